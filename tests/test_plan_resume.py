"""``plan.json`` as the run's contract (pipeline.plan.ledger, planner.resume): a rerun keeps what finished and
trains nothing, a member an interrupted invocation left running resumes with its recorded settings, the minutes
spent count across invocations, a budget change re-fits only what is not done, other data plans anew; and the
limits: the user's --set kept in every member, the EDA's CV advice applied and recorded, estimates corrected by
the run's own timings, a second ``full`` of the same experiment refused, and a member screened on its first fold
that goes on without training it again."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest

from pipeline import full
from pipeline.core.config import load_config
from pipeline.core.utils import read_json
from pipeline.plan import costs, ledger, planner, screen
from pipeline.rundir import RunDir

from conftest import DEFAULT_CONFIG, config_overrides, locked_elsewhere, make_cfg, make_competition
from test_plan import given, only_the_first, outputs, photos_facts, small_facts

PHOTO_MINUTES = {"lp": 2, "partial": 1, "lite2": 4, "crops": 3, "seed2": 3}  # + 2 an epoch when fine-tuning


def photo_estimates(cfg, planned):
    name = cfg.experiment.rsplit("-", 1)[-1] if "-" in cfg.experiment else "lp"
    return costs.Cost(60 * PHOTO_MINUTES[name], 120.0 if cfg.train.mode == "partial" else 0.0)


def photo_base(tmp_path, *more):
    sets = outputs(tmp_path, tmp_path / "photos") + list(more)
    return planner.base_config("photos", load_config(DEFAULT_CONFIG, sets), sets), sets


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_finished_plan_run_again_trains_nothing_and_writes_the_same_submission(tmp_path, monkeypatch):
    root = make_competition(tmp_path / "comp", n_per_class=8)
    only_the_first(monkeypatch)
    sets = config_overrides(tmp_path, root)
    cfg = load_config(DEFAULT_CONFIG, sets)
    def estimate(cfg, planned):  # the first member half a minute, the others longer than the budget
        return costs.Cost(30.0 if cfg.experiment == "demo" else 20000.0, 0.0)

    first = full.run_auto(cfg, sets, 3600, estimate=estimate)
    weights = RunDir.of(cfg).model(0).weights("best")
    before, kept, spent = digest(first), weights.stat().st_mtime_ns, read_json(RunDir.of(cfg).plan)["spent_min"]
    again = full.run_auto(cfg, sets, 3600, estimate=estimate)
    record = read_json(RunDir.of(cfg).plan)
    assert digest(again) == before  # the same submission
    assert weights.stat().st_mtime_ns == kept  # no fold trained again
    assert record["resumed"].startswith("carried on after") and record["spent_min"] > spent
    assert [s["status"] for s in record["steps"]] == ["done", "dropped", "dropped", "dropped"]


def test_an_interrupted_member_resumes_with_its_settings_and_the_minutes_spent_count(tmp_path):
    base, sets = photo_base(tmp_path)
    made = planner.make_plan("photos", "why", base, photos_facts(), 20 * 60, planner._no_time, photo_estimates,
                             sets)
    epochs = made.configs[1].train.epochs
    made.steps[0].update(status="done", actual_min=2.0, oof={"accuracy": 0.7, "log_loss": 0.5})
    made.steps[1]["status"] = "running"  # then the process was killed
    made.elapsed = lambda: 6 * 60
    made.save()
    killed_at = read_json(made.path)["saved_at"]
    member = Path(base.runs_dir) / made.steps[1]["experiment"]
    member.mkdir(parents=True)
    (member / "progress").write_text("x")
    os.utime(member / "progress", (killed_at + 90, killed_at + 90))  # the member wrote for 90 s after the save
    record = ledger.earlier(made.path)
    assert ledger.spent_before(record, Path(base.runs_dir)) == pytest.approx(6 * 60 + 90, abs=1)
    again = planner.planned("photos", "why", base, photos_facts(), 20 * 60, lambda: 0.0, photo_estimates, sets)
    assert again.prior_s == pytest.approx(450, abs=1)
    assert again.steps[0]["status"] == "done" and again.steps[1]["member"] == "partial"
    assert again.steps[1]["status"] == "planned" and again.steps[1]["resumed"]
    assert again.configs[1].train.epochs == epochs  # as recorded: its folds' fingerprints match
    assert "carried on after 7.5 min" in again.record["resumed"]
    assert again.configs[1] == made.configs[1]


def test_another_budget_refits_what_is_not_done_and_other_data_plans_anew(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    base, sets = photo_base(tmp_path)
    made = planner.make_plan("photos", "why", base, photos_facts(), 20 * 60, planner._no_time, photo_estimates,
                             sets)
    made.steps[0].update(status="done", actual_min=2.0, oof={"accuracy": 0.7, "log_loss": 0.5})
    made.save()
    longer = planner.planned("photos", "why", base, photos_facts(), 60 * 60, lambda: 0.0, photo_estimates, sets)
    assert "the budget changed from 20.0 to 60.0 min" in longer.record["resumed"]
    assert longer.steps[0]["status"] == "done" and longer.steps[0]["actual_min"] == 2.0
    assert all(s["status"] == "planned" for s in longer.steps[1:])  # everything fits an hour
    more = dataclasses.replace(photos_facts(), images=3000)
    other = planner.planned("photos", "why", base, more, 60 * 60, lambda: 0.0, photo_estimates, sets)
    assert other.record["resumed"] is None and all(s["status"] != "done" for s in other.steps)
    assert "planning anew: the data changed" in caplog.text


def test_the_users_set_is_kept_in_every_member(tmp_path):
    base, sets = photo_base(tmp_path, "train.epochs=1")
    made = planner.make_plan("photos", "why", base, photos_facts(), 60 * 60, planner._no_time, photo_estimates,
                             sets)
    assert [c.train.epochs for c, s in zip(made.configs, made.steps) if c.train.mode == "partial"] == [1, 1, 1]
    base, sets = photo_base(tmp_path, "train.mode=partial")
    made = planner.make_plan("photos", "why", base, photos_facts(), 60 * 60, planner._no_time, photo_estimates,
                             sets)
    assert all(c.train.mode == "partial" for c in made.configs)
    assert made.steps[1]["member"] == "partial" and made.steps[1]["status"] == "dropped"
    assert made.steps[1]["note"] == f"the same as {base.experiment} under your --set"


def test_the_edas_cv_advice_is_applied_unless_the_user_set_it(tmp_path):
    base, _ = photo_base(tmp_path)
    report = {"duplicates": {"any": {"within_train": {"groups": 3, "images": 7}}},
              "group_candidates": [{"column": "sender_id", "values": 40, "rows_per_value": 5.0}]}
    protected, applied = planner.protections(report, base, frozenset())
    assert protected.folds.group_duplicates and protected.data.group_col == "sender_id"
    assert [a["off"] for a in applied] == ["--set folds.group_duplicates=false", "--set data.group_col=null"]
    kept, applied = planner.protections(report, base, frozenset({"data.group_col", "folds.group_duplicates"}))
    assert kept is base and applied == []


def test_estimates_are_corrected_by_the_members_that_finished(tmp_path):
    base, sets = photo_base(tmp_path)
    made = planner.make_plan("photos", "why", base, photos_facts(), 60 * 60, planner._no_time, photo_estimates,
                             sets)
    assert made.steps[2]["member"] == "lite2" and made.steps[2]["estimated_min"] == pytest.approx(4)
    made.steps[0].update(status="done", actual_min=4.0, oof={"accuracy": 0.7, "log_loss": 0.5})  # 2 x its estimate
    made.elapsed = lambda: 4 * 60
    planner.refit(made)
    lite2 = next(s for s in made.steps if s["member"] == "lite2")
    assert lite2["correction"] == pytest.approx(2.0) and lite2["estimated_min"] == pytest.approx(8)
    partial = next(s for s in made.steps if s["member"] == "partial")
    assert partial["correction"] == pytest.approx(2.0)  # no fine-tune finished yet: every finished member counts
    made.steps[0]["actual_min"] = 1.0  # half its estimate: frozen passes ahead of their estimate
    planner.refit(made)
    factors = {s["member"]: s["correction"] for s in made.steps[1:]}
    assert factors["lite2"] == pytest.approx(0.5) and factors["partial"] == 1.0  # a training loop is not shortened


def test_a_second_full_of_the_same_experiment_is_refused_before_it_plans(tmp_path, capsys):
    root = make_competition(tmp_path / "comp", n_per_class=8)
    sets = config_overrides(tmp_path, root)
    run_dir = load_config(DEFAULT_CONFIG, sets).run_dir
    with locked_elsewhere(run_dir, "full"):
        argv = [str(DEFAULT_CONFIG), "--budget", "5m", *[a for t in sets for a in ("--set", t)]]
        assert full.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and "in use by another pipeline process" in err[-1]
        assert not RunDir(run_dir).plan.exists()


def test_time_the_larger_cnn_cannot_use_goes_to_a_second_seed_of_the_first(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path / "comp")
    estimates = given({"base": 2, "long": 100, "seed2": 100}, per_epoch=0.5, base_per_epoch=0.25)
    made = planner.make_plan("small", "why", cfg, small_facts(), 600, planner._no_time, estimates)
    assert [s["status"] for s in made.steps] == ["planned", "dropped", "dropped", "dropped"]
    made.steps[0].update(status="done", actual_min=made.steps[0]["estimated_min"])
    made.elapsed = lambda: 5 * 60  # 10 - 0.9 (reserve) - 5 = 4.1 min left: 2 + 8 epochs x 0.25
    planner.refit(made)
    seed2 = next(s for s, c in zip(made.steps, made.configs) if s["member"] == "base-seed2")
    assert seed2["status"] == "planned" and seed2["overrides"]["train.epochs"] == 8
    assert seed2["overrides"]["seed"] == cfg.seed + 1


def test_a_resumed_members_minutes_span_its_invocations(tmp_path):
    base, sets = photo_base(tmp_path)
    made = planner.make_plan("photos", "why", base, photos_facts(), 20 * 60, planner._no_time, photo_estimates,
                             sets)
    made.prior_s = 4 * 60  # earlier invocations: 1 min before the first member started, which ran 3 min
    made.steps[0].update(status="planned", resumed=True, started_min=1.0)
    made.elapsed = lambda: 0.0
    planner.start_step(made, 0, None)
    assert made.steps[0]["started_min"] == 1.0  # its first start is kept
    made.elapsed = lambda: 2 * 60
    planner.finish_step(made, 0, 2 * 60, ok=False)
    assert made.steps[0]["actual_min"] == pytest.approx(5.0)  # 3 min before the kill + 2 now


def test_every_member_splits_alike_and_a_screened_one_keeps_its_first_fold(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    root = make_competition(tmp_path / "comp", n_per_class=8, groups=True)  # train.csv's patient: a group column
    shutil.copy(root / "train" / "0001.png", root / "train" / "0002.png")  # a duplicate within one class
    only_the_first(monkeypatch)
    sets = config_overrides(tmp_path, root)
    cfg = load_config(DEFAULT_CONFIG, sets)

    def estimate(cfg, planned):  # the first two members fit, the others do not
        return costs.Cost(20000.0 if "seed2" in cfg.experiment else 30.0, 0.0)

    assert full.run_auto(cfg, sets, 3600, estimate=estimate) is not None
    record = read_json(RunDir.of(cfg).plan)
    assert [s["status"] for s in record["steps"]][:2] == ["done", "done"]
    assert [c["set"].split("=")[0] for c in record["cv"]] == ["folds.group_duplicates", "data.group_col"]
    first, second = (read_json(Path(cfg.runs_dir) / s["experiment"] / "folds.json") for s in record["steps"][:2])
    assert first == second  # the same split
    screened = record["steps"][1]["screen"]  # its fold 0 first, judged, then its other folds
    assert "screen" not in record["steps"][0] and screened["decision"] == "goes on" and screened["actual_min"] > 0
    assert screened["estimated_min"] == pytest.approx(record["steps"][1]["estimated_min"] / 3, abs=0.01)  # 3 folds
    assert screened["evidence"]["rows"] < screen.MIN_ROWS  # recorded, but too few rows to stop a member on
    assert screened["evidence"]["members"] == [cfg.experiment]
    assert "fold 0 already trained with these settings: skipped" in caplog.text
    assert len(record["ensemble"]["weights"]) == 2
