"""Learning-rate schedules: warmup + cosine, one-cycle, plateau, names."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.config import TrainConfig
from pipeline.training.schedulers import build_scheduler


def make(**kwargs):
    param = torch.nn.Parameter(torch.zeros(1))
    cfg = TrainConfig(**kwargs)
    opt = torch.optim.SGD([param], lr=cfg.lr, momentum=0.9)
    return opt, cfg


def lr_trace(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate used at every optimizer step of the whole run, plus the one after the last."""
    opt, _ = make(**{f: getattr(cfg, f) for f in ("epochs", "lr", "warmup_epochs", "min_lr", "scheduler")})
    schedule = build_scheduler(cfg, opt, steps_per_epoch)
    lrs = []
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step_batch()
        schedule.step_epoch(1.0)  # no-op for per-step schedules
    lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_cosine_with_warmup_ramps_then_decays_to_min_lr():
    cfg = TrainConfig(epochs=5, lr=0.1, warmup_epochs=1, min_lr=0.001, scheduler="cosine")
    lrs = lr_trace(cfg, steps_per_epoch=10)
    warmup = lrs[:11]
    assert warmup[0] < 0.02  # starts low
    assert all(b > a for a, b in zip(warmup, warmup[1:]))  # strictly rising during warmup
    assert max(lrs) == pytest.approx(0.1)
    assert lrs.index(max(lrs)) == 10  # the peak is reached when warmup ends
    decay = lrs[10:]
    assert all(b <= a + 1e-12 for a, b in zip(decay, decay[1:]))  # then only decreases
    assert lrs[-1] == pytest.approx(0.001, abs=1e-9)  # ends at min_lr
    assert lrs[30] == pytest.approx(0.001 + (0.1 - 0.001) * 0.5, rel=1e-6)  # cosine halfway point


def test_cosine_without_warmup_starts_at_lr():
    lrs = lr_trace(TrainConfig(epochs=3, lr=0.05, warmup_epochs=0, min_lr=0.0, scheduler="cosine"), 4)
    assert lrs[0] == pytest.approx(0.05)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(b < a for a, b in zip(lrs, lrs[1:]))


def test_onecycle_peaks_at_lr():
    cfg = TrainConfig(epochs=4, lr=0.2, warmup_epochs=1, scheduler="onecycle")
    lrs = lr_trace(cfg, steps_per_epoch=10)[:-1]
    assert max(lrs) == pytest.approx(0.2, rel=1e-6)
    peak = lrs.index(max(lrs))
    assert 8 <= peak <= 11  # warmup_epochs / epochs of the run
    assert lrs[0] < 0.2 / 10 and lrs[-1] < 0.2 / 100


def test_plateau_reduces_lr_after_patience_epochs_without_improvement():
    opt, cfg = make(lr=0.1, scheduler="plateau", plateau_patience=2, plateau_factor=0.5)
    schedule = build_scheduler(cfg, opt, steps_per_epoch=10)
    assert not schedule.per_step
    for _ in range(10):
        schedule.step_batch()  # per-step calls do nothing
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    history = []
    for val_loss in [1.0, 0.9, 0.9, 0.9, 0.9]:  # improves once, then 3 epochs without improvement
        schedule.step_epoch(val_loss)
        history.append(opt.param_groups[0]["lr"])
    assert history[:4] == pytest.approx([0.1, 0.1, 0.1, 0.1])  # patience=2 bad epochs are tolerated
    assert history[4] == pytest.approx(0.05)  # the third bad epoch halves it
    schedule.step_epoch(0.5)  # improvement: no further cut
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_schedule_state_round_trips_for_resume():
    cfg = TrainConfig(epochs=3, lr=0.1, warmup_epochs=1, scheduler="cosine")
    opt, _ = make(lr=0.1)
    schedule = build_scheduler(cfg, opt, 5)
    for _ in range(7):
        opt.step()
        schedule.step_batch()
    state, lr = schedule.state_dict(), opt.param_groups[0]["lr"]
    opt2, _ = make(lr=0.1)
    schedule2 = build_scheduler(cfg, opt2, 5)
    opt2.load_state_dict(opt.state_dict())
    schedule2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr)
    opt.step(), schedule.step_batch(), opt2.step(), schedule2.step_batch()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_unknown_scheduler_lists_valid_names():
    opt, cfg = make(scheduler="step")
    with pytest.raises(KeyError) as err:
        build_scheduler(cfg, opt, 10)
    for name in ("cosine", "onecycle", "plateau"):
        assert name in str(err.value)
