"""``python -m pipeline.eda``: see :mod:`pipeline.eda`."""
from . import main

if __name__ == "__main__":
    raise SystemExit(main())
