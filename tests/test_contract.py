"""The data contract: every problem reported at once, string ids, both layouts, per-file extensions."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import preprocess
from pipeline.rundir import load_split
from pipeline.data.contract import DataError, check, load_competition, sort_classes

from conftest import CLASSES, make_cfg, make_competition, pattern


def problems_of(cfg) -> list[str]:
    """Every problem :func:`check` reports (it must raise once, with all of them)."""
    comp = load_competition(cfg.data)
    with pytest.raises(DataError) as err:
        check(comp, cfg.folds.n_splits)
    return err.value.problems


def test_clean_competition_passes(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition)
    comp = load_competition(cfg.data)
    check(comp, cfg.folds.n_splits)
    assert comp.layout == "csv"
    assert comp.classes == sorted(CLASSES)
    assert len(comp.train) == 36 and len(comp.test) == 6
    assert comp.submission_columns == ["id", "label"]
    assert comp.problems == []


def test_every_problem_is_reported_at_once(tmp_path, competition):
    root = competition
    train = pd.read_csv(root / "train.csv", dtype=str)
    (root / "outside.png").write_bytes((root / "train" / "0000.png").read_bytes())
    os.symlink(root / "outside.png", root / "train" / "link.png")
    (root / "train" / "8888.png").write_bytes((root / "train" / "0000.png").read_bytes())
    (root / "test" / "9999.png").write_bytes((root / "test" / "0036.png").read_bytes())  # not in sample
    extra = pd.DataFrame([
        {"id": "7777", "label": "blob"},                 # missing image
        {"id": train.at[0, "id"], "label": "blob"},      # duplicate id
        {"id": "0001", "label": np.nan},                 # NaN label (written as an empty field)
        {"id": "../outside", "label": "blob"},           # escapes the folder
        {"id": str(root / "outside"), "label": "blob"},  # absolute path
        {"id": "link", "label": "blob"},                 # symlink out of train/
        {"id": "8888", "label": "rare"},                 # a class with 1 image < 3 folds
    ])
    pd.concat([train, extra], ignore_index=True).to_csv(root / "train.csv", index=False)
    cfg = make_cfg(tmp_path, root)

    problems = problems_of(cfg)
    text = "\n".join(problems)
    n = len(train)
    row = lambda k: f"row {n + 2 + k}"  # noqa: E731 (1-based, header is row 1)
    expected = {
        "missing image": (row(0), "'7777' has no image"),
        "duplicate": (row(1), "duplicate id"),
        "NaN label": (row(2), "empty or NaN label"),
        "dotdot": (row(3), "escapes the image folder"),
        "absolute": (row(4), "escapes the image folder"),
        "symlink": (row(5), "link out of the image folder"),
        "rare class": ("class 'rare'", "fewer than folds.n_splits=3"),
        "test absent": ("9999.png", "absent from sample_submission.csv"),
    }
    for name, parts in expected.items():
        assert any(all(p in line for p in parts) for line in problems), f"{name} not reported:\n{text}"
    # and preprocess refuses to run, with the same full list, before writing any cache
    with pytest.raises(DataError) as err:
        preprocess.run(cfg)
    assert len(err.value.problems) == len(problems)
    assert not (tmp_path / "cache").exists()


def test_data_error_message_lists_every_problem():
    err = DataError(["a is bad", "b is worse"])
    assert "2 data problem(s)" in str(err) and "a is bad" in str(err) and "b is worse" in str(err)


def test_unreadable_image_is_reported_at_decode(tmp_path, competition):
    (competition / "train" / "0003.png").write_bytes(b"this is not a png" * 10)
    (competition / "test" / "0037.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)  # truncated
    cfg = make_cfg(tmp_path, competition)
    check(load_competition(cfg.data), cfg.folds.n_splits)  # structurally fine
    with pytest.raises(DataError) as err:
        preprocess.run(cfg)
    problems = err.value.problems
    assert any("0003.png" in p and "unreadable image" in p for p in problems), problems
    assert any("0037.png" in p and "unreadable image" in p for p in problems), problems
    assert not (cfg.run_dir / "preprocess.json").exists()
    assert not list((tmp_path / "cache").glob("*.npy"))  # no half-written cache is left behind


def test_preprocess_main_reports_data_errors(tmp_path, competition, capsys):
    from conftest import stage_argv

    (competition / "train" / "0005.png").unlink()
    assert preprocess.main(stage_argv(tmp_path, competition)) == 1
    assert "0005" in capsys.readouterr().err


def test_ids_stay_strings(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition)
    comp = load_competition(cfg.data)
    assert "0012" in set(comp.train["id"]) and "0036" in set(comp.test["id"])
    manifest = preprocess.run(cfg)
    _, train_index = load_split(cfg.run_dir, "train", manifest)
    _, test_index = load_split(cfg.run_dir, "test", manifest)
    assert "0012" in set(train_index["id"]) and "0000" in set(train_index["id"])
    assert list(test_index["id"]) == [f"{i:04d}" for i in range(36, 42)]
    assert "0012," in (cfg.run_dir / "train_index.csv").read_text()


def test_preprocess_cache_matches_images_and_is_reused(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition)
    manifest = preprocess.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    assert images.shape == (36, 16, 16, 3) and images.dtype == np.uint8
    row = int(np.flatnonzero(index["id"].to_numpy() == "0004")[0])
    with Image.open(competition / "train" / "0004.png") as img:
        expected = np.asarray(img.convert("RGB").resize((16, 16), Image.BICUBIC, reducing_gap=3.0))
    np.testing.assert_array_equal(images[row], expected)
    assert index.at[row, "label"] == "hstripes"
    assert index.at[row, "label_idx"] == manifest["classes"].index("hstripes")
    assert manifest["classes"] == sorted(CLASSES)
    assert all(0 < m < 1 for m in manifest["mean"]) and all(0 < s < 1 for s in manifest["std"])
    array = manifest["train"]["array"]
    mtime = os.stat(array).st_mtime_ns
    assert preprocess.run(cfg) == manifest
    assert os.stat(array).st_mtime_ns == mtime  # unchanged files: cache reused


def test_imagefolder_layout_loads_and_preprocesses(tmp_path):
    root = tmp_path / "folder_comp"
    rng = np.random.default_rng(1)
    for label in CLASSES:
        (root / "train" / label).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(pattern(label, rng)).save(root / "train" / label / f"img{k}.png")
    (root / "test").mkdir()
    for k in range(3):
        Image.fromarray(pattern("blob", rng)).save(root / "test" / f"t{k}.png")
    cfg = make_cfg(tmp_path, root)
    comp = load_competition(cfg.data)
    assert comp.layout == "imagefolder"
    assert comp.classes == sorted(CLASSES)
    assert len(comp.train) == 12 and sorted(comp.test["id"]) == ["t0", "t1", "t2"]
    assert set(comp.train.loc[comp.train["label"] == "blob", "id"]) == {f"blob/img{k}" for k in range(4)}
    check(comp, cfg.folds.n_splits)
    manifest = preprocess.run(cfg)
    assert manifest["layout"] == "imagefolder" and manifest["train"]["n"] == 12 and manifest["test"]["n"] == 3


def test_imagefolder_file_outside_class_folder_is_a_problem(tmp_path):
    root = tmp_path / "folder_comp"
    rng = np.random.default_rng(2)
    for label in ("a", "b"):
        (root / "train" / label).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(pattern("blob", rng)).save(root / "train" / label / f"{k}.png")
    Image.fromarray(pattern("blob", rng)).save(root / "train" / "stray.png")
    problems = problems_of(make_cfg(tmp_path, root))
    assert any("stray.png" in p and "outside any class folder" in p for p in problems)


def test_extension_is_found_per_file(tmp_path, competition):
    # half the train images become JPEGs, one test image too
    for image_id in ("0001", "0013", "0025", "0030"):
        png = competition / "train" / f"{image_id}.png"
        with Image.open(png) as img:
            img.convert("RGB").save(competition / "train" / f"{image_id}.jpg", quality=95)
        png.unlink()
    with Image.open(competition / "test" / "0040.png") as img:
        img.convert("RGB").save(competition / "test" / "0040.jpeg")
    (competition / "test" / "0040.png").unlink()
    cfg = make_cfg(tmp_path, competition)
    comp = load_competition(cfg.data)
    check(comp, cfg.folds.n_splits)
    paths = dict(zip(comp.train["id"], comp.train["path"]))
    assert paths["0001"].endswith("0001.jpg") and paths["0002"].endswith("0002.png")
    assert dict(zip(comp.test["id"], comp.test["path"]))["0040"].endswith("0040.jpeg")
    manifest = preprocess.run(cfg)
    assert manifest["train"]["n"] == 36 and manifest["test"]["n"] == 6


def test_custom_column_names(tmp_path):
    root = make_competition(tmp_path / "comp")
    train = pd.read_csv(root / "train.csv", dtype=str).rename(columns={"id": "image_id", "label": "target"})
    train.to_csv(root / "train.csv", index=False)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str).rename(columns={"id": "image_id",
                                                                                    "label": "target"})
    sample.to_csv(root / "sample_submission.csv", index=False)
    cfg = make_cfg(tmp_path, root, "data.id_col=image_id", "data.label_col=target")
    comp = load_competition(cfg.data)
    check(comp, cfg.folds.n_splits)
    assert comp.submission_columns == ["image_id", "target"]
    assert "0012" in set(comp.train["id"])
    found = load_competition(make_cfg(tmp_path, root).data)  # unambiguous: found without the settings
    assert (found.id_col, found.label_col) == ("image_id", "target")


def test_subset_is_stratified_and_of_the_requested_size(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, "data.subset=18", "data.subset_seed=3")
    comp = load_competition(cfg.data)
    assert len(comp.train) == 18
    assert comp.train["label"].value_counts().to_dict() == {c: 6 for c in CLASSES}
    again = load_competition(cfg.data)
    assert list(again.train["id"]) == list(comp.train["id"])  # a fixed subset
    other = load_competition(make_cfg(tmp_path, competition, "data.subset=18", "data.subset_seed=4").data)
    assert list(other.train["id"]) != list(comp.train["id"])
    manifest = preprocess.run(cfg)
    assert manifest["train"]["n"] == 18


def test_missing_root_and_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_competition(make_cfg(tmp_path, tmp_path / "nowhere").data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither"):
        load_competition(make_cfg(tmp_path, tmp_path / "empty").data)


def test_single_class_is_refused(tmp_path):
    root = make_competition(tmp_path / "comp", classes=("only",))
    problems = problems_of(make_cfg(tmp_path, root))
    assert any("at least 2" in p for p in problems)


def test_sort_classes_is_numeric_for_integer_labels():
    assert sort_classes(["10", "9", "1", "0"]) == ["0", "1", "9", "10"]
    assert sort_classes(["b", "a", "10"]) == ["10", "a", "b"]


def test_ids_written_with_their_extension(tmp_path, competition):
    """Some competitions (e.g. Cassava) list ``1000015157.jpg`` in train.csv and sample_submission.csv."""
    for name in ("train.csv", "sample_submission.csv"):
        table = pd.read_csv(competition / name, dtype=str)
        table["id"] = table["id"] + ".png"
        table.to_csv(competition / name, index=False)
    cfg = make_cfg(tmp_path, competition)
    comp = load_competition(cfg.data)
    assert comp.problems == []
    check(comp, cfg.folds.n_splits)
    assert "0012.png" in set(comp.train["id"])
    # a test image missing from the sample is still reported
    (competition / "test" / "9999.png").write_bytes((competition / "test" / "0036.png").read_bytes())
    assert any("9999.png" in p and "absent" in p for p in load_competition(cfg.data).problems)


def plant_image_and_csv_faults(root: Path) -> None:
    """A truncated JPEG, random bytes, an empty file (train) and a truncated PNG (test), plus CSV problems."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.open(root / "train" / "0000.png").convert("RGB").save(buf, format="JPEG")
    (root / "train" / "0000.png").unlink()
    (root / "train" / "0000.jpg").write_bytes(buf.getvalue()[:200])  # truncated JPEG
    (root / "train" / "0001.png").write_bytes(np.random.default_rng(0).bytes(500))  # random bytes
    (root / "train" / "0002.png").write_bytes(b"")  # empty file
    (root / "test" / "0036.png").write_bytes((root / "test" / "0036.png").read_bytes()[:60])
    train = pd.read_csv(root / "train.csv", dtype=str)
    extra = pd.DataFrame([{"id": "7777", "label": "blob"}, {"id": "0003", "label": "blob"},
                          {"id": "0004", "label": np.nan}])
    pd.concat([train, extra], ignore_index=True).to_csv(root / "train.csv", index=False)


def test_csv_and_image_problems_in_one_report_with_file_and_row(tmp_path, competition):
    plant_image_and_csv_faults(competition)
    cfg = make_cfg(tmp_path, competition)
    with pytest.raises(DataError) as err:
        preprocess.run(cfg)
    problems = err.value.problems
    train = pd.read_csv(competition / "train.csv", dtype=str)
    row = {i: f"train.csv row {r + 2}: id '{i}'" for r, i in zip(train.index[::-1], train["id"][::-1])}  # first
    n = len(train)
    expected = [f"train.csv row {n - 1}: id '7777' has no image", f"train.csv row {n}: duplicate id '0003'",
                f"train.csv row {n + 1}: empty or NaN label", f"train.csv row {n + 1}: duplicate id '0004'",
                f"{row['0000']}: {competition / 'train' / '0000.jpg'}: unreadable image",
                f"{row['0001']}: {competition / 'train' / '0001.png'}: unreadable image",
                f"{row['0002']}: {competition / 'train' / '0002.png'}: unreadable image",
                f"sample_submission.csv row 2: id '0036': {competition / 'test' / '0036.png'}: unreadable image"]
    for text in expected:
        assert any(text in p for p in problems), f"{text!r} not in:\n" + "\n".join(problems)
    assert len(problems) == len(expected)
    assert not (tmp_path / "cache").exists()


def test_image_problems_alone_name_their_rows_too(tmp_path, competition):
    (competition / "train" / "0002.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        preprocess.run(make_cfg(tmp_path, competition))
    train = pd.read_csv(competition / "train.csv", dtype=str)
    line = int(train.index[train["id"] == "0002"][0]) + 2
    assert err.value.problems == [f"{competition / 'train.csv'} row {line}: id '0002': "
                                  f"{competition / 'train' / '0002.png'}: unreadable image "
                                  + err.value.problems[0].split("unreadable image ")[1]]
