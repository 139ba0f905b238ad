"""predict and export: a trained run predicts a copy of its test folder under new ids as its own submission did,
from a read-only run folder, and its ONNX graphs agree with PyTorch."""
from __future__ import annotations

import logging
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import ensemble, export, folds, infer, preprocess, train
from pipeline.core.config import with_values
from pipeline.predict import stage
from pipeline.predict.recipe import load_recipe

from conftest import make_cfg, trained_run
from test_run_sh import run_sh

pytestmark = pytest.mark.slow

TTA = "infer.tta=[identity,hflip]"
# the run and predict run PyTorch alike: with infer.engine=auto each times its engines and may keep another one,
# within pipeline.models.engines.PARITY of the other
ENGINE = "infer.engine=torch"


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """A fine-tuned run with a refit model and its ensemble stage (its submission is ensemble.csv)."""
    tmp = tmp_path_factory.mktemp("predict")
    root, cfg = trained_run(tmp, TTA, ENGINE, "train.epochs=2", "train.refit=true", "experiment=a")
    ensemble.run(cfg)
    return tmp, root, cfg


def renamed_copy(root: Path, folder: Path, sample: bool = False) -> dict[str, str]:
    """The run's test images under new names (new id -> the run's id); with ``sample`` a Kaggle-style test
    folder: ``folder/test/`` and a sample submission listing the new ids in another order."""
    images = folder / "test" if sample else folder
    images.mkdir(parents=True)
    mapping = {}
    for k, path in enumerate(sorted((root / "test").iterdir())):
        new = f"img-{k:03d}-x"
        shutil.copy(path, images / f"{new}{path.suffix}")
        mapping[new] = path.stem
    if sample:
        ids = list(mapping)[::-1]
        pd.DataFrame({"id": ids, "label": "blob"}).to_csv(folder / "sample_submission.csv", index=False)
    return mapping


def run_table(cfg) -> pd.DataFrame:
    """The run's own submission table (ensemble.csv, else test_probs.csv), by id."""
    path = cfg.run_dir / ("ensemble.csv" if (cfg.run_dir / "ensemble.csv").is_file() else "test_probs.csv")
    return pd.read_csv(path, dtype={"id": str}).set_index("id")


def predict(capsys, *argv: str) -> tuple[int, str]:
    code = stage.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def assert_same_as_run(out: Path, cfg, mapping: dict[str, str], probs: bool, atol: float = 1e-5) -> None:
    table = pd.read_csv(out, dtype={"id": str, "label": str}).set_index("id")
    own = run_table(cfg).loc[[mapping[i] for i in table.index]]
    classes = list(own.columns)
    if probs:
        np.testing.assert_allclose(table[classes].to_numpy(), own.to_numpy(), atol=atol)
    else:
        assert (table["label"].to_numpy() == np.asarray(classes)[own.to_numpy().argmax(1)]).all()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_read_only_run_predicts_renamed_images_as_its_submission(run_a, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    tmp, root, cfg = run_a
    copy = tmp_path / "dataset" / cfg.run_dir.name  # the run folder as a read-only dataset elsewhere
    shutil.copytree(cfg.run_dir, copy)
    mapping = renamed_copy(root, tmp_path / "new")
    before = snapshot(copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        code, err = predict(capsys, copy, tmp_path / "new", "--out", tmp_path / "probs.csv", "--probs")
        assert code == 0, err
        assert_same_as_run(tmp_path / "probs.csv", cfg, mapping, probs=True)
        code, err = predict(capsys, copy, tmp_path / "new", "--out", tmp_path / "sub.csv")
        assert code == 0, err
        assert_same_as_run(tmp_path / "sub.csv", cfg, mapping, probs=False)
        assert "6 images written to" in caplog.text and "images/s" in caplog.text
        assert snapshot(copy) == before
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_a_kaggle_test_folder_gets_a_checked_submission_in_its_sample_order(run_a, tmp_path, capsys):
    tmp, root, cfg = run_a
    mapping = renamed_copy(root, tmp_path / "hidden", sample=True)
    code, err = predict(capsys, cfg.run_dir, tmp_path / "hidden", "--out", tmp_path / "submission.csv")
    assert code == 0, err
    sub = pd.read_csv(tmp_path / "submission.csv", dtype=str)
    sample = pd.read_csv(tmp_path / "hidden" / "sample_submission.csv", dtype=str)
    assert list(sub.columns) == ["id", "label"] and sub["id"].tolist() == sample["id"].tolist()
    assert_same_as_run(tmp_path / "submission.csv", cfg, mapping, probs=False)


def test_run_sh_predict_ends_with_the_path(run_a, tmp_path):
    _, root, cfg = run_a
    mapping = renamed_copy(root, tmp_path / "new")
    done = run_sh(tmp_path, "predict", str(cfg.run_dir), str(tmp_path / "new"), "--out", str(tmp_path / "sub.csv"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"predictions: {tmp_path / 'sub.csv'}"
    assert_same_as_run(tmp_path / "sub.csv", cfg, mapping, probs=False)


def test_the_recipe_is_the_runs(run_a):
    _, _, cfg = run_a
    recipe = load_recipe(cfg.run_dir)
    (member,) = recipe.members
    assert [m.name for m in member.models] == ["fold0", "fold1", "fold2", "refit"]
    assert all(m.views == ["identity", "hflip"] for m in member.models)
    assert np.isclose(sum(member.shares), 1.0) and recipe.table == "ensemble.csv"


def test_unreadable_images_are_listed_in_one_report(run_a, tmp_path, capsys):
    _, root, cfg = run_a
    renamed_copy(root, tmp_path / "new")
    (tmp_path / "new" / "broken-a.png").write_bytes(b"not a png")
    (tmp_path / "new" / "broken-b.jpg").write_bytes(b"\xff\xd8 truncated")
    code, err = predict(capsys, cfg.run_dir, tmp_path / "new", "--out", tmp_path / "out.csv")
    assert code == 1 and "broken-a.png" in err and "broken-b.jpg" in err and "2 data problem(s)" in err
    assert not (tmp_path / "out.csv").exists()


def many_images(root: Path, folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    sources = sorted((root / "test").iterdir())
    for k in range(n):
        shutil.copy(sources[k % len(sources)], folder / f"m{k:04d}.png")


def test_time_limit_refuses_at_once_naming_the_rate_or_predicts_the_same(run_a, tmp_path, capsys):
    _, root, cfg = run_a
    many_images(root, tmp_path / "many", 150)  # more than the first images the rate is measured on
    code, err = predict(capsys, cfg.run_dir, tmp_path / "many", "--out", tmp_path / "late.csv", "--time-limit",
                        "0.01s")
    assert code == 1 and "images/s" in err and "nothing predicted" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert not (tmp_path / "late.csv").exists()
    code, err = predict(capsys, cfg.run_dir, tmp_path / "many", "--out", tmp_path / "timed.csv", "--probs",
                        "--time-limit", "1h")
    assert code == 0, err
    code, err = predict(capsys, cfg.run_dir, tmp_path / "many", "--out", tmp_path / "plain.csv", "--probs")
    assert code == 0, err
    timed, plain = (pd.read_csv(tmp_path / f"{n}.csv", dtype={"id": str}) for n in ("timed", "plain"))
    assert timed["id"].tolist() == plain["id"].tolist()
    np.testing.assert_allclose(timed.iloc[:, 1:].to_numpy(), plain.iloc[:, 1:].to_numpy(), atol=1e-6)


def test_predict_refuses_what_would_change_the_run(run_a, tmp_path, capsys):
    _, root, cfg = run_a
    renamed_copy(root, tmp_path / "new")
    code, err = predict(capsys, cfg.run_dir, tmp_path / "new", "--out", tmp_path / "x.csv", "--set",
                        "model.name=resnet18")
    assert code == 1 and "model.name" in err
    code, err = predict(capsys, cfg.run_dir, tmp_path / "new", "--out", cfg.run_dir / "x.csv")
    assert code == 1 and "never writes there" in err and not (cfg.run_dir / "x.csv").exists()


def test_export_agrees_with_pytorch_and_predicts_like_the_run(run_a, tmp_path, capsys):
    _, root, cfg = run_a
    record = export.run(cfg.run_dir, tmp_path / "onnx")
    assert [g["graph"] for g in record["graphs"]] == [f"a-{m}.onnx" for m in ("fold0", "fold1", "fold2", "refit")]
    for graph in record["graphs"]:
        assert graph["max_abs_diff"] <= 1e-4 and graph["labels_equal"] == 1.0 and graph["images"] == 6
        assert (tmp_path / "onnx" / graph["graph"]).stat().st_size > 0
    mapping = renamed_copy(root, tmp_path / "new")
    code, err = predict(capsys, tmp_path / "onnx", tmp_path / "new", "--out", tmp_path / "onnx.csv", "--probs")
    assert code == 0, err
    assert_same_as_run(tmp_path / "onnx.csv", cfg, mapping, probs=True, atol=1e-4)


@pytest.mark.parametrize("method", ["hill_climb", "stack"])
def test_an_ensemble_of_runs_predicts_as_its_ensemble_csv(run_a, tmp_path, capsys, method):
    tmp, root, cfg = run_a
    other = make_cfg(tmp, root, TTA, ENGINE, "train.epochs=1", "experiment=b", "seed=7")
    if not (other.run_dir / "test_probs.csv").is_file():
        for stage_module in (preprocess, folds, train, infer):
            stage_module.run(other)
    ens = with_values(cfg, {"experiment": f"a-{method}", "ensemble.members": [str(other.run_dir)],
                            "ensemble.method": method, "ensemble.calibrate": "temperature"})
    shutil.copytree(cfg.run_dir, ens.run_dir)  # run a, refit model included, ensembled with b in a folder of its own
    ensemble.run(ens)
    mapping = renamed_copy(root, tmp_path / "new")
    code, err = predict(capsys, ens.run_dir, tmp_path / "new", "--out", tmp_path / "ens.csv", "--probs")
    assert code == 0, err
    assert_same_as_run(tmp_path / "ens.csv", ens, mapping, probs=True)
    record = export.run(ens.run_dir, tmp_path / "onnx")  # the combination travels with the graphs
    assert len(record["graphs"]) == 7 and record["recipe"]["combination"]["temperature"] > 0
    code, err = predict(capsys, tmp_path / "onnx", tmp_path / "new", "--out", tmp_path / "onnx.csv", "--probs")
    assert code == 0, err
    assert_same_as_run(tmp_path / "onnx.csv", ens, mapping, probs=True, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> Path:
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    return path


@pytest.mark.parametrize("mode", ["features", "partial"])
def test_frozen_modes_predict_and_export_the_whole_network(tmp_path, capsys, tiny_backbone, mode):
    """With infer.engine=auto: predict finds the engine the run timed and kept (whichever it was) and predicts as
    the run did."""
    extra = ["train.tune_blocks=2", "train.epochs=1"] if mode == "partial" else []
    root, cfg = trained_run(tmp_path, f"train.mode={mode}", "model.name=test_efficientnet",
                            f"model.weights={tiny_backbone}", TTA, "infer.engine=auto", *extra)
    mapping = renamed_copy(root, tmp_path / "new")
    code, err = predict(capsys, cfg.run_dir, tmp_path / "new", "--out", tmp_path / "p.csv", "--probs", "--work",
                        tmp_path / "work")
    assert code == 0, err
    assert_same_as_run(tmp_path / "p.csv", cfg, mapping, probs=True)
    record = export.run(cfg.run_dir, tmp_path / "onnx")
    assert len(record["graphs"]) == 3 and all(g["max_abs_diff"] <= 1e-4 for g in record["graphs"])
    assert all(g["labels_equal"] == 1.0 for g in record["graphs"])


def test_the_time_limit_counts_what_is_already_spent():
    entries = {(16, "squash"): {"signature": "0" * 40}}
    instant = lambda entries, split: []  # noqa: E731 - models that cost nothing: only the clock matters
    stage.check_time_limit(instant, entries, "new0", 64, 1000, 1e6, time.monotonic() - 3000, 3600)
    with pytest.raises(stage.TimeLimit, match="more time than is left"):
        stage.check_time_limit(instant, entries, "new0", 64, 1000, 1e6, time.monotonic() - 3700, 3600)
