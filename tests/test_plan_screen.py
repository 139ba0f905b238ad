"""A member's first fold as evidence (pipeline.plan.screen): fold 0's held-out probabilities judged against the
finished members' by an honest (nested) hill climb on generated tables, the verdicts' reasons, what a first fold
is estimated to cost, and a whole budgeted run on the tiny competition where a member whose other folds no longer
fit stops after its first, its minutes recorded, while the submission is still written (one that goes on:
test_plan_resume.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import full
from pipeline.core.config import EnsembleConfig, load_config, with_values
from pipeline.core.utils import read_json
from pipeline.plan import costs, planner, screen
from pipeline.rundir import RunDir
from pipeline.training import features, mode

from conftest import DEFAULT_CONFIG, config_overrides, make_competition
from test_plan import only_the_first, photos_facts
from test_plan_resume import photo_base, photo_estimates

CLASSES = ["ant", "bee", "wasp"]


def write_oof(folder: Path, labels: np.ndarray, predicted: np.ndarray, folds: np.ndarray, confidence: float = 0.8,
              ids: list[str] | None = None) -> Path:
    """A member's ``oof.csv`` whose probabilities put ``confidence`` on ``predicted`` and share the rest."""
    folder.mkdir(parents=True, exist_ok=True)
    probs = np.full((len(labels), len(CLASSES)), (1 - confidence) / (len(CLASSES) - 1))
    probs[np.arange(len(labels)), predicted] = confidence
    frame = pd.DataFrame(probs, columns=CLASSES)
    frame.insert(0, "fold", folds)
    frame.insert(0, "label", [CLASSES[k] for k in labels])
    frame.insert(0, "id", ids or [f"{i:04d}" for i in range(len(labels))])
    frame.to_csv(folder / "oof.csv", index=False)
    return folder


def test_a_first_fold_that_adds_nothing_stops_and_one_that_helps_goes_on(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    folds = np.where(np.arange(400) < 240, 0, 1)  # fold 0: 240 rows; fold 1 is not looked at
    wrong = rng.random(400) < 0.35
    first = np.where(wrong, (labels + 1) % 3, labels)  # the finished member: 65 % right
    done = write_oof(tmp_path / "lp", labels, first, folds)
    copy = write_oof(tmp_path / "copy", labels, first, folds)
    right_where_wrong = np.where(wrong | (rng.random(400) < 0.5), labels, (labels + 2) % 3)
    helps = write_oof(tmp_path / "helps", labels, right_where_wrong, folds, confidence=0.7)
    cfg = EnsembleConfig()

    same = screen.fold_gain([done], copy, cfg, seed=0)
    assert same["rows"] == 240 and same["members"] == ["lp"] and same["gain"] <= 0
    assert same["with"]["accuracy"] == same["without"]["accuracy"] == pytest.approx((~wrong[:240]).mean())
    assert "does not improve the ensemble of lp" in screen.stop_reason(same, rest_s=60, left_s=600)

    better = screen.fold_gain([done], helps, cfg, seed=0)
    assert better["gain"] > 0 and better["with"]["log_loss"] < better["without"]["log_loss"]
    assert screen.stop_reason(better, rest_s=60, left_s=600) is None
    assert "other folds need 10.0 min (timed by its first), 5.0 min left" in screen.stop_reason(better, 600, 300)

    few = dict(same, rows=screen.MIN_ROWS - 1)  # too few rows to stop a member on
    assert screen.stop_reason(few, rest_s=60, left_s=600) is None
    other = write_oof(tmp_path / "other", labels, first, folds, ids=[f"x{i}" for i in range(400)])
    assert screen.fold_gain([done], other, cfg, seed=0) is None  # not split alike: no evidence


def test_a_member_whose_other_folds_no_longer_fit_stops_after_its_first(tmp_path, monkeypatch):
    root = make_competition(tmp_path / "comp", n_per_class=8)
    only_the_first(monkeypatch)
    sets = config_overrides(tmp_path, root)
    cfg = load_config(DEFAULT_CONFIG, sets)
    screened = Path(cfg.runs_dir) / f"{cfg.experiment}-long"

    def clock() -> float:  # the second member's first fold takes 50 minutes
        return 3000.0 if RunDir(screened).model(0).result.is_file() else 0.0

    def estimate(cfg, planned):  # 300 s, 200 of them the infer stage's
        return costs.Cost(20000.0 if "seed2" in cfg.experiment else 300.0, 0.0, infer=200.0)

    path = full.run_auto(cfg, sets, 3600, clock=clock, estimate=estimate)
    assert path is not None and path.is_file()
    record = read_json(RunDir.of(cfg).plan)
    second = record["steps"][1]
    assert second["status"] == "stopped" and "other folds need" in second["note"]
    assert second["screen"]["actual_min"] == pytest.approx(50) and second["actual_min"] == pytest.approx(50)
    assert second["first_fold_min"] == pytest.approx(100 / 3 / 60, abs=0.01)  # a third of the training
    fit_s = read_json(RunDir(screened).model(0).result)["seconds"]  # the other folds as long as fold 0 took to fit
    rest_s = 2 * (fit_s + mode.FOLD_OVERHEAD_S) + 4 * 200  # the infer stage as fold 0 ran: slower 4x at most
    assert second["screen"]["rest_min"] == pytest.approx(rest_s / 60, abs=0.02)  # minutes as plan.json rounds
    assert RunDir(screened).model(0).result.is_file() and not RunDir(screened).model(1).root.exists()
    assert record["ensemble"]["weights"] is None or len(record["ensemble"]["weights"]) == 1  # the first alone


def test_a_frozen_members_first_fold_costs_its_training_images_embeddings(tmp_path):
    base = with_values(photo_base(tmp_path)[0], {"train.mode": "features"})  # the photos family's first member
    facts = photos_facts()
    estimator = costs.Estimator(facts, torch.device("cpu"))
    frozen = ("frozen img", base.model.name, base.data.image_size, "pooled", base.infer.batch_size, base.infer.engine)
    estimator.rates.update({frozen: (100.0,), ("decode img",): (50.0,)})  # throughputs given: nothing measured
    cost = estimator(base, [])
    train_views, test_views = costs.member_views(base)
    decode = (facts.images + facts.test_images) / 50.0
    embed_train = facts.images * len(train_views) / 100.0
    assert cost.once == pytest.approx(costs.SAFETY * (embed_train + decode) + costs.MEMBER_OVERHEAD_S)
    assert cost.fixed == pytest.approx(cost.once + costs.SAFETY * facts.test_images * len(test_views) / 100.0 + 5 * (
        features.HEAD_S[0] + features.HEAD_S[1] * facts.images * len(train_views) * 4 / 5 + mode.FOLD_OVERHEAD_S))
    assert cost.infer == pytest.approx(costs.SAFETY * facts.test_images * len(test_views) / 100.0)  # test embedded
    k = base.folds.n_splits
    assert cost.first_fold(1, k) == pytest.approx(cost.once + (cost.fixed - cost.once - cost.infer) / k)
    assert costs.Cost(50.0, 10.0).first_fold(5, 5) == pytest.approx(20.0)  # nothing done once: a fifth
    assert costs.Cost(50.0, 10.0, infer=25.0).first_fold(5, 5) == pytest.approx(15.0)  # nor the infer stage


def test_stopped_members_complete_only_with_time_left_the_largest_gain_first(tmp_path):
    base, sets = photo_base(tmp_path)
    made = planner.make_plan("photos", "why", base, photos_facts(), 20 * 60, planner._no_time, photo_estimates,
                             sets)
    for step in made.steps:
        step["status"] = "done" if step["member"] == "lp" else "dropped"
    gains = {"partial": 0.0, "lite2": -0.001, "crops": 0.002}  # crops's other folds need the most time
    for step in made.steps:
        if step["member"] in gains:
            step.update(status="stopped", screen={"actual_min": 1.0, "rest_min": 3.0 if step["member"] == "crops"
                                                  else 1.0, "evidence": {"gain": gains[step["member"]]}})
    made.elapsed = lambda: 15 * 60  # 20 - 0.9 (reserve) - 15: 4.1 min left
    assert made.steps[screen.late_step(made)]["member"] == "crops"
    made.elapsed = lambda: 17 * 60  # 2.1 min left: crops no longer fits, partial's gain beats lite2's
    assert made.steps[screen.late_step(made)]["member"] == "partial"
    made.elapsed = lambda: 19 * 60
    assert screen.late_step(made) is None
