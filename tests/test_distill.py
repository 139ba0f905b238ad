"""Distillation: targets from the teacher's out-of-fold probabilities, checked for leaks, in the fingerprint."""
from __future__ import annotations

import numpy as np
import torch
import pandas as pd
import pytest

from pipeline import provenance
from pipeline.training.mode import FoldData
from pipeline.training import distill, fold
from pipeline import folds, preprocess, train
from pipeline.core.config import load_config
from pipeline.rundir import load_manifest, load_split

from conftest import DEFAULT_CONFIG, config_overrides, stage_argv


def test_distill_targets_mix_softened_teacher_and_labels():
    teacher = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([1, 2])
    np.testing.assert_allclose(distill.distill_targets(labels, teacher, 0.0, 1.0), np.eye(3)[labels])
    np.testing.assert_allclose(distill.distill_targets(labels, teacher, 1.0, 1.0), teacher, rtol=1e-6)
    mixed = distill.distill_targets(labels, teacher, 0.5, 1.0)
    np.testing.assert_allclose(mixed, 0.5 * teacher + 0.5 * np.eye(3)[labels], rtol=1e-6)
    soft = distill.distill_targets(labels, teacher, 1.0, 4.0)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    assert (soft.max(1) < teacher.max(1)).all() and (soft.argmax(1) == teacher.argmax(1)).all()  # softer, same order


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, shared_competition):
    """A trained 3-fold teacher on the tiny competition, and the student's prepared run folder."""
    tmp = tmp_path_factory.mktemp("distill")
    for stage in (preprocess, folds, train):
        assert stage.main(stage_argv(tmp, shared_competition, "experiment=teacher")) == 0
    for stage in (preprocess, folds):
        assert stage.main(stage_argv(tmp, shared_competition, "experiment=student")) == 0
    return tmp


def student_cfg(tmp, root, *overrides):
    return load_config(DEFAULT_CONFIG, config_overrides(tmp, root, "experiment=student", *overrides))


def test_targets_come_from_the_fold_that_held_each_row_out(teacher_run, shared_competition):
    cfg = student_cfg(teacher_run, shared_competition, "train.teacher=teacher")
    manifest = load_manifest(cfg.run_dir)
    _, index = load_split(cfg.run_dir, "train", manifest)
    fold_table = pd.read_csv(cfg.run_dir / "folds.csv", dtype={"id": str})
    probs = distill.teacher_probs(cfg, index, fold_table, manifest["classes"])
    teacher_dir = teacher_run / "runs" / "teacher"
    for k in range(3):  # row r's target is the teacher fold model's prediction for the fold that held r out
        held = fold_table["fold"].to_numpy() == k
        np.testing.assert_allclose(probs[held], np.load(teacher_dir / f"fold{k}" / "oof.npy"), rtol=1e-5)
    # the fold-k model's training rows get targets from the other folds' models, never from fold k's model
    targets = distill.distill_targets(index["label_idx"].to_numpy(), probs, 1.0, 1.0)
    images = load_split(cfg.run_dir, "train", manifest)[0]
    run = fold.FoldRun(FoldData(cfg, manifest, images, index, fold_table, torch.device("cpu"), targets), 0)
    images, targets = next(iter(run.training.loader))
    assert targets.ndim == 2 and targets.shape[1] == 3
    rows = run.train_rows
    assert not np.isin(rows, np.flatnonzero(fold_table["fold"].to_numpy() == 0)).any()
    gap = np.abs(targets.numpy()[:, None, :] - probs[rows][None]).max(axis=2).min(axis=1)
    assert (gap < 1e-5).all()  # every target is a training row's teacher OOF probability


def test_a_teacher_on_other_folds_or_with_missing_folds_is_refused(teacher_run, shared_competition):
    cfg = student_cfg(teacher_run, shared_competition, "train.teacher=teacher")
    manifest = load_manifest(cfg.run_dir)
    _, index = load_split(cfg.run_dir, "train", manifest)
    fold_table = pd.read_csv(cfg.run_dir / "folds.csv", dtype={"id": str})
    shuffled = fold_table.assign(fold=(fold_table["fold"] + 1) % 3)
    with pytest.raises(ValueError, match="other folds"):
        distill.teacher_probs(cfg, index, shuffled, manifest["classes"])
    oof = pd.read_csv(teacher_run / "runs" / "teacher" / "oof.csv", dtype={"id": str, "label": str})
    partial = teacher_run / "partial_oof.csv"
    oof.assign(**{manifest["classes"][0]: np.where(oof["fold"] == 2, np.nan, oof[manifest["classes"][0]])}).to_csv(
        partial, index=False)
    with pytest.raises(ValueError, match="every fold"):
        distill.teacher_probs(student_cfg(teacher_run, shared_competition, f"train.teacher={partial}"), index,
                              fold_table, manifest["classes"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        distill.teacher_probs(student_cfg(teacher_run, shared_competition, "train.teacher=nowhere"), index,
                              fold_table, manifest["classes"])
    with pytest.raises(FileNotFoundError, match="'gone/ensemble_oof.csv': no such file"):
        distill.teacher_probs(student_cfg(teacher_run, shared_competition, "train.teacher=gone/ensemble_oof.csv"),
                              index, fold_table, manifest["classes"])


def test_student_trains_and_its_fingerprint_follows_the_teacher(teacher_run, shared_competition, tmp_path):
    argv = stage_argv(teacher_run, shared_competition, "experiment=student", "train.teacher=teacher",
                      "train.distill_alpha=0.7", "train.distill_temperature=2")
    assert train.main(argv) == 0
    cfg = student_cfg(teacher_run, shared_competition, "train.teacher=teacher", "train.distill_alpha=0.7",
                      "train.distill_temperature=2")
    assert provenance.fold_done(cfg, 0) is not None
    assert provenance.fold_done(student_cfg(teacher_run, shared_competition, "train.teacher=teacher"), 0) is None
    # a retrained teacher (other OOF probabilities) makes the student stale
    copy = tmp_path / "teacher_oof.csv"
    oof = pd.read_csv(teacher_run / "runs" / "teacher" / "oof.csv", dtype={"id": str, "label": str})
    oof.to_csv(copy, index=False)
    moved = student_cfg(teacher_run, shared_competition, f"train.teacher={copy}", "train.distill_alpha=0.7",
                        "train.distill_temperature=2")
    before = provenance.training_fingerprint(moved)
    oof.assign(fold=oof["fold"]).iloc[::-1].to_csv(copy, index=False)
    assert provenance.training_fingerprint(moved) != before
