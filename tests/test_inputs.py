"""Awkward inputs: labels pandas would turn into NaN or that differ by whitespace, formula-like cells, other
text encodings, decomposed Unicode file names, empty test sets, odd sample submissions and huge images."""
from __future__ import annotations

import logging
import struct
import unicodedata
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import folds, preprocess
from pipeline.data.contract import DataError, check, load_competition, looks_like_formula, structural_problems
from pipeline.eda.scan import scan_paths
from pipeline.rundir import ReportDir

from conftest import make_cfg, make_competition, pattern, stage_argv


def relabel(root: Path, mapping: dict[str, str]) -> pd.DataFrame:
    """Rename classes in train.csv (written as is) and return the new table."""
    train = pd.read_csv(root / "train.csv", dtype=str)
    train["label"] = train["label"].map(lambda x: mapping.get(x, x))
    train.to_csv(root / "train.csv", index=False)
    return train


def report_of(cfg) -> list[str]:
    """Every problem the preprocess stage reports (it must raise once, with all of them)."""
    with pytest.raises(DataError) as err:
        preprocess.run(cfg)
    return err.value.problems


def huge_png(path: Path, width: int, height: int) -> None:
    """A 1-bit black PNG of ``width`` x ``height``: a few kB on disk, written without holding its pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------- labels as written


def test_na_like_labels_reach_the_folds(tmp_path, competition):
    relabel(competition, {"blob": "NA", "hstripes": "None"})
    cfg = make_cfg(tmp_path, competition)
    preprocess.run(cfg)
    frame = folds.run(cfg)
    assert set(frame["label"]) == {"NA", "None", "vstripes"}


def test_duplicate_groups_keep_na_like_ids(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, "folds.group_duplicates=true")
    path = ReportDir.of(cfg).duplicate_groups
    path.parent.mkdir(parents=True)
    pd.DataFrame({"id": ["NA", "None", "0003"], "split": "train", "dup_group": [0, 0, 1]}).to_csv(path, index=False)
    groups = folds.duplicate_groups(cfg, pd.Series(["NA", "None", "0003", "0004"]))
    assert list(groups) == ["dup:0", "dup:0", "dup:1", "id:0004"]


def test_labels_with_surrounding_whitespace_are_problems_naming_the_row(tmp_path, competition):
    train = pd.read_csv(competition / "train.csv", dtype=str)
    first = int(train.index[train["label"] == "blob"][0])
    train.loc[first, "label"] = "blob "  # a trailing space: another class in disguise
    second = int(train.index[train["label"] == "vstripes"][0])
    train.loc[second, "label"] = " vstripes"
    train.to_csv(competition / "train.csv", index=False)
    problems = report_of(make_cfg(tmp_path, competition))
    csv = competition / "train.csv"
    assert f"{csv} row {first + 2}: label 'blob ' has surrounding whitespace (also written 'blob')" in problems
    assert f"{csv} row {second + 2}: label ' vstripes' has surrounding whitespace (also written 'vstripes')" \
        in problems


def test_labels_in_two_unicode_forms_are_problems(tmp_path, competition):
    composed = "caf\u00e9"
    relabel(competition, {"blob": composed})
    train = pd.read_csv(competition / "train.csv", dtype=str)
    row = int(train.index[train["label"] == composed][0])
    train.loc[row, "label"] = unicodedata.normalize("NFD", composed)
    train.to_csv(competition / "train.csv", index=False)
    problems = report_of(make_cfg(tmp_path, competition))
    assert any(p.startswith(f"{competition / 'train.csv'} row {row + 2}: label 'cafe\u0301' is also written 'café'")
               for p in problems), problems


def test_a_continuous_label_column_is_one_problem_not_one_per_value(tmp_path, competition, capsys):
    train = pd.read_csv(competition / "train.csv", dtype=str)
    train["label"] = [f"{v:.4f}" for v in np.random.default_rng(0).uniform(0, 10, len(train))]  # a regression target
    train.to_csv(competition / "train.csv", index=False)
    assert preprocess.main(stage_argv(tmp_path, competition)) == 1
    err = capsys.readouterr().err
    err = err[err.index("error: "):]  # after the image check's progress bar
    assert err.startswith("error: 1 data problem(s):") and err.count("\n") == 2, err
    assert f"the label column 'label' looks continuous: {len(train)} distinct numbers" in err
    assert "bin a regression target into classes first" in err and "class '" not in err


def test_numbered_classes_and_a_rare_decimal_class_are_not_continuous(tmp_path, competition):
    relabel(competition, {"blob": "1", "hstripes": "2", "vstripes": "2.5"})  # classes that are numbers
    assert structural_problems(load_competition(make_cfg(tmp_path, competition).data), 3) == []
    train = relabel(competition, {"2.5": "0.5"})
    train.loc[0, "label"] = "7.25"  # one rare value among numbered classes: named as a small class, as before
    train.to_csv(competition / "train.csv", index=False)
    problems = structural_problems(load_competition(make_cfg(tmp_path, competition).data), 3)
    assert problems == ["class '7.25' has 1 image(s), fewer than folds.n_splits=3"]


# --------------------------------------------------------------------------- formula-like cells


def test_formula_rule():
    for text in ("=HYPERLINK(\"http://x\",\"y\")", "+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx", "-x"):
        assert looks_like_formula(text), text
    for text in ("-1", "+3", "-0.5", "1e-3", "cat", "a=b", "0012"):
        assert not looks_like_formula(text), text


def test_formula_like_labels_and_ids_are_refused_naming_their_rows(tmp_path, competition):
    train = relabel(competition, {"blob": "=HYPERLINK(\"http://evil\",\"blob\")"})
    sample = pd.read_csv(competition / "sample_submission.csv", dtype=str)
    (competition / "test" / f"{sample.at[0, 'id']}.png").rename(competition / "test" / "@0036.png")
    sample.loc[0, "id"] = "@0036"
    sample.to_csv(competition / "sample_submission.csv", index=False)
    problems = report_of(make_cfg(tmp_path, competition))
    rows = [i + 2 for i in train.index[train["label"].str.startswith("=")]]
    formula = [p for p in problems if "looks like a spreadsheet formula" in p]
    assert len(formula) == len(rows) + 1
    assert f"{competition / 'train.csv'} row {rows[0]}: label '=HYPERLINK" in formula[0]
    assert formula[-1].startswith(f"{competition / 'sample_submission.csv'} row 2: id '@0036'")
    assert all("data.allow_formula_cells=true" in p for p in formula)


def test_allowed_formula_like_labels_are_warned_about(tmp_path, competition, caplog):
    relabel(competition, {"blob": "=1+1", "vstripes": "-1"})  # -1 is a number, not a formula
    cfg = make_cfg(tmp_path, competition, "data.allow_formula_cells=true")
    with caplog.at_level(logging.WARNING):
        manifest = preprocess.run(cfg)
    assert "=1+1" in manifest["classes"]
    warned = [r.getMessage() for r in caplog.records if "spreadsheet formula" in r.getMessage()]
    assert len(warned) == 12 and all("label '=1+1'" in w for w in warned)


# --------------------------------------------------------------------------- encodings and file names


def test_csv_in_another_encoding_is_named_with_its_offset(tmp_path, competition, capsys):
    relabel(competition, {"blob": "caf\u00e9"})
    text = (competition / "train.csv").read_text(encoding="utf-8")
    (competition / "train.csv").write_bytes(text.encode("latin-1"))
    offset = text.encode("latin-1").index(b"\xe9")
    assert preprocess.main(stage_argv(tmp_path, competition)) == 1
    err = capsys.readouterr().err
    assert f"{competition / 'train.csv'}: not utf-8 text: byte 0xe9 at offset {offset}" in err
    assert "--set data.csv_encoding=latin-1" in err and "Traceback" not in err
    manifest = preprocess.run(make_cfg(tmp_path, competition, "data.csv_encoding=latin-1"))
    assert "caf\u00e9" in manifest["classes"]
    (competition / "train.csv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # UTF-8 with a byte-order mark
    comp = load_competition(make_cfg(tmp_path, competition).data)
    assert comp.problems == [] and "caf\u00e9" in comp.classes


def test_decomposed_file_names_match_composed_ids(tmp_path, competition):
    composed = "caf\u00e9"
    train = pd.read_csv(competition / "train.csv", dtype=str)
    old = train.at[0, "id"]
    decomposed = unicodedata.normalize("NFD", composed)
    (competition / "train" / f"{old}.png").rename(competition / "train" / f"{decomposed}.png")
    train.loc[0, "id"] = composed
    train.to_csv(competition / "train.csv", index=False)
    cfg = make_cfg(tmp_path, competition)
    comp = load_competition(cfg.data)
    assert comp.problems == []
    assert Path(comp.train.at[0, "path"]).is_file() and comp.train.at[0, "id"] == composed


# --------------------------------------------------------------------------- found before training


def test_empty_test_set_is_a_problem(tmp_path, competition):
    for image in (competition / "test").iterdir():
        image.unlink()
    pd.DataFrame({"id": [], "label": []}).to_csv(competition / "sample_submission.csv", index=False)
    problems = structural_problems(load_competition(make_cfg(tmp_path, competition).data), 3)
    assert problems == [f"{competition / 'test'}: no test images (sample_submission.csv lists none): the pipeline "
                        "predicts a test set"]


def test_imagefolder_without_test_images_is_a_problem(tmp_path):
    root, rng = tmp_path / "folder_comp", np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "train" / label).mkdir(parents=True)
        for k in range(3):
            Image.fromarray(pattern("blob", rng)).save(root / "train" / label / f"{k}.png")
    cfg = make_cfg(tmp_path, root)
    with pytest.raises(DataError, match="no test images"):
        check(load_competition(cfg.data), cfg.folds.n_splits)


def test_sample_submission_with_an_extra_column_is_in_the_same_report(tmp_path, competition):
    sample = pd.read_csv(competition / "sample_submission.csv", dtype=str)
    sample.assign(notes="x").to_csv(competition / "sample_submission.csv", index=False)
    (competition / "train" / "0005.png").unlink()
    problems = report_of(make_cfg(tmp_path, competition))
    assert any("0005" in p and "has no image" in p for p in problems), problems
    assert f"{competition / 'sample_submission.csv'}: submit.format=labels: the sample submission's columns " \
           "['id', 'label', 'notes'] should be ['id', 'label']; the submission cannot fill ['notes']" in problems


def test_sample_submission_missing_a_class_column_is_a_problem(tmp_path, competition):
    sample = pd.read_csv(competition / "sample_submission.csv", dtype=str)[["id"]].assign(blob=0.0, hstripes=0.0)
    sample.to_csv(competition / "sample_submission.csv", index=False)
    problems = report_of(make_cfg(tmp_path, competition, "submit.format=probs"))
    assert problems == [f"{competition / 'sample_submission.csv'}: submit.format=probs: the sample submission has "
                        "no column for class(es) ['vstripes']"]


# --------------------------------------------------------------------------- image size


def test_image_over_max_pixels_is_refused_naming_it(tmp_path, competition):
    big = np.zeros((40, 50, 3), dtype=np.uint8)
    Image.fromarray(big).save(competition / "train" / "0003.png")
    problems = report_of(make_cfg(tmp_path, competition, "data.max_pixels=1024"))
    assert len(problems) == 1
    assert problems[0].endswith(f"{competition / 'train' / '0003.png'}: image too large: 50x40 is 0.0 Mpx, over "
                                "data.max_pixels=1024: shrink the file, or raise the limit (--set data.max_pixels=N)")
    assert "train.csv row" in problems[0]


def test_default_limit_refuses_a_huge_image_without_decoding_it(tmp_path, competition, recwarn):
    huge_png(competition / "train" / "0003.png", 10_000, 10_000)  # 100 Mpx: Pillow itself would only warn
    problems = report_of(make_cfg(tmp_path, competition))
    assert len(problems) == 1 and "0003.png: image too large: 10000x10000 is 100.0 Mpx, over data.max_pixels=" \
        "64000000" in problems[0]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_eda_scan_lists_a_huge_image_as_unreadable(tmp_path):
    huge_png(tmp_path / "big.png", 10_000, 10_000)
    row = scan_paths([str(tmp_path / "big.png")], workers=1, max_pixels=64_000_000).iloc[0]
    assert not row["readable"] and "data.max_pixels" in row["error"]
