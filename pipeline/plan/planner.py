"""The planner behind ``recipe: auto``: which members to train (:mod:`pipeline.plan.members`: a family chosen
from the EDA's facts), timed on this machine to fit a budget, written to ``runs/<experiment>/plan.json`` before
anything trains, and carried on by a later invocation of the same command (:mod:`pipeline.plan.ledger`).

Without a budget only the first member runs. With one, each member's minutes are estimated (:class:`Estimator`:
its backbone at its input size timed on random tensors through the engine it will run, the train stage's recipe
for a few steps, the decoder on a few source images; seconds in all) and members are taken in order while they
fit what the budget leaves after a reserve for the ensemble, the results page and the submission. A budget too
small for the first member is refused, naming the smallest that fits. After every member the ones not yet done
are re-fitted (:func:`refit`) to the time actually left, their estimates corrected by how long the finished
members took against their own estimates (:func:`correction`), so a misjudged machine or a passing load shifts
the next choices instead of dropping members for good; before each member :func:`skip_reason` re-checks the
clock. Every member after the first proves itself on its first fold before its other folds train
(:mod:`pipeline.plan.screen`): one that does not improve the ensemble of the finished members there, or whose
other folds (timed by its first) no longer fit, is stopped, and its time goes to the next. What finished is
ensembled (hill climbing on the OOF) and submitted.

Minutes count across invocations: ``plan.json`` records the minutes spent at every save, and a rerun after a
kill charges what the earlier invocations spent, resumes the member they left running at its fold and epoch and
keeps the finished ones; a finished plan run again trains nothing and writes the same submission.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from pipeline.core.config import Config, ConfigError
from pipeline.core.jobs import training_slot
from pipeline.core.timing import minutes
from pipeline.core.utils import device_name, read_json, resolve_device, write_json
from pipeline.eda.suggest import Facts
from pipeline.plan import ledger
from pipeline.plan.costs import Cost, Estimate, Estimator
from pipeline.plan.members import (FAMILIES, Member, base_config, final_config, member_config,  # noqa: F401
                                   overrides_of, protections)
from pipeline.rundir import RunDir, read_cv

log = logging.getLogger(__name__)

RESERVE_S, RESERVE_SHARE = 30.0, 0.03  # kept for the ensemble, results and submission: 30 s + 3% of the budget
CORRECTION = (0.25, 4.0)  # the bounds of the factor finished members' timings put on the next estimates
EVIDENCE_MIN = 1.0  # estimated minutes of finished members it takes to apply their factor in full


# --------------------------------------------------------------------------- the plan


def _no_time() -> float:
    return 0.0


@dataclass
class Plan:
    """The plan as written to ``plan.json`` (``record``), each step's config, and what :func:`refit` re-fits with:
    the budget, the estimates, the keys the user fixed, and the seconds spent (``prior_s`` by earlier
    invocations, ``elapsed()`` by this one)."""
    record: dict
    configs: list[Config]
    path: Path
    lead: int = 0  # the step of the member that runs first (1 where the family's first made way)
    family: str = "small"
    base: Optional[Config] = None
    budget_s: Optional[float] = None
    estimate: Optional[Estimate] = None
    fixed: frozenset = frozenset()
    prior_s: float = 0.0
    elapsed: Callable[[], float] = _no_time

    @property
    def steps(self) -> list[dict]:
        return self.record["steps"]

    def spent(self) -> float:
        """Seconds spent on this plan so far, earlier invocations included: what counts against the budget."""
        return self.prior_s + self.elapsed()

    def left(self) -> Optional[float]:
        """Seconds the budget leaves after what is spent and the final stages' reserve (None: no budget)."""
        budget = self.record["budget_min"]
        return None if budget is None else budget * 60 - reserve(budget * 60) - self.spent()

    def save(self) -> None:
        if isinstance(self.estimate, Estimator):
            self.record["rates"] = ledger.rates_out(self.estimate.rates)
        ledger.stamp(self.record, self.spent())
        write_json(self.path, self.record)


def reserve(budget_s: float) -> float:
    """Seconds kept from the budget for the ensemble, the results page and the submission."""
    return RESERVE_S + RESERVE_SHARE * budget_s


def make_plan(family: str, why: str, base: Config, facts: Facts, budget_s: Optional[float],
              elapsed: Callable[[], float], estimate: Optional[Estimate], overrides: Sequence[str] = ()) -> Plan:
    """Every member of the family as a step: the first always planned (a budget too small for it refused);
    with a budget the next ones while their estimate fits what is left (``elapsed()`` seconds already spent,
    measuring included, and :func:`reserve` kept), a member with fitted epochs taking as many as fit; without
    one, only the first (``estimate`` None: nothing measured). ``overrides``: the user's ``--set``, whose keys
    every member keeps."""
    fixed = ledger.user_keys(overrides)
    members, lead, steps, configs = FAMILIES[family], 0, [], []
    yielded = _yields(members, base, budget_s, elapsed, estimate, fixed)
    if yielded:
        lead, cfg = 1, member_config(base, members[0], first=False, fixed=fixed)
        steps.append(_step(members[0], cfg, base, None, "dropped", yielded))
        configs.append(cfg)
    more_steps, more_configs = _fit_members(members[lead:], base, budget_s, elapsed, estimate, [], True, fixed)
    steps, configs = steps + more_steps, configs + more_configs
    record = {"version": ledger.VERSION, "experiment": base.experiment, "data_root": str(Path(base.data.root).resolve()),
              "created": time.strftime("%Y-%m-%d %H:%M:%S"), "family": family, "why": why, "facts": facts.as_dict(),
              "overrides": list(overrides), "budget_min": minutes(budget_s), "reserve_min": minutes(budget_s and reserve(budget_s)),
              "planning_min": minutes(elapsed()), "device": device_name(resolve_device(base.train.device)),
              "steps": steps, "adapted": None, "resumed": None, "stopped": None, "cv": [], "ensemble": None,
              "submission": None, "total_min": None}
    plan = Plan(record, configs, RunDir.of(base).plan, lead, family, base, budget_s, estimate, fixed, 0.0, elapsed)
    _refuse_small_budget(plan)
    return plan


def _refuse_small_budget(plan: Plan) -> None:
    """A one-line refusal when the first member's estimate, with the time already spent and the final stages'
    reserve, does not fit the budget: it names the smallest budget that does."""
    step = plan.steps[plan.lead]
    if plan.budget_s is None or step["estimated_min"] is None:
        return
    needed = plan.spent() + 60 * step["estimated_min"] + RESERVE_S
    if needed + RESERVE_SHARE * plan.budget_s <= plan.budget_s:
        return
    smallest = math.ceil(needed / (1 - RESERVE_SHARE) / 60)
    raise ConfigError(f"--budget {plan.budget_s / 60:g}m is too small here: the first member ({step['member']}) "
                      f"needs about {step['estimated_min']:.1f} min on this machine, {needed / 60:.1f} with the "
                      f"planning and the final stages: give --budget {smallest}m or more")


def _yields(members: list[Member], base: Config, budget_s: Optional[float], elapsed: Callable[[], float],
            estimate: Optional[Estimate], fixed: frozenset) -> Optional[str]:
    """Why the family's first member makes way for the second (it ``yields`` and the second, at its fewest
    epochs, fits the whole budget: the larger member gains more per minute), or None."""
    if budget_s is None or estimate is None or not members[0].yields or len(members) < 2:
        return None
    second = members[1]
    cfg = member_config(base, second, True, second.epochs[0] if second.epochs else None, fixed)
    needed, left = estimate(cfg, []).seconds(cfg.train.epochs), budget_s - elapsed() - reserve(budget_s)
    if needed > left:
        return None
    return f"{second.name} fits the budget on its own ({needed / 60:.1f} of {left / 60:.1f} min) and gains more"


def _step(member: Member, cfg: Config, base: Config, est: Optional[tuple[float, float, float]], status: str,
          note: Optional[str], correction: float = 1.0) -> dict:
    """A plan step as ``plan.json`` records it: ``est``, the estimated seconds of the member, of its first fold
    and of its infer stage (``correction``: the factor the run's own timings put on the measured estimate)."""
    total, first, infer = est or (None, None, None)
    return {"member": member.name, "experiment": cfg.experiment, "why": member.why,
            "overrides": overrides_of(base, cfg), "estimated_min": minutes(total), "first_fold_min": minutes(first),
            "infer_min": minutes(infer), "correction": round(correction, 3), "status": status, "note": note or "",
            "actual_min": None, "oof": None}


def _fit_members(members: list[Member], base: Config, budget_s: Optional[float], elapsed: Callable[[], float],
                 estimate: Optional[Estimate], planned: list[Config], first: bool, fixed: frozenset,
                 correction: Callable[[Config], float] = lambda cfg: 1.0) -> tuple[list[dict], list[Config]]:
    """(steps, configs) of ``members`` fitted in order to what is left after ``planned`` (extended in place);
    ``first``: ``members[0]`` is the plan's first member, planned whatever it costs. A member that the user's
    ``--set`` makes the same as one planned before it is dropped."""
    steps, configs, spent = [], [], 0.0

    def left() -> Optional[float]:
        return None if budget_s is None else budget_s - elapsed() - reserve(budget_s) - spent

    def scaled(cfg: Config, before: list[Config]) -> Cost:
        return estimate(cfg, before).scaled(correction(cfg))

    for i, member in enumerate(members):
        cfg, est, note = _fit(base, member, first and i == 0, left, planned, estimate and scaled,
                              budget_s is not None, fixed)
        twin = next((c for c in planned if overrides_of(base, c) == overrides_of(base, cfg)), None)
        if twin is not None and not (first and i == 0):
            note = f"the same as {twin.experiment} under your --set"
        status = "planned" if (first and i == 0) or (note is None and budget_s is not None) else "dropped"
        if status == "planned":
            planned.append(cfg)
            spent += est[0] if est else 0.0
        steps.append(_step(member, cfg, base, est, status, note, correction(cfg)))
        configs.append(cfg)
    return steps, configs


def _fit(base: Config, member: Member, first: bool, left: Callable[[], Optional[float]], planned: list[Config],
         estimate: Optional[Estimate], budgeted: bool,
         fixed: frozenset) -> tuple[Config, Optional[tuple[float, float, float]], Optional[str]]:
    """(member's config, its estimated seconds (:func:`_seconds`), why it is dropped or None); ``left()``:
    the seconds left once the member is measured. Epochs are fitted only where the user did not fix
    ``train.epochs``."""
    if not first and not budgeted:
        return member_config(base, member, first, fixed=fixed), None, "without --budget only the first member runs"
    if estimate is None:  # without a budget: the settings as written
        return member_config(base, member, first, fixed=fixed), None, None
    fitted = member.epochs if "train.epochs" not in fixed else None
    cfg = member_config(base, member, first, fitted[1] if fitted else None, fixed)
    cost, remaining = estimate(cfg, planned), left()
    if remaining is None or (first and not fitted):
        return cfg, _seconds(cost, cfg), None
    if fitted and cost.per_epoch > 0:  # as many epochs as fit, or the fewest it takes to say what it needs
        epochs = min(fitted[1], int((remaining - cost.fixed) // cost.per_epoch))
        cfg = member_config(base, member, first, max(epochs, fitted[0]), fixed)
    needed = cost.seconds(cfg.train.epochs)
    if needed > remaining and not first:
        return cfg, _seconds(cost, cfg), f"needs {needed / 60:.1f} min, {max(remaining, 0) / 60:.1f} min left"
    return cfg, _seconds(cost, cfg), None


def _seconds(cost: Cost, cfg: Config) -> tuple[float, float, float]:
    """(the member's estimated seconds, those of its first fold, those of its infer stage) at its epochs and
    folds."""
    return cost.seconds(cfg.train.epochs), cost.first_fold(cfg.train.epochs, cfg.folds.n_splits), cost.infer


# --------------------------------------------------------------------------- across invocations, after each member


def resume(record: dict, base: Config, budget_s: Optional[float], elapsed: Callable[[], float],
           estimate: Optional[Estimate], prior_s: float) -> Plan:
    """The earlier invocation's plan carried on: finished members kept, a member it left running (or that
    failed) planned again with its recorded config (it resumes at its fold and epoch), the others re-fitted to
    the budget left after ``prior_s`` seconds already spent."""
    members = {m.name: m for m in FAMILIES[record["family"]]}
    fixed = ledger.user_keys(record["overrides"])
    configs = []
    for step in record["steps"]:
        member = members[step["member"]]
        epochs = step["overrides"].get("train.epochs") if member.epochs and "train.epochs" not in fixed else None
        configs.append(member_config(base, member, step["experiment"] == base.experiment, epochs, fixed))
        if step["status"] in ("running", "failed"):
            step.update(status="planned", resumed=True, note=f"{step['status']} in an earlier invocation: resumed")
    was = record["budget_min"]
    record.update(budget_min=minutes(budget_s), reserve_min=minutes(budget_s and reserve(budget_s)), stopped=None,
                  resumed=f"carried on after {prior_s / 60:.1f} min spent" + (
                      f"; the budget changed from {was} to {minutes(budget_s)} min" if was != minutes(budget_s) else ""))
    lead = next(i for i, s in enumerate(record["steps"]) if s["experiment"] == base.experiment)
    plan = Plan(record, configs, RunDir.of(base).plan, lead, record["family"], base, budget_s, estimate, fixed,
                prior_s, elapsed)
    refit(plan)
    log.info("plan: %s", record["resumed"])
    return plan


def correction(plan: Plan, cfg: Config) -> float:
    """The factor this run's own timings put on a member's measured estimate: actual over estimated minutes of
    the finished members of its training mode, within :data:`CORRECTION`, taken fully once they were estimated
    at :data:`EVIDENCE_MIN` or more; where none shares its mode, that of all finished members, but only to make
    the estimate longer (a frozen pass running ahead of its estimate says little about a training loop); 1
    before any has finished."""
    done = timings(plan)
    by_mode: dict[str, list] = {}
    for mode, estimated, actual in done:
        by_mode.setdefault(mode, []).append((estimated, actual))
    same = by_mode.get(cfg.train.mode)
    if not (same or done):
        return 1.0
    pairs = same or [(estimated, actual) for _, estimated, actual in done]
    actual = sum(a for _, a in pairs)
    measured = sum(e for e, _ in pairs)
    weight = min(1.0, measured / EVIDENCE_MIN)  # seconds of evidence correct the estimates only part of the way
    factor = min(max((actual / measured) ** weight, CORRECTION[0]), CORRECTION[1])
    return factor if same else max(factor, 1.0)  # another mode's members may only make an estimate longer


def timings(plan: Plan) -> list[tuple[str, float, float]]:
    """(training mode, measured estimate, actual) minutes of what finished: each finished member, and the first
    fold of a member stopped after it."""
    found = []
    for s, c in zip(plan.steps, plan.configs):
        timed = s if s["status"] == "done" else s.get("screen") if s["status"] == "stopped" else None
        if timed and timed.get("actual_min") and timed.get("estimated_min"):
            found.append((c.train.mode, timed["estimated_min"] / (s.get("correction") or 1.0), timed["actual_min"]))
    return found


def refit(plan: Plan) -> None:
    """The members not yet done re-fitted to the time actually left, in the family's order, with estimates
    corrected by the run's own timings (:func:`correction`). Done, stopped and resumed members keep their place
    and config."""
    if plan.budget_s is None or plan.estimate is None:
        return
    keep = [i for i, s in enumerate(plan.steps)
            if s["status"] in ("done", "failed", "stopped") or (s.get("resumed") and s["status"] == "planned")]
    taken = {plan.steps[i]["member"] for i in keep}
    members = [m for m in FAMILIES[plan.family] if m.name not in taken]
    note = f"the members not done re-fitted to the time left after {plan.spent() / 60:.1f} min"
    ahead = sum(60 * (plan.steps[i]["estimated_min"] or 0) for i in keep if plan.steps[i]["status"] == "planned")
    steps, configs = _fit_members(members, plan.base, plan.budget_s, lambda: plan.spent() + ahead, plan.estimate,
                                  [plan.configs[i] for i in keep], False, plan.fixed, lambda c: correction(plan, c))
    plan.record["steps"] = [plan.steps[i] for i in keep] + steps
    plan.configs = [plan.configs[i] for i in keep] + configs
    plan.lead = next(i for i, c in enumerate(plan.configs) if c.experiment == plan.base.experiment)
    plan.record["adapted"] = note
    plan.save()
    log.info("plan: %s\n  %s", note, table(plan.record))


# --------------------------------------------------------------------------- while it runs


def next_step(plan: Plan) -> Optional[int]:
    """The next step to run (the first planned one), or None."""
    return next((i for i, s in enumerate(plan.steps) if s["status"] == "planned"), None)


def skip_reason(plan: Plan, i: int) -> Optional[str]:
    """Why step ``i`` (not the first) does not run now, or None: the budget is spent, or the step's estimate
    does not fit the time left."""
    left = plan.left()
    if left is None:
        return None
    estimated = (plan.steps[i]["estimated_min"] or 0) * 60
    if left <= 0:
        return "not run: the budget is spent"
    if estimated > left:
        return f"not run: needs {estimated / 60:.1f} min, {left / 60:.1f} min left"
    return None


def start_step(plan: Plan, i: int, skipped: Optional[str]) -> None:
    """Mark step ``i`` running, or skipped for the reason given, before its stages start; a running step notes
    the plan's minutes spent when it started (a resumed one keeps its first start: its minutes span invocations)."""
    step = plan.steps[i]
    if skipped:
        step.update(status="skipped", note=skipped)
    else:
        step["status"] = "running"
        if not (step.get("resumed") and step.get("started_min") is not None):
            step["started_min"] = minutes(plan.spent())
    plan.save()


def finish_step(plan: Plan, i: int, actual_s: float, ok: bool) -> None:
    """Record step ``i``'s minutes (a resumed step's over every invocation) and OOF score; a spent budget stops
    further members."""
    step, cfg = plan.steps[i], plan.configs[i]
    if step.get("resumed") and step.get("started_min") is not None:
        actual_s = max(actual_s, plan.spent() - 60 * step["started_min"])
    step.update(status="done" if ok else "failed", actual_min=minutes(actual_s), oof=oof_score(cfg) if ok else None)
    left = plan.left()
    if left is not None and left <= 0:
        plan.record["stopped"] = "the budget is spent"
    plan.save()


def stop_step(plan: Plan, i: int, actual_s: float, reason: str) -> None:
    """Record step ``i`` stopped after its first fold (:mod:`pipeline.plan.screen`), and why."""
    plan.steps[i].update(status="stopped", note=reason, actual_min=minutes(actual_s), oof=None)
    plan.save()


def finished(plan: Plan) -> list[Config]:
    """The configs of the finished members, the first member's first (the ensemble goes in its folder); none
    when the first did not finish."""
    if plan.steps[plan.lead]["status"] != "done":
        return []
    rest = [c for i, (s, c) in enumerate(zip(plan.steps, plan.configs)) if s["status"] == "done" and i != plan.lead]
    return [plan.configs[plan.lead]] + rest


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


def finish_run(plan: Plan, submission: Optional[Path]) -> None:
    """Record the submission (None: a final stage failed) and the plan's minutes over all its invocations."""
    plan.record.update(submission=None if submission is None else str(submission), total_min=minutes(plan.spent()))
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


def estimator(facts: Facts, cfg: Config, rates: Optional[dict] = None) -> Estimator:
    """The measuring estimator on the device the members will train on (:func:`planned` sets their threads),
    holding ``rates`` an earlier invocation measured on this machine."""
    found = Estimator(facts, resolve_device(cfg.train.device))
    found.rates.update(rates or {})
    return found


def planned(family: str, why: str, base: Config, facts: Facts, budget_s: Optional[float],
            elapsed: Callable[[], float], estimate: Optional[Estimate] = None, overrides: Sequence[str] = ()) -> Plan:
    """The plan of this run: the earlier invocation's carried on where it is the same plan (:mod:`ledger`), else
    :func:`make_plan` measured on this machine when there is a budget (``estimate`` given: those estimates
    instead); written to ``plan.json`` and logged as a table."""
    path = RunDir.of(base).plan
    before = ledger.earlier(path)
    identity = {"data_root": str(Path(base.data.root).resolve()), "family": family, "overrides": list(overrides)}
    anew = ledger.why_anew(before, identity, facts.as_dict())
    same_machine = before is not None and before.get("device") == device_name(resolve_device(base.train.device))
    with training_slot(base, "plan") as threads:
        torch.set_num_threads(threads)
        if estimate is None and budget_s is not None:  # without a budget nothing is fitted: no measuring
            estimate = estimator(facts, base, ledger.rates_in(before.get("rates")) if same_machine and not anew else None)
        if anew is None:
            plan = resume(before, base, budget_s, elapsed, estimate, ledger.spent_before(before, Path(base.runs_dir)))
        else:
            if before is not None:
                log.info("plan: planning anew: %s", anew)
            plan = make_plan(family, why, base, facts, budget_s, elapsed, estimate, overrides)
    plan.save()
    log.info("%s\n  written to %s", table(plan.record), plan.path)
    return plan
