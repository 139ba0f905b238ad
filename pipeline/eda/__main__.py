"""``python -m pipeline.eda``: see :mod:`pipeline.eda.stage`."""
from pipeline.eda.stage import main

if __name__ == "__main__":
    raise SystemExit(main())
