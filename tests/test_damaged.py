"""Damaged files in a run folder: a clear error naming the file and what to re-run, or a rebuild."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from pipeline import folds, infer, preprocess, train

from conftest import stage_argv, trained_run

OVERRIDES = ("experiment=damaged", "train.lr=0.01", "train.optimizer=adamw", "infer.tta=[identity]")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A competition preprocessed, split, trained (1 epoch, 3 folds) and predicted once for this module."""
    tmp = tmp_path_factory.mktemp("damaged")
    root, cfg = trained_run(tmp, *OVERRIDES)
    return {"cfg": cfg, "argv": stage_argv(tmp, root, *OVERRIDES)}


def truncate(path, keep: float = 0.5) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return data


def error_of(stage, argv, capsys) -> str:
    capsys.readouterr()
    assert stage.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_truncated_best_weights(run, capsys, caplog):
    cfg, argv = run["cfg"], run["argv"]
    best = cfg.run_dir / "fold1" / "best.safetensors"
    truncate(best)
    (cfg.run_dir / "fold1" / "test.json").unlink()  # as if the weights had changed since
    err = error_of(infer, argv, capsys)
    assert str(best) in err and "re-run the train stage" in err
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert train.main(argv) == 0  # rebuilt: the fold is trained again
    assert f"fold 1: {best} is missing or damaged: training the fold again" in caplog.text
    assert infer.main(argv) == 0


def test_truncated_last_state_restarts_the_fold(run, caplog):
    cfg = run["cfg"]
    fold0 = cfg.run_dir / "fold0"
    (fold0 / "result.json").unlink()  # interrupted: train would resume from last_state.pt
    truncate(fold0 / "last_state.pt")
    with caplog.at_level(logging.INFO, logger="pipeline"):
        train.run(cfg)
    assert f"fold 0: {fold0 / 'last_state.pt'} is damaged" in caplog.text and "starting the fold over" in caplog.text
    assert "fold 0 epoch 1/1" in caplog.text and (fold0 / "result.json").is_file()


def test_truncated_cache_array(run, capsys, caplog):
    cfg, argv = run["cfg"], run["argv"]
    array = json.loads((cfg.run_dir / "preprocess.json").read_text())["train"]["array"]
    truncate(__import__("pathlib").Path(array), 0.7)
    err = error_of(train, argv, capsys)
    assert f"{array} is damaged" in err and "re-run the preprocess stage" in err
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert preprocess.main(argv) == 0
    assert "rebuilding it" in caplog.text
    assert train.main(argv) == 0


def test_truncated_folds_csv(run, capsys, caplog):
    cfg, argv = run["cfg"], run["argv"]
    path = cfg.run_dir / "folds.csv"
    text = path.read_text()
    path.write_text(text[:len(text) - 3])  # the last row loses its fold number
    for stage in (train, infer):
        err = error_of(stage, argv, capsys)
        assert str(path) in err and "re-run the folds stage" in err
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert folds.main(argv) == 0  # made again, identical
    assert "making the folds again" in caplog.text
    assert path.read_text() == text


def test_edited_manifest(run, capsys, caplog):
    cfg, argv = run["cfg"], run["argv"]
    path = cfg.run_dir / "preprocess.json"
    original = json.loads(path.read_text())
    edited = {**original, "classes": list(reversed(original["classes"]))}  # would mislabel every prediction
    path.write_text(json.dumps(edited))
    for stage in (train, infer):
        err = error_of(stage, argv, capsys)
        assert f"{path} was edited or damaged" in err and "re-run the preprocess stage" in err
    path.write_text("{ not json")
    assert f"{path} is damaged" in error_of(train, argv, capsys)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert preprocess.main(argv) == 0
    assert json.loads(path.read_text())["classes"] == original["classes"]
    assert train.main(argv) == 0 and infer.main(argv) == 0
    np.testing.assert_allclose(np.load(cfg.run_dir / "fold0" / "test.npy").sum(1), 1, rtol=1e-5)
