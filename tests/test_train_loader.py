"""The train loader: batches cut from chunks augmented together are ordinary shuffled batches."""
import numpy as np
import pytest
import torch

from pipeline import augment
from pipeline.core.config import from_dict
from pipeline.training.loaders import make_train_loader


def _setup(n: int, batch_size: int, policy: str = "none"):
    images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(4, 1).repeat(4, 2).repeat(3, 3)
    cfg = from_dict({"train": {"batch_size": batch_size}, "augment": {"policy": policy}})
    return images, cfg


@pytest.mark.parametrize("n,batch_size,drop_last", [(100, 8, True), (100, 8, False), (37, 16, True), (64, 16, True)])
def test_batches_cover_a_permutation_of_the_rows(n, batch_size, drop_last):
    images, cfg = _setup(n, batch_size)
    rows = np.arange(n)
    loader = make_train_loader(images, rows, rows % 5, cfg, drop_last=drop_last)
    batches = list(loader)
    assert len(batches) == len(loader)
    sizes = [len(t) for _, t in batches]
    if drop_last:
        assert sizes == [batch_size] * (n // batch_size)
    else:
        assert sum(sizes) == n and all(s == batch_size for s in sizes[:-1])
    seen = np.concatenate([x[:, 0, 0, 0].numpy() for x, _ in batches])
    assert len(set(seen.tolist())) == len(seen)  # no row twice in an epoch
    labels = np.concatenate([t.numpy() for _, t in batches])
    assert np.array_equal(labels, seen % 5)  # labels travel with their images
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape[1:] == (3, 4, 4)


def test_epochs_are_shuffled_differently_and_reproducibly():
    images, cfg = _setup(64, 8)
    rows = np.arange(64)

    def epochs(loader):
        return [np.concatenate([x[:, 0, 0, 0].numpy() for x, _ in loader]) for _ in range(2)]

    a, b = epochs(make_train_loader(images, rows, rows, cfg)), epochs(make_train_loader(images, rows, rows, cfg))
    assert not np.array_equal(a[0], a[1])
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_the_policy_augments_every_batch():
    n = 32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    rows, labels = np.arange(n), np.zeros(n, dtype=int)
    cfg = from_dict({"train": {"batch_size": 8}, "augment": {"policy": "randaugment", "n_select": 2, "level": 20}})
    plain = list(make_train_loader(images, rows, labels, cfg, None))  # same seeded shuffle, no augmentation
    policy = augment.build_policy(cfg.augment, 16, seed=0)
    augmented = list(make_train_loader(images, rows, labels, cfg, policy))
    assert len(augmented) == len(plain) == n // 8
    for (x, _), (ref, _) in zip(augmented, plain):
        assert x.shape == ref.shape and x.dtype == torch.uint8
        changed = (x != ref).flatten(1).any(1)
        assert changed.float().mean() > 0.9  # nearly every image altered (a few ops can be no-ops)
