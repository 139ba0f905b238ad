"""The precision and memory format a run trains and predicts in: the configured one, or the bench's fastest."""
from __future__ import annotations

from typing import Optional

import torch

from pipeline.core.config import Config
from pipeline.core.utils import device_name, read_json, resolve_precision
from pipeline.rundir import RunDir


def compute_settings(cfg: Config, device: torch.device) -> tuple[Optional[torch.dtype], bool]:
    """(autocast dtype, channels_last) for training and inference. ``train.precision: bench`` takes the fastest
    setting ``python -m pipeline.bench`` measured for this experiment on this device (its ``best_floor`` in
    ``runs/<experiment>/bench.json``) instead of the configured guess."""
    precision, channels_last = cfg.train.precision, cfg.train.channels_last
    if precision == "bench":
        path = RunDir.of(cfg).bench
        if not path.is_file():
            raise FileNotFoundError(f"train.precision: bench reads {path}: run `python -m pipeline.bench --config "
                                    "CONFIG` for this experiment on this machine first")
        record = read_json(path)
        if record.get("device") != device_name(device):
            raise ValueError(f"train.precision: bench: {path} was measured on {record.get('device')!r}, not on "
                             f"{device_name(device)!r}: run the bench here again")
        best = record["best_floor"]  # e.g. "bf16_channels_last", "fp32"
        precision, channels_last = best.split("_")[0], best.endswith("_channels_last")
    return resolve_precision(precision, device), channels_last and device.type != "mps"
