"""The engines of the frozen passes (infer.engine): the exported graph is made once, reused and keyed like the
cached activations, checked against PyTorch (a graph that disagrees is not used), a missing package is a
one-line error, and the folds predict alike whichever engine made the cache."""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import timm
import torch

from pipeline import folds, infer, preprocess, train
from pipeline.core.config import ConfigError
from pipeline.models.engines import FrozenPass, export, graph_path
from pipeline.rundir import load_manifest, load_split
from pipeline.training import features, partial

from conftest import chain, make_cfg, stage_argv


def _cfg(tmp_path, competition, weights, *more):
    return make_cfg(tmp_path, competition, "train.mode=features", "model.name=test_efficientnet",
                    f"model.weights={weights}", "infer.tta=[identity,hflip]", "infer.batch_size=8", *more)


def _graphs(tmp_path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "graphs").glob("*.onnx")}


def test_the_graph_is_made_once_checked_reused_and_keyed_like_the_cache(tmp_path, competition, tiny_weights):
    cfg = _cfg(tmp_path, competition, tiny_weights, "infer.engine=onnxruntime")
    manifest = preprocess.run(cfg)
    features.embeddings(cfg, manifest, "train", ["identity"], torch.device("cpu"))
    made = _graphs(tmp_path)
    assert list(made) == [f"{features.frozen_key(cfg, 'pooled')}.onnx"]
    record = json.loads(graph_path(cfg, features.frozen_key(cfg, "pooled")).with_suffix(".json").read_text())
    assert record["parity"] <= 1e-4  # checked against PyTorch on the first real batch
    for path in (tmp_path / "cache" / "features").glob("*.npy"):
        path.unlink()
    features.embeddings(cfg, manifest, "test", ["identity", "hflip"], torch.device("cpu"))
    assert _graphs(tmp_path) == made  # reused, not exported again
    # partial mode's front before the last 2 blocks, and the same at another size: graphs of their own
    for more in (["train.mode=partial", "train.tune_blocks=2"], ["train.mode=partial", "train.tune_blocks=1"]):
        other = _cfg(tmp_path, competition, tiny_weights, "infer.engine=onnxruntime", *more)
        partial.activations(other, manifest, "train", ["identity"], torch.device("cpu"))
    assert len(_graphs(tmp_path)) == 3 and all(_graphs(tmp_path)[n] == t for n, t in made.items())


def test_a_graph_that_disagrees_with_pytorch_is_not_used(tmp_path, competition, tiny_weights, caplog):
    cfg = _cfg(tmp_path, competition, tiny_weights, "infer.engine=onnxruntime")
    module = features.backbone(cfg, torch.device("cpu"))
    key = features.frozen_key(cfg, "pooled")
    x = torch.randn(4, 3, 16, 16)
    stranger = timm.create_model("test_efficientnet", num_classes=0).eval()  # other weights, same shapes
    export(stranger, x, graph_path(cfg, key))
    caplog.set_level(logging.WARNING)
    run = FrozenPass(module, cfg, key, torch.device("cpu"), None)
    out = run(x)
    assert run.engine == "torch" and "differs from PyTorch" in caplog.text
    assert torch.allclose(out, module(x))
    caplog.clear()
    FrozenPass(module, cfg, key, torch.device("cpu"), None)(x)  # recorded: one warning, no new check
    assert caplog.text.count("differs from PyTorch") == 1


def test_onnxruntime_without_its_package_is_a_one_line_error(tmp_path, competition, tiny_weights, monkeypatch,
                                                              capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as on a machine without the package
    argv = stage_argv(tmp_path, competition, "train.mode=features", "model.name=test_efficientnet",
                      f"model.weights={tiny_weights}", "infer.engine=onnxruntime")
    cfg = _cfg(tmp_path, competition, tiny_weights, "infer.engine=onnxruntime")
    preprocess.run(cfg)
    folds.run(cfg)
    capsys.readouterr()
    assert train.main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "infer.engine=onnxruntime" in err[0] and "pip install onnxruntime" in err[0]
    auto = _cfg(tmp_path, competition, tiny_weights)  # auto: PyTorch serves it
    assert FrozenPass(features.backbone(auto, torch.device("cpu")), auto, "k", torch.device("cpu"), None).runs(
        torch.zeros(1, 3, 16, 16)).keys() == {"torch"}


@pytest.mark.parametrize("mode", ["features", "partial"])
def test_folds_predict_alike_whichever_engine_made_the_cache(tmp_path, competition, tiny_weights, mode):
    more = ["train.tune_blocks=2", "train.optimizer=adamw", "train.lr=0.01"] if mode == "partial" else []
    oof = {}
    for engine in ("torch", "onnxruntime"):
        cfg = _cfg(tmp_path / engine, competition, tiny_weights, f"train.mode={mode}", f"infer.engine={engine}",
                   *more)
        chain(cfg)
        manifest = load_manifest(cfg.run_dir)
        oof[engine] = np.concatenate([np.load(cfg.run_dir / f"fold{k}" / "oof.npy") for k in range(3)])
        assert load_split(cfg.run_dir, "test", manifest)[0] is not None and (cfg.run_dir / "test_probs.csv").is_file()
    assert np.abs(oof["torch"] - oof["onnxruntime"]).max() < 0.02
    top2 = np.sort(oof["torch"], axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.04  # rows whose class no difference within the tolerance can flip
    assert (oof["torch"].argmax(1) == oof["onnxruntime"].argmax(1))[clear].all()


def test_the_bench_of_a_frozen_mode_times_each_engine_against_a_matrix_product(tmp_path, competition, tiny_weights):
    from pipeline import bench

    cfg = _cfg(tmp_path, competition, tiny_weights, "train.precision=bf16")
    result = bench.run(cfg, rounds=1, seconds=4)
    assert set(result["engines"]) == {"torch_bf16", "torch_fp32", "onnxruntime_fp32"}
    assert result["matmul_gflop_s"] > 0 and result["pipeline_img_s"] > 0 and result["gflop_per_image"] > 0
    for engine in result["engines"].values():
        assert set(engine["img_s"]) == {"4", "8", "16", "32"} and engine["best_img_s"] == max(engine["img_s"].values())
    assert json.loads((cfg.run_dir / "bench_frozen.json").read_text())["key"].endswith("-pooled")


def test_a_finetuned_network_predicts_alike_through_either_engine_and_auto_exports_only_what_wins(tmp_path,
                                                                                                   competition):
    probs = {}
    for engine in ("torch", "onnxruntime"):
        cfg = make_cfg(tmp_path / engine, competition, "train.epochs=1", f"infer.engine={engine}",
                       "infer.tta=[identity,hflip]", "infer.batch_size=8")
        chain(cfg)
        probs[engine] = np.loadtxt(cfg.run_dir / "test_probs.csv", delimiter=",", skiprows=1, usecols=(1, 2, 3))
    assert np.abs(probs["torch"] - probs["onnxruntime"]).max() < 1e-3
    graphs = sorted((tmp_path / "onnxruntime" / "cache" / "graphs").glob("*.onnx"))
    assert len(graphs) == 3  # one per fold, named by its kept weights
    # auto, with PyTorch recorded as the faster engine for this network: nothing is exported
    cfg = make_cfg(tmp_path / "onnxruntime", competition, "train.epochs=1", "infer.tta=[identity,hflip]",
                   "infer.batch_size=8")
    manifest = load_manifest(cfg.run_dir)
    predict = infer.fold_predictor(cfg, 0, manifest, torch.device("cpu"))
    x = torch.zeros(manifest["test"]["n"], 3, cfg.data.image_size, cfg.data.image_size)  # one batch: all 6
    net = FrozenPass(torch.nn.Identity(), cfg, "unused", torch.device("cpu"), None,
                     choice_key=graphs[0].stem.rsplit("-", 1)[0] + "-network")
    record = net.choice_key
    path = graph_path(cfg, record).with_suffix(".json")
    path.write_text(json.dumps({"rates": {net.setting(x): {"torch": 2.0, "onnxruntime": 1.0}}}))
    for graph in graphs:
        graph.unlink()
    predict("test", np.arange(manifest["test"]["n"]), ["identity"])
    assert not list((tmp_path / "onnxruntime" / "cache" / "graphs").glob("*.onnx"))


def test_a_network_trained_in_bf16_exports_an_fp32_graph(tmp_path, competition, caplog):
    cfg = make_cfg(tmp_path, competition, "train.epochs=1", "train.precision=bf16", "infer.engine=onnxruntime",
                   "infer.tta=[identity,hflip]", "infer.batch_size=8")
    caplog.set_level(logging.WARNING)
    chain(cfg)
    assert "no ONNX graph" not in caplog.text and "differs from PyTorch" not in caplog.text
    assert len(list((tmp_path / "cache" / "graphs").glob("*.onnx"))) == 3
