"""``python -m pipeline.models --download NAME``: see :func:`pipeline.models.factory.main`."""
from pipeline.models.factory import main

if __name__ == "__main__":
    raise SystemExit(main())
