"""``python -m pipeline.augment --config CFG --preview``: see :mod:`pipeline.augment.preview`."""
from .preview import main

if __name__ == "__main__":
    raise SystemExit(main())
