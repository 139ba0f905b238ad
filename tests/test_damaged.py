"""Damaged files in a run folder and in the caches: a clear error naming the file and what to re-run, or a rebuild
naming the file."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from pipeline import folds, infer, preprocess, train

from conftest import make_cfg, stage_argv, trained_run

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


# --------------------------------------------------------------------------- damaged caches of the frozen passes


def frozen_argv(tmp_path, root, weights, mode: str, *more: str) -> list[str]:
    return stage_argv(tmp_path, root, f"train.mode={mode}", "model.name=test_efficientnet", f"model.weights={weights}",
                      "infer.tta=[identity,hflip]", "infer.engine=torch", "infer.batch_size=8", *more)


@pytest.mark.parametrize("mode, folder", [("partial", "activations"), ("features", "features")])
def test_a_damaged_cached_pass_is_named_and_computed_again(tmp_path, competition, tiny_weights, caplog, mode,
                                                           folder):
    own = ["train.tune_blocks=2", "train.optimizer=adamw", "train.lr=0.01"] if mode == "partial" else []
    argv = frozen_argv(tmp_path, competition, tiny_weights, mode, *own)
    for stage in (preprocess, folds, train):
        assert stage.main(argv) == 0
    [damaged] = (tmp_path / "cache" / folder).glob("train-*identity*.npy")
    [other] = (tmp_path / "cache" / folder).glob("train-*hflip*.npy")
    kept, other_time = np.load(damaged), other.stat().st_mtime_ns
    truncate(damaged)
    again = argv + ["--set", "train.epochs=2" if mode == "partial" else "train.head_c=2.0"]  # another schedule
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert train.main(again) == 0
    assert f"{damaged} is damaged (" in caplog.text and "computing it again" in caplog.text
    np.testing.assert_array_equal(np.load(damaged), kept)  # made again, the same
    assert other.stat().st_mtime_ns == other_time  # the undamaged view is reused
    assert infer.main(again) == 0


def test_a_damaged_cached_graph_is_named_and_exported_again(tmp_path, competition, tiny_weights, caplog):
    import torch

    from pipeline.models.engines import graph_path
    from pipeline.training import features

    cfg = make_cfg(tmp_path, competition, "train.mode=features", "model.name=test_efficientnet",
                   f"model.weights={tiny_weights}", "infer.engine=onnxruntime", "infer.batch_size=8")
    manifest = preprocess.run(cfg)
    first = features.embeddings(cfg, manifest, "train", ["identity"], torch.device("cpu"))["identity"]
    graph = graph_path(cfg, features.frozen_key(cfg, "pooled"))
    truncate(graph)
    for path in (tmp_path / "cache" / "features").glob("*.npy"):
        path.unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        again = features.embeddings(cfg, manifest, "train", ["identity"], torch.device("cpu"))["identity"]
    assert f"{graph} is damaged (" in caplog.text and "exporting it again" in caplog.text
    assert "PyTorch serves this pass" not in caplog.text  # the graph made again serves it
    np.testing.assert_allclose(again, first, atol=1e-5)
