"""What a finished run predicts its test set with, read from its folder without writing to it.

A run's submission is its ``ensemble.csv`` when its ensemble stage ran, else its ``test_probs.csv``
(:func:`pipeline.submit.predictions`); :func:`load_recipe` rebuilds the recipe behind that table:

* the members: the run itself, or the experiments its ``ensemble.json`` lists (an ensemble config's or a plan's),
  found beside the run folder first (a run folder copied elsewhere, e.g. a Kaggle dataset, keeps its siblings),
  else where they were written;
* each member's models: every ``fold<k>/`` the infer stage predicted (``test.npy``), each with the TTA views it
  kept (``test.json``: ``infer.tta``, or what ``infer.tta: auto`` chose), and its refit model as
  ``ensemble.refit`` combined it (:func:`pipeline.ensemble.model_shares`);
* the combination (:class:`Combination`): the ensemble's member weights as the ensemble stage fitted them on the
  OOF (hill climbing's picks, set weights, an equal mean), a stacker re-fitted on the same OOF tables (it is
  deterministic), and the calibration temperature.

A :class:`Recipe` is plain data (:meth:`Recipe.to_dict`): an export writes it beside its graphs
(:mod:`pipeline.export`), and predicting from the graphs reads it back.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from scipy.special import expit, softmax

from pipeline.core.config import Config, ConfigError, DataConfig, EnsembleConfig, from_dict, load_config, \
    with_values
from pipeline.core.utils import read_json
from pipeline.ensemble import ENSEMBLERS, Stack, load_oof, model_shares, trained_with_refit
from pipeline.evaluation.calibration import with_temperature
from pipeline.rundir import ModelDir, RunDir, file_sha1, load_manifest

log = logging.getLogger(__name__)

# settings a prediction may change: where and how fast it runs, never what it computes
RUNTIME_KEYS = ("infer.batch_size", "infer.engine", "train.device", "train.threads")
DATA_KEYS = ("id_col", "sample_submission", "test_dir", "csv_encoding", "max_pixels")  # how a new test folder is read
PRECISIONS = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "None": "fp32"}  # infer's record -> setting


@dataclass
class Model:
    """One network of a member: a fold's (``fold`` k) or the refit's (None), with the TTA views it predicts
    under; ``graph`` names its exported ONNX file."""
    fold: Optional[int]
    views: list[str]
    graph: Optional[str] = None

    @property
    def name(self) -> str:
        return f"fold{self.fold}" if self.fold is not None else "refit"


@dataclass
class Member:
    """One experiment of the recipe: its models, each one's share of it, and how its images are decoded
    (``size`` px, ``resize``; the network sees the centre ``image_size``). ``dir``, ``cfg`` and ``manifest``: its
    run folder (None when read from an export); ``manifest`` also holds the new splits its predictors read."""
    name: str
    size: int
    resize: str
    image_size: int
    models: list[Model]
    shares: list[float]
    dir: Optional[Path] = None
    cfg: Optional[Config] = None
    manifest: Optional[dict] = None
    cache: Optional[Path] = None  # the run's own data.cache_dir (its frozen passes' graphs and engine records)

    @property
    def geometry(self) -> tuple[int, str]:
        return self.size, self.resize


@dataclass
class Combination:
    """How the members' models combine into one probability table: ``soft`` (weighted mean) or ``hard`` (vote)
    with ``weights`` per member, or ``stack`` (the fitted stacker's parameters), then ``temperature``."""
    method: str
    weights: list[float]
    temperature: Optional[float] = None
    stack: Optional[dict] = None

    def __call__(self, member_probs: list[list[np.ndarray]], shares: list[list[float]]) -> np.ndarray:
        if self.method == "stack":
            probs = stack_predict(self.stack, [np.tensordot(np.asarray(s), np.stack(p), axes=1)
                                               for p, s in zip(member_probs, shares)])
        else:
            ens = EnsembleConfig(method=self.method, weights=list(self.weights))
            probs = ENSEMBLERS.build(self.method, ens, len(member_probs)).predict_folds(member_probs, shares)
        return with_temperature(probs, self.temperature) if self.temperature else probs


@dataclass
class Recipe:
    """Everything a prediction needs besides the networks: members, combination, the class list and how the
    submission is written (the first member's id and label columns, ``submit.format``, data settings)."""
    classes: list[str]
    id_col: str
    label_col: str
    submit_format: str
    data: DataConfig
    members: list[Member]
    combination: Combination
    table: str = ""  # the run's table this recipe reproduces (ensemble.csv or test_probs.csv)
    notes: list[str] = field(default_factory=list)

    def models(self) -> int:
        return sum(len(m.models) for m in self.members)

    def to_dict(self) -> dict:
        """The recipe as JSON-ready data (without run folders and configs)."""
        members = [{"name": m.name, "size": m.size, "resize": m.resize, "image_size": m.image_size,
                    "models": [dataclasses.asdict(x) for x in m.models], "shares": list(map(float, m.shares))}
                   for m in self.members]
        return {"classes": self.classes, "id_col": self.id_col, "label_col": self.label_col,
                "submit_format": self.submit_format, "data": {k: getattr(self.data, k) for k in DATA_KEYS},
                "members": members, "combination": dataclasses.asdict(self.combination), "table": self.table}

    @classmethod
    def from_dict(cls, values: dict) -> "Recipe":
        members = [Member(m["name"], m["size"], m["resize"], m["image_size"], [Model(**x) for x in m["models"]],
                          m["shares"]) for m in values["members"]]
        return cls(values["classes"], values["id_col"], values["label_col"], values["submit_format"],
                   dataclasses.replace(DataConfig(), **values["data"]), members,
                   Combination(**values["combination"]), values.get("table", ""))


def stack_params(stack: Stack) -> dict:
    """A fitted :class:`pipeline.ensemble.Stack` as numbers: the members it keeps, its scaler and its
    logistic regression."""
    return {"keep": list(stack.keep), "mean": stack.scaler.mean_.tolist(), "scale": stack.scaler.scale_.tolist(),
            "coef": stack.model.coef_.tolist(), "intercept": stack.model.intercept_.tolist(),
            "classes": stack.model.classes_.tolist()}


def stack_predict(params: dict, probs: list[np.ndarray]) -> np.ndarray:
    """:meth:`pipeline.ensemble.Stack.predict` from :func:`stack_params`: the logistic regression's probabilities
    (a sigmoid for two classes, else a softmax) on the kept members' standardised log-probabilities."""
    x = (Stack.features([probs[i] for i in params["keep"]]) - np.asarray(params["mean"])) / np.asarray(params["scale"])
    decision = x @ np.asarray(params["coef"]).T + np.asarray(params["intercept"])
    if decision.shape[1] == 1:
        p = expit(decision[:, 0])
        proba = np.column_stack([1 - p, p])
    else:
        proba = softmax(decision, axis=1)
    out = np.zeros((len(probs[0]), probs[0].shape[1]))
    out[:, params["classes"]] = proba
    return out


# --------------------------------------------------------------------------- reading a run folder


def member_config(run_dir: Path, runtime: dict) -> Config:
    """A member's saved ``config.yaml``, pointed at the folder where it is now, with the ``runtime`` settings."""
    return with_values(saved_config(run_dir), {"runs_dir": str(run_dir.parent), "experiment": run_dir.name,
                                               **runtime})


def saved_config(run_dir: Path) -> Config:
    """The config a run saved (``config.yaml``), as it is."""
    path = RunDir(run_dir).config
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a run folder the pipeline trained")
    return load_config(path)


def kept_views(model: ModelDir) -> list[str]:
    """The TTA views the infer stage predicted the test set of ``model`` with (its ``test.json``); a warning when
    the weights changed since (the run's own predictions are then stale)."""
    path = model.predictions("test").with_suffix(".json")
    try:
        record = read_json(path)
        views, key = list(record["tta"]), record.get("key", {})
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is missing or damaged: re-run the run's infer stage") from None
    if key.get("weights_sha1") and key["weights_sha1"] != file_sha1(model.weights("best")):
        log.warning("%s: its weights changed since the infer stage: the run's own test predictions are stale",
                    model.root)
    return views


def member_models(run_dir: Path, refit: bool, ens: EnsembleConfig) -> tuple[list[Model], list[float]]:
    """The models of one member as its test predictions were made (every predicted fold, the refit as
    ``ens.refit`` says) and each one's share."""
    run = RunDir(run_dir)
    folds = [m for m in run.fold_models() if m.predictions("test").is_file()]
    if not folds:
        raise FileNotFoundError(f"{run_dir} has no fold*/test.npy: run its infer stage first")
    models = [Model(m.fold, kept_views(m)) for m in folds]
    if refit:
        refit_dir = run.model(None)
        if not refit_dir.predictions("test").is_file():
            raise FileNotFoundError(f"{run_dir} was trained with train.refit but has no refit/test.npy: run its "
                                    "infer stage")
        models = ([] if ens.refit == "instead" else models) + [Model(None, kept_views(refit_dir))]
    return models, model_shares(len(folds), refit, ens).tolist()


def load_member(run_dir: Path, refit: bool, ens: EnsembleConfig, runtime: dict) -> Member:
    """One member read from its run folder (config, manifest, models)."""
    cfg = member_config(run_dir, runtime)
    if cfg.train.precision == "bench":  # the bench's pick was made on the training machine: infer's record
        recorded = read_json(RunDir(run_dir).fold_models()[0].predictions("test").with_suffix(".json"))
        cfg = with_values(cfg, {"train.precision": PRECISIONS.get(recorded["key"]["precision"], "fp32")})
    manifest = dict(load_manifest(run_dir))
    models, shares = member_models(run_dir, refit, ens)
    size = manifest.get("cache_size", manifest["test"]["size"])
    return Member(run_dir.name, size, manifest.get("resize", "squash"), manifest["image_size"], models, shares,
                  run_dir, cfg, manifest, Path(saved_config(run_dir).data.cache_dir))


def member_dir(written: str, run_dir: Path, own: str) -> Path:
    """Where the ensemble member recorded as ``written`` is now: the run itself, a folder of that name beside
    it, or the path as written."""
    if written == own:
        return run_dir
    for candidate in (run_dir.parent / Path(written).name, Path(written)):
        if RunDir(candidate).manifest.is_file():
            return candidate
    raise FileNotFoundError(f"ensemble member {written}: no run folder beside {run_dir} nor at {written} (copy the "
                            "members' run folders beside it)")


def ensemble_settings(report: dict, cfg: Config) -> EnsembleConfig:
    """The ensemble stage's settings: as ``ensemble.json`` records them, else the run's config with the method
    it records (a plan's final ensemble hill-climbs whatever its config says)."""
    settings = report.get("settings") or {**dataclasses.asdict(cfg.ensemble), "method": report["method"]}
    try:
        return from_dict({"ensemble": settings}).ensemble
    except ConfigError as err:
        raise ValueError(f"ensemble.json: {err}") from None


def combination(report: Optional[dict], members: list[Member], ens: EnsembleConfig) -> Combination:
    """The ensemble stage's combination of ``members`` (``report``: its ``ensemble.json``, whose member weights
    are keyed by the members' folder names as written; None: the folds' mean of one run)."""
    if report is None:
        return Combination("soft", [1.0])
    temperature = (report.get("calibration") or {}).get("temperature")
    if ens.method == "stack":
        stack = fitted_stack(members, ens)
        return Combination("stack", stack.weights.tolist(), temperature, stack_params(stack))
    weights = [report["member_weights"][Path(written).name] for written in report["members"]]
    return Combination("hard" if ens.method == "hard" else "soft", weights, temperature)


def fitted_stack(members: list[Member], ens: EnsembleConfig) -> Stack:
    """The stacker re-fitted on the members' OOF tables as the ensemble stage fitted it."""
    dicts = [{"dir": m.dir, "oof": RunDir(m.dir).oof_table()} for m in members]
    oof = load_oof(dicts, members[0].manifest["classes"], same_folds=True)
    if oof is None:
        raise FileNotFoundError("ensemble.method=stack: a member's OOF table (oof_tta.csv or oof.csv) is missing "
                                "or incomplete: the stacker cannot be re-fitted")
    return Stack(ens, len(members)).fit(oof["probs"], oof["labels"], oof["folds"])


def load_recipe(run_dir: str | Path, runtime: Optional[dict] = None) -> Recipe:
    """The recipe behind ``run_dir``'s submission table (see the module's docstring); ``runtime``: settings of
    :data:`RUNTIME_KEYS` for every member."""
    run_dir, runtime = Path(run_dir), dict(runtime or {})
    cfg = member_config(run_dir, runtime)
    run = RunDir(run_dir)
    report = read_json(run.ensemble_json) if run.ensemble_json.is_file() and run.ensemble_csv.is_file() else None
    if report is None:  # the submission is test_probs.csv: the mean of the fold models
        ens = EnsembleConfig()
        members = [load_member(run_dir, False, ens, runtime)]
    else:
        ens = ensemble_settings(report, cfg)
        own = str(saved_config(run_dir).run_dir)
        dirs = [member_dir(m, run_dir, own) for m in report["members"]]
        members = [load_member(d, trained_with_refit(d), ens, runtime) for d in dirs]
    classes = members[0].manifest["classes"]
    for m in members[1:]:
        if m.manifest["classes"] != classes:
            raise ValueError(f"ensemble member {m.dir} has classes {m.manifest['classes']}, not {classes}")
    manifest = members[0].manifest
    return Recipe(classes, manifest["id_col"], manifest["label_col"], cfg.submit.format, cfg.data, members,
                  combination(report, members, ens), "ensemble.csv" if report else "test_probs.csv")
