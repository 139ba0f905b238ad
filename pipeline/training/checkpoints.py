"""Checkpoints: weights as safetensors with a JSON sidecar, and the exact-resume state; every write atomic."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core.utils import atomic_path, write_json
from pipeline.rundir import ModelDir


def save_checkpoint(folder: ModelDir, kind: str, model: nn.Module, meta: dict) -> None:
    """Weights as safetensors plus a JSON sidecar (``kind``: best, last, last_ema); both written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder.weights(kind)) as tmp:
        save_file(state, str(tmp))
    write_json(folder.meta(kind), meta)


def weights_intact(path: Path) -> bool:
    """True when ``path`` is a complete safetensors file (its header covers the file exactly: a truncated
    or garbled file fails); reads only the header."""
    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
        return True
    except Exception:  # noqa: BLE001 - SafetensorError, OSError, ...: not usable either way
        return False


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load a safetensors checkpoint; a damaged one is an error naming the file and the stage to re-run."""
    try:
        state = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - SafetensorError and OSError: the file is not usable
        raise ValueError(f"{path} is damaged ({err}): re-run the train stage (it retrains that fold)") from None
    model.load_state_dict(state)
    return model


def save_state(path: Path, state: dict) -> None:
    """The resume state (tensors, numbers, random streams), atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    """A resume state, with ``weights_only``: a file cannot run code."""
    return torch.load(path, map_location="cpu", weights_only=True)
