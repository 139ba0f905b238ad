"""``recipe: auto`` and ``--budget`` (pipeline.plan.planner, pipeline.full): the family chosen from the EDA's
facts on generated data of each kind, budgets in the words people write them, the budget accounting of the plan
(with estimates and a clock given, never measured), and whole runs on the tiny competition: the plan file is
there before training starts, an overrunning member stops further ones, and the submission is still written."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import full, train
from pipeline.core.config import ConfigError, load_config
from pipeline.core.timing import parse_duration
from pipeline.core.utils import read_json
from pipeline.eda import stage as eda, suggest
from pipeline.plan import costs, members, planner
from pipeline.rundir import ReportDir, RunDir, check_data

from conftest import DEFAULT_CONFIG, config_overrides, make_cfg, make_competition


def make_photos(root: Path, width: int = 160, height: int = 120, per_class: int = 4, n_test: int = 2) -> Path:
    """A CSV competition of ``width``×``height`` noise photos in two classes (bright and dark)."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(2 * per_class + n_test):
        label = ("bright", "dark")[k % 2]
        base = 180 if label == "bright" else 60
        pixels = (base + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)
        split = "train" if k < 2 * per_class else "test"
        Image.fromarray(pixels).save(root / split / f"{k:03d}.jpg")
        rows.append({"id": f"{k:03d}", "label": label, "split": split})
    frame = pd.DataFrame(rows)
    frame[frame.split == "train"][["id", "label"]].to_csv(root / "train.csv", index=False)
    frame[frame.split == "test"][["id"]].assign(label="bright").to_csv(root / "sample_submission.csv", index=False)
    return root


def outputs(tmp_path: Path, root: Path) -> list[str]:
    """Overrides that point the default config at ``root`` and keep every output in tmp_path, nothing else."""
    return [f"data.root={root}", f"runs_dir={tmp_path / 'runs'}", f"data.cache_dir={tmp_path / 'cache'}",
            f"submit.dir={tmp_path / 'submissions'}", f"eda.out_dir={tmp_path / 'reports'}"]


def facts_of(cfg) -> suggest.Facts:
    return suggest.facts(read_json(eda.run(cfg).json))


def test_budgets_read_as_people_write_them(tmp_path, capsys):
    assert [parse_duration(t) for t in ("90s", "15m", "1h", "1.5h", " 2M ")] == [90, 900, 3600, 5400, 120]
    for bad in ("15x", "15", "m", "0m", "-5m", "1h30m"):
        with pytest.raises(ConfigError, match="expected a duration like 15m, 90s or 1.5h"):
            parse_duration(bad)
    assert full.main([str(DEFAULT_CONFIG), "--budget", "15x", *[a for t in outputs(tmp_path, tmp_path / "c")
                                                                   for a in ("--set", t)]]) == 1
    assert capsys.readouterr().err.strip() == "error: --budget: expected a duration like 15m, 90s or 1.5h, got '15x'"
    assert full.main([str(DEFAULT_CONFIG), "--budget", "5m", "--set", "recipe=manual"]) == 1
    assert "--budget: plans the members of one config with recipe: auto" in capsys.readouterr().err


def test_small_images_take_the_small_family_as_configured(tmp_path):
    root = make_competition(tmp_path / "comp")  # 32 px squares
    cfg = make_cfg(tmp_path, root)
    family, why = suggest.family(facts_of(cfg))
    assert family == "small" and "32×32" in why
    assert planner.base_config(family, cfg, []) is cfg  # the config as written: the demo's settings unchanged
    page = ReportDir.of(cfg).eda_page.read_text()
    assert "<h3>Plan</h3>" in page and "recipe: auto takes the small recipe" in page


def test_photos_take_the_pretrained_family_with_the_users_data_and_overrides(tmp_path):
    root = make_photos(tmp_path / "photos")
    sets = outputs(tmp_path, root) + ["train.head_c=0.5", "data.id_col=id"]
    loaded = load_config(DEFAULT_CONFIG, sets)
    found = facts_of(loaded)
    assert (found.width, found.height, found.images) == (160, 120, 8)
    family, why = suggest.family(found)
    assert family == "photos" and "160×120" in why
    base = planner.base_config(family, loaded, sets)
    assert (base.model.name, base.model.pretrained, base.train.mode) == ("tf_efficientnet_lite0", True, "partial")
    first = planner.member_config(base, planner.FAMILIES["photos"][0], first=True)
    assert first.train.mode == "features" and first.experiment == base.experiment  # the fastest strong start
    assert (base.data.image_size, base.data.resize) == (224, "crop")  # photos.yaml's, not default.yaml's 32
    assert base.data.root == str(root) and base.train.head_c == 0.5  # the user's data and --set on top
    assert base.experiment == loaded.experiment and base.runs_dir == str(tmp_path / "runs")


def small_facts(images: int = 1000) -> suggest.Facts:
    return suggest.Facts(images=images, test_images=200, classes=10, width=32, height=32, aspect=1.0, mode="RGB",
                         imbalance=1.0, duplicate_groups=0)


def given(minutes: dict[str, float], per_epoch: float = 0.0, base_per_epoch: float = 0.0):
    """Estimates given per member of the small family (known by its model and seed), never measured."""
    def estimate(cfg, planned):
        name = "base" if cfg.model.name != "airnet_small" else "long" if cfg.seed == 42 else "seed2"
        return costs.Cost(60 * minutes[name], 60 * (per_epoch if name != "base" else base_per_epoch))
    return estimate


def no_time() -> float:
    return 0.0


def test_a_plan_whose_estimates_exceed_the_budget_drops_steps(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path / "comp")
    estimates = given({"base": 2, "long": 1, "seed2": 1}, per_epoch=0.5)
    made = planner.make_plan("small", "why", cfg, small_facts(), 600, no_time, estimates)
    left = 10 - planner.reserve(600) / 60  # minutes
    status = [(s["member"], s["status"]) for s in made.steps]
    assert status == [("base", "dropped"), ("long", "planned"), ("long-seed2", "dropped"), ("base-seed2", "dropped")]
    assert "long fits the budget on its own" in made.steps[0]["note"] and made.lead == 1
    long = made.configs[1]
    assert long.experiment == cfg.experiment  # the first member to run takes the experiment's folder
    assert long.train.epochs == int((left - 1) // 0.5) and members.LONG_EPOCHS[0] <= long.train.epochs < 40  # that fit
    assert made.steps[1]["estimated_min"] == pytest.approx(1 + 0.5 * long.train.epochs, abs=0.01)
    assert "needs" in made.steps[2]["note"] and made.configs[2].seed == cfg.seed + 1
    assert made.configs[2].train.epochs == members.LONG_EPOCHS[0]  # what its fewest epochs would need

    kept = given({"base": 2, "long": 5, "seed2": 5}, per_epoch=0.5, base_per_epoch=0.25)  # long: 5 + 5 > 9.2 min
    small = planner.make_plan("small", "why", cfg, small_facts(), 600, no_time, kept)
    assert [s["status"] for s in small.steps] == ["planned", "dropped", "dropped", "dropped"] and small.lead == 0
    assert small.configs[0].train.epochs == int((left - 2) // 0.25) == 28  # the compact CNN for as long as fits

    over = given({"base": 5, "long": 1, "seed2": 1})  # 5 min + 30 s of final stages: 5.7 min with the reserve
    with pytest.raises(ConfigError, match=r"--budget 1m is too small here: the first member \(base\) needs about "
                                          r"5.0 min .*give --budget 6m or more"):
        planner.make_plan("small", "why", cfg, small_facts(), 60, no_time, over)

    unbudgeted = planner.make_plan("small", "why", cfg, small_facts(), None, no_time, None)
    assert [s["status"] for s in unbudgeted.steps] == ["planned", "dropped", "dropped", "dropped"]
    assert unbudgeted.configs[0] is cfg and "without --budget" in unbudgeted.steps[1]["note"]


def photos_facts() -> suggest.Facts:
    return suggest.Facts(images=2000, test_images=500, classes=20, width=400, height=300, aspect=1.33, mode="RGB",
                         imbalance=3.0, duplicate_groups=0)


def test_after_the_first_member_the_rest_is_refitted_in_the_familys_order(tmp_path):
    sets = outputs(tmp_path, tmp_path / "photos")
    base = planner.base_config("photos", load_config(DEFAULT_CONFIG, sets), sets)
    fixed = {"base": 2, "partial": 1, "lite2": 4, "crops": 3, "seed2": 3}  # minutes, + 2 an epoch when fine-tuning

    def estimates(cfg, planned):
        name = cfg.experiment.rsplit("-", 1)[-1] if "-" in cfg.experiment else "base"
        return costs.Cost(60 * fixed[name], 120.0 if cfg.train.mode == "partial" else 0.0)

    made = planner.make_plan("photos", "why", base, photos_facts(), 20 * 60, no_time, estimates)
    assert [s["member"] for s in made.steps] == ["lp", "partial", "lite2", "crops", "partial-seed2", "lite2-partial"]
    assert made.configs[1].train.epochs == 2 and made.steps[1]["estimated_min"] == pytest.approx(5)  # 1 + 2 x 2
    assert made.steps[1]["first_fold_min"] == pytest.approx(1)  # 5 min over 5 folds
    made.steps[0].update(status="done", oof={"accuracy": 0.95, "log_loss": 0.5})  # a high score reorders nothing:
    made.elapsed = lambda: 10 * 60  # the first member took 10 min, not 2: 10 - 0.9 (reserve) left
    planner.refit(made)  # each member's first fold decides whether it goes on
    order = [s["member"] for s in made.steps]
    assert order == ["lp", "partial", "lite2", "crops", "partial-seed2", "lite2-partial"]
    assert [s["status"] for s in made.steps[1:]] == ["planned", "dropped", "planned", "dropped", "dropped"]
    assert made.configs[1].train.epochs == 2 and "re-fitted" in made.record["adapted"]
    assert [c.experiment.rsplit("-", 1)[-1] for c in made.configs[1:]] == [o.rsplit("-", 1)[-1] for o in order[1:]]
    assert read_json(made.path)["steps"] == made.steps  # saved as adapted

    made.elapsed = lambda: 15 * 60  # 3.9 min left: partial fits with one epoch only
    planner.refit(made)
    assert made.configs[1].train.epochs == 1 and made.steps[1]["status"] == "planned"
    assert [s["status"] for s in made.steps[2:]] == ["dropped"] * 4


def test_the_plan_is_written_before_training_and_one_member_runs_without_a_budget(tmp_path, monkeypatch, capsys):
    root = make_competition(tmp_path / "comp", n_per_class=8)
    seen = []
    real_train = train.run

    def observed(cfg):
        path = RunDir.of(cfg).plan
        seen.append(read_json(path)["steps"][0]["status"] if path.is_file() else None)
        return real_train(cfg)

    monkeypatch.setattr(train, "run", observed)
    sets = [a for t in config_overrides(tmp_path, root) for a in ("--set", t)]
    assert full.main([str(DEFAULT_CONFIG), *sets]) == 0
    assert seen == ["running"]  # plan.json, its first member running, before the train stage started
    err = capsys.readouterr().err
    assert [line.split()[1:] for line in err.splitlines() if line.startswith("== ")] == [
        [stage, "demo"] for stage in full.STAGES]  # the stages of the config as written, and nothing else
    record = read_json(tmp_path / "runs" / "demo" / "plan.json")
    assert [s["status"] for s in record["steps"]] == ["done", "dropped", "dropped", "dropped"]
    assert record["steps"][0]["actual_min"] is not None and record["steps"][0]["oof"]["accuracy"] >= 0
    assert record["submission"] and Path(record["submission"]).is_file()
    assert 'id="plan"' in (tmp_path / "reports" / "demo" / "results" / "index.html").read_text()


def only_the_first(monkeypatch) -> None:
    """The small family with a first member that never makes way and trains its configured epochs."""
    monkeypatch.setitem(planner.FAMILIES, "small", [
        replace(m, yields=False, epochs=None if m.name == "base" else m.epochs) for m in planner.FAMILIES["small"]])


def test_a_spent_budget_runs_no_further_member_and_the_submission_is_written(tmp_path, monkeypatch):
    root = make_competition(tmp_path / "comp", n_per_class=8)
    only_the_first(monkeypatch)
    sets = config_overrides(tmp_path, root)
    cfg = load_config(DEFAULT_CONFIG, sets)
    trained = RunDir.of(cfg).model(0).weights("best")

    def clock() -> float:  # the first member's training takes the hour
        return 3600.0 if trained.is_file() else 0.0

    path = full.run_auto(cfg, sets, 3600, clock=clock, estimate=given({"base": 1, "long": 1, "seed2": 1}))
    assert path is not None and path.is_file()
    record = read_json(RunDir.of(cfg).plan)
    assert [s["status"] for s in record["steps"]] == ["done", "dropped", "dropped", "dropped"]
    assert "min left" in record["steps"][1]["note"] and record["stopped"] == "the budget is spent"
    assert record["ensemble"]["oof"] is not None and record["submission"] == str(path)
    assert not (tmp_path / "runs" / "demo-long").exists()


def test_a_run_folder_holding_other_data_makes_way_unless_named(tmp_path):
    other = make_cfg(tmp_path, tmp_path / "other")
    (tmp_path / "other").mkdir()
    check_data(other, stamp_it=True)
    sets = config_overrides(tmp_path, tmp_path / "comp")
    cfg = load_config(DEFAULT_CONFIG, sets)
    assert full.own_folder(cfg, sets).experiment == "demo-comp"
    named = load_config(DEFAULT_CONFIG, sets + ["experiment=demo"])
    assert full.own_folder(named, sets + ["experiment=demo"]).experiment == "demo"
