"""Every training mode by name (``train.mode``): the registry filled by importing each mode's module, and the
check of a config against its mode that the stages run before anything else.

============  ======================================================================================
``finetune``  the whole network per fold on images (:class:`pipeline.training.fold.FinetuneMode`)
``features``  a head per fold on cached frozen embeddings (:class:`pipeline.training.features.FeaturesMode`)
``partial``   the last blocks per fold on cached activations (:class:`pipeline.training.partial.PartialMode`)
============  ======================================================================================

A new mode is one module registering a :class:`~pipeline.training.mode.TrainMode` subclass, imported here.
"""
from __future__ import annotations

import dataclasses
import logging
import sys

from pipeline.core.config import AugmentConfig, Config, ConfigError, TrainConfig
from pipeline.models.engines import onnxruntime_module
from pipeline.training import features, fold, partial  # noqa: F401 - each module registers its mode
from pipeline.training.mode import TRAIN_MODES, TrainMode
from pipeline.training.recipe import refuse

log = logging.getLogger(__name__)


def training_mode(cfg: Config) -> TrainMode:
    """``cfg``'s training mode; a ConfigError names an unknown one (with the valid names) or a setting the mode
    cannot honour (:attr:`TrainMode.refused`)."""
    try:
        mode = TRAIN_MODES.build(cfg.train.mode)
    except KeyError as err:
        raise ConfigError(f"train.mode: {err.args[0]}") from None
    refuse(cfg, f"train.mode={mode.name}", mode.refused)
    if mode.cache_key(cfg) is not None and cfg.infer.engine == "onnxruntime":
        onnxruntime_module(required=True)  # its frozen passes need the package: say so before anything runs
    return mode


def check(cfg: Config) -> TrainMode:
    """:func:`training_mode`, and one log line naming the settings the mode has no use for."""
    mode = training_mode(cfg)
    unused = mode.unused_set(cfg)
    if unused:
        log.info("train.mode=%s does not use %s (settings of a training loop, e.g. for another mode)", mode.name,
                 ", ".join(unused))
    return mode


def settings_table() -> str:
    """Which ``train.*`` and ``augment.*`` settings each mode honours, refuses or does not use, as Markdown (the
    table in docs/MODES.md)."""
    names = TRAIN_MODES.names()
    built = {name: TRAIN_MODES.build(name) for name in names}
    keys = [f"{section}.{f.name}" for section, kind in (("train", TrainConfig), ("augment", AugmentConfig))
            for f in dataclasses.fields(kind) if f.name != "mode"]
    lines = ["| setting | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in keys:
        cells = ["refused" if key in m.refused else "not used" if key in m.unused else "yes" for m in built.values()]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    """``python -m pipeline.training.modes``: print :func:`settings_table`."""
    sys.stdout.write(settings_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
