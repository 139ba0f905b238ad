"""The input-pipeline benchmark runs end to end on the demo competition and prints its JSON summary."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline import bench
from pipeline.core.config import load_config
from pipeline.core.utils import resolve_precision
from pipeline.data.demo import build
from pipeline.training.precision import compute_settings

KEYS = ["train_floor_img_s", "train_img_s", "train_ratio", "tta_floor_img_s", "tta_img_s", "tta_ratio",
        "preprocess_img_s", "model", "batch_size", "threads", "device", "floors", "best_floor"]


def test_compare_covers_fp32_and_memory_formats():
    settings = bench.combos(torch.device("cpu"), None, True)
    assert {"fp32", "fp32_channels_last"} <= set(settings)
    assert bench.combos(torch.device("cpu"), None, True, compare=False) == {"fp32_channels_last": (None, True)}


def test_bench_prints_and_writes_its_json(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    build(tmp_path / "demo")
    overrides = [f"data.root={tmp_path / 'demo'}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"runs_dir={tmp_path / 'runs'}", "experiment=bench", "model.name=airnet_tiny",
                 "train.batch_size=32", "infer.batch_size=64", "augment.policy=randaugment",
                 "augment.mixup_alpha=0.2", "infer.tta=[identity, hflip]"]
    # a fresh config: no preprocess run yet, bench runs it
    args = [a for o in overrides for a in ("--set", o)]
    args += ["--batches", "2", "--preprocess-images", "40", "--rounds", "1"]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    for key in KEYS:
        assert key in result, key
    for key in ("train_floor_img_s", "train_img_s", "tta_floor_img_s", "tta_img_s", "preprocess_img_s"):
        assert result[key] > 0, key
    assert result["model"] == "airnet_tiny" and result["batch_size"] == 32
    assert result["train_ratio"] == pytest.approx(result["train_img_s"] / result["train_floor_img_s"], abs=0.01)
    # every precision x memory format worth measuring here was measured, and the fastest is the one recorded
    # (which one wins depends on the machine and on noise: never asserted)
    device = torch.device("cpu")
    dtype = resolve_precision(load_config(None, overrides).train.precision, device)
    assert set(result["floors"]) == set(bench.combos(device, dtype, True))
    assert all(rate > 0 for rate in result["floors"].values())
    assert result["floors"][result["best_floor"]] == max(result["floors"].values())
    assert result["floors"][result["configured_floor"]] == result["train_floor_img_s"]
    assert json.loads((tmp_path / "runs" / "bench" / "bench.json").read_text()) == result
    assert result["augment"]["per_image_img_s"] > 0 and result["augment"]["batched_img_s"] > 0

    # train.precision: bench trains with the fastest measured setting, on the machine it was measured on
    cfg = load_config(None, overrides + ["train.precision=bench", "train.channels_last=false"])
    best = result["best_floor"]
    fastest = bench.combos(device, dtype, True)[best]  # (autocast dtype, channels_last)
    assert compute_settings(cfg, device) == fastest
    record = tmp_path / "runs" / "bench" / "bench.json"
    record.write_text(json.dumps({**result, "best_floor": "fp32"}))
    assert compute_settings(cfg, device) == (None, False)
    record.write_text(json.dumps({**result, "best_floor": "fp32_channels_last"}))
    assert compute_settings(cfg, device) == (None, True)
    record.write_text(json.dumps({**result, "device": "another machine"}))
    with pytest.raises(ValueError, match="measured on 'another machine'"):
        compute_settings(cfg, torch.device("cpu"))
    record.unlink()
    with pytest.raises(FileNotFoundError, match="python -m pipeline.bench"):
        compute_settings(cfg, torch.device("cpu"))


def test_augment_only_compares_per_image_and_batched(tmp_path, monkeypatch, capsys):
    """--augment-only: the per-image and batched rates of one policy; the training pipeline on the device
    loader runs too."""
    monkeypatch.chdir(tmp_path)
    build(tmp_path / "demo")
    overrides = [f"data.root={tmp_path / 'demo'}", f"data.cache_dir={tmp_path / 'cache'}",
                 f"runs_dir={tmp_path / 'runs'}", "experiment=aug", "augment.policy=flip_crop",
                 "data.loader=device", "augment.flip=alternate", "model.name=airnet_tiny", "train.batch_size=16"]
    args = [a for o in overrides for a in ("--set", o)] + ["--batches", "2", "--augment-only"]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out)["augment"]
    assert result["policy"] == "flip_crop" and result["images_per_call"] == 64
    assert result["per_image_img_s"] > 0 and result["batched_img_s"] > 0
    cfg = load_config(None, overrides)
    data = bench.load_data(cfg)
    assert bench.train_pipeline(cfg, data, torch.device("cpu"), None, False, bench.Effort(2)) > 0


def test_bench_without_data_fails_with_a_message(tmp_path, capsys):
    assert bench.main(["--set", f"runs_dir={tmp_path}", "--set", "experiment=none",
                       "--set", f"data.root={tmp_path / 'nothing'}"]) == 1
    assert f"data.root {tmp_path / 'nothing'} is not a folder" in capsys.readouterr().err


def test_a_time_bound_stops_warm_up_and_timing():
    """--seconds bounds a measurement whatever the batch count: on a clock that advances 1 s a call, a 4 s bound
    allows 2 warm-up calls (half of it) and the timed calls up to the bound, not the 100 asked for."""
    now, calls = [0.0], []

    def clock() -> float:
        return now[0]

    def one() -> int:
        now[0] += 1.0
        calls.append(now[0])
        return 10

    rate = bench.timed(one, warmup=5, effort=bench.Effort(batches=100, seconds=4.0), clock=clock)
    assert len(calls) == 4 and rate == 10.0  # 2 warm-up + 2 timed: 20 items in 2 s
    calls.clear()
    assert bench.timed(one, warmup=1, effort=bench.Effort(batches=3), clock=clock) == 10.0 and len(calls) == 4


def test_infer_batches_measures_only_the_forward_floor_at_each_batch(tmp_path, capsys):
    sets = [f"runs_dir={tmp_path / 'runs'}", "experiment=batches", "model.name=airnet_tiny", "data.image_size=32"]
    args = [a for s in sets for a in ("--set", s)] + ["--infer-batches", "2,8", "--batches", "2", "--rounds", "1"]
    assert bench.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["forward_img_s"]) == {"2", "8"} and all(r > 0 for r in result["forward_img_s"].values())
    assert result["ratio_to_largest"]["8"] == 1.0  # the reference; which batch wins is never asserted
    assert result["best_batch"] in (2, 8) and result["model"] == "airnet_tiny"
    assert json.loads((tmp_path / "runs" / "batches" / "bench_batches.json").read_text()) == result
    assert not (tmp_path / "runs" / "batches" / "preprocess.json").exists()  # no data read: random images
    with pytest.raises(SystemExit):
        bench.main(["--infer-batches", "0,4"])
    assert "expected batch sizes like 4,16,64, got '0,4'" in capsys.readouterr().err
