"""EDA stage on small generated competitions with planted facts (and a clean one that must report nothing)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.core.config import from_dict
from pipeline.eda import stage as eda
from pipeline.eda.dups import near_pairs

from conftest import needs_browser

ROOT = Path(__file__).resolve().parents[1]


def smooth_image(seed: int, size: int = 48) -> Image.Image:
    """A distinct, smooth random RGB image (low-frequency content, so pHash is stable under resizing)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize((size, size), Image.BICUBIC)


def write_competition(root: Path, train: dict[str, tuple[str, Image.Image | bytes, str]],
                      test: dict[str, tuple[str, Image.Image | bytes]]) -> Path:
    """Write train.csv, sample_submission.csv and the image files; values are (label, image|bytes, ext)."""
    for split, rows in (("train", {k: v[1:] for k, v in train.items()}), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for image_id, (img, ext) in rows.items():
            path = root / split / f"{image_id}.{ext}"
            if isinstance(img, bytes):
                path.write_bytes(img)
            else:
                img.save(path)
    pd.DataFrame({"id": list(train), "label": [v[0] for v in train.values()]}).to_csv(root / "train.csv", index=False)
    pd.DataFrame({"id": list(test), "label": "cat"}).to_csv(root / "sample_submission.csv", index=False)
    return root


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def config(root: Path, out: Path, **eda_kwargs):
    return from_dict({"experiment": "t", "data": {"root": str(root)}, "eda": {"out_dir": str(out), **eda_kwargs}})


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A competition with known class counts, a corrupt file, duplicates, odd modes and an EXIF rotation."""
    root = tmp_path_factory.mktemp("planted")
    img = {i: smooth_image(i) for i in range(40)}
    exif = Image.Exif()
    exif[0x0112] = 6
    train = {f"cat{i}": ("cat", img[i], "png") for i in range(8)}                      # 8 cats …
    train["cat_copy"] = ("cat", encoded(img[0], "PNG"), "png")  # … + exact copy of cat0
    train["cat_trunc"] = ("cat", encoded(img[30], "JPEG")[:300], "jpg")                # … + a truncated JPEG = 10
    train.update({f"dog{i}": ("dog", img[10 + i], "png") for i in range(4)})
    train["dog_conflict"] = ("dog", encoded(img[1], "PNG"), "png")                     # same bytes as cat1
    train["dog_rot"] = ("dog", encoded(img[14], "JPEG", exif=exif), "jpg")             # 6 dogs
    train["bird_gray"] = ("bird", img[15].convert("L"), "png")
    train["bird_rgba"] = ("bird", img[16].convert("RGBA"), "png")
    train["bird_16"] = ("bird", Image.fromarray((np.asarray(img[17].convert("L"), np.uint16) * 257)), "png")  # 3
    test = {f"t{i}": (img[20 + i], "png") for i in range(5)}
    test["t_near"] = (encoded(img[2].resize((40, 40), Image.BILINEAR), "JPEG", quality=85), "jpg")  # ~ cat2
    for key in ("cat0", "cat1"):  # cat0/cat1 are saved as PNG by PIL; make copies byte-identical
        train[key] = (train[key][0], encoded(img[int(key[-1])], "PNG"), "png")
    write_competition(root, train, test)
    before = snapshot(root)
    result = eda.run(config(root, tmp_path_factory.mktemp("out")))
    assert snapshot(root) == before, "EDA must never modify the data"
    return result, json.loads(result.json.read_text())


def snapshot(root: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    train = {f"a{i}": (["x", "y", "z"][i % 3], smooth_image(100 + i), "png") for i in range(24)}
    test = {f"b{i}": (smooth_image(200 + i), "png") for i in range(8)}
    write_competition(root, train, test)
    result = eda.run(config(root, tmp_path_factory.mktemp("out")))
    return root, result, json.loads(result.json.read_text())


def test_class_counts_and_imbalance(planted):
    _, report = planted
    assert report["classes"]["counts"] == {"bird": 3, "cat": 10, "dog": 6}
    assert report["classes"]["imbalance_ratio"] == pytest.approx(10 / 3)
    assert report["counts"] == {"train": 19, "test": 6, "classes": 3}


def test_corrupt_file_listed(planted):
    _, report = planted
    files = report["unreadable"]["files"]
    assert [(f["split"], f["id"], f["kind"]) for f in files] == [("train", "cat_trunc", "truncated")]
    assert report["unreadable"] == {"train": 1, "test": 0, "files": files}


def test_modes_and_exif_rotation(planted):
    _, report = planted
    train = report["images"]["train"]
    assert train["modes"]["L"] == 1 and train["modes"]["RGBA"] == 1
    assert train["high_depth"] == 1 and any(m.startswith("I") for m in train["modes"])
    assert train["exif_rotated"]["count"] == 1 and train["exif_rotated"]["examples"] == ["dog_rot"]
    assert train["formats"] == {"PNG": 17, "JPEG": 1}  # the truncated JPEG is not readable
    assert report["images"]["test"]["exif_rotated"]["count"] == 0


def test_duplicates_leaks_and_conflicts(planted):
    _, report = planted
    exact, near = report["duplicates"]["exact"], report["duplicates"]["near"]
    assert exact["groups"] == 2 and exact["pairs"] == 2
    assert exact["within_train"]["groups"] == 2 and exact["train_test"]["groups"] == 0
    assert exact["conflicting_labels"]["groups"] == 1
    conflict = [g for g in exact["listed"] if "conflicting labels" in g["flags"]]
    assert sorted(m["id"] for m in conflict[0]["members"]) == ["cat1", "dog_conflict"]
    assert near["pairs"] == 1 and near["train_test"] == {"groups": 1, "test_images": 1, "train_images": 1}
    assert sorted(m["id"] for m in near["listed"][0]["members"]) == ["cat2", "t_near"]
    assert near["within_train"]["groups"] == 0 and near["conflicting_labels"]["groups"] == 0
    topics = {s["topic"] for s in report["suggestions"]}
    assert {"cross-validation", "leakage", "label noise", "corrupt files", "EXIF rotation"} <= topics


def test_duplicate_groups_csv(planted):
    result, _ = planted
    groups = pd.read_csv(result.json.parent / "duplicate_groups.csv", dtype=str)
    assert sorted(groups["id"]) == sorted(["cat0", "cat_copy", "cat1", "dog_conflict", "cat2", "t_near"])
    assert groups["dup_group"].nunique() == 3


def test_html_is_self_contained(planted):
    result, report = planted
    text = result.html.read_text()
    assert text.count("data:image/png;base64,") >= 5
    assert "<script" not in text and "http" not in text.replace("data:image", "")
    assert "cat_trunc" in text and "Suggestions" in text


def test_clean_set_reports_nothing(clean):
    root, result, report = clean
    d = report["duplicates"]
    assert d["exact"]["groups"] == d["near"]["pairs"] == d["any"]["groups"] == 0
    assert report["unreadable"]["files"] == [] and report["problems"] == []
    assert report["images"]["train"]["modes"] == {"RGB": 24}
    assert report["images"]["train"]["exif_rotated"]["count"] == 0
    topics = {s["topic"] for s in report["suggestions"]}
    assert not topics & {"cross-validation", "leakage", "label noise", "corrupt files", "EXIF rotation"}
    assert result.summary["near_duplicate_pairs"] == 0


def test_normalization_matches_numpy(clean):
    root, _, report = clean
    arrays = [np.asarray(Image.open(p), np.float64) / 255 for p in sorted((root / "train").glob("*.png"))]
    mean = np.mean([a.mean(axis=(0, 1)) for a in arrays], axis=0)
    square = np.mean([(a ** 2).mean(axis=(0, 1)) for a in arrays], axis=0)
    assert report["normalization"]["mean"] == pytest.approx(mean, abs=1e-4)
    assert report["normalization"]["std"] == pytest.approx(np.sqrt(square - mean ** 2), abs=1e-4)


def test_rerun_is_skipped_until_inputs_change(clean, tmp_path):
    root, _, _ = clean
    cfg = config(root, tmp_path)
    assert not eda.run(cfg).skipped
    assert eda.run(cfg).skipped
    assert not eda.run(config(root, tmp_path, near_dup_threshold=2)).skipped


def test_contract_problems_reported_not_raised(tmp_path):
    root = write_competition(tmp_path / "c", {f"a{i}": ("x" if i % 2 else "y", smooth_image(i), "png")
                                              for i in range(6)}, {"b0": (smooth_image(50), "png")})
    csv = pd.read_csv(root / "train.csv", dtype=str)
    pd.concat([csv, pd.DataFrame({"id": ["ghost"], "label": ["x"]})]).to_csv(root / "train.csv", index=False)
    report = json.loads(eda.run(config(root, tmp_path / "out")).json.read_text())
    assert any("ghost" in p for p in report["problems"])


def test_near_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2 ** 63, 400, dtype=np.uint64) * np.uint64(2)
    hashes[200:260] = hashes[:60] ^ np.uint64(0b1011)  # 3 bits apart
    hashes[300:320] = hashes[:20] ^ np.uint64(0b11111)  # 5 bits apart
    for t in (0, 3, 4, 5, 12):
        pairs, dist = near_pairs(hashes, t)
        expected = {(i, j) for i in range(400) for j in range(i + 1, 400)
                    if bin(int(hashes[i] ^ hashes[j])).count("1") <= t}
        assert set(map(tuple, pairs.tolist())) == expected and (dist <= t).all()


def test_cli_main(clean, tmp_path):
    root, _, _ = clean
    runs = ["--set", f"runs_dir={tmp_path / 'runs'}"]
    assert eda.main(["--set", f"data.root={root}", "--set", f"eda.out_dir={tmp_path}", "--force", *runs]) == 0
    assert (tmp_path / "demo" / "eda" / "index.html").is_file()
    assert eda.main(["--set", f"data.root={root}", "--set", "eda.near_dup_threshold=99", *runs]) == 1


@needs_browser
def test_screenshot_in_headless_browser(planted, tmp_path):
    result, _ = planted
    shot = tmp_path / "eda.png"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "eda_screenshot.sh"), str(result.html), str(shot)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert shot.stat().st_size > 10_000


def test_thumbnail_correlation_confirms_near_pairs():
    from pipeline.eda.dups import thumb_correlation

    ramp = np.arange(256, dtype=np.uint8)
    thumbs = np.array([ramp.tobytes(), (ramp // 2 + 20).astype(np.uint8).tobytes(), ramp[::-1].tobytes(),
                       bytes(256), bytes([3] * 256), bytes([200] * 256)], dtype=object)
    corr = thumb_correlation(thumbs, np.array([[0, 1], [0, 2], [3, 4], [3, 5], [0, 3]]))
    assert corr == pytest.approx([1.0, -1.0, 1.0, 0.0, 0.0], abs=1e-3)


def test_every_count_names_its_files_in_json_html_csv_and_log(tmp_path, caplog):
    img = {i: smooth_image(300 + i) for i in range(12)}
    exif = Image.Exif()
    exif[0x0112] = 8
    train = {f"ok{i}": ("cat" if i % 2 else "dog", img[i], "png") for i in range(6)}
    train.update({"gray": ("cat", img[6].convert("L"), "png"), "rgba": ("dog", img[7].convert("RGBA"), "png"),
                  "cmyk": ("cat", encoded(img[8].convert("CMYK"), "JPEG"), "jpg"),
                  "deep": ("dog", Image.fromarray(np.asarray(img[9].convert("L"), np.uint16) * 257), "png"),
                  "rot": ("cat", encoded(img[10], "JPEG", exif=exif), "jpg"),
                  "fake": ("dog", encoded(img[11], "PNG"), "jpg"),  # a PNG named .jpg
                  "trunc": ("cat", encoded(img[0], "JPEG")[:200], "jpg"),
                  "noise": ("dog", np.random.default_rng(1).bytes(300), "png"), "empty": ("cat", b"", "png")})
    root = write_competition(tmp_path / "comp", train, {"t0": (img[0], "png")})
    with caplog.at_level("INFO", logger="pipeline"):
        result = eda.run(config(root, tmp_path / "out"))
    report = json.loads(result.json.read_text())
    props = report["images"]["train"]
    path = lambda name, ext: str(root / "train" / f"{name}.{ext}")  # noqa: E731
    assert props["mode_files"] == {"CMYK": [path("cmyk", "jpg")], "I;16": [path("deep", "png")],
                                   "L": [path("gray", "png")], "RGBA": [path("rgba", "png")]}
    assert props["high_depth_files"] == [path("deep", "png")]
    assert props["exif_rotated"]["files"] == [path("rot", "jpg")]
    assert props["extension_mismatch_files"] == [path("fake", "jpg")] and props["extension_mismatch"] == 1
    bad = {f["path"] for f in report["unreadable"]["files"]}
    assert bad == {path("trunc", "jpg"), path("noise", "png"), path("empty", "png")}
    html = result.html.read_text()
    for name, ext in (("cmyk", "jpg"), ("deep", "png"), ("gray", "png"), ("rgba", "png"), ("rot", "jpg"),
                      ("fake", "jpg"), ("trunc", "jpg"), ("noise", "png"), ("empty", "png")):
        assert path(name, ext) in html, name
        assert path(name, ext) in caplog.text, name
    flags = pd.read_csv(result.json.parent / "image_flags.csv")
    assert set(flags.loc[flags["flag"] == "unreadable", "path"]) == bad
    assert set(flags["flag"]) == {"unreadable", "mode", "high_depth", "exif_rotated", "extension_mismatch"}
