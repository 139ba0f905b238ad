"""Patch-whitening of the first conv (model.whiten), batch-norm momentum and no weight decay on norms/biases."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.training import checkpoints
from pipeline import provenance
from pipeline import folds, preprocess
from pipeline.search import study as search
from pipeline.core.config import ModelConfig, TrainConfig, with_values
from pipeline.rundir import load_split
from pipeline.training.fold import FoldRun
from pipeline.training.mode import FoldData
from pipeline.training.recipe import build_optimizer
from pipeline.training.checkpoints import load_weights
from pipeline.models.factory import create_model
from pipeline.models.weights import normalization
from pipeline.models.whiten import first_conv, patch_covariance, whiten_conv

from conftest import KeepEpochOne, make_cfg, trained_run

PATCH = "model.kwargs={patch_stem: 2}"


def smooth_images(n: int = 64, size: int = 16, seed: int = 0) -> np.ndarray:
    """uint8 N×H×W×3 images with strongly correlated neighbouring pixels (blurred noise), as photos have."""
    noise = torch.from_numpy(np.random.default_rng(seed).normal(size=(n, 3, size + 2, size + 2))).float()
    blurred = F.avg_pool2d(noise, 3, stride=1) * 3 * 40 + 128
    return blurred.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def test_whitened_conv_decorrelates_training_patches():
    images = smooth_images()
    rows = np.arange(len(images))
    mean, std = [0.5] * 3, [0.2] * 3
    conv = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    cov = patch_covariance(images, rows, mean, std, conv.kernel_size, 16)
    before = torch.linalg.eigvalsh(cov)
    assert before.max() / before.min() > 20  # the raw patches are strongly correlated
    eigenvalues = whiten_conv(conv, cov, eps=1e-9)
    assert torch.all(eigenvalues[:-1] >= eigenvalues[1:])
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.2
    with torch.no_grad():
        out = F.conv2d(x, conv.weight).permute(0, 2, 3, 1).reshape(-1, 24).double()
    out_cov = out.T @ out / len(out)
    torch.testing.assert_close(out_cov[:12, :12], torch.eye(12, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[:, 12:], -out[:, :12])  # the second half: the same filters negated
    assert torch.all(conv.bias == 0)


@pytest.fixture
def prepared(tmp_path, competition):
    def setup(*overrides):
        cfg = make_cfg(tmp_path, competition, "model.whiten=true", *overrides)
        manifest = preprocess.run(cfg)
        images, index = load_split(cfg.run_dir, "train", manifest)
        return cfg, manifest, np.array(images), index, folds.run(cfg)
    return setup


def stem_weight(run: FoldRun) -> torch.Tensor:
    return first_conv(run.training.model, 3, run.training.size).weight.detach().clone()


def test_whitening_reads_only_the_folds_training_images(prepared):
    cfg, manifest, images, index, split = prepared(PATCH)
    cpu = torch.device("cpu")
    reference = stem_weight(FoldRun(FoldData(cfg, manifest, images, index, split, cpu), 0))
    held_out = np.flatnonzero(split["fold"].to_numpy() == 0)
    changed = images.copy()
    changed[held_out] = np.random.default_rng(1).integers(0, 256, size=changed[held_out].shape, dtype=np.uint8)
    assert torch.equal(stem_weight(FoldRun(FoldData(cfg, manifest, changed, index, split, cpu), 0)), reference)
    changed = images.copy()
    train_row = np.flatnonzero(split["fold"].to_numpy() != 0)[0]
    changed[train_row] = 255 - changed[train_row]
    assert not torch.equal(stem_weight(FoldRun(FoldData(cfg, manifest, changed, index, split, cpu), 0)), reference)


def test_whitening_works_on_airnets_own_conv_bn_stem(prepared):
    """airnet_tiny's 3x3, 16-filter stem (room for 2 x 27) takes the top 8 directions and their negatives."""
    cfg, manifest, images, index, split = prepared()
    weight = stem_weight(FoldRun(FoldData(cfg, manifest, images, index, split, torch.device("cpu")), 0))
    assert weight.shape == (16, 3, 3, 3)
    torch.testing.assert_close(weight[8:], -weight[:8])


@pytest.mark.parametrize("override, message", [("model.kwargs={stem: 15}", "even number"),
                                               ("model.kwargs={stem: 64}", "<= 2 x in_channels x kernel area = 54")])
def test_model_without_a_whitenable_first_conv_is_a_clear_error(prepared, override, message):
    cfg, manifest, images, index, split = prepared(override)
    with pytest.raises(ValueError, match=f"model.whiten.*{message}.*patch_stem"):
        FoldRun(FoldData(cfg, manifest, images, index, split, torch.device("cpu")), 0)


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_whitening_survives_training_and_is_saved_in_the_weights(tmp_path, freeze):
    root, cfg = trained_run(tmp_path, "model.whiten=true", PATCH, "train.folds=[0]", f"model.whiten_freeze={freeze}")
    manifest = preprocess.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    initial = stem_weight(FoldRun(FoldData(cfg, manifest, images, index, folds.run(cfg), torch.device("cpu")), 0))
    trained = load_weights(create_model(cfg.model, 3), cfg.run_dir / "fold0" / "best.safetensors")
    assert torch.equal(trained.stem[0].weight, initial) == freeze
    assert (cfg.run_dir / "fold0" / "test.npy").is_file()  # infer builds the patch-stem model and predicts
    assert provenance.fold_done(cfg, 0) and not provenance.fold_done(with_values(cfg, {"model.whiten_eps": 0.1}), 0)


@pytest.mark.parametrize("bias_epochs", [1, None])
def test_whitening_bias_trains_only_its_first_epochs(prepared, bias_epochs):
    cfg, manifest, images, index, split = prepared(PATCH, "train.epochs=2", "train.monitor=last",
                                                   f"model.whiten_bias_epochs={'null' if bias_epochs is None else 1}")
    run = KeepEpochOne(FoldData(cfg, manifest, images, index, split, torch.device("cpu")), 0)
    run.fit()
    after_one = checkpoints.load_state(run.dir.root / "epoch1_state.pt")["model"]["stem.0.bias"]
    final = run.training.model.stem[0].bias.detach()
    assert after_one.abs().sum() > 0  # trained in epoch 1
    assert torch.equal(final, after_one) == (bias_epochs == 1)


def test_search_trials_whiten_from_their_own_training_rows(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, "model.whiten=true", PATCH, "search.subsample=null")
    preprocess.run(cfg)
    data = search.load_trial_data(cfg)
    training = search.trial_training(cfg, data, torch.device("cpu"))
    training.run_epoch(0, "trial epoch 1")
    model = training.model
    expected = nn.Conv2d(3, 24, 2)
    mean, std = normalization(cfg.model, data.manifest)
    whiten_conv(expected, patch_covariance(data.images, data.train_rows, mean, std, (2, 2), 16), cfg.model.whiten_eps)
    assert torch.equal(model.stem[0].weight, expected.weight)  # whitened and kept frozen through the trial


def test_bn_momentum_is_set_on_every_batch_norm():
    for name in ("airnet_tiny", "resnet18"):
        model = create_model(ModelConfig(name=name, bn_momentum=0.4), 3)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(m.momentum == 0.4 for m in norms)
    default = create_model(ModelConfig(name="airnet_tiny"), 3)
    assert all(m.momentum == 0.1 for m in default.modules() if isinstance(m, nn.BatchNorm2d))
    bn = create_model(ModelConfig(name="airnet_tiny", bn_momentum=0.4), 3).stem[1]
    x = torch.randn(8, 16, 4, 4) + 3.0
    bn.train()(x)
    torch.testing.assert_close(bn.running_mean, 0.4 * x.mean(dim=(0, 2, 3)))


def test_weight_decay_spares_norms_and_biases():
    """One SGD step with zero gradients: only conv/linear weights shrink by lr x weight_decay."""
    model = create_model(ModelConfig(name="airnet_tiny", kwargs={"patch_stem": 2}), 3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.5)
                module.bias.fill_(0.5)
        model.stem[0].bias.fill_(0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(TrainConfig(lr=1.0, momentum=0.0, weight_decay=0.1), model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (0.9 if p.ndim > 1 else 1.0)
        torch.testing.assert_close(p.detach(), expected, msg=name)
    assert any(p.ndim <= 1 for p in model.parameters()) and any(p.ndim > 1 for p in model.parameters())
