"""End to end: every stage through its ``main`` on the tiny competition, then skipping and resuming.

The chain runs once per module (a shared run folder); the tests after it read and extend that folder in
file order: a re-run skips finished folds, then a fold interrupted after its first epoch is resumed.
Also static checks over pipeline/: torch.load only with weights_only=True, never yaml.load.
"""
from __future__ import annotations

import ast
import json
import importlib
import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.training import checkpoints
from pipeline import provenance
from pipeline import ensemble, folds, infer, preprocess, submit, train
from pipeline.core.config import Config, load_config
from pipeline.rundir import read_cv
from pipeline.core.utils import read_json

from conftest import DEFAULT_CONFIG, REPO, config_overrides, make_competition, needs_browser, stage_argv

EXPERIMENT = "e2e"
# a learning rate and batch size at which 2 epochs on 24 images learn the stripes apart from the blobs
OVERRIDES = (f"experiment={EXPERIMENT}", "train.epochs=2", "train.batch_size=4", "train.optimizer=adamw",
             "train.lr=0.01", "train.warmup_epochs=0")
N_FOLDS = 3


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Run preprocess → folds → train → infer → ensemble → submit once; return what they produced."""
    tmp = tmp_path_factory.mktemp("e2e")
    root = make_competition(tmp / "comp")
    argv = stage_argv(tmp, root, *OVERRIDES)
    cfg = load_config(DEFAULT_CONFIG, config_overrides(tmp, root, *OVERRIDES))
    for stage in (preprocess, folds, train, infer, ensemble):
        assert stage.main(argv) == 0, f"{stage.__name__} failed"
    return {"tmp": tmp, "root": root, "argv": argv, "cfg": cfg, "run_dir": cfg.run_dir}


@pytest.mark.slow
def test_stages_write_the_run_folder(chain):
    run_dir = chain["run_dir"]
    assert run_dir == chain["tmp"] / "runs" / EXPERIMENT
    for name in ("config.yaml", "preprocess.json", "train_index.csv", "test_index.csv", "folds.csv", "oof.csv",
                 "cv.json", "test_probs.csv", "ensemble.csv", "ensemble.json"):
        assert (run_dir / name).is_file(), name
    # the saved config is the resolved one
    assert load_config(run_dir / "config.yaml") == chain["cfg"]
    for k in range(N_FOLDS):
        fold = run_dir / f"fold{k}"
        for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "last_state.pt",
                     "oof.npy", "result.json", "test.npy"):
            assert (fold / name).is_file(), f"fold{k}/{name}"
        best = read_json(fold / "best.json")
        assert best["classes"] == ["blob", "hstripes", "vstripes"] and best["fold"] == k
        assert best["config"]["train"]["epochs"] == 2
    assert (run_dir / "tb").is_dir()
    assert not list(Path(chain["tmp"]).rglob(".*.tmp")) and not list(run_dir.rglob(".*.json"))  # no temp files


@pytest.mark.slow
def test_cv_report_matches_the_oof_table_and_beats_chance(chain):
    run_dir = chain["run_dir"]
    cv = read_cv(run_dir)
    oof = pd.read_csv(run_dir / "oof.csv", dtype={"id": str, "label": str})
    classes = ["blob", "hstripes", "vstripes"]
    assert list(oof.columns) == ["id", "label", "fold"] + classes
    assert len(oof) == 36 and not oof[classes].isna().any().any()
    np.testing.assert_allclose(oof[classes].sum(axis=1), 1.0, rtol=1e-4)
    accuracy = float((np.asarray(classes)[oof[classes].to_numpy().argmax(1)] == oof["label"]).mean())
    assert cv["oof"]["accuracy"] == pytest.approx(accuracy)
    assert cv["oof"]["n"] == 36 and cv["scored_rows"] == 36 and len(cv["folds"]) == N_FOLDS
    assert cv["oof"]["accuracy"] > 0.45, cv["oof"]  # chance is 1/3
    # the OOF rows agree with the folds file
    fold_file = pd.read_csv(run_dir / "folds.csv", dtype={"id": str})
    assert list(oof["id"]) == list(fold_file["id"]) and list(oof["fold"]) == list(fold_file["fold"])
    assert "oof_tta" in cv and cv["oof_tta"]["tta"] == ["identity", "shift_left", "shift_right"]


@pytest.mark.slow
def test_test_probabilities_and_ensemble(chain):
    run_dir = chain["run_dir"]
    probs = pd.read_csv(run_dir / "test_probs.csv", dtype={"id": str})
    assert list(probs["id"]) == [f"{i:04d}" for i in range(36, 42)]
    folds_mean = np.mean([np.load(run_dir / f"fold{k}" / "test.npy") for k in range(N_FOLDS)], axis=0)
    np.testing.assert_allclose(probs.iloc[:, 1:].to_numpy(), folds_mean, rtol=1e-5)
    ens = pd.read_csv(run_dir / "ensemble.csv", dtype={"id": str})
    np.testing.assert_allclose(ens.iloc[:, 1:].to_numpy(), folds_mean, rtol=1e-5)  # one experiment: the mean


@pytest.mark.slow
def test_submission(chain, capsys):
    assert submit.main(chain["argv"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("submission: ")
    path = Path(last.split("submission: ", 1)[1])
    assert path.parent == chain["tmp"] / "submissions" and path.name.startswith(f"{EXPERIMENT}-")
    sub = pd.read_csv(path, dtype=str)
    sample = pd.read_csv(chain["root"] / "sample_submission.csv", dtype=str)
    assert list(sub.columns) == list(sample.columns)
    assert list(sub["id"]) == list(sample["id"])
    assert set(sub["label"]) <= {"blob", "hstripes", "vstripes"}


@pytest.mark.slow
def test_infer_rerun_is_up_to_date(chain, caplog):
    run_dir = chain["run_dir"]
    before = {k: (run_dir / f"fold{k}" / "test.npy").stat().st_mtime_ns for k in range(N_FOLDS)}
    caplog.set_level(logging.INFO)
    assert infer.main(chain["argv"]) == 0
    assert sum("predictions up to date" in r.getMessage() for r in caplog.records) == N_FOLDS
    assert {k: (run_dir / f"fold{k}" / "test.npy").stat().st_mtime_ns for k in range(N_FOLDS)} == before


@pytest.mark.slow
def test_train_rerun_skips_finished_folds(chain, caplog):
    run_dir = chain["run_dir"]
    results = {k: (run_dir / f"fold{k}" / "result.json").read_text() for k in range(N_FOLDS)}
    weights = {k: (run_dir / f"fold{k}" / "best.safetensors").stat().st_mtime_ns for k in range(N_FOLDS)}
    cv = (run_dir / "cv.json").read_text()
    caplog.set_level(logging.INFO)
    assert train.main(chain["argv"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("already trained with these settings: skipped" in m for m in messages) == N_FOLDS
    assert not any(" epoch " in m and "train_loss" in m for m in messages)
    assert {k: (run_dir / f"fold{k}" / "result.json").read_text() for k in range(N_FOLDS)} == results
    assert {k: (run_dir / f"fold{k}" / "best.safetensors").stat().st_mtime_ns for k in range(N_FOLDS)} == weights
    # cv.json is rewritten from the same OOF files, so infer's TTA scores (cv_tta.json) still describe it
    assert read_json(run_dir / "cv.json")["oof"] == json.loads(cv)["oof"]
    assert "oof_tta" in read_cv(run_dir)


@pytest.mark.slow
def test_changing_only_inference_settings_does_not_retrain(chain):
    cfg = load_config(DEFAULT_CONFIG, config_overrides(chain["tmp"], chain["root"], *OVERRIDES,
                                                       "infer.tta=[identity, hflip]", "submit.format=probs"))
    assert provenance.fold_done(chain["cfg"], 1) is not None  # the unchanged config: finished
    assert provenance.fold_done(cfg, 1) is not None
    retrain = load_config(DEFAULT_CONFIG, config_overrides(chain["tmp"], chain["root"], *OVERRIDES, "train.lr=0.02"))
    assert provenance.fold_done(retrain, 1) is None  # a training setting changed: the fold is stale


def trained_competition(tmp_path: Path) -> tuple[Path, list[str], Config]:
    """A tiny competition taken through preprocess, folds and train: its root, the stages' argv, its config."""
    root = make_competition(tmp_path / "comp")
    argv = stage_argv(tmp_path, root, *OVERRIDES)
    retrain(argv)
    return root, argv, load_config(DEFAULT_CONFIG, config_overrides(tmp_path, root, *OVERRIDES))


def retrain(argv: list[str]) -> None:
    """preprocess, folds and train again, as a user re-running after changing the data."""
    for stage in (preprocess, folds, train):
        assert stage.main(argv) == 0


@pytest.mark.slow
def test_a_fixed_label_remakes_the_folds_and_retrains_every_model_of_the_old_ones(tmp_path, caplog):
    """EDA flags a wrong label and the user fixes train.csv: the folds are made again, and no model trained on
    the old split is kept or resumed (it saw rows that the new split holds out)."""
    root, argv, cfg = trained_competition(tmp_path)
    old = provenance.split_signature(cfg)
    assert old and all(read_json(cfg.run_dir / f"fold{k}" / "result.json")["folds"] == old for k in range(N_FOLDS))
    (cfg.run_dir / "fold0" / "result.json").unlink()  # fold 0 as if killed after its last checkpoint
    table = pd.read_csv(root / "train.csv", dtype=str)
    table.loc[0, "label"] = next(c for c in sorted(set(table["label"])) if c != table.loc[0, "label"])
    table.to_csv(root / "train.csv", index=False)

    caplog.set_level(logging.INFO)
    retrain(argv)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("fold 0: last checkpoint was made on other folds") for m in messages), messages
    assert sum("was trained on other folds" in m for m in messages) == N_FOLDS - 1
    assert all(any(m.startswith(f"fold {k} epoch 2/2") for m in messages) for k in range(N_FOLDS))
    new = provenance.split_signature(cfg)
    assert new != old and all(read_json(cfg.run_dir / f"fold{k}" / "result.json")["folds"] == new
                              for k in range(N_FOLDS))


@pytest.mark.slow
def test_an_image_replaced_in_place_retrains_and_a_touched_one_does_not(tmp_path, caplog):
    """The models record the pixels they saw: touching every image (new mtimes, so preprocess decodes them
    again) keeps every fold; one image replaced by another under its own name retrains every fold."""
    root, argv, cfg = trained_competition(tmp_path)
    old = provenance.images_signature(cfg)
    assert old and read_json(cfg.run_dir / "fold0" / "result.json")["images"] == old
    decoded = read_json(cfg.run_dir / "preprocess.json")["train"]["signature"]
    images = sorted((root / "train").iterdir())
    later = time.time() + 10
    for path in images:
        os.utime(path, (later, later))

    caplog.set_level(logging.INFO)
    retrain(argv)
    messages = [r.getMessage() for r in caplog.records]
    assert read_json(cfg.run_dir / "preprocess.json")["train"]["signature"] != decoded  # decoded again
    assert provenance.images_signature(cfg) == old and not any(" epoch 1/2" in m for m in messages), messages

    Image.open(images[1]).save(images[0])  # another image under the first one's name
    caplog.clear()
    retrain(argv)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("was trained on other images" in m for m in messages) == N_FOLDS, messages
    assert all(any(m.startswith(f"fold {k} epoch 2/2") for m in messages) for k in range(N_FOLDS))
    assert provenance.images_signature(cfg) not in (None, old)


@pytest.mark.slow
def test_interrupted_fold_resumes_from_its_last_checkpoint(chain, caplog):
    """Fold 0 as if the run had been killed after epoch 1: its last checkpoint says epoch 1, no result."""
    run_dir = chain["run_dir"]
    fold = run_dir / "fold0"
    state = torch.load(fold / "last_state.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    state["epoch"] = 1
    torch.save(state, fold / "last_state.pt")
    (fold / "result.json").unlink()
    other = (run_dir / "fold1" / "result.json").read_text()

    caplog.set_level(logging.INFO)
    assert train.main(chain["argv"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("fold 0: resuming after epoch 1 (best accuracy 0.") for m in messages), messages
    assert any(m.startswith("fold 0 epoch 2/2") for m in messages), messages
    assert not any(m.startswith("fold 0 epoch 1/2") for m in messages)  # epoch 1 was not trained again
    assert not any(m.startswith("fold 1 epoch") or m.startswith("fold 2 epoch") for m in messages)
    assert (fold / "result.json").is_file()
    assert read_json(fold / "last.json")["epoch"] == 2
    assert torch.load(fold / "last_state.pt", map_location="cpu", weights_only=True)["epoch"] == 2
    assert (run_dir / "fold1" / "result.json").read_text() == other


@pytest.mark.slow
def test_changed_config_retrains_instead_of_resuming(chain, caplog):
    """A finished fold is only skipped for the very same config; another config starts over."""
    fold = chain["run_dir"] / "fold2"
    before = (fold / "result.json").read_text()
    caplog.set_level(logging.INFO)
    argv = stage_argv(chain["tmp"], chain["root"], *OVERRIDES, "train.folds=[2]", "train.epochs=1")
    assert train.main(argv) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("other training settings; starting over" in m for m in messages), messages
    assert any(m.startswith("fold 2 epoch 1/1") for m in messages)
    assert (fold / "result.json").read_text() != before
    assert read_json(fold / "result.json")["best_epoch"] == 1  # epochs completed when the best was saved


@pytest.mark.slow
def test_eda_stage_on_the_tiny_competition(tmp_path):
    try:
        eda = importlib.import_module("pipeline.eda.stage")
    except ImportError:
        pytest.skip("pipeline.eda.stage is not there")
    if not hasattr(eda, "run") or not hasattr(eda, "main"):
        pytest.skip("pipeline.eda.stage has no run/main")
    root = make_competition(tmp_path / "comp", n_per_class=6, n_test=3)
    assert eda.main(stage_argv(tmp_path, root, f"experiment={EXPERIMENT}")) == 0
    out = tmp_path / "reports"
    assert list(out.rglob("*.html")) and list(out.rglob("*.json"))
    assert not list(root.rglob("*.json")) and not (REPO / "reports" / EXPERIMENT).exists()  # data only read


def test_stage_main_turns_errors_into_exit_code_1(tmp_path, capsys):
    assert train.main(stage_argv(tmp_path, tmp_path / "nowhere")) == 1
    assert "preprocess" in capsys.readouterr().err
    assert preprocess.main(["--config", str(DEFAULT_CONFIG), "--set", "train.epoch=3"]) == 1
    assert "train.epoch" in capsys.readouterr().err


# --------------------------------------------------------------------------- static safety checks


def pipeline_sources() -> list[Path]:
    files = sorted((REPO / "pipeline").rglob("*.py"))
    assert len(files) > 10
    return files


def calls(tree: ast.AST, module: str, names: set[str]):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
                and isinstance(node.func.value, ast.Name) and node.func.value.id == module):
            yield node


def test_torch_load_is_only_called_with_weights_only_true():
    found = 0
    for path in pipeline_sources():
        tree = ast.parse(path.read_text(), str(path))
        for node in calls(tree, "torch", {"load"}):
            found += 1
            flags = [k for k in node.keywords if k.arg == "weights_only"]
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            assert flags, f"{where}: torch.load without weights_only=True"
            assert isinstance(flags[0].value, ast.Constant) and flags[0].value.value is True, where
        # no aliasing around the check (from torch import load / torch.load passed around)
        text = path.read_text()
        assert "from torch import load" not in text and "= torch.load\n" not in text, path
    assert found >= 1  # checkpoints.load_state uses it


def test_yaml_is_only_loaded_safely():
    for path in pipeline_sources():
        text = path.read_text()
        tree = ast.parse(text, str(path))
        unsafe = list(calls(tree, "yaml", {"load", "load_all", "unsafe_load", "full_load", "unsafe_load_all"}))
        assert not unsafe, f"{path.relative_to(REPO)}:{unsafe[0].lineno}: unsafe YAML loading"
        assert "yaml.load(" not in text and "yaml.Loader" not in text and "UnsafeLoader" not in text, path


def test_a_config_key_added_at_its_default_does_not_retrain(tmp_path):
    """Folds trained before a new option existed stay finished while the option keeps its default."""
    import yaml

    cfg = load_config(DEFAULT_CONFIG, config_overrides(tmp_path, None))
    old = yaml.safe_load(provenance.training_fingerprint(cfg))
    del old["model"]["kwargs"]  # as if model.kwargs had been added after this fold was trained
    stored = yaml.safe_dump(old, sort_keys=True)
    assert provenance.same_training(stored, cfg)
    changed = load_config(DEFAULT_CONFIG, config_overrides(tmp_path, None, "model.kwargs={stem: 8}"))
    assert not provenance.same_training(stored, changed)
    assert not provenance.same_training(provenance.training_fingerprint(cfg), changed) and not provenance.same_training(None, cfg)


@pytest.mark.slow
def test_results_report_and_tensorboard_confusion(chain):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline import results

    assert results.main(chain["argv"]) == 0
    out = chain["tmp"] / "reports" / EXPERIMENT / "results"
    page = (out / "index.html").read_text()
    for anchor in ("cv", "classes", "confusion", "wrong", "calibration", "tta", "ensemble"):
        assert f'id="{anchor}"' in page
    assert "<script" not in page and page.count("data:image/png;base64,") >= 2
    report = read_json(out / "results.json")
    oof = pd.read_csv(chain["run_dir"] / "oof_tta.csv", dtype={"id": str, "label": str})
    assert report["source"] == "oof_tta.csv" and report["overall"]["n"] == len(oof)
    assert sum(map(sum, report["confusion_matrix"])) == len(oof) and len(report["folds"]) == N_FOLDS
    assert {c["class"] for c in report["per_class"]} == {"blob", "hstripes", "vstripes"}
    wrong = report["confidently_wrong"]
    assert [w["confidence"] for w in wrong] == sorted((w["confidence"] for w in wrong), reverse=True)
    events = EventAccumulator(str(chain["run_dir"] / "tb" / "fold1"), size_guidance={"images": 0}).Reload()
    assert "confusion_matrix" in events.Tags()["images"]


@pytest.mark.slow
@needs_browser
def test_results_page_in_headless_browser(chain, tmp_path):
    from pipeline import results

    assert results.main(chain["argv"]) == 0
    page = chain["tmp"] / "reports" / EXPERIMENT / "results" / "index.html"
    shot = tmp_path / "results.png"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "eda_screenshot.sh"), str(page), str(shot)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # rendered without console errors
    assert shot.stat().st_size > 10_000
