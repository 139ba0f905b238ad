"""Typed, frozen configuration loaded from YAML.

Every run is described by one :class:`Config`, assembled from the sections in :mod:`pipeline.core.sections`.
YAML files in ``configs/`` are loaded into these dataclasses; unknown keys and wrong types are errors that name
the key, and ``--set section.key=value`` overrides are applied (and type-checked) before anything runs. The
resolved config is written into the run folder and into every checkpoint, so any result can be traced back to
the settings that made it.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from pipeline.core.sections import (NON_NEGATIVE, ArchSpaceConfig, AugmentConfig, ConfigError, DataConfig, EdaConfig,
                                    EnsembleConfig, FoldsConfig, InferConfig, Limit, ModelConfig, SearchConfig,
                                    SubmitConfig, TrainConfig, check_limits)

__all__ = ["ConfigError", "DataConfig", "FoldsConfig", "ModelConfig", "AugmentConfig", "TrainConfig",
           "InferConfig", "EnsembleConfig", "SubmitConfig", "EdaConfig", "ArchSpaceConfig", "SearchConfig",
           "Config", "changed", "from_dict", "load_config", "parse_override", "to_dict", "to_yaml", "with_values",
           "yaml_error"]


@dataclass(frozen=True)
class Config:
    SECTION: ClassVar[str] = ""  # the top level: its keys are named without a section
    LIMITS: ClassVar[dict[str, Limit]] = {"seed": NON_NEGATIVE}
    experiment: str = "demo"
    seed: int = 42
    runs_dir: str = "runs"
    # manual: run this config as written; auto: pipeline.full chooses the recipe from the data and the machine
    # (and --budget), starting from these settings (pipeline/plan/)
    recipe: Literal["manual", "auto"] = "manual"
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    eda: EdaConfig = field(default_factory=EdaConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        check_limits(self)
        if self.augment.flip == "alternate" and self.data.loader != "device":
            raise ConfigError("augment.flip: alternate is only supported by data.loader: device "
                              f"(got data.loader: {self.data.loader})")

    @property
    def run_dir(self) -> Path:
        """The folder every stage of this experiment reads from and writes to."""
        return Path(self.runs_dir) / self.experiment


# --------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked against the type hint ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                if isinstance(value, (list, tuple)) and typing.get_origin(arg) in (list, tuple):
                    raise  # a list with a bad item: name the item
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return _build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 3e-4 as a string; YAML 1.2 and everyone else: a float
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ConfigError(f"unknown key(s) {', '.join(repr(prefix + '.' + u if prefix else u) for u in unknown)} "
                          f"in {where}; valid keys: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    return cls(**kwargs)


# --------------------------------------------------------------------------- loading


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is parsed as YAML (``3`` → int, ``[a, b]`` → list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({yaml_error(err)}); quote it or fix "
                          "its brackets") from None


def yaml_error(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (line and column), without the echoed source."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return " ".join(str(err).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    context = getattr(err, "context", None)
    return f"{context + ': ' if context else ''}{problem}{where}"


def from_dict(values: dict, overrides: list[str] = ()) -> Config:
    """Build a :class:`Config` from a plain mapping plus ``section.key=value`` overrides."""
    tree = _deep_copy(values or {})
    for text in overrides:
        _set_path(tree, *parse_override(text))
    return _build(Config, tree)


def with_values(cfg: Config, values: dict) -> Config:
    """``cfg`` with dotted keys set (``{"train.lr": 0.1}``), type-checked like ``--set`` overrides."""
    tree = to_dict(cfg)
    for key, value in values.items():
        _set_path(tree, key, value)
    return _build(Config, tree)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (defaults when ``path`` is None) and apply overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {yaml_error(err)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    try:
        return from_dict(values, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None


def to_dict(cfg: Config) -> dict:
    """The config as plain data (what is saved next to every result)."""
    return dataclasses.asdict(cfg)


def changed(cfg: Config, keys) -> dict[str, Any]:
    """Those of the dotted ``keys`` (``train.lr``) that ``cfg`` sets away from their defaults, with their values."""
    ours, default = to_dict(cfg), to_dict(Config())
    return {key: _get(ours, key) for key in keys if _get(ours, key) != _get(default, key)}


def _get(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _deep_copy(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _deep_copy(v) for k, v in values.items()}
    if isinstance(values, list):
        return [_deep_copy(v) for v in values]
    return values
