"""Fine-tuning recipes: frozen first epochs, a lower backbone learning rate, batch norm kept frozen, and a
weight EMA that is evaluated, checkpointed and resumed."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pipeline import provenance
from pipeline.training import finetune, recipe
from pipeline import folds, preprocess, train
from pipeline.models.factory import create_model
from pipeline.core.utils import read_json

from conftest import fold_run, make_cfg


def _copy(module: torch.nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_freeze_then_unfreeze(tmp_path, competition):
    training = fold_run(make_cfg(tmp_path, competition, "train.freeze_epochs=1", "train.epochs=2")).training
    model = training.model
    body, head = _copy(model.stem), _copy(model.head)
    training.run_epoch(0, "epoch 1")
    assert all(torch.equal(v, model.stem.state_dict()[k]) for k, v in body.items())  # weights and BN stats
    assert not torch.equal(head["weight"], model.head.weight)
    training.run_epoch(1, "epoch 2")
    assert not torch.equal(body["0.weight"], model.stem[0].weight)
    assert all(p.requires_grad for p in model.parameters())


def test_backbone_lr_mult_and_frozen_batch_norm():
    from pipeline.core.config import ModelConfig, TrainConfig

    model = create_model(ModelConfig(name="airnet_tiny"), 3)
    cfg = TrainConfig(lr=0.1, backbone_lr_mult=0.1, bn="frozen", scheduler="onecycle", epochs=2)
    optimizer = recipe.build_optimizer(cfg, model)
    head_ids = {id(p) for p in model.head.parameters()}
    for group in optimizer.param_groups:
        is_head = any(id(p) in head_ids for p in group["params"])
        assert group["lr"] == pytest.approx(0.1 if is_head else 0.01)
    from pipeline.training.schedulers import build_scheduler

    build_scheduler(cfg, optimizer, 5)  # one-cycle keeps each group's own peak
    assert sorted({round(g["max_lr"], 6) for g in optimizer.param_groups}) == [0.01, 0.1]
    finetune.train_mode(model, cfg, epoch=0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and model.head.training


def test_ema_is_evaluated_checkpointed_and_resumed(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, "train.ema_decay=0.9", "train.epochs=2", "train.folds=[0]",
                   "train.monitor=last")
    preprocess.run(cfg)
    folds.run(cfg)
    train.run(cfg)
    fold = cfg.run_dir / "fold0"
    ema, raw, best = (load_file(str(fold / f"{n}.safetensors")) for n in ("last_ema", "last", "best"))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema if ema[k].is_floating_point())
    assert all(torch.equal(best[k], ema[k]) for k in ema)  # the average is what is kept
    state = torch.load(fold / "last_state.pt", weights_only=True)
    assert state["updates"] > 0

    run = fold_run(cfg)
    run.resume()
    assert run.epoch == 2 and run.training.step.updates == state["updates"]
    assert all(torch.equal(v, ema[k]) for k, v in run.training.ema.module.state_dict().items())
    assert read_json(fold / "result.json")["fingerprint"] == provenance.training_fingerprint(cfg)
