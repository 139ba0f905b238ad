"""TTA views (shapes, flips, shifts, composition) and predict_tta's averaging."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.evaluation.tta import VIEWS, get_view, predict_tta
from pipeline.rundir import read_cv

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", VIEWS.names())
def test_every_view_keeps_shape_and_is_deterministic(name):
    out = get_view(name)(X)
    assert out.shape == X.shape and out.dtype == X.dtype
    assert torch.equal(out, get_view(name)(X))


@pytest.mark.parametrize("name", [n for n in VIEWS.names() if n != "identity"])
def test_every_view_but_identity_changes_the_image(name):
    assert not torch.allclose(get_view(name)(X), X)


def test_identity_and_flips():
    assert torch.equal(get_view("identity")(X), X)
    assert torch.equal(get_view("hflip")(get_view("hflip")(X)), X)
    assert torch.equal(get_view("vflip")(get_view("vflip")(X)), X)
    assert torch.equal(get_view("hflip")(X)[..., 0], X[..., -1])
    assert torch.equal(get_view("vflip")(X)[..., 0, :], X[..., -1, :])


@pytest.mark.parametrize("size", [32, 16])
def test_shift_views_move_content_by_a_sixteenth(size):
    x = X[..., :size, :size]
    s = max(1, size // 16)
    left, right = get_view("shift_left")(x), get_view("shift_right")(x)
    up, down = get_view("shift_up")(x), get_view("shift_down")(x)
    assert torch.equal(left[..., :, :-s], x[..., :, s:])
    assert torch.equal(right[..., :, s:], x[..., :, :-s])
    assert torch.equal(up[..., :-s, :], x[..., s:, :])
    assert torch.equal(down[..., s:, :], x[..., :-s, :])
    # the uncovered border is filled by reflection, not zeros
    assert torch.equal(left[..., :, -1], x[..., :, -1 - s]) if s == 1 else torch.equal(
        left[..., :, -s:], x[..., :, -s - 1:-1].flip(-1))


def test_scale_views_keep_the_centre():
    x = torch.zeros(1, 1, 32, 32)
    x[..., 12:20, 12:20] = 1.0  # a centred square
    up, down = get_view("scale_up")(x), get_view("scale_down")(x)
    assert up.sum() > x.sum() > down.sum()  # zoom in makes it bigger, zoom out smaller
    assert up[..., 16, 16] == pytest.approx(1.0) and down[..., 16, 16] == pytest.approx(1.0, abs=1e-3)


def test_composed_views():
    both = get_view("hflip+vflip")(X)
    assert torch.equal(both, X.flip(-1).flip(-2))
    assert torch.equal(get_view("hflip + shift_left")(X), get_view("shift_left")(X.flip(-1)))
    assert torch.equal(get_view("hflip+hflip")(X), X)


def test_unknown_view_lists_names():
    with pytest.raises(KeyError) as err:
        get_view("rotate90")
    assert "rotate90" in str(err.value)
    for name in ("hflip", "identity", "shift_left", "scale_up"):
        assert name in str(err.value)
    with pytest.raises(KeyError, match="rotate90"):
        get_view("hflip+rotate90")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()


IMAGES = np.random.default_rng(0).integers(0, 256, size=(7, 8, 8, 3), dtype=np.uint8)


def reference_probs(model, rows, views, mean, std):
    x = torch.from_numpy(IMAGES[rows]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return torch.stack([model(get_view(v)(x)).softmax(1) for v in views]).mean(0)


@pytest.mark.parametrize("views", [["identity"], ["identity", "hflip"], ["hflip", "vflip", "shift_right"]])
def test_predict_tta_averages_softmax_over_views(views):
    model = tiny_model()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    rows = np.array([5, 0, 3, 6, 1])  # unsorted: predictions must follow the requested order
    got = predict_tta(model, IMAGES, rows, views, mean=mean, std=std, device=torch.device("cpu"), dtype=None,
                      channels_last=False, batch_size=2)
    expected = reference_probs(model, rows, views, mean, std)
    assert got.shape == (5, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.ones(5))


def test_predict_tta_differs_from_a_single_view():
    model = tiny_model()
    kwargs = dict(mean=[0.5] * 3, std=[0.25] * 3, device=torch.device("cpu"), dtype=None, channels_last=False)
    rows = np.arange(len(IMAGES))
    both = predict_tta(model, IMAGES, rows, ["identity", "hflip"], **kwargs)
    ident = predict_tta(model, IMAGES, rows, ["identity"], **kwargs)
    flip = predict_tta(model, IMAGES, rows, ["hflip"], **kwargs)
    torch.testing.assert_close(both, (ident + flip) / 2)
    assert not torch.allclose(both, ident)


def test_predict_tta_needs_a_view():
    with pytest.raises(ValueError, match="at least one view"):
        predict_tta(tiny_model(), IMAGES, np.arange(2), [], mean=[0] * 3, std=[1] * 3,
                    device=torch.device("cpu"), dtype=None)


# --------------------------------------------------------------------------- infer.tta: auto


def test_select_views_keeps_views_that_help_and_drops_one_that_hurts():
    from pipeline.evaluation.tta import select_views

    rng = np.random.default_rng(0)
    n, c = 2000, 5
    labels = rng.integers(0, c, n)

    def view(signal):  # a view's probabilities: the truth plus independent noise
        logits = signal * np.eye(c)[labels] + rng.normal(0, 1.0, (n, c))
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    probs = {"identity": view(1.5), "hflip": view(1.5), "shift_left": view(1.4), "scale_down": view(0.0)}
    chosen, report = select_views(probs, labels, "accuracy")
    assert chosen[0] == "identity" and "hflip" in chosen and "scale_down" not in chosen
    assert set(report["views"]) == set(probs)  # every candidate's own effect is reported
    steps = report["steps"]
    assert steps[0]["views"] == ["identity"] and all(s["kept"] for s in steps[:-1])
    assert steps[-1]["kept"] is False or len(chosen) == len(probs)
    kept_accuracy = [s["accuracy"] for s in steps if s["kept"]]
    assert kept_accuracy == sorted(kept_accuracy) and kept_accuracy[-1] > kept_accuracy[0]
    # alone, the useless view is at chance; added to identity it lowers the accuracy
    assert report["views"]["scale_down"]["alone"]["accuracy"] < 0.35
    assert report["views"]["scale_down"]["with_identity"]["accuracy"] < report["views"]["identity"]["alone"]["accuracy"]
    # nothing helps: identity alone
    assert select_views({"identity": probs["identity"], "scale_down": probs["scale_down"]}, labels)[0] == ["identity"]


def test_infer_auto_chooses_views_on_the_oof(tmp_path, shared_competition):
    import json

    from pipeline import folds, infer, preprocess, train
    from pipeline.core.utils import read_json

    from conftest import stage_argv

    argv = stage_argv(tmp_path, shared_competition, "experiment=auto", "infer.tta=auto",
                      "infer.tta_candidates=[identity, hflip, vflip, scale_down]")
    for stage in (preprocess, folds, train, infer):
        assert stage.main(argv) == 0, stage.__name__
    run_dir = tmp_path / "runs" / "auto"
    cv = read_cv(run_dir)
    auto = cv["tta_auto"]
    assert auto["candidates"] == ["identity", "hflip", "vflip", "scale_down"]
    assert cv["oof_tta"]["tta"] == auto["chosen"] and auto["chosen"][0] == "identity"
    assert cv["oof_tta"]["accuracy"] >= auto["views"]["identity"]["alone"]["accuracy"]
    for k in range(3):
        assert json.loads((run_dir / f"fold{k}" / "test.json").read_text())["tta"] == auto["chosen"]
        assert np.load(run_dir / f"fold{k}" / "oof_views.npy").shape[0] == 4
    # a re-run predicts nothing again and keeps the choice
    before = (run_dir / "fold0" / "oof_views.npy").stat().st_mtime_ns
    assert infer.main(argv) == 0
    assert (run_dir / "fold0" / "oof_views.npy").stat().st_mtime_ns == before
    assert read_cv(run_dir)["tta_auto"]["chosen"] == auto["chosen"]
