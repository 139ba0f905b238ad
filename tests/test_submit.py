"""Submission: the sample's id order and columns, both formats, refusals, never overwriting."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import submit
from pipeline.data.contract import DataError

from conftest import make_cfg, stage_argv

CLASSES = ["10", "2", "7"]  # string classes that look like numbers: must not turn into ints or re-sort
IDS = ["0003", "0010", "0001", "0042", "0007"]


def setup_run(tmp_path: Path, sample: pd.DataFrame, preds_ids=IDS, probs=None, name="ensemble.csv",
              experiment="demo") -> tuple[Path, np.ndarray]:
    """A competition folder with ``sample`` and a run folder with a manifest and predictions."""
    root = tmp_path / "comp"
    root.mkdir(exist_ok=True)
    sample.to_csv(root / "sample_submission.csv", index=False)
    run_dir = tmp_path / "runs" / experiment
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"root": str(root), "layout": "csv", "classes": CLASSES, "submission_columns": list(sample.columns),
                "id_col": sample.columns[0], "label_col": "label",
                "test": {"index": "test_index.csv", "n": len(preds_ids)}}
    (run_dir / "preprocess.json").write_text(json.dumps(manifest))
    if probs is None:
        probs = np.random.default_rng(0).random((len(preds_ids), len(CLASSES)))
        probs /= probs.sum(1, keepdims=True)
    frame = pd.DataFrame(probs, columns=CLASSES)
    frame.insert(0, "id", preds_ids)
    frame.to_csv(run_dir / name, index=False)
    return root, probs


def read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str)


def test_labels_submission_follows_sample_order_and_columns(tmp_path):
    sample_ids = ["0042", "0001", "0007", "0003", "0010"]  # another order than the predictions
    sample = pd.DataFrame({"id": sample_ids, "label": "2"})
    root, probs = setup_run(tmp_path, sample)
    path = submit.run(make_cfg(tmp_path, root))
    assert path.parent == tmp_path / "submissions" and path.name.startswith("demo-") and path.suffix == ".csv"
    sub = read(path)
    assert list(sub.columns) == ["id", "label"]
    assert list(sub["id"]) == sample_ids  # zero padding kept, sample order kept
    predicted = dict(zip(IDS, np.asarray(CLASSES)[probs.argmax(1)]))
    assert list(sub["label"]) == [predicted[i] for i in sample_ids]
    assert path.read_text().splitlines()[1].startswith("0042,")


def test_probs_submission_uses_the_sample_class_columns(tmp_path):
    sample = pd.DataFrame({"id": ["0010", "0003", "0007", "0001", "0042"], "7": 0.0, "10": 0.0, "2": 0.0})
    root, probs = setup_run(tmp_path, sample)
    path = submit.run(make_cfg(tmp_path, root, "submit.format=probs"))
    sub = pd.read_csv(path, dtype={"id": str})
    assert list(sub.columns) == ["id", "7", "10", "2"]  # the sample's column order, not the class order
    by_id = pd.DataFrame(probs, columns=CLASSES, index=IDS)
    np.testing.assert_allclose(sub[["7", "10", "2"]].to_numpy(), by_id.loc[list(sub["id"]), ["7", "10", "2"]],
                               rtol=1e-6)
    np.testing.assert_allclose(sub[CLASSES].sum(axis=1), 1.0, rtol=1e-6)


def test_test_probs_are_used_without_an_ensemble(tmp_path):
    sample = pd.DataFrame({"id": IDS, "label": "2"})
    root, probs = setup_run(tmp_path, sample, name="test_probs.csv")
    sub = read(submit.run(make_cfg(tmp_path, root)))
    assert list(sub["label"]) == list(np.asarray(CLASSES)[probs.argmax(1)])


def test_ensemble_is_preferred_over_test_probs(tmp_path):
    sample = pd.DataFrame({"id": IDS, "label": "2"})
    root, _ = setup_run(tmp_path, sample, probs=np.tile([1.0, 0.0, 0.0], (5, 1)), name="test_probs.csv")
    setup_run(tmp_path, sample, probs=np.tile([0.0, 0.0, 1.0], (5, 1)), name="ensemble.csv")
    assert set(read(submit.run(make_cfg(tmp_path, root)))["label"]) == {"7"}


def test_missing_ids_are_refused(tmp_path):
    sample = pd.DataFrame({"id": IDS + ["0099"], "label": "2"})
    root, _ = setup_run(tmp_path, sample)
    with pytest.raises(ValueError, match="0099"):
        submit.run(make_cfg(tmp_path, root))
    assert not list((tmp_path / "submissions").glob("*.csv")) if (tmp_path / "submissions").exists() else True


def test_probs_format_refuses_columns_that_are_not_classes(tmp_path):
    sample = pd.DataFrame({"id": IDS, "10": 0.0, "2": 0.0, "wolf": 0.0})
    root, _ = setup_run(tmp_path, sample)
    with pytest.raises(ValueError, match="wolf"):
        submit.run(make_cfg(tmp_path, root, "submit.format=probs"))


def test_validate_catches_mismatches():
    sample = pd.DataFrame({"id": ["1", "2"], "label": ["a", "a"]})
    submit.validate(sample, sample, ["a", "b"], "id", "label", "labels")
    with pytest.raises(ValueError, match="order"):
        submit.validate(sample.iloc[::-1].reset_index(drop=True), sample, ["a", "b"], "id", "label", "labels")
    with pytest.raises(ValueError, match="outside the training classes"):
        submit.validate(sample.assign(label=["a", "c"]), sample, ["a", "b"], "id", "label", "labels")
    with pytest.raises(ValueError, match="columns"):
        submit.validate(sample.assign(extra=1), sample, ["a", "b"], "id", "label", "labels")


def test_never_overwrites_an_earlier_submission(tmp_path):
    sample = pd.DataFrame({"id": IDS, "label": "2"})
    root, _ = setup_run(tmp_path, sample)
    cfg = make_cfg(tmp_path, root)
    first = submit.run(cfg)
    first_text = first.read_text()
    second = submit.run(cfg)
    third = submit.run(cfg)
    assert len({first, second, third}) == 3
    assert all(p.is_file() for p in (first, second, third))
    assert first.read_text() == first_text
    assert sorted((tmp_path / "submissions").iterdir()) == sorted([first, second, third])  # no temp files left


def test_write_new_picks_a_fresh_name(tmp_path):
    sub = pd.DataFrame({"id": ["1"], "label": ["a"]})
    (tmp_path / "x.csv").write_text("earlier\n")
    path = submit.write_new(sub, tmp_path, "x")
    assert path.name == "x-1.csv"
    assert (tmp_path / "x.csv").read_text() == "earlier\n"


def test_main_prints_the_submission_path_last(tmp_path, capsys):
    sample = pd.DataFrame({"id": IDS, "label": "2"})
    root, _ = setup_run(tmp_path, sample)
    assert submit.main(stage_argv(tmp_path, root)) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("submission: ")
    path = Path(last[len("submission: "):])
    assert path.is_file() and path.parent == tmp_path / "submissions"


def test_main_fails_cleanly_without_predictions(tmp_path, capsys):
    sample = pd.DataFrame({"id": IDS, "label": "2"})
    root, _ = setup_run(tmp_path, sample)
    (tmp_path / "runs" / "demo" / "ensemble.csv").unlink()
    assert submit.main(stage_argv(tmp_path, root)) == 1
    captured = capsys.readouterr()
    assert "submission:" not in captured.out
    assert "run infer" in captured.err


def test_imagefolder_competition_submits_id_label_over_the_test_folder(tmp_path):
    from PIL import Image

    from pipeline import preprocess

    from conftest import CLASSES as PATTERNS, pattern

    root, rng = tmp_path / "folder_comp", np.random.default_rng(0)
    for label in PATTERNS:
        (root / "train" / label).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(pattern(label, rng)).save(root / "train" / label / f"{k}.png")
    (root / "test").mkdir()
    for k in range(3):
        Image.fromarray(pattern("blob", rng)).save(root / "test" / f"t{k}.png")
    cfg = make_cfg(tmp_path, root)
    manifest = preprocess.run(cfg)
    assert not (root / "sample_submission.csv").exists()
    probs = pd.DataFrame(np.eye(3)[[2, 0, 1]], columns=manifest["classes"])
    probs.insert(0, "id", ["t0", "t1", "t2"])
    probs.to_csv(cfg.run_dir / "test_probs.csv", index=False)
    sub = read(submit.run(cfg))
    assert list(sub.columns) == ["id", "label"]
    assert list(sub["id"]) == ["t0", "t1", "t2"]
    assert list(sub["label"]) == [manifest["classes"][i] for i in (2, 0, 1)]


def test_format_follows_the_sample_submission_without_submit_format(tmp_path):
    probs_sample = pd.DataFrame({"id": IDS, "2": 0.0, "10": 0.0, "7": 0.0})
    root, probs = setup_run(tmp_path, probs_sample)
    sub = pd.read_csv(submit.run(make_cfg(tmp_path, root)), dtype={"id": str})  # submit.format left at auto
    assert list(sub.columns) == ["id", "2", "10", "7"]
    np.testing.assert_allclose(sub[CLASSES].to_numpy(), probs, rtol=1e-6)
    labels_sample = pd.DataFrame({"id": IDS, "label": "2"})
    (tmp_path / "b").mkdir()
    root, probs = setup_run(tmp_path / "b", labels_sample)
    sub = read(submit.run(make_cfg(tmp_path / "b", root)))
    assert list(sub.columns) == ["id", "label"] and list(sub["label"]) == list(np.asarray(CLASSES)[probs.argmax(1)])


def test_a_sample_of_neither_format_is_refused_naming_its_columns(tmp_path):
    root, _ = setup_run(tmp_path, pd.DataFrame({"id": IDS, "target": "2"}))
    with pytest.raises(ValueError, match=r"'target'.*submit.format"):
        submit.run(make_cfg(tmp_path, root))


def test_na_like_ids_are_submitted_as_written(tmp_path):
    ids = ["NA", "None", "null", "n/a", "0001"]
    root, probs = setup_run(tmp_path, pd.DataFrame({"id": ids, "label": "2"}), preds_ids=ids)
    sub = submit.run(make_cfg(tmp_path, root))
    lines = sub.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["id"] + ids
    assert [line.split(",")[1] for line in lines[1:]] == list(np.asarray(CLASSES)[probs.argmax(1)])


def test_sample_submission_in_the_configured_encoding(tmp_path):
    ids = ["caf\u00e9", "0001"]
    root, _ = setup_run(tmp_path, pd.DataFrame({"id": ids, "label": "2"}), preds_ids=ids)
    sample = root / "sample_submission.csv"
    sample.write_bytes(sample.read_text(encoding="utf-8").encode("latin-1"))
    with pytest.raises(DataError, match=r"sample_submission.csv: not utf-8 text: byte 0xe9 at offset 12 "
                                        r"\(line 2\).*data.csv_encoding=latin-1"):
        submit.run(make_cfg(tmp_path, root))
    sub = read(submit.run(make_cfg(tmp_path, root, "data.csv_encoding=latin-1")))
    assert list(sub["id"]) == ids
