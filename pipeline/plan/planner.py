"""The planner behind ``recipe: auto``: which members to train, chosen from the EDA's facts and timed on this
machine to fit a budget, written to ``runs/<experiment>/plan.json`` before anything trains.

:func:`pipeline.eda.suggest.family` picks the family from the EDA's facts (a median short side of at most 64 px:
small images, else photos). A family is a list of members in a fixed order of expected gain per minute
(:data:`FAMILIES`), each a set of overrides on the family's base config (:func:`base_config`) trained in its own
run folder, ``<experiment>`` for the first and ``<experiment>-<member>`` for the others:

* ``small`` (the loaded config as written, configs/default.yaml: ``airnet_tiny`` from scratch): ``base`` (with a
  budget for as many epochs as fit, 8 to 40; it makes way when ``long`` fits the budget alone);
  ``long``, ``airnet_small`` with configs/cifar10-small-scratch.yaml's recipe for as many epochs as the budget
  leaves (10 to 40: below 10 epochs the compact CNN trained longer does better in the same minutes);
  ``long-seed2``, the same with another seed (a second seed gains less).
* ``photos`` (configs/photos.yaml with the loaded config's competition keys and the ``--set`` overrides on top):
  ``lp``, frozen Lite0 features (seconds for hundreds of photos); ``partial``, configs/photos.yaml's default:
  Lite0's last 3 blocks tuned on cached activations (2 epochs, 1 where only one fits); ``lite2``, frozen Lite2
  features at 260 px; ``crops``, Lite0 features with 2 random-resized-crop views per training image;
  ``partial-seed2``. Where ``lp`` scores :data:`EASY_OOF` or more, ``lite2`` and ``crops`` go before ``partial``
  (:func:`adapt`).

Without a budget only the first member runs. With one, each member's minutes are estimated (:class:`Estimator`:
its backbone at its input size timed on random tensors, the train stage's recipe for a few steps, the decoder on
a few source images, :mod:`pipeline.core.timing`; seconds in all), and members are taken in order while they fit
what the budget leaves after a reserve for the ensemble, the results page and the submission; once the first
is done, the others are re-fitted to the time actually left. While members run,
:func:`skip_reason` re-checks the clock before each one: a member that overran its estimate, or a spent budget,
stops further members, and what finished is ensembled (hill climbing on the OOF) and submitted.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from pipeline.core.config import Config, from_dict, load_config, to_dict, with_values
from pipeline.core.jobs import training_slot
from pipeline.core.timing import minutes
from pipeline.core.utils import device_name, read_json, resolve_device, write_json
from pipeline.eda.suggest import Facts
from pipeline.plan.costs import Estimate, Estimator
from pipeline.rundir import RunDir, read_cv

log = logging.getLogger(__name__)

PHOTOS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "photos.yaml"
# the loaded config's keys that describe the competition rather than the recipe: the photos family keeps them
COMPETITION_KEYS = ("root", "train_csv", "id_col", "label_col", "group_col", "train_dir", "test_dir",
                    "sample_submission", "cache_dir", "subset", "subset_seed", "num_workers", "csv_encoding",
                    "max_pixels", "allow_formula_cells")
KEPT = ("experiment", "seed", "runs_dir", "folds", "submit", "eda")  # where results go and how the CV splits

RESERVE_S, RESERVE_SHARE = 30.0, 0.03  # kept for the ensemble, results and submission: 30 s + 3% of the budget
OVERRUN, OVERRUN_SLACK_S = 1.5, 30.0  # a member taking over 1.5 x its estimate + 30 s stops further members
# photos whose frozen Lite0 features score this OOF accuracy or more are close to ImageNet: there a larger frozen
# backbone gains more than fine-tuning (Caltech-36: Lite2 features 0.988, partial 0.979 against Lite0's 0.978;
# hymenoptera 0.971, 0.939 against 0.947), where on harder photos fine-tuning does (clothing: 0.804, Lite2 0.734
# against 0.727)
EASY_OOF = 0.90
EASY_ORDER = ("lite2", "crops", "partial", "partial-seed2")


@dataclass(frozen=True)
class Member:
    """One candidate of a family: overrides on the family's base config, and why it is there."""
    name: str
    why: str
    overrides: dict = field(default_factory=dict)
    epochs: Optional[tuple[int, int]] = None  # train.epochs fitted to the time left, within these bounds
    seed_offset: int = 0  # seed = the base config's + this
    yields: bool = False  # with a budget, the first member makes way when the next one fits the budget alone


FEATURES = {"train.mode": "features"}
PARTIAL = {"train.mode": "partial"}  # configs/photos.yaml's default: the last 3 blocks, 2 epochs
# configs/cifar10-small-scratch.yaml's recipe for airnet_small: larger batches, more smoothing, the flip view
# (``basic`` trains with flips), and the last epoch kept so its OOF is unbiased beside the other members'
LONG = {"model.name": "airnet_small", "train.batch_size": 128, "train.label_smoothing": 0.2, "train.monitor": "last",
        "infer.tta": ["identity", "hflip"]}
FAMILIES: dict[str, list[Member]] = {
    "small": [
        Member("base", "the config as written: a compact CNN from scratch, the fastest strong start, with a budget "
               "for as many epochs as fit", epochs=(8, 40), yields=True),
        Member("long", "a larger CNN (airnet_small) trained as long as the budget allows: the largest gain",
               LONG, epochs=(10, 40)),
        Member("long-seed2", "the larger CNN again with another seed: ensembling two seeds", LONG, epochs=(10, 40),
               seed_offset=1),
    ],
    "photos": [
        Member("lp", "frozen ImageNet Lite0 features and a logistic regression: strong in minutes", FEATURES),
        Member("partial", "Lite0's last 3 blocks tuned on cached activations: most of a fine-tune's gain", PARTIAL,
               epochs=(1, 2)),
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


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The plan as written to ``plan.json`` (``record``), each step's config, and what :func:`adapt` re-fits
    with."""
    record: dict
    configs: list[Config]
    path: Path
    lead: int = 0  # the step of the member that runs first (1 where the family's first made way)
    family: str = "small"
    base: Optional[Config] = None
    budget_s: Optional[float] = None
    estimate: Optional[Estimate] = None

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
    members, lead, steps, configs = FAMILIES[family], 0, [], []
    yielded = _yields(members, base, budget_s, elapsed, estimate)
    if yielded:
        lead, cfg = 1, member_config(base, members[0], first=False)
        steps.append(_step(members[0], cfg, base, None, "dropped", yielded))
        configs.append(cfg)
    more_steps, more_configs = _fit_members(members[lead:], base, budget_s, elapsed, estimate, [], first=True)
    steps, configs = steps + more_steps, configs + more_configs
    record = {"version": 1, "experiment": base.experiment, "data_root": str(Path(base.data.root).resolve()),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), "family": family, "why": why, "facts": facts.as_dict(),
              "budget_min": minutes(budget_s), "reserve_min": minutes(budget_s and reserve(budget_s)),
              "planning_min": minutes(elapsed()), "device": device_name(resolve_device(base.train.device)),
              "steps": steps, "adapted": None, "stopped": None, "ensemble": None, "submission": None,
              "total_min": None}
    return Plan(record, configs, RunDir.of(base).plan, lead, family, base, budget_s, estimate)


def _yields(members: list[Member], base: Config, budget_s: Optional[float], elapsed: Callable[[], float],
            estimate: Optional[Estimate]) -> Optional[str]:
    """Why the family's first member makes way for the second (it ``yields`` and the second, at its fewest
    epochs, fits the whole budget: the larger member gains more per minute), or None."""
    if budget_s is None or estimate is None or not members[0].yields or len(members) < 2:
        return None
    second = members[1]
    cfg = member_config(base, second, True, second.epochs[0] if second.epochs else None)
    needed, left = estimate(cfg, []).seconds(cfg.train.epochs), budget_s - elapsed() - reserve(budget_s)
    if needed > left:
        return None
    return f"{second.name} fits the budget on its own ({needed / 60:.1f} of {left / 60:.1f} min) and gains more"


def _step(member: Member, cfg: Config, base: Config, est_s: Optional[float], status: str, note: Optional[str]) -> dict:
    """A plan step as ``plan.json`` records it."""
    return {"member": member.name, "experiment": cfg.experiment, "why": member.why,
            "overrides": _overrides(base, cfg), "estimated_min": minutes(est_s), "status": status,
            "note": note or "", "actual_min": None, "oof": None}


def _fit_members(members: list[Member], base: Config, budget_s: Optional[float], elapsed: Callable[[], float],
                 estimate: Optional[Estimate], planned: list[Config], first: bool) -> tuple[list[dict], list[Config]]:
    """(steps, configs) of ``members`` fitted in order to what is left after ``planned`` (extended in place);
    ``first``: ``members[0]`` is the plan's first member, planned whatever it costs."""
    steps, configs, spent = [], [], 0.0

    def left() -> Optional[float]:
        return None if budget_s is None else budget_s - elapsed() - reserve(budget_s) - spent

    for i, member in enumerate(members):
        cfg, est_s, note = _fit(base, member, first and i == 0, left, planned, estimate, budget_s is not None)
        status = "planned" if (first and i == 0) or (note is None and budget_s is not None) else "dropped"
        if status == "planned":
            planned.append(cfg)
            spent += est_s or 0.0
        steps.append(_step(member, cfg, base, est_s, status, note))
        configs.append(cfg)
    return steps, configs


def adapt(plan: Plan, elapsed_s: float) -> None:
    """Once the first member is done (with a budget): the other members re-fitted to the time actually left,
    and for photos, where the frozen Lite0 features already score :data:`EASY_OOF` or more (data close to
    ImageNet's), the larger frozen backbone and the crop views moved before fine-tuning."""
    lead = plan.lead
    if plan.budget_s is None or plan.estimate is None or plan.steps[lead]["status"] != "done" or plan.record["stopped"]:
        return
    members = FAMILIES[plan.family][lead + 1:]
    accuracy = (plan.steps[lead]["oof"] or {}).get("accuracy")
    note = f"the members after {plan.steps[lead]['member']} re-fitted to the time left"
    if plan.family == "photos" and accuracy is not None and accuracy >= EASY_OOF:
        members = sorted(members, key=lambda m: EASY_ORDER.index(m.name))
        note += (f"; its OOF {accuracy:.3f} >= {EASY_OOF}: frozen ImageNet features already fit this data, so a "
                 "larger frozen backbone and crop views go before fine-tuning")
    steps, configs = _fit_members(members, plan.base, plan.budget_s, lambda: elapsed_s, plan.estimate,
                                  [plan.configs[lead]], first=False)
    plan.record["steps"][lead + 1:], plan.configs[lead + 1:] = steps, configs
    plan.record["adapted"] = note
    plan.save()
    log.info("plan: %s\n  %s", note, table(plan.record))


def _fit(base: Config, member: Member, first: bool, left: Callable[[], Optional[float]], planned: list[Config],
         estimate: Optional[Estimate], budgeted: bool) -> tuple[Config, Optional[float], Optional[str]]:
    """(member's config, estimated seconds, why it is dropped or None); ``left()``: the seconds left once the
    member is measured."""
    if not first and not budgeted:
        return member_config(base, member, first), None, "without --budget only the first member runs"
    if estimate is None:  # without a budget: the settings as written
        return member_config(base, member, first), None, None
    cfg = member_config(base, member, first, member.epochs[1] if member.epochs else None)
    cost, remaining = estimate(cfg, planned), left()
    if remaining is None or (first and not member.epochs):
        return cfg, cost.seconds(cfg.train.epochs), None
    if member.epochs and cost.per_epoch > 0:  # as many epochs as fit, or the fewest it takes to say what it needs
        epochs = min(member.epochs[1], int((remaining - cost.fixed) // cost.per_epoch))
        cfg = member_config(base, member, first, max(epochs, member.epochs[0]))
    needed = cost.seconds(cfg.train.epochs)
    if needed > remaining and not first:
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
    adapted = f"\n  ({record['adapted']})" if record.get("adapted") else ""
    return f"plan: {record['family']} ({budget}): {record['why']}{adapted}\n  " + "\n  ".join(rows)


def _num(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def estimator(facts: Facts, cfg: Config) -> Estimator:
    """The measuring estimator on the device the members will train on (:func:`planned` sets their threads)."""
    return Estimator(facts, resolve_device(cfg.train.device))


def planned(family: str, why: str, base: Config, facts: Facts, budget_s: Optional[float],
            elapsed: Callable[[], float], estimate: Optional[Estimate] = None) -> Plan:
    """:func:`make_plan` measured on this machine when there is a budget (``estimate`` given: those estimates
    instead), written to ``plan.json`` and logged as a table."""
    with training_slot(base, "plan") as threads:
        torch.set_num_threads(threads)
        if estimate is None and budget_s is not None:  # without a budget nothing is fitted: no measuring
            estimate = estimator(facts, base)
        plan = make_plan(family, why, base, facts, budget_s, elapsed, estimate)
    plan.save()
    log.info("%s\n  written to %s", table(plan.record), plan.path)
    return plan
