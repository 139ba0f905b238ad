"""Architecture specs: timm blocks built from plain data, checked, and trained by the normal train stage."""
from __future__ import annotations

import re

import pytest
import torch
import yaml

from pipeline import folds, infer, preprocess, train
from pipeline.models.arch import SpecError, SpecNet, count_macs, cpu_latency_ms, load_spec
from pipeline.core.config import load_config
from pipeline.models.factory import count_parameters, create_model
from pipeline.core.utils import read_json

from conftest import DEFAULT_CONFIG, REPO, config_overrides, stage_argv

SPEC = {"blocks": [
    {"type": "Conv", "repeats": 1, "out": 8, "kernel": 3, "stride": 1},
    {"type": "DWConv", "repeats": 1, "out": 16, "kernel": 5, "stride": 2, "se": True},
    {"type": "Pass"},
    {"type": "InvertedResidualv2", "repeats": 2, "out": 16, "kernel": 3, "stride": 1, "expansion": 3},
    {"type": "InvertedResidualv3", "repeats": 2, "out": 24, "kernel": 5, "stride": 2, "expansion": 2,
     "se": True, "act": "hard_swish"},
]}


def test_spec_builds_timm_blocks_with_residuals_and_multipliers():
    model = SpecNet(SPEC, num_classes=5)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["ConvBnAct", "DepthwiseSeparableConv", "InvertedResidual", "InvertedResidual",
                     "InvertedResidual", "InvertedResidual"]
    assert model.features[3].has_skip and not model.features[4].has_skip  # repeat keeps the resolution
    wide = SpecNet({**SPEC, "width_multiplier": 2.0, "depth_multiplier": 1.5}, num_classes=5)
    assert count_parameters(wide) > 2 * count_parameters(model) and len(wide.features) > len(model.features)
    assert count_macs(model, 32) > count_macs(model, 16) > 0 and cpu_latency_ms(model, 16, runs=3) > 0


AIRNET_TINY = {"pool": "max", "blocks": [
    {"type": "ConvPool", "repeats": 1, "out": 16, "kernel": 3, "stride": 1},
    {"type": "ConvPool", "repeats": 2, "out": 16, "kernel": 3, "stride": 2},
    {"type": "ConvPool", "repeats": 2, "out": 32, "kernel": 3, "stride": 2},
    {"type": "ConvPool", "repeats": 2, "out": 64, "kernel": 3, "stride": 2},
]}


def test_convpool_blocks_rebuild_airnet_tiny_layer_for_layer():
    spec_net = SpecNet(AIRNET_TINY, num_classes=10)
    airnet = create_model(load_config(DEFAULT_CONFIG, ["model.name=airnet_tiny"]).model, 10)
    # the same convolutions, pools, norms and GELUs; only the head differs (a bias, no 1/9 logit scale)
    assert count_parameters(spec_net) == count_parameters(airnet) + 10
    assert count_macs(spec_net, 32) == pytest.approx(count_macs(airnet, 32), rel=1e-3)
    assert spec_net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert [type(m).__name__ for m in spec_net.features[1]] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "GELU"]
    assert isinstance(spec_net.pool, torch.nn.AdaptiveMaxPool2d)


def test_airnet_head_makes_the_spec_net_airnet_tiny_exactly():
    """``head: airnet`` (bias-free, logits × 1/9): the same parameters as airnet_tiny, and with airnet_tiny's
    weights loaded, the same logits."""
    airnet = create_model(load_config(DEFAULT_CONFIG, ["model.name=airnet_tiny"]).model, 10).eval()
    spec_net = SpecNet({**AIRNET_TINY, "head": "airnet"}, num_classes=10).eval()
    assert count_parameters(spec_net) == count_parameters(airnet)
    spec_net.load_state_dict(dict(zip(spec_net.state_dict(), airnet.state_dict().values())))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(spec_net(x), airnet(x), atol=1e-5)
        linear = SpecNet(AIRNET_TINY, num_classes=10).eval()
        linear.load_state_dict({**dict(zip(linear.state_dict(), airnet.state_dict().values())),
                                "head.bias": torch.zeros(10)})
        assert torch.allclose(linear(x) / 9, airnet(x), atol=1e-5)  # the only difference is the 1/9



@pytest.mark.parametrize("config", ["experiments/cifar10-search-545k-air.yaml"])
def test_shipped_seed_specs_fit_their_search_space_and_bounds(config):
    """The half-size studies' seed designs: within their bounds, sampleable by their space, rebuilt exactly."""
    from pipeline.search.space import arch_spec, spec_params

    cfg = load_config(REPO / "configs" / config)
    for path in cfg.search.seed_specs:
        spec = load_spec(REPO / path)
        net = SpecNet(spec, num_classes=10)
        assert count_parameters(net) <= cfg.search.constraints["params"] < count_parameters(
            create_model(load_config(DEFAULT_CONFIG, ["model.name=airnet_small"]).model, 10))
        assert count_macs(net, 32) <= cfg.search.constraints["macs"]
        rebuilt = arch_spec(spec_params(spec, cfg.search.arch), cfg.search.arch, 32)
        assert [block for block in rebuilt["blocks"] if block["type"] != "Pass"] == spec["blocks"]
        assert count_parameters(SpecNet(rebuilt, num_classes=10)) == count_parameters(net)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "experiments" / "specs").glob("airnet_half_*.yaml")),
                         ids=lambda path: path.stem)
def test_every_shipped_half_size_spec_is_half_airnet_small_and_states_its_size(path):
    """Each half-size design (the search's seeds and the hand-made rivals the README reports) builds, fits the
    half-size bracket (at most half of airnet_small's parameters), and its header's count is the real one."""
    net = SpecNet(load_spec(path), num_classes=10)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    airnet_small = create_model(load_config(DEFAULT_CONFIG, ["model.name=airnet_small"]).model, 10)
    assert 2 * count_parameters(net) <= count_parameters(airnet_small)
    stated = re.search(r"(\d{1,3}(?:,\d{3})+) param", path.read_text())
    assert stated and int(stated.group(1).replace(",", "")) == count_parameters(net)


def test_convpool_skip_adds_identities_free_in_parameters():
    """skip: true puts an identity around every ConvPool repeat that keeps the shape, at no parameter cost."""
    blocks = [{"type": "ConvPool", "repeats": 1, "out": 8, "kernel": 3, "stride": 1},
              {"type": "ConvPool", "repeats": 3, "out": 16, "kernel": 3, "stride": 2}]
    plain = SpecNet({"blocks": blocks}, num_classes=4)
    skips = SpecNet({"blocks": [blocks[0], {**blocks[1], "skip": True}]}, num_classes=4)
    assert [type(m).__name__ for m in skips.features] == ["ConvPool", "ConvPool", "Residual", "Residual"]
    assert count_parameters(skips) == count_parameters(plain)
    skips.load_state_dict(dict(zip(skips.state_dict(), plain.state_dict().values())))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        inner = plain.features[:2](x)
        assert torch.allclose(skips.features[:3](x), inner + plain.features[2](inner), atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    ({"blocks": [{"type": "Conv", "out": 8, "skip": True}]}, "only for ConvPool"),
    ({"blocks": [{"type": "Conv", "out": 8}], "pool": "mean"}, "pool: must be one of"),
    ({"blocks": [{"type": "Conv", "out": 8}], "head": "mlp"}, "head: must be one of"),
    ({"blocks": [{"type": "Pass"}, {"type": "Conv", "out": 8}]}, "first block cannot be Pass"),
    ({"blocks": [{"type": "Dense", "out": 8}]}, "'type' must be one of"),
    ({"blocks": [{"type": "Conv", "out": 8, "kernal": 3}]}, "unknown key"),
    ({"blocks": [{"type": "Conv", "out": 8, "stride": 2}] * 3, "max_downsample": 4}, "exceeds max_downsample"),
    ({"layers": []}, "non-empty 'blocks'"),
])
def test_bad_specs_are_refused_naming_the_problem(bad, message):
    with pytest.raises(SpecError, match=message):
        load_spec(bad)


@pytest.mark.slow
def test_a_spec_file_trains_and_infers_through_the_pipeline(tmp_path, shared_competition):
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    overrides = ("experiment=spec", f"model.spec={path}")
    cfg = load_config(DEFAULT_CONFIG, config_overrides(tmp_path, shared_competition, *overrides))
    assert cfg.model.name == "spec"
    argv = stage_argv(tmp_path, shared_competition, *overrides)
    for stage in (preprocess, folds, train, infer):
        assert stage.main(argv) == 0
    best = read_json(cfg.run_dir / "fold0" / "best.json")
    assert best["config"]["model"]["spec"] == str(path) and (cfg.run_dir / "test_probs.csv").is_file()
    saved = load_config(cfg.run_dir / "config.yaml")  # the saved config rebuilds the same network
    assert count_parameters(create_model(saved.model, 3)) == count_parameters(SpecNet(SPEC, 3))


def test_editing_a_spec_file_retrains_and_moving_it_does_not(tmp_path):
    """A fold's fingerprint holds the architecture a spec file describes, not the file's name: a trained fold
    is reused after the file moves, and retrained after its contents change."""
    from pipeline import provenance

    def fingerprint(spec):
        return provenance.training_fingerprint(load_config(DEFAULT_CONFIG, config_overrides(tmp_path, None,
                                                                                         f"model.spec={spec}")))

    first, moved = tmp_path / "net.yaml", tmp_path / "moved.yaml"
    first.write_text(yaml.safe_dump(SPEC))
    moved.write_text(yaml.safe_dump(SPEC))
    trained = fingerprint(first)
    cfg = load_config(DEFAULT_CONFIG, config_overrides(tmp_path, None, f"model.spec={moved}"))
    assert provenance.same_training(trained, cfg)
    moved.write_text(yaml.safe_dump({**SPEC, "width_multiplier": 2.0}))
    assert not provenance.same_training(trained, cfg) and fingerprint(moved) != trained
