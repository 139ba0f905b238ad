"""The search space: Optuna parameters → an architecture spec and config values → a trial's Config.

The space is static (every trial suggests every parameter), which suits NSGA-II and multivariate TPE;
:func:`trial_config` maps a parameter dict to a Config deterministically, so a finished trial (or a row of
``pareto.csv``) always rebuilds the same model and settings. Parameters a block does not use (Pass, the
expansion of a Conv) are ignored, and a stride is dropped to 1 once the downsampling cap is reached.
"""
from __future__ import annotations

import re
from typing import Any

import optuna

from pipeline.models.arch import HEADS, POOLS, load_spec
from pipeline.core.config import ArchSpaceConfig, Config, ConfigError, SearchConfig, with_values

# objective name → Optuna direction
OBJECTIVES = {"accuracy": "maximize", "macro_f1": "maximize", "params": "minimize", "macs": "minimize",
              "latency_ms": "minimize"}
DISTRIBUTIONS = ("uniform", "log_uniform", "int", "choice")


def check_search(search: SearchConfig) -> None:
    """Clear errors for unknown objectives, constraint metrics, distribution kinds and seed specs outside the space."""
    for name in list(search.objectives) + list(search.constraints) + list(search.hv_reference):
        if name not in OBJECTIVES:
            raise ConfigError(f"search: unknown objective/metric '{name}'; valid: {', '.join(OBJECTIVES)}")
    if len(set(search.objectives)) != len(search.objectives) or not search.objectives:
        raise ConfigError(f"search.objectives: must be distinct and non-empty, got {search.objectives}")
    for key, dist in search.space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"search.space.{key}: expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, "
                              f"got {dist!r}")
    for key, chosen, valid in (("pools", search.arch.pools, POOLS), ("heads", search.arch.heads, HEADS)):
        if not chosen or set(chosen) - set(valid):  # else every trial would fail building its spec
            raise ConfigError(f"search.arch.{key}: expected names from {list(valid)}, got {chosen}")
    for spec in search.seed_specs:  # before any data is read: a seed the space cannot sample is a config error
        spec_params(load_spec(spec), search.arch)


def check_same_space(study: optuna.Study, search: SearchConfig) -> None:
    """Refuse a stored study whose parameters the configured space redefines incompatibly (other categorical
    choices, another kind): Optuna would fail every new trial of it with "dynamic value space"."""
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(0)).ask()
    suggest(probe, search)
    current = probe.distributions
    for trial in study.get_trials(deepcopy=False):
        for name, old in trial.distributions.items():
            if name not in current:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(old, current[name])
            except ValueError:
                raise ConfigError(f"search: study '{study.study_name}' sampled '{name}' from {old} (trial "
                                  f"{trial.number}); the config now gives {current[name]}. Optuna cannot change "
                                  "that in a study: set search.study_name (or another experiment) for a new "
                                  "one") from None


def suggest(trial: optuna.Trial, search: SearchConfig) -> dict:
    """Ask the trial for every parameter of the space; returns ``trial.params``."""
    if search.arch.enabled:
        suggest_arch(trial, search.arch)
    for key, dist in search.space.items():
        (kind, args), = dist.items()
        if kind == "choice":
            trial.suggest_categorical(key, list(args))
        elif kind == "int":
            trial.suggest_int(key, int(args[0]), int(args[1]), step=int(args[2]) if len(args) > 2 else 1)
        else:
            trial.suggest_float(key, float(args[0]), float(args[1]), log=kind == "log_uniform")
    return dict(trial.params)


def suggest_arch(trial: optuna.Trial, space: ArchSpaceConfig) -> None:
    trial.suggest_categorical("width", list(space.width_multipliers))
    trial.suggest_categorical("depth", list(space.depth_multipliers))
    trial.suggest_categorical("pool", list(space.pools))
    trial.suggest_categorical("head", list(space.heads))
    for i, channels in enumerate(space.channels):
        types = [t for t in space.types if t != "Pass"] if i == 0 else list(space.types)
        trial.suggest_categorical(f"b{i}_type", types)
        trial.suggest_int(f"b{i}_repeats", int(space.repeats[0]), int(space.repeats[1]))
        trial.suggest_categorical(f"b{i}_out", list(channels))
        trial.suggest_categorical(f"b{i}_kernel", list(space.kernels))
        trial.suggest_categorical(f"b{i}_stride", [1, 2])
        trial.suggest_categorical(f"b{i}_expansion", list(space.expansions))
        trial.suggest_categorical(f"b{i}_se", [False, True])
        trial.suggest_categorical(f"b{i}_act", ["relu", "hard_swish"])


def arch_spec(params: dict, space: ArchSpaceConfig, image_size: int) -> dict:
    """The architecture spec the ``b<i>_*`` parameters describe, strides capped at ``max_downsample``."""
    cap = space.max_downsample or max(1, image_size // 4)
    blocks, down = [], 1
    for i in range(len(space.channels)):
        kind = params[f"b{i}_type"]
        if kind == "Pass":
            blocks.append({"type": "Pass"})
            continue
        stride = 2 if params[f"b{i}_stride"] == 2 and down * 2 <= cap else 1
        down *= stride
        block = {"type": kind, "repeats": int(params[f"b{i}_repeats"]), "out": int(params[f"b{i}_out"]),
                 "kernel": int(params[f"b{i}_kernel"]), "stride": stride}
        if kind.startswith("InvertedResidual"):
            block["expansion"] = float(params[f"b{i}_expansion"])
        if kind in ("DWConv", "InvertedResidualv3"):
            block["se"] = bool(params[f"b{i}_se"])
        if kind == "InvertedResidualv3":
            block["act"] = params[f"b{i}_act"]
        blocks.append(block)
    return {"width_multiplier": float(params["width"]), "depth_multiplier": float(params["depth"]),
            "max_downsample": cap, "pool": params.get("pool", "avg"), "head": params.get("head", "linear"),
            "blocks": blocks}


def spec_params(spec: dict, space: ArchSpaceConfig) -> dict:
    """The trial parameters that :func:`arch_spec` turns back into ``spec`` (its blocks padded with Pass to the
    space's slots), for enqueueing a hand-made design; a value the space cannot sample is an error naming it."""
    blocks = list(spec["blocks"])
    if len(blocks) > len(space.channels):
        raise ConfigError(f"search.seed_specs: {len(blocks)} blocks, but the space has {len(space.channels)} slots")
    blocks += [{"type": "Pass"}] * (len(space.channels) - len(blocks))
    params = {"width": float(spec.get("width_multiplier", 1.0)), "depth": float(spec.get("depth_multiplier", 1.0)),
              "pool": spec.get("pool", "avg"), "head": spec.get("head", "linear")}
    choices = {"width": space.width_multipliers, "depth": space.depth_multipliers, "pool": space.pools,
               "head": space.heads}
    for i, block in enumerate(blocks):
        params.update({f"b{i}_type": block["type"], f"b{i}_repeats": int(block.get("repeats", space.repeats[0])),
                       f"b{i}_out": int(block.get("out", space.channels[i][0])),
                       f"b{i}_kernel": int(block.get("kernel", space.kernels[0])),
                       f"b{i}_stride": int(block.get("stride", 1)),
                       f"b{i}_expansion": float(block.get("expansion", space.expansions[0])),
                       f"b{i}_se": bool(block.get("se", False)), f"b{i}_act": block.get("act") or "relu"})
        choices.update({f"b{i}_type": space.types, f"b{i}_out": space.channels[i], f"b{i}_kernel": space.kernels,
                        f"b{i}_expansion": space.expansions, f"b{i}_act": ["relu", "hard_swish"],
                        f"b{i}_repeats": range(int(space.repeats[0]), int(space.repeats[1]) + 1)})
    for key, allowed in choices.items():
        if params[key] not in list(allowed):
            raise ConfigError(f"search.seed_specs: {key}={params[key]!r} is outside the space ({list(allowed)})")
    return params


def trial_config(cfg: Config, params: dict, epochs: int | None = None) -> Config:
    """``cfg`` with a trial's parameters applied: the spec inline in ``model.spec``, the other keys set."""
    values: dict[str, Any] = {key: params[key] for key in cfg.search.space if key in params}
    if cfg.search.arch.enabled:
        values["model.spec"] = arch_spec(params, cfg.search.arch, cfg.data.image_size)
    if epochs is not None:
        values["train.epochs"] = epochs
    return with_values(cfg, values)


def reference_overrides(ref: str | dict) -> dict:
    """A ``search.references`` entry as config values: a model name, or a mapping of dotted keys that names
    ``model.name`` and the settings the reference trains with (``{model.name: resnet18, model.stem_stride: 1}``)."""
    return {"model.name": ref} if isinstance(ref, str) else dict(ref)


def reference_label(ref: str | dict) -> str:
    """The entry's name in tables, figures and file names: the model, then each other setting's last key part
    and value (``resnet18-stem_stride1``)."""
    values = reference_overrides(ref)
    parts = [str(values["model.name"])] + [f"{k.rsplit('.', 1)[-1]}{v}" for k, v in values.items()
                                           if k != "model.name"]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(parts))


def reference_config(cfg: Config, ref: str | dict, epochs: int | None = None) -> Config:
    """A reference's training config: the study's config with the reference's model and settings instead of a
    searched spec, at ``epochs`` (default ``train.epochs``: what ``best/*.yaml`` train at)."""
    values: dict[str, Any] = {"model.spec": None, **reference_overrides(ref)}
    if epochs is not None:
        values["train.epochs"] = epochs
    return with_values(cfg, values)


def check_references(cfg: Config) -> None:
    """Each ``search.references`` entry names a model and only settings the config has (a one-line error)."""
    labels = []
    for ref in cfg.search.references:
        if not isinstance(ref, str) and not (isinstance(ref, dict) and isinstance(ref.get("model.name"), str)):
            raise ConfigError(f"search.references: expected a model name or a mapping with model.name, got {ref!r}")
        reference_config(cfg, ref)
        labels.append(reference_label(ref))
    if len(set(labels)) != len(labels):
        raise ConfigError(f"search.references: two entries share a name ({labels})")
