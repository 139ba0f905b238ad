"""``python -m pipeline.search``: see :mod:`pipeline.search.study`."""
from pipeline.search.study import main

if __name__ == "__main__":
    raise SystemExit(main())
