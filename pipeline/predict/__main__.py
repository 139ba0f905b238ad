"""``python -m pipeline.predict``: the predict stage (:mod:`pipeline.predict.stage`), offline."""
import os

# predicting never downloads: a backbone whose weights are not on this machine is an error, not a fetch
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.predict.stage import main  # noqa: E402 - after the offline switch, which the hub reads on import

raise SystemExit(main())
