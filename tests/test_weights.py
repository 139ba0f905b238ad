"""Pretrained weights offline: the shipped EfficientNet-Lite0 mapping, model.weights with renamed layouts and
mismatches, and the normalisation statistics of pretrained backbones."""
from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.core.config import ModelConfig
from pipeline.models.factory import create_model
from pipeline.core.utils import read_json
from pipeline.models.weights import SHIPPED, WeightsError, load_pretrained, normalization, read_state

MANIFEST = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}


@pytest.mark.parametrize("name, tensors", [("efficientnet_lite0", 296), ("tf_efficientnet_lite0", 296),
                                           ("tf_efficientnet_lite1", 386), ("tf_efficientnet_lite2", 386)])
def test_shipped_lites_map_every_tensor_in_order(name, tensors, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: the weights come from the installed package
    path = SHIPPED[name].path()
    assert path is not None, f"{SHIPPED[name].package} must be installed (install dependency)"
    source = read_state(path)
    model = timm.create_model(name, num_classes=1000)
    report = load_pretrained(model, path)
    assert len(report["loaded"]) == len(source) == len(model.state_dict()) == tensors
    assert report["skipped"] == [] and report["random"] == []
    for (_, want), (key, got) in zip(source.items(), model.state_dict().items()):
        assert want.shape == got.shape and torch.equal(want, got), key
    # our classes: the 1000-way classifier is skipped and ours left random, everything else loaded
    ours = create_model(ModelConfig(name=name, pretrained=True), num_classes=3)
    assert ours.classifier.weight.shape == (3, 1280)
    assert torch.equal(ours.conv_head.weight, model.conv_head.weight)
    # model.zero_head: the new classifier starts at zero (timm's init gives a 2-class head logits of ~±10)
    assert not ours.classifier.weight.any() and not ours.classifier.bias.any()
    random_head = create_model(ModelConfig(name=name, pretrained=True, zero_head=False), num_classes=2)
    assert random_head.classifier.weight.abs().max() > 0.1


def test_a_timm_network_from_scratch_starts_at_the_uniform():
    """timm's MobileNetV2 init starts 10 classes at logits of std ~5 (loss ~8): from scratch it diverged at the
    compact CNNs' learning rate; its zeroed head starts at loss log 10."""
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    for zero, low, high in ((True, 2.30, 2.31), (False, 4.0, 50.0)):
        model = create_model(ModelConfig(name="mobilenetv2_050", zero_head=zero), num_classes=10).eval()
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(model(x), y).item()
        assert low <= loss <= high, (zero, loss)


def test_normalization_follows_the_weights():
    assert normalization(ModelConfig(name="resnet18"), MANIFEST) == (MANIFEST["mean"], MANIFEST["std"])
    assert normalization(ModelConfig(name="efficientnet_lite0", pretrained=True), MANIFEST) == ([0.5] * 3, [0.5] * 3)
    mean, std = normalization(ModelConfig(name="resnet18", pretrained=True), MANIFEST)
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])


def _renamed(state: dict) -> dict:
    return {"backbone/" + k.replace(".", "_"): v.clone() for k, v in state.items()}


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_model_weights_renamed_layout(tmp_path, suffix):
    donor = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / f"donor{suffix}"
    state = _renamed(donor.state_dict())
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model = create_model(ModelConfig(name="resnet18", weights=str(path)), num_classes=3)
    for key, value in donor.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model.fc.weight.shape == (3, 512)
    report = load_pretrained(timm.create_model("resnet18", num_classes=3), path)
    assert report["random"] == ["fc.weight", "fc.bias"]
    assert report["skipped"] == ["backbone/fc_weight", "backbone/fc_bias"]


def test_model_weights_mismatch_names_the_keys(tmp_path):
    state = timm.create_model("resnet18", num_classes=1000).state_dict()
    state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:, :32].contiguous()
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"layer1\.0\.conv1\.weight"):
        create_model(ModelConfig(name="resnet18", weights=str(tmp_path / "bad.safetensors")), num_classes=3)
    other = {"encoder.conv.weight": torch.zeros(8, 3, 3, 3), "encoder.fc.weight": torch.zeros(2, 8)}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="layouts differ"):
        create_model(ModelConfig(name="resnet18", weights=str(tmp_path / "other.safetensors")), num_classes=3)
    with pytest.raises(FileNotFoundError, match="model.weights"):
        create_model(ModelConfig(name="resnet18", weights=str(tmp_path / "missing.pth")), num_classes=3)
    with pytest.raises(ValueError, match="compact model"):
        create_model(ModelConfig(name="airnet_tiny", weights=str(tmp_path / "bad.safetensors")), num_classes=3)


def test_a_starting_checkpoint_replaced_under_its_name_retrains_and_a_moved_or_deleted_one_does_not(tmp_path,
                                                                                                   competition, caplog):
    """model.weights re-exported at the same path is another starting point: every fold trained from the old one is
    stale. Moving the file (the same bytes under another name) or deleting it after training leaves the trained
    folds valid (inference does not need it)."""
    from pipeline import provenance
    from pipeline import folds, preprocess, train

    from conftest import make_cfg

    path = tmp_path / "start.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    cfg = make_cfg(tmp_path, competition, "model.name=test_efficientnet", f"model.weights={path}",
                   "train.epochs=1", "train.folds=[0]")
    for stage in (preprocess, folds, train):
        stage.run(cfg)
    first = read_json(cfg.run_dir / "fold0" / "result.json")["start_weights"]
    assert first and provenance.fold_done(cfg, 0) is not None

    moved = tmp_path / "moved" / "start.safetensors"
    moved.parent.mkdir()
    path.rename(moved)
    assert provenance.fold_done(replace(cfg, model=replace(cfg.model, weights=str(moved))), 0) is not None
    assert provenance.fold_done(replace(cfg, model=replace(cfg.model, weights=None)), 0) is None
    (cfg.run_dir / "fold0" / "result.json").unlink()  # as if killed after its last checkpoint: it resumes
    with caplog.at_level(logging.INFO, logger="pipeline"):
        train.run(replace(cfg, model=replace(cfg.model, weights=str(moved))))
    assert "fold 0: resuming after epoch 1" in caplog.text and "starting over" not in caplog.text
    moved.rename(path)

    path.unlink()
    assert provenance.fold_done(cfg, 0) is not None
    torch.manual_seed(1)
    save_file(timm.create_model("test_efficientnet").state_dict(), str(path))  # same name, size and layout
    assert provenance.data_change(read_json(cfg.run_dir / "fold0" / "result.json"), cfg).startswith("other starting")
    assert provenance.fold_done(cfg, 0) is None


class Wrapped:
    """A training script's own object pickled around the tensors (weights_only loading refuses its class)."""

    def __init__(self, state: dict) -> None:
        self.state = state


def test_model_weights_holding_pickled_objects_fail_in_one_line_naming_the_file(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": Wrapped(timm.create_model("resnet18", num_classes=3).state_dict())}, path)
    with pytest.raises(WeightsError) as caught:
        create_model(ModelConfig(name="resnet18", weights=str(path)), num_classes=3)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a plain tensor file") and "safetensors" in message
    assert "\n" not in message and "weights_only=False" not in message
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(WeightsError, match=r"garbage\.pth is not a readable torch file"):
        read_state(tmp_path / "garbage.pth")
