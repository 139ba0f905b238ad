"""TensorBoard curves of a fold: a resumed or retrained fold never repeats a step."""
from __future__ import annotations

import shutil

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipeline import folds, preprocess
from pipeline.training.mode import FoldData
from pipeline.rundir import RunDir, load_split
from pipeline.training.fold import FoldRun

from conftest import KeepEpochOne, make_cfg


def steps(cfg, tag: str = "loss/train") -> list[int]:
    """The steps TensorBoard shows for fold 0's ``tag``, read back from its event files."""
    events = EventAccumulator(str(RunDir.of(cfg).tb("fold0")))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_a_resumed_or_retrained_fold_logs_each_epoch_once(tmp_path, competition, caplog):
    cfg = make_cfg(tmp_path, competition, "train.epochs=2", "train.folds=[0]")
    manifest = preprocess.run(cfg)
    split = folds.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    fold = lambda cls=FoldRun: cls(FoldData(cfg, manifest, images, index, split, torch.device("cpu")), 0)  # noqa: E731
    model = RunDir.of(cfg).model(0)

    fold(KeepEpochOne).fit()
    assert steps(cfg) == [1, 2]
    # killed after epoch 2 logged but before its checkpoint: resumed after epoch 1, epoch 2 is logged again
    shutil.copy(model.root / "epoch1_state.pt", model.last_state)
    model.result.unlink()
    with caplog.at_level("INFO", logger="pipeline"):
        fold().fit()
    assert "fold 0: resuming after epoch 1" in caplog.text
    for tag in ("loss/train", "loss/valid", "valid/accuracy", "lr"):
        assert steps(cfg, tag) == [1, 2], tag

    # trained again from the start (no checkpoint to resume): the old curves are replaced, not continued
    model.last_state.unlink()
    model.result.unlink()
    fold().fit()
    assert steps(cfg) == [1, 2]
    events = EventAccumulator(str(RunDir.of(cfg).tb("fold0")))
    events.Reload()
    assert [e.step for e in events.Images("augmented_samples")] == [0]
