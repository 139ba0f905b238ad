"""Model factory: compact models, timm fallback, helpful errors for unknown names and offline weights."""
from __future__ import annotations

import pytest
import torch

from pipeline.models import factory
from pipeline.core.config import ModelConfig


@pytest.mark.parametrize("name", ["airnet", "airnet_small", "airnet_tiny"])
def test_compact_models_build_with_the_requested_head(name):
    model = factory.create_model(ModelConfig(name=name), num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_compact_model_kwargs_and_sizes():
    tiny = factory.create_model(ModelConfig(name="airnet_tiny"), 3)
    small = factory.create_model(ModelConfig(name="airnet_small"), 3)
    assert factory.count_parameters(tiny) < factory.count_parameters(small)
    custom = factory.create_model(ModelConfig(name="airnet_tiny", kwargs={"widths": [8, 8, 8], "stem": 8}), 3)
    assert factory.count_parameters(custom) < factory.count_parameters(tiny)
    with torch.no_grad():
        assert custom.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 3)


def test_timm_models_are_found_by_name():
    model = factory.create_model(ModelConfig(name="resnet10t"), num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_unknown_model_lists_compact_models():
    with pytest.raises(KeyError) as err:
        factory.create_model(ModelConfig(name="airnet_tinyy"), 3)
    message = str(err.value)
    assert "airnet_tinyy" in message
    for name in factory.MODELS.names():
        assert name in message
    assert "Did you mean" in message and "airnet_tiny" in message.split("Did you mean")[1]


def test_compact_models_have_no_pretrained_weights():
    with pytest.raises(ValueError, match="pretrained"):
        factory.create_model(ModelConfig(name="airnet_tiny", pretrained=True), 3)


def test_pretrained_timm_model_offline_says_how_to_download(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import time
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(RuntimeError) as err:
        factory.create_model(ModelConfig(name="resnet10t", pretrained=True), 3)
    message = str(err.value)
    assert "--download resnet10t" in message
    assert "pretrained=false" in message
