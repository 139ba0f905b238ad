"""The fold contract every training mode keeps: one registry, one writer of a fold's files with the same keys for
every mode, damaged files found for every mode, and every setting a mode cannot honour refused by name."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import folds, infer, preprocess, train
from pipeline.core.config import ConfigError
from pipeline.rundir import RunDir, load_manifest, load_split, read_folds
from pipeline.training import modes, partial
from pipeline.training.fold import FoldRun
from pipeline.training.mode import TRAIN_MODES, FoldData
from pipeline.training.record import RESULT_KEYS, Monitor, damage

from conftest import REPO, make_competition, make_cfg, stage_argv

FOLD_FILES = {"best.safetensors", "best.json", "oof.npy", "result.json"}
PROVENANCE = {"fingerprint", "folds", "images", "start_weights"}
META = {"fold", "epoch", "classes", "metrics", "mode", "model", "image_size", "config"}


def _tiny(weights: Path) -> list[str]:
    return ["model.name=test_efficientnet", f"model.weights={weights}", "infer.tta=[identity,hflip]"]


def mode_overrides(mode: str, weights: Path) -> list[str]:
    """Each mode on the tiny competition, fold 0 only: a scratch CNN, or timm's tiny EfficientNet as a backbone."""
    extra = {"finetune": [], "features": _tiny(weights),
             "partial": [*_tiny(weights), "train.tune_blocks=2", "train.optimizer=adamw", "train.lr=0.01"]}[mode]
    return [f"train.mode={mode}", "train.folds=[0]", *extra]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import timm
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.safetensors"
    save_file(timm.create_model("test_efficientnet").state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights) -> dict:
    """One run folder per mode, fold 0 trained and predicted."""
    root = make_competition(tmp_path_factory.mktemp("modes") / "comp")
    runs = {}
    for mode in TRAIN_MODES.names():
        cfg = make_cfg(root.parent / mode, root, *mode_overrides(mode, weights))
        for stage in (preprocess, folds, train, infer):
            stage.run(cfg)
        runs[mode] = cfg
    return runs


def test_the_registry_holds_every_mode_and_names_the_valid_ones(tmp_path):
    assert TRAIN_MODES.names() == ["features", "finetune", "partial"]
    with pytest.raises(ConfigError, match=r"train.mode: unknown training mode 'linear'.*features, finetune, partial"):
        modes.training_mode(make_cfg(tmp_path, None, "train.mode=linear"))


def test_every_mode_writes_the_same_fold_files_and_result_keys(trained):
    results = {}
    for mode, cfg in trained.items():
        folder = RunDir.of(cfg).model(0)
        assert FOLD_FILES <= {p.name for p in folder.root.iterdir()}, mode
        results[mode] = json.loads(folder.result.read_text())
        assert results[mode]["mode"] == mode and results[mode]["fold"] == 0
        meta = json.loads(folder.meta("best").read_text())
        assert META <= set(meta) and meta["mode"] == mode
        assert np.load(folder.predictions("oof")).shape[1] == 3
    keys = {mode: set(result) for mode, result in results.items()}
    assert all(k == set(RESULT_KEYS) | PROVENANCE for k in keys.values()), keys


@pytest.mark.parametrize("mode", ["finetune", "features", "partial"])
@pytest.mark.parametrize("name", ["best.safetensors", "oof.npy"])
def test_a_damaged_fold_file_is_found_and_the_fold_trained_again(trained, mode, name):
    cfg = trained[mode]
    folder = RunDir.of(cfg).model(0)
    path = folder.root / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert damage(folder) == path
    with pytest.raises(ValueError, match=re.escape(str(path))):
        infer.trained_folds(cfg)  # refused, naming the file, until the train stage mends it
    before = folder.result.stat().st_mtime_ns
    train.run(cfg)
    assert damage(folder) is None and folder.result.stat().st_mtime_ns != before
    assert infer.trained_folds(cfg) == [0]


# a value away from the default for every setting some mode refuses (a new refusal needs one here)
SAMPLES = {
    "train.tune_blocks": 2, "train.crop_views": 1, "train.head": "mlp", "train.head_hidden": 64,
    "train.head_steps": 10, "train.refit": True, "train.teacher": "teacher.csv", "train.distill_alpha": 0.3,
    "train.distill_temperature": 2.0, "train.freeze_epochs": 1, "train.accum_steps": 4, "train.early_stopping": 2,
    "train.lookahead_k": 5, "train.lookahead_alpha": 0.3, "train.backbone_lr_mult": 0.1,
    "train.head_init": "linear_probe", "augment.policy": "randaugment", "augment.n_select": 1, "augment.level": 5,
    "augment.n_level": 20, "augment.random_magnitude": True, "augment.ops": "[Rotate]", "augment.mixup_alpha": 0.2,
    "augment.cutmix_alpha": 1.0, "augment.mix_prob": 0.5, "augment.switch_prob": 0.3, "augment.sizes": "[16]",
    "augment.size_epochs": "[0]", "augment.autoaugment_policy": "v0", "augment.flip": "alternate",
}
NEEDS = {"augment.size_epochs": ["augment.sizes=[16]"], "augment.flip": ["data.loader=device"]}
REFUSALS = [(name, key) for name in TRAIN_MODES.names() for key in TRAIN_MODES.build(name).refused]


@pytest.mark.parametrize("mode,key", REFUSALS)
def test_a_setting_a_mode_cannot_honour_is_refused_by_name(tmp_path, mode, key):
    cfg = make_cfg(tmp_path, None, f"train.mode={mode}", *NEEDS.get(key, []), f"{key}={SAMPLES[key]}")
    with pytest.raises(ConfigError, match=rf"train.mode={mode} cannot honour (.*; )?{re.escape(key)}="):
        modes.training_mode(cfg)


def test_the_train_stage_refuses_in_one_line_before_it_reads_anything(tmp_path, capsys):
    argv = stage_argv(tmp_path, tmp_path / "missing", "train.mode=features", "train.accum_steps=4")
    assert train.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.accum_steps=4" in err[0] and "train.mode=features" in err[0]


def test_settings_a_mode_has_no_use_for_are_named_in_the_log(tmp_path, caplog):
    caplog.set_level("INFO")
    modes.check(make_cfg(tmp_path, None, "train.mode=features", "train.lr=0.3"))
    assert "train.mode=features does not use" in caplog.text and "train.lr=0.3" in caplog.text


def test_the_docs_table_is_the_registry():
    assert modes.settings_table() in (REPO / "docs" / "MODES.md").read_text()


def test_no_stage_branches_on_a_modes_name():
    """Callers look the mode up (pipeline.training.modes): none compares ``train.mode`` with a name."""
    pattern = re.compile(r"\.mode\s*(==|!=|in\s*[(\[{])|COSTS\[")
    found = [f"{path.relative_to(REPO)}:{i}" for path in sorted((REPO / "pipeline").rglob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if "train" in line and pattern.search(line)]
    assert not found


def test_partial_steps_through_the_recipe_with_accumulation(tmp_path, competition, weights):
    """``train.accum_steps`` in partial mode: one optimizer step every 3 batches of cached activations."""
    counts = {}
    for accum in (1, 3):
        cfg = make_cfg(tmp_path, competition, *mode_overrides("partial", weights), "train.batch_size=8",
                       f"train.accum_steps={accum}")
        manifest = preprocess.run(cfg)
        folds.run(cfg)
        _, index = load_split(cfg.run_dir, "train", manifest)
        acts = partial.activations(cfg, manifest, "train", ["identity"], torch.device("cpu"))
        rows = np.flatnonzero(read_folds(cfg.run_dir, index)["fold"].to_numpy() != 0)  # 24 rows: 3 batches
        tuning = partial.build_tuning(cfg, acts, index["label_idx"].to_numpy(), rows, 3, torch.device("cpu"), 0)
        tuning.run_epoch(acts, rows, index["label_idx"].to_numpy(), np.random.default_rng(0), "epoch")
        counts[accum] = tuning.step.updates
    assert counts == {1: 3, 3: 1}


def test_a_monitor_keeps_the_best_epoch_and_stops_after_its_patience():
    monitor = Monitor("accuracy", patience=2)
    kept = [monitor.update(epoch, {"accuracy": acc, "loss": 0.0}) for epoch, acc in enumerate([0.5, 0.7, 0.6, 0.6])]
    assert kept == [True, True, False, False] and monitor.best_epoch == 1 and monitor.stop
    last = Monitor("last", patience=1)
    assert all(last.update(epoch, {"accuracy": 0.0, "loss": 9.0}) for epoch in range(3)) and not last.stop


def test_finetune_honours_min_steps_too(tmp_path, competition):
    cfg = make_cfg(tmp_path, competition, "train.min_steps=10", "train.batch_size=8")
    manifest = preprocess.run(cfg)
    images, index = load_split(cfg.run_dir, "train", manifest)
    run = FoldRun(FoldData(cfg, load_manifest(cfg.run_dir), images, index, folds.run(cfg), torch.device("cpu")), 0)
    assert run.epochs == 4  # 24 training rows: 3 steps an epoch, 10 steps need 4 epochs (train.epochs=1)
