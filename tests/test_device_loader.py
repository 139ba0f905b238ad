"""data.loader: device — the fold's rows held on the training device, batched augmentation, exact resume."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import provenance
from pipeline import folds, preprocess, train
from pipeline.augment import BatchAugment
from pipeline.core.config import AugmentConfig, from_dict
from pipeline.data.device import DeviceLoader

from conftest import make_cfg
from test_resume import check_streams


@pytest.mark.parametrize("n,batch_size,drop_last", [(100, 8, True), (100, 8, False), (37, 16, True), (5, 8, True)])
def test_every_row_once_per_epoch(n, batch_size, drop_last):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(4, 1).repeat(4, 2).repeat(3, 3)
    rows = np.arange(n)[::-1].copy()
    loader = DeviceLoader(images, rows, rows % 5, batch_size, torch.device("cpu"), seed=1, drop_last=drop_last)
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen = torch.cat([x[:, 0, 0, 0] for x, _ in batches]).numpy()
        labels = torch.cat([t for _, t in batches]).numpy()
        assert np.array_equal(labels, seen % 5)  # labels travel with their images
        if drop_last and n > batch_size:
            assert len(seen) == n // batch_size * batch_size and len(set(seen.tolist())) == len(seen)
        else:
            assert sorted(seen.tolist()) == list(range(n))  # every row exactly once
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1])
    again = DeviceLoader(images, rows, rows % 5, batch_size, torch.device("cpu"), seed=1, drop_last=drop_last)
    assert np.array_equal(torch.cat([x[:, 0, 0, 0] for x, _ in again]).numpy(), orders[0])


def test_batches_are_augmented_with_their_row_ids():
    """The alternating flip sees each batch's cache row ids: over two epochs every row is flipped once."""
    n = 24
    images = np.zeros((n, 8, 8, 3), dtype=np.uint8)
    images[:, :, :4] = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1) + 1  # left half carries the row id
    rows = np.arange(n)
    aug = BatchAugment(AugmentConfig(policy="flip_crop", flip="alternate"), 8, seed=0)
    aug.pad = 0
    loader = DeviceLoader(images, rows, rows, 6, torch.device("cpu"), aug, seed=0)
    flipped = np.zeros(n, dtype=int)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        for x, t in loader:
            flipped[t.numpy()] += (x[:, 0, 0, 0] == 0).numpy()  # the id moved to the right half
    assert (flipped == 1).all()


def test_training_on_the_device_loader_gives_a_valid_oof(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, "data.loader=device", "augment.policy=flip_crop", "augment.flip=alternate",
                   "augment.mixup_alpha=0.2", "train.epochs=2", "train.folds=[0, 1]")
    preprocess.run(cfg)
    folds.run(cfg)
    train.run(cfg)
    oof = pd.read_csv(cfg.run_dir / "oof.csv")
    probs = oof[[c for c in oof.columns if c not in ("id", "label", "fold")]].to_numpy()
    scored = oof["fold"].isin([0, 1]).to_numpy()
    assert np.isfinite(probs[scored]).all() and np.allclose(probs[scored].sum(1), 1, atol=1e-4)
    assert np.isnan(probs[~scored]).all()
    assert "loader: device" in provenance.training_fingerprint(cfg)
    assert provenance.same_training(provenance.training_fingerprint(from_dict({})), from_dict({}))


def test_device_loader_resumes_exactly(tmp_path, competition):
    """Resuming epoch 1's checkpoint reproduces the OOF; with the loader's or the batched policy's stream
    fresh it does not (both are saved)."""
    cfg = make_cfg(tmp_path, competition, "data.loader=device", "augment.policy=randaugment",
                   "augment.mixup_alpha=0.4", "train.epochs=3", "train.folds=[0]", "train.monitor=last")
    threads = torch.get_num_threads()
    try:
        check_streams(cfg, ("loader", "policy"))
    finally:
        torch.set_num_threads(threads)


def test_device_loader_refuses_a_cache_with_a_margin(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, "data.loader=device", "data.crop_pct=0.8")
    preprocess.run(cfg)
    folds.run(cfg)
    with pytest.raises(ValueError, match="crop_pct"):
        train.run(cfg)


def test_folds_too_large_for_the_device_stream_from_host_memory_instead():
    from pipeline.data.device import fits_on_device

    gb = 10**9
    assert fits_on_device(4 * gb, torch.device("cuda"), 0.5, free=8 * gb)
    assert not fits_on_device(4 * gb + 1, torch.device("cuda"), 0.5, free=8 * gb)
    assert fits_on_device(10**15, torch.device("cpu"), 0.5)  # the cache already lives in host memory


def test_deterministic_mode_sets_torch_and_cudnn_and_benchmark_mode_undoes_it():
    from pipeline.core.utils import configure_backends

    try:
        configure_backends(True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        configure_backends(False)
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        configure_backends(False)
