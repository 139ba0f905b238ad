"""The search's chart: references named with their settings, exported like best/, trained K-fold and charted."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from pipeline import preprocess
from pipeline.core.config import ConfigError, ModelConfig, load_config
from pipeline.models.arch import load_spec
from pipeline.models.factory import architecture_id, create_model, model_costs
from pipeline.search import report, study
from pipeline.search.chart import write_chart
from pipeline.search.space import check_references, reference_label
from pipeline.training.features import frozen_key

from conftest import chain, make_cfg
from test_search import SMALL


def test_stem_stride_sets_the_first_convolution_and_names_frozen_passes(tmp_path):
    native = create_model(ModelConfig(name="resnet18"), 10).eval()
    fine = create_model(ModelConfig(name="resnet18", stem_stride=1), 10).eval()
    with torch.no_grad():
        assert native.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 1
        assert fine.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == 2  # 32 px keep a 2×2 last map
    assert fine.conv1.stride == (1, 1) and native.conv1.stride == (2, 2)
    with pytest.raises(ConfigError, match="stem_stride"):
        ModelConfig(name="resnet18", stem_stride=0)
    cfg = make_cfg(tmp_path, None)
    strided = make_cfg(tmp_path, None, "model.stem_stride=1")
    assert frozen_key(cfg, "pooled") != frozen_key(strided, "pooled")  # no cached features of the other stride
    spec = load_spec("configs/specs/airnet_tiny.yaml")
    wider = {**spec, "blocks": [{**spec["blocks"][0], "out": 32}]
             + spec["blocks"][1:]}
    one, other = (architecture_id(ModelConfig(name="spec", spec=s)) for s in (spec, wider))
    assert one != other and architecture_id(ModelConfig(name="airnet_tiny")) == "airnet_tiny"  # specs time apart


def test_references_are_model_names_or_settings_checked_before_any_training(tmp_path):
    ref = {"model.name": "resnet18", "model.stem_stride": 1}
    assert reference_label(ref) == "resnet18-stem_stride1" and reference_label("airnet_tiny") == "airnet_tiny"
    check_references(make_cfg(tmp_path, None, "search.references=[airnet_tiny, "
                                                "{model.name: resnet18, model.stem_stride: 1}]"))
    for bad, message in (("[{model.name: resnet18, model.stem_strid: 1}]", "stem_strid"),
                         ("[{model.stem_stride: 1}]", "model.name"), ("[airnet_tiny, airnet_tiny]", "share")):
        with pytest.raises(ConfigError, match=message):
            check_references(make_cfg(tmp_path, None, f"search.references={bad}"))


def test_the_chart_trains_like_best_and_reads_the_run_folders(tmp_path, shared_competition):
    ref = "{model.name: airnet_tiny, model.stem_stride: 2}"
    cfg = make_cfg(tmp_path, shared_competition, *SMALL, "search.n_trials=4", f"search.references=[{ref}]",
                   "search.sampler=random", "search.rerank_top=1")
    preprocess.run(cfg)
    summary = study.run(cfg)
    chart = cfg.run_dir / "search" / "chart"
    names = summary["chart"]
    assert "ref-airnet_tiny-stem_stride2" in names and any(n.startswith("trial") for n in names)
    ref_cfg = load_config(chart / "ref-airnet_tiny-stem_stride2.yaml")
    assert ref_cfg.model.name == "airnet_tiny" and ref_cfg.model.stem_stride == 2 and ref_cfg.model.spec is None
    trial_cfg = load_config(chart / f"{names[-1]}.yaml")
    for c in (ref_cfg, trial_cfg):  # trained like best/*.yaml: only the model and the experiment differ
        assert c.train == cfg.train and c.data == cfg.data and c.folds == cfg.folds
    best = load_config(cfg.run_dir / "search" / "best" / "most_accurate.yaml")
    assert best.train == ref_cfg.train and best.augment == ref_cfg.augment
    chain(ref_cfg)  # one config trained K-fold; the others are listed with their command
    out = write_chart(cfg.run_dir / "search", latency=False)
    assert [r["model"] for r in out["rows"]] == ["airnet_tiny-stem_stride2"]
    assert len(out["not_trained"]) == len(names) - 1 and all("./run.sh full" in c for c in out["not_trained"])
    table = pd.read_csv(chart / "chart.csv")
    assert table.loc[0, "kind"] == "reference" and 0 <= table.loc[0, "oof_accuracy_tta"] <= 1
    assert (table.loc[0, "epochs"], table.loc[0, "folds"]) == (cfg.train.epochs, cfg.folds.n_splits)
    native = model_costs(create_model(ModelConfig(name="airnet_tiny"), 3), cfg.data.image_size, latency=False)
    assert table.loc[0, "macs"] < native["macs"] and table.loc[0, "params"] == native["params"]  # the stride counted
    assert (chart / "chart.png").stat().st_size > 0 and "airnet_tiny-stem_stride2" in (chart / "chart.md").read_text()
    assert report.main(["--chart", str(cfg.run_dir / "search"), "--no-latency"]) == 0
