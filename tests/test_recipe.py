"""One recipe for every caller: a search trial and a train-stage fold built from one config train alike."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipeline import folds, preprocess
from pipeline.core.config import ConfigError, with_values
from pipeline.rundir import load_split
from pipeline.search import study as search
from pipeline.training.fold import FoldRun
from pipeline.training.mode import FoldData

from conftest import make_cfg

# settings the search used to drop on the floor: each must now shape a trial exactly as it shapes a fold
RECIPE = ("train.epochs=1", "train.ema_decay=0.9", "train.freeze_epochs=1", "augment.sizes=[24, 32]",
          "augment.size_epochs=[0, 1]", "search.subsample=null")


@pytest.fixture
def fold0(tmp_path, competition):
    """Fold 0 of the tiny competition, split, and the search's view of the same rows."""
    cfg = make_cfg(tmp_path, competition, *RECIPE)
    manifest = preprocess.run(cfg)
    table = folds.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    held = table["fold"].to_numpy() == 0
    labels = index["label_idx"].to_numpy()
    data = search.TrialData(np.ascontiguousarray(images), labels, np.flatnonzero(~held), np.flatnonzero(held),
                            manifest["classes"], manifest)
    return cfg, manifest, images, index, table, data


def test_a_search_trial_and_a_fold_have_the_same_first_epoch_loss(fold0, caplog):
    cfg, manifest, images, index, table, data = fold0
    cpu = torch.device("cpu")
    fold_loss, _ = FoldRun(FoldData(cfg, manifest, images, index, table, cpu), 0).training.run_epoch(0, "fold 0")
    seen = []
    metrics = search.fit(cfg, data, cpu, lambda epoch, m: seen.append(m["train_loss"]))
    assert seen == [metrics["train_loss"]] == [fold_loss]
    with caplog.at_level(logging.INFO, logger="pipeline"):  # the train stage's own loop logs the same epoch
        FoldRun(FoldData(cfg, manifest, images, index, table, cpu), 0).fit()
    assert any(f"fold 0 epoch 1/1: train_loss {fold_loss:.4f}" in r.getMessage() for r in caplog.records)
    other = search.fit(with_values(cfg, {"train.freeze_epochs": 0}), data, cpu, lambda epoch, m: None)
    assert other["train_loss"] != fold_loss  # the setting matters, so the equality above is not vacuous


@pytest.mark.parametrize("key, value", [("train.early_stopping", 2), ("train.head_init", "linear_probe"),
                                        ("train.mode", "features")])
def test_a_search_trial_refuses_what_it_cannot_honour(fold0, key, value):
    cfg, *_, data = fold0
    with pytest.raises(ConfigError, match=f"a search trial cannot honour {key}="):
        search.fit(with_values(cfg, {key: value}), data, torch.device("cpu"), lambda epoch, m: None)
