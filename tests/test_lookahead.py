"""train.lookahead_k / lookahead_alpha: timm's Lookahead around the optimizer, with schedulers and exact resume."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch import nn

from pipeline.training import checkpoints
from pipeline.training.mode import FoldData
from pipeline.training.fold import FoldRun
from pipeline import folds, preprocess
from pipeline.core.config import TrainConfig
from pipeline.rundir import load_split
from pipeline.training.recipe import build_optimizer
from pipeline.training.schedulers import build_scheduler

from conftest import KeepEpochOne, make_cfg


def sgd_steps(cfg: TrainConfig, steps: int) -> float:
    """A one-weight model after ``steps`` plain SGD steps with gradient 1 (lr 0.1): the weight left."""
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    opt = build_optimizer(cfg, model)
    for _ in range(steps):
        model.weight.grad = torch.ones_like(model.weight)
        opt.step()
    return float(model.weight.detach())


def test_lookahead_pulls_the_fast_weights_back_every_k_steps():
    plain = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0)
    assert sgd_steps(plain, 4) == pytest.approx(0.6)
    wrapped = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0, lookahead_k=2, lookahead_alpha=0.5)
    # timm starts the slow weights at the first sync (step 2: 0.8); step 4: 0.8 + 0.5 x (0.6 - 0.8) = 0.7
    assert sgd_steps(wrapped, 2) == pytest.approx(0.8)
    assert sgd_steps(wrapped, 3) == pytest.approx(0.7)
    assert sgd_steps(wrapped, 4) == pytest.approx(0.7)
    assert sgd_steps(wrapped, 5) == pytest.approx(0.6)


def test_schedulers_drive_the_wrapped_optimizer():
    cfg = TrainConfig(lr=0.1, epochs=2, lookahead_k=3, scheduler="cosine", warmup_epochs=1)
    model = nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    schedule = build_scheduler(cfg, opt, steps_per_epoch=4)
    lrs = []
    for _ in range(8):
        model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
        opt.step()
        schedule.step_batch()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) == pytest.approx(0.1) and lrs[0] < 0.1 and lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_resume_with_lookahead_is_exact(tmp_path, competition):
    """3 steps an epoch, k=2: the slow sync falls mid-epoch; resuming epoch 1's state gives the same OOF."""
    cfg = make_cfg(tmp_path, competition, "train.epochs=3", "train.lookahead_k=2", "train.monitor=last",
                   "train.folds=[0]", "train.warmup_epochs=1")
    manifest = preprocess.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    split = folds.run(cfg)
    fold = lambda cls=FoldRun: cls(FoldData(cfg, manifest, images, index, split, torch.device("cpu")), 0)  # noqa: E731
    run = fold(KeepEpochOne)
    run.fit()
    reference = np.load(run.dir.root / "oof.npy")
    saved = checkpoints.load_state(run.dir.root / "epoch1_state.pt")
    assert any("lookahead_slow_buff" in s for s in saved["optimizer"]["state"].values())
    assert saved["optimizer"]["param_groups"][0]["lookahead_step"] == 3
    checkpoints.save_state(run.dir.root / "last_state.pt", saved)
    (run.dir.root / "result.json").unlink()
    fold().fit()
    np.testing.assert_array_equal(np.load(run.dir.root / "oof.npy"), reference)
