"""The planner behind ``recipe: auto``: which members to train, chosen from the EDA's facts and timed on this
machine to fit a budget, written to ``runs/<experiment>/plan.json`` before anything trains.

:func:`pipeline.eda.suggest.family` picks the family from the EDA's facts (a median short side of at most 64 px:
small images, else photos). A family is a list of members in a fixed order of expected gain per minute
(:data:`FAMILIES`), each a set of overrides on the family's base config (:func:`base_config`) trained in its own
run folder, ``<experiment>`` for the first and ``<experiment>-<member>`` for the others:

* ``small`` (the loaded config as written, configs/default.yaml: ``airnet_tiny`` from scratch): ``base``;
  ``long``, ``airnet_small`` for as many epochs as the budget leaves (10 to 40: a larger model trained longer
  gains most); ``long-seed2``, the same with another seed (a second seed gains less).
* ``photos`` (configs/photos.yaml with the loaded config's competition keys and the ``--set`` overrides on top):
  ``lp``, frozen Lite0 features (seconds for hundreds of photos); ``partial``, configs/photos.yaml's default:
  Lite0's last 3 blocks tuned on cached activations; ``lite2``, frozen Lite2 features at 260 px; ``crops``, Lite0 features with 2
  random-resized-crop views per training image; ``partial-seed2``.

Without a budget only the first member runs. With one, each member's minutes are estimated (:class:`Estimator`:
its backbone at its input size timed on random tensors, the train stage's recipe for a few steps, the decoder on
a few source images, :mod:`pipeline.core.timing`; seconds in all), and members are taken in order while they fit
what the budget leaves after a reserve for the ensemble, the results page and the submission. While members run,
:func:`skip_reason` re-checks the clock before each one: a member that overran its estimate, or a spent budget,
stops further members, and what finished is ensembled (hill climbing on the OOF) and submitted.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from pipeline import bench
from pipeline.core.config import Config, from_dict, load_config, to_dict, with_values
from pipeline.core.jobs import training_slot
from pipeline.core.timing import Effort, minutes, timed
from pipeline.core.utils import autocast, device_name, read_json, resolve_device, write_json
from pipeline.data.cache import cache_side
from pipeline.eda.suggest import Facts
from pipeline.evaluation.tta import configured_views
from pipeline.models.factory import create_model
from pipeline.rundir import RunDir, read_cv
from pipeline.training.features import train_views
from pipeline.training.partial import split_backbone
from pipeline.training.precision import compute_settings

log = logging.getLogger(__name__)

PHOTOS_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "photos.yaml"
# the loaded config's keys that describe the competition rather than the recipe: the photos family keeps them
COMPETITION_KEYS = ("root", "train_csv", "id_col", "label_col", "group_col", "train_dir", "test_dir",
                    "sample_submission", "cache_dir", "subset", "subset_seed", "num_workers", "csv_encoding",
                    "max_pixels", "allow_formula_cells")
KEPT = ("experiment", "seed", "runs_dir", "folds", "submit", "eda")  # where results go and how the CV splits

SAFETY = 1.2  # floors timed on random tensors run ahead of a real run (first batches, loaders, bookkeeping)
MEMBER_OVERHEAD_S = 5.0  # a member's stage start-ups, folds and tables
FOLD_OVERHEAD_S = 2.0  # a fold's model building and checkpoints
HEAD_S = (1.0, 1e-3)  # a feature head per fold: 1 s + 1 ms per training row and view (logistic regression)
RESERVE_S, RESERVE_SHARE = 30.0, 0.03  # kept for the ensemble, results and submission: 30 s + 3% of the budget
OVERRUN, OVERRUN_SLACK_S = 1.5, 30.0  # a member taking over 1.5 x its estimate + 30 s stops further members
DECODE_SAMPLE = 48  # source images decoded to time the preprocess stage
EFFORT = Effort(batches=4, seconds=3.0)  # each timed measurement
MEASURE_BATCH = 16  # images per timed pass of a pretrained backbone's parts (partial fine-tuning)
MEASURE_PIXELS = 64 * 64 * 64  # a timed forward pass: about this many pixels (256 images at 32 px, 8 at 224)


@dataclass(frozen=True)
class Member:
    """One candidate of a family: overrides on the family's base config, and why it is there."""
    name: str
    why: str
    overrides: dict = field(default_factory=dict)
    epochs: Optional[tuple[int, int]] = None  # train.epochs fitted to the time left, within these bounds
    seed_offset: int = 0  # seed = the base config's + this


FEATURES = {"train.mode": "features"}
PARTIAL = {"train.mode": "partial"}  # configs/photos.yaml's default: the last 3 blocks, 2 epochs
LONG = {"model.name": "airnet_small"}
FAMILIES: dict[str, list[Member]] = {
    "small": [
        Member("base", "the config as written: a compact CNN from scratch, the fastest strong start"),
        Member("long", "a larger CNN (airnet_small) trained as long as the budget allows: the largest gain",
               LONG, epochs=(10, 40)),
        Member("long-seed2", "the larger CNN again with another seed: ensembling two seeds", LONG, epochs=(10, 40),
               seed_offset=1),
    ],
    "photos": [
        Member("lp", "frozen ImageNet Lite0 features and a logistic regression: strong in minutes", FEATURES),
        Member("partial", "Lite0's last 3 blocks tuned on cached activations: most of a fine-tune's gain", PARTIAL),
        Member("lite2", "frozen Lite2 features at 260 px: another, larger backbone",
               {**FEATURES, "model.name": "tf_efficientnet_lite2", "data.image_size": 260}),
        Member("crops", "Lite0 features with 2 random-resized-crop views per training image: augmentation",
               {**FEATURES, "train.crop_views": 2}),
        Member("partial-seed2", "the partial fine-tune with another seed: ensembling two seeds", PARTIAL,
               seed_offset=1),
    ],
}


# --------------------------------------------------------------------------- the members' configs


def base_config(family: str, loaded: Config, overrides: list[str], photos: Path = PHOTOS_CONFIG) -> Config:
    """The family's first member: ``small``, the loaded config as it is; ``photos``, configs/photos.yaml with the
    loaded config's competition keys, experiment, seed, folds and output folders, then ``overrides``."""
    if family == "small":
        return loaded
    values = {f"data.{key}": getattr(loaded.data, key) for key in COMPETITION_KEYS}
    values.update({key: to_dict(loaded)[key] for key in KEPT})
    values["recipe"] = "auto"
    return from_dict(to_dict(with_values(load_config(photos), values)), overrides)


def member_config(base: Config, member: Member, first: bool, epochs: Optional[int] = None) -> Config:
    """``member``'s config: ``base`` with its overrides (and fitted ``epochs``) in ``<experiment>-<member>``; the
    first member is ``base`` itself."""
    values = dict(member.overrides)
    if member.seed_offset:
        values["seed"] = base.seed + member.seed_offset
    if epochs is not None:
        values["train.epochs"] = epochs
    if first and not values:
        return base
    return with_values(base, {**values, "experiment": base.experiment if first else f"{base.experiment}-{member.name}"})


def final_config(first: Config, others: list[Config]) -> Config:
    """The ensemble, results and submission config in the first member's folder: every finished member,
    weighted by hill climbing on the OOF when there are several."""
    if not others:
        return first
    return with_values(first, {"ensemble.members": [str(c.run_dir) for c in others], "ensemble.method": "hill_climb"})


# --------------------------------------------------------------------------- estimates


@dataclass(frozen=True)
class Cost:
    """A member's seconds: ``fixed`` plus ``per_epoch`` for each training epoch."""
    fixed: float
    per_epoch: float = 0.0

    def seconds(self, epochs: int) -> float:
        return self.fixed + self.per_epoch * epochs


Estimate = Callable[[Config, list[Config]], Cost]  # (member, members planned before it) -> its cost


def member_views(cfg: Config) -> tuple[list[str], list[str]]:
    """(training views, test views) a member embeds or caches: the head trains on every training view."""
    return train_views(cfg), configured_views(cfg.infer)


def synthetic(classes: int, rows: int, side: int) -> dict:
    """Random uint8 images and labels shaped like the bench's data (what its measurements take)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (rows, side, side, 3), dtype=np.uint8)
    manifest = {"classes": [str(c) for c in range(classes)], "mean": [0.5] * 3, "std": [0.25] * 3}
    return {"images": images, "test": images, "labels": (np.arange(rows) % classes).astype(np.int64),
            "manifest": manifest, "num_classes": classes}


class Estimator:
    """Seconds per member on this machine, from throughputs measured once each (:data:`EFFORT`) and the EDA's
    image counts; work a member shares with one planned before it (decoded images, embeddings, cached
    activations of the same backbone, size and view) is not counted twice."""

    def __init__(self, facts: Facts, device: torch.device, effort: Effort = EFFORT) -> None:
        self.facts, self.device, self.effort = facts, device, effort
        self.rates: dict[tuple, float] = {}

    def __call__(self, cfg: Config, planned: list[Config]) -> Cost:
        before = set().union(*(self.work(c) for c in planned))
        cost = COSTS[cfg.train.mode](self, cfg, before)
        decode = ("decode", cache_side(cfg.data.image_size, cfg.data.crop_pct), cfg.data.resize)
        preprocess = 0.0 if decode in before else (self.facts.images + self.facts.test_images) / self.decode_rate(cfg)
        return Cost(SAFETY * (cost.fixed + preprocess) + MEMBER_OVERHEAD_S, SAFETY * cost.per_epoch)

    def work(self, cfg: Config) -> set[tuple]:
        """What a member leaves cached for later ones: decoded images and, per view, embeddings or activations."""
        side = cache_side(cfg.data.image_size, cfg.data.crop_pct)
        keys = {("decode", side, cfg.data.resize)}
        if cfg.train.mode != "finetune":
            train, test = member_views(cfg)
            keys |= {self.view_key(cfg, split, v) for split, views in (("train", train), ("test", test)) for v in views}
        return keys

    @staticmethod
    def view_key(cfg: Config, split: str, view: str) -> tuple:
        cut = cfg.train.tune_blocks if cfg.train.mode == "partial" else None
        return (cfg.train.mode, cfg.model.name, cfg.data.image_size, cut, split, view)

    def new_images(self, cfg: Config, before: set[tuple]) -> float:
        """Images × views a features or partial member still has to embed or cache."""
        train, test = member_views(cfg)
        count = {"train": self.facts.images, "test": self.facts.test_images}
        return float(sum(count[split] for split, views in (("train", train), ("test", test)) for v in views
                         if self.view_key(cfg, split, v) not in before))

    def rate(self, key: tuple, measure: Callable[[], float]) -> float:
        """A throughput, measured once per key."""
        if key not in self.rates:
            self.rates[key] = max(measure(), 1e-3)
            log.info("plan: %s %.1f/s", " ".join(map(str, key)), self.rates[key])
        return self.rates[key]

    def decode_rate(self, cfg: Config) -> float:
        return self.rate(("decode img",), lambda: bench.preprocess_rate(cfg, DECODE_SAMPLE) or 50.0)

    def forward_rate(self, cfg: Config) -> float:
        """Images/s of the member's model forward at its input size (the bench's inference floor)."""
        batch = int(min(cfg.infer.batch_size, max(8, MEASURE_PIXELS // cfg.data.image_size ** 2)))

        def measure() -> float:
            probe = with_values(cfg, {"infer.batch_size": batch})
            data = synthetic(self.facts.classes, batch, cfg.data.image_size)
            return bench.tta_floor(probe, data, self.device, *compute_settings(cfg, self.device), self.effort)
        return self.rate(("forward img", cfg.model.name, cfg.data.image_size), measure)

    def train_rate(self, cfg: Config) -> float:
        """Images/s of the train stage's recipe and loader on random images (the bench's training pipeline)."""
        def measure() -> float:
            probe = with_values(cfg, {"train.head_init": "random"})
            side = cache_side(cfg.data.image_size, cfg.data.crop_pct)
            data = synthetic(self.facts.classes, cfg.train.batch_size * (self.effort.batches + 5), side)
            return bench.train_pipeline(probe, data, self.device, *compute_settings(cfg, self.device), self.effort)
        key = ("train img", cfg.model.name, str(cfg.model.spec), cfg.data.image_size, cfg.train.batch_size,
               cfg.augment.policy, cfg.data.loader)
        return self.rate(key, measure)

    def partial_rates(self, cfg: Config) -> tuple[float, float, float]:
        """Images/s of the frozen front, and of the tuned back's training step and forward pass."""
        key = ("partial img", cfg.model.name, cfg.data.image_size, cfg.train.tune_blocks, cfg.train.batch_size)
        if key + ("front",) not in self.rates:
            front, step, back = measure_partial(cfg, self.facts.classes, self.device, self.effort)
            self.rates.update({key + ("front",): front, key + ("step",): step, key + ("back",): back})
            log.info("plan: %s front %.1f, back step %.1f, back forward %.1f img/s", " ".join(map(str, key)),
                     front, step, back)
        return self.rates[key + ("front",)], self.rates[key + ("step",)], self.rates[key + ("back",)]


def measure_partial(cfg: Config, classes: int, device: torch.device, effort: Effort) -> tuple[float, float, float]:
    """Time ``train.mode: partial``'s parts on random tensors: the frozen front's forward, the back's
    forward + backward + AdamW step on a training batch of activations, and its forward alone."""
    model = create_model(cfg.model, classes).to(device).eval()
    front, back = split_backbone(model, cfg.train.tune_blocks)
    dtype = compute_settings(cfg, device)[0]
    x = torch.randn(MEASURE_BATCH, 3, cfg.data.image_size, cfg.data.image_size, device=device)

    @torch.no_grad()
    def forward_front() -> int:
        with autocast(device, dtype):
            front(x)
        return len(x)

    front_rate = timed(forward_front, 1, effort)
    with torch.no_grad(), autocast(device, dtype):
        acts = front(x).float()
    acts = acts.repeat(math.ceil(cfg.train.batch_size / len(acts)), 1, 1, 1)[:cfg.train.batch_size]
    labels = torch.arange(len(acts), device=device) % classes
    optimizer = torch.optim.AdamW(back.parameters(), lr=1e-4)

    def step() -> int:
        back.train()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(back(acts), labels).backward()
        optimizer.step()
        return len(acts)

    @torch.no_grad()
    def forward_back() -> int:
        back.eval()
        back(acts)
        return len(acts)

    return front_rate, timed(step, 1, effort), timed(forward_back, 1, effort)


def finetune_cost(est: Estimator, cfg: Config, before: set[tuple]) -> Cost:
    """Every fold trains on the others each epoch and scores its own; infer predicts the held-out rows and the
    test set per fold under every TTA view."""
    n, t, k = est.facts.images, est.facts.test_images, cfg.folds.n_splits
    train, forward = est.train_rate(cfg), est.forward_rate(cfg)
    views = len(configured_views(cfg.infer))
    return Cost((n + k * t) * views / forward + k * FOLD_OVERHEAD_S, n * (k - 1) / train + n / forward)


def features_cost(est: Estimator, cfg: Config, before: set[tuple]) -> Cost:
    """Every image embedded once per view not embedded before, then a head per fold."""
    k, rows, new = cfg.folds.n_splits, est.facts.images * len(member_views(cfg)[0]), est.new_images(cfg, before)
    head = HEAD_S[0] + HEAD_S[1] * rows * (k - 1) / k
    return Cost((new / est.forward_rate(cfg) if new else 0.0) + k * (head + FOLD_OVERHEAD_S))


def partial_cost(est: Estimator, cfg: Config, before: set[tuple]) -> Cost:
    """The front once per image and view not cached before; per fold the linear probe's pass over the training
    rows' views, then each epoch a training pass over the other folds' rows and one over its own, and the
    held-out rows and test set under every TTA view."""
    n, t, k = est.facts.images, est.facts.test_images, cfg.folds.n_splits
    train, test = member_views(cfg)
    new = est.new_images(cfg, before)
    front, step, back = est.partial_rates(cfg)
    probe = (k - 1) * n * len(train) / back if cfg.train.head_init == "linear_probe" else 0.0
    fixed = new / front + probe + (n + k * t) * len(test) / back + k * FOLD_OVERHEAD_S
    return Cost(fixed, n * (k - 1) / step + n / back)


COSTS: dict[str, Callable[[Estimator, Config, set], Cost]] = {
    "finetune": finetune_cost, "features": features_cost, "partial": partial_cost}


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The plan as written to ``plan.json`` (``record``) and each step's config."""
    record: dict
    configs: list[Config]
    path: Path

    @property
    def steps(self) -> list[dict]:
        return self.record["steps"]

    def save(self) -> None:
        write_json(self.path, self.record)


def reserve(budget_s: float) -> float:
    """Seconds kept from the budget for the ensemble, the results page and the submission."""
    return RESERVE_S + RESERVE_SHARE * budget_s


def make_plan(family: str, why: str, base: Config, facts: Facts, budget_s: Optional[float],
              elapsed: Callable[[], float], estimate: Optional[Estimate]) -> Plan:
    """Every member of the family as a step: the first always planned; with a budget the next ones while their
    estimate fits what is left (``elapsed()`` seconds already spent, measuring included, and :func:`reserve`
    kept), a member with fitted epochs taking as many as fit; without one, only the first (``estimate`` None:
    nothing measured)."""
    steps, configs, planned, spent = [], [], [], 0.0

    def left() -> Optional[float]:
        return None if budget_s is None else budget_s - elapsed() - reserve(budget_s) - spent

    for i, member in enumerate(FAMILIES[family]):
        cfg, est_s, note = _fit(base, member, i == 0, left, planned, estimate, budget_s is not None)
        status = "planned" if i == 0 or (note is None and budget_s is not None) else "dropped"
        if status == "planned":
            planned.append(cfg)
            spent += est_s or 0.0
        steps.append({"member": member.name, "experiment": cfg.experiment, "why": member.why,
                      "overrides": _overrides(base, cfg), "estimated_min": minutes(est_s), "status": status,
                      "note": note or "", "actual_min": None, "oof": None})
        configs.append(cfg)
    record = {"version": 1, "experiment": base.experiment, "data_root": str(Path(base.data.root).resolve()),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), "family": family, "why": why, "facts": facts.as_dict(),
              "budget_min": minutes(budget_s), "reserve_min": minutes(budget_s and reserve(budget_s)),
              "planning_min": minutes(elapsed()), "device": device_name(resolve_device(base.train.device)),
              "steps": steps, "stopped": None, "ensemble": None, "submission": None, "total_min": None}
    return Plan(record, configs, RunDir.of(base).plan)


def _fit(base: Config, member: Member, first: bool, left: Callable[[], Optional[float]], planned: list[Config],
         estimate: Optional[Estimate], budgeted: bool) -> tuple[Config, Optional[float], Optional[str]]:
    """(member's config, estimated seconds, why it is dropped or None); ``left()``: the seconds left once the
    member is measured."""
    if not first and not budgeted:
        return member_config(base, member, first), None, "without --budget only the first member runs"
    cfg = member_config(base, member, first, member.epochs[1] if member.epochs else None)
    if estimate is None:
        return cfg, None, None
    cost, remaining = estimate(cfg, planned), left()
    if first or remaining is None:
        return cfg, cost.seconds(cfg.train.epochs), None
    if member.epochs and cost.per_epoch > 0:
        epochs = min(member.epochs[1], int((remaining - cost.fixed) // cost.per_epoch))
        if epochs >= member.epochs[0]:
            cfg = member_config(base, member, first, epochs)
    needed = cost.seconds(cfg.train.epochs)
    if needed > remaining:
        return cfg, needed, f"needs {needed / 60:.1f} min, {max(remaining, 0) / 60:.1f} min left"
    return cfg, needed, None


def _overrides(base: Config, cfg: Config) -> dict:
    """The dotted keys where ``cfg`` differs from ``base`` (what the member changes)."""
    ours, theirs = _flat(to_dict(cfg)), _flat(to_dict(base))
    return {key: value for key, value in ours.items() if theirs.get(key) != value and key != "experiment"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- while it runs


def skip_reason(plan: Plan, i: int, elapsed_s: float) -> Optional[str]:
    """Why step ``i`` (not the first) no longer runs, or None: an earlier member overran or failed its
    estimate, the budget is spent, or the step's estimate does not fit the time left."""
    if plan.record.get("stopped"):
        return f"not run: {plan.record['stopped']}"
    budget = plan.record["budget_min"]
    if budget is None:
        return None
    left = budget * 60 - reserve(budget * 60) - elapsed_s
    estimated = (plan.steps[i]["estimated_min"] or 0) * 60
    if left <= 0:
        return "not run: the budget is spent"
    if estimated > left:
        return f"not run: needs {estimated / 60:.1f} min, {left / 60:.1f} min left"
    return None


def start_step(plan: Plan, i: int, skipped: Optional[str]) -> None:
    """Mark step ``i`` running, or skipped for the reason given, before its stages start."""
    plan.steps[i].update({"status": "skipped", "note": skipped} if skipped else {"status": "running"})
    plan.save()


def finish_step(plan: Plan, i: int, actual_s: float, ok: bool, elapsed_s: float) -> None:
    """Record step ``i``'s minutes and OOF score; an overrun or a spent budget stops further members."""
    step, cfg = plan.steps[i], plan.configs[i]
    step.update(status="done" if ok else "failed", actual_min=minutes(actual_s), oof=oof_score(cfg) if ok else None)
    estimated = (step["estimated_min"] or 0) * 60
    budget = plan.record["budget_min"]
    if budget is not None and step["estimated_min"] is not None and actual_s > OVERRUN * estimated + OVERRUN_SLACK_S:
        plan.record["stopped"] = (f"{step['member']} took {actual_s / 60:.1f} min against {estimated / 60:.1f} "
                                  "estimated: later estimates are not trusted")
    elif budget is not None and elapsed_s >= budget * 60 - reserve(budget * 60):
        plan.record["stopped"] = "the budget is spent"
    plan.save()


def oof_score(cfg: Config) -> Optional[dict]:
    """A member's OOF accuracy and log loss (with TTA when infer scored it)."""
    cv = read_cv(cfg.run_dir)
    found = cv.get("oof_tta") or cv.get("oof")
    if not found:
        return None
    return {"accuracy": found["accuracy"], "log_loss": found["log_loss"], "tta": "oof_tta" in cv}


def finish_ensemble(plan: Plan, final: Config) -> None:
    """Record the ensemble's method, weights and (nested) OOF score."""
    path = RunDir.of(final).ensemble_json
    report = read_json(path) if path.is_file() else {}
    plan.record["ensemble"] = {"method": report.get("method"), "weights": report.get("member_weights"),
                               "oof": report.get("oof"), "oof_scoring": report.get("oof_scoring")}
    plan.save()


def finish_run(plan: Plan, submission: Optional[Path], total_s: float) -> None:
    """Record the submission (None: a final stage failed) and the whole run's minutes."""
    plan.record.update(submission=None if submission is None else str(submission), total_min=minutes(total_s))
    plan.save()


def table(record: dict) -> str:
    """The plan as a text table for the log: each step's estimated and actual minutes, OOF and status."""
    head = f"{'member':<14} {'experiment':<28} {'est. min':>8} {'actual':>8} {'OOF acc':>8}  status"
    rows = [head] + [f"{s['member']:<14} {s['experiment']:<28} {_num(s['estimated_min']):>8} "
                     f"{_num(s['actual_min']):>8} {_num((s['oof'] or {}).get('accuracy'), 4):>8}  {s['status']}"
                     + (f" ({s['note']})" if s["note"] else "") for s in record["steps"]]
    budget = "no budget" if record["budget_min"] is None else f"budget {record['budget_min']:g} min"
    return f"plan: {record['family']} ({budget}): {record['why']}\n  " + "\n  ".join(rows)


def _num(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def estimator(facts: Facts, cfg: Config) -> Estimator:
    """The measuring estimator on the device the members will train on (:func:`planned` sets their threads)."""
    return Estimator(facts, resolve_device(cfg.train.device))


def planned(family: str, why: str, base: Config, facts: Facts, budget_s: Optional[float],
            elapsed: Callable[[], float], estimate: Optional[Estimate] = None) -> Plan:
    """:func:`make_plan` measured on this machine (``estimate`` given: those estimates instead), written to
    ``plan.json`` and logged as a table."""
    with training_slot(base, "plan") as threads:
        torch.set_num_threads(threads)
        plan = make_plan(family, why, base, facts, budget_s, elapsed, estimate or estimator(facts, base))
    plan.save()
    log.info("%s\n  written to %s", table(plan.record), plan.path)
    return plan
