"""The search stage on tiny data: the space, constraints, outputs, resuming, concurrent workers, warm start."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import torch
import yaml
from sqlalchemy.exc import SQLAlchemyError

from pipeline import preprocess
from pipeline.search import storage as stores
from pipeline.search import study as search
from pipeline.models.arch import SpecNet, downsampling, load_spec
from pipeline.core.config import ConfigError, load_config, with_values
from pipeline.models.factory import count_parameters, create_model, model_costs
from pipeline.search.space import spec_params, suggest, trial_config
from pipeline.core.utils import read_json

from conftest import DEFAULT_CONFIG, REPO, config_overrides, make_cfg

SMALL = ("search.arch.channels=[[4, 8], [8, 12], [8, 16]]", "search.arch.repeats=[1, 2]", "search.epochs=1",
         "search.subsample=null", "search.holdout=0.25", "search.record_latency=false", "train.batch_size=8",
         "search.population_size=4", "search.startup_trials=2")


def search_cfg(tmp_path, root, *overrides):
    cfg = make_cfg(tmp_path, root, *SMALL, *overrides)
    preprocess.run(cfg)
    return cfg


def test_random_samples_of_the_default_space_build_valid_models(tmp_path):
    cfg = make_cfg(tmp_path, None, "search.record_latency=false", "search.arch.heads=[linear, airnet]")
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(0))
    heads = set()
    for i in range(20):
        trial = study.ask()
        cfg_t = trial_config(cfg, suggest(trial, cfg.search))
        spec = cfg_t.model.spec
        assert cfg_t.model.name == "spec" and spec["blocks"][0]["type"] != "Pass" and len(spec["blocks"]) == 7
        assert downsampling(spec) <= cfg.data.image_size // 4
        model = create_model(cfg_t.model, 10).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
        if i % 5 == 0:  # the FLOP counter is the slow part
            costs = model_costs(model, 32, latency=False)
            assert costs["params"] == count_parameters(model) and costs["macs"] > 0
        study.tell(trial, [0.0, count_parameters(model)])
        heads.add((spec["head"], model.head.bias is None))
    assert heads == {("linear", False), ("airnet", True)}  # both heads sampled, the airnet one bias-free


def test_study_enforces_constraints_and_exports_loadable_configs(tmp_path, shared_competition):
    cfg = search_cfg(tmp_path, shared_competition, "search.n_trials=8", "search.constraints={params: 3000}",
                     "search.references=[airnet_tiny]", "search.best_floor=0.0",
                     "search.best_budgets=[2000, 10]")
    summary = search.run(cfg)
    out = cfg.run_dir / "search"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 8 and summary["trials"] == 8
    trained = trials["curve"].notna()
    assert (trials.loc[trained, "params"] <= 3000).all()  # constraints hold: nothing over the bound trained
    assert (trials.loc[~trained & (trials["state"] == "COMPLETE"), "params"] > 3000).all()
    study = optuna.load_study(study_name=cfg.experiment, storage=f"sqlite:///{out / 'study.db'}")
    for t in study.trials:  # the recorded objective is the built model's parameter count
        model = create_model(trial_config(cfg, t.params).model, 3)
        assert t.user_attrs["params"] == count_parameters(model)
    for name in ("pareto.csv", "pareto.png", "hypervolume.png", "summary.json", "references.json"):
        assert (out / name).is_file(), name
    assert list((out / "tb").iterdir())
    assert summary["best"], "no trial trained"
    assert "most_accurate_under_10" not in summary["best"]  # nothing that small: no config
    if (trials.loc[trained, "params"] <= 2000).any():
        assert summary["best"]["most_accurate_under_2000"]["params"] <= 2000
    for rule in summary["best"]:
        exported = load_config(out / "best" / f"{rule}.yaml")
        assert exported.experiment == f"{cfg.experiment}-{rule}" and exported.train.epochs == cfg.train.epochs
        assert count_parameters(create_model(exported.model, 3)) == summary["best"][rule]["params"] <= 3000
    # a second study warm-starts from this one's Pareto set: those parameters are tried first
    pareto = pd.read_csv(out / "pareto.csv")
    cfg2 = search_cfg(tmp_path, shared_competition, "experiment=warm", f"search.warm_start={out}",
                      f"search.n_trials={len(pareto)}", "search.constraints={params: 3000}")
    search.run(cfg2)
    warm = optuna.load_study(study_name="warm", storage=f"sqlite:///{cfg2.run_dir / 'search' / 'study.db'}")
    assert sorted(t.user_attrs["params"] for t in warm.trials) == sorted(pareto["params"])



def test_rerank_retrains_the_proxys_best_and_picks_by_the_full_fidelity_score(tmp_path, shared_competition):
    cfg = search_cfg(tmp_path, shared_competition, "search.n_trials=6", "search.rerank_top=2", "train.epochs=2",
                     "search.best_budgets=[3000]", "search.references=[airnet_tiny]", "search.sampler=random")
    summary = search.run(cfg)
    out = cfg.run_dir / "search"
    trials = pd.read_csv(out / "trials.csv")
    reranked = trials[trials["rerank_accuracy"].notna()]
    good = trials[(trials["state"] == "COMPLETE") & (trials["feasible"] == True)]  # noqa: E712
    expected = set(good.sort_values(["accuracy", "params"], ascending=[False, True])["number"].head(2))
    expected |= set(good[good["params"] <= 3000].sort_values(["accuracy", "params"], ascending=[False, True])
                    ["number"].head(2))
    within = good[good["accuracy"] >= good["accuracy"].max() - cfg.search.best_within - 1e-12]
    expected.add(within.sort_values(["params", "accuracy"], ascending=[True, False])["number"].iloc[0])
    above = good[good["accuracy"] >= cfg.search.best_floor - 1e-12]
    if len(above):
        expected.add(above.sort_values(["params", "accuracy"], ascending=[True, False])["number"].iloc[0])
    assert set(reranked["number"]) == expected and set(summary["rerank"]) == {str(n) for n in expected}
    best = reranked.sort_values(["rerank_accuracy", "params"], ascending=[False, True]).iloc[0]
    assert summary["best"]["most_accurate"]["trial"] == best["number"]
    assert "rerank_accuracy" in (out / "best" / "most_accurate.yaml").read_text().splitlines()[0]
    assert read_json(out / "rerank_references.json")["models"]["airnet_tiny"]["accuracy"] >= 0
    cached = read_json(out / "rerank.json")
    search.run(cfg)  # resumed with nothing new to do: the re-rank is read back, not retrained
    assert read_json(out / "rerank.json") == cached


def test_top_pick_prefers_the_rerank_score_where_there_is_one():
    from pipeline.search.report import top_pick

    by_proxy = pd.DataFrame({"number": [3, 1, 2], "accuracy": [0.6, 0.5, 0.4], "params": [900, 500, 100]})
    assert top_pick(by_proxy, "accuracy")["number"] == 3
    by_proxy["rerank_accuracy"] = [0.70, 0.75, None]
    assert top_pick(by_proxy, "accuracy")["number"] == 1

def test_every_rule_judges_by_the_rerank_score_where_there_is_one(tmp_path):
    from pipeline.search.report import best_trials, rerank_candidates

    cfg = make_cfg(tmp_path, None, "search.rerank_top=1", "search.best_within=0.05",
                     "search.best_floor=0.5")
    table = pd.DataFrame({"number": [0, 1, 2, 3], "state": "COMPLETE", "feasible": True,
                          "accuracy": [0.60, 0.58, 0.56, 0.40], "params": [900, 500, 100, 50]})
    assert {r: row["number"] for r, row in best_trials(table, cfg).items()} == {
        "most_accurate": 0, "smallest_within": 2, "smallest_above_floor": 2}
    assert rerank_candidates(table, cfg) == [0, 2]  # the proxy's best and its pick for both smallest_* rules
    table["rerank_accuracy"] = [0.80, None, 0.70, None]  # at full epochs trial 2 falls 10 points behind
    picks = {r: row["number"] for r, row in best_trials(table, cfg).items()}
    assert picks == {"most_accurate": 0, "smallest_within": 0, "smallest_above_floor": 2}


SEED_SPEC = "{pool: max, blocks: [{type: ConvPool, out: 8}, {type: Conv, out: 12, stride: 2}]}"


def test_seed_specs_are_the_first_trials_and_must_fit_the_space(tmp_path, shared_competition):
    cfg = search_cfg(tmp_path, shared_competition, f"search.seed_specs=[{SEED_SPEC}]", "search.n_trials=1")
    search.run(cfg)
    study = optuna.load_study(study_name=cfg.experiment, storage=f"sqlite:///{cfg.run_dir / 'search' / 'study.db'}")
    (trial,) = study.trials
    built = trial_config(cfg, trial.params).model.spec
    assert built["pool"] == "max" and [b["type"] for b in built["blocks"]] == ["ConvPool", "Conv", "Pass"]
    assert trial.user_attrs["params"] == count_parameters(SpecNet(cfg.search.seed_specs[0], 3))
    search.run(with_values(cfg, {"search.n_trials": 2}))  # resuming does not enqueue the seed again
    assert [t.params for t in study.trials][1] != trial.params
    with pytest.raises(ConfigError, match="sampled 'pool'.*search.study_name"):  # not a failed trial each
        search.run(with_values(cfg, {"search.n_trials": 3, "search.arch.pools": ["max"]}))
    assert len(study.trials) == 2
    with pytest.raises(ConfigError, match="b1_out=13 is outside the space"):
        search.run(with_values(cfg, {"experiment": "bad", "search.seed_specs": [
            {"blocks": [{"type": "Conv", "out": 8}, {"type": "Conv", "out": 13}]}]}))


def test_a_configuration_already_trained_is_not_trained_again(tmp_path, shared_competition):
    """Parameters a block ignores (a ConvPool's expansion ratio) make equal models look new to the sampler:
    the repeat takes its twin's result, and the Pareto set, the re-rank and the trained count list it once."""
    cfg = search_cfg(tmp_path, shared_competition, "search.n_trials=3", "search.arch.expansions=[1.0, 4.0]",
                     "search.rerank_top=2", "search.best_floor=0.0")
    (cfg.run_dir / "search").mkdir(parents=True)
    study = stores.open_study(cfg)
    params = spec_params(load_spec(yaml.safe_load(SEED_SPEC)), cfg.search.arch)
    study.enqueue_trial(params)
    study.enqueue_trial({**params, "b0_expansion": 4.0})  # a different trial, the same ConvPool model
    summary = search.run(cfg)
    first, repeat = study.trials[:2]
    assert first.params != repeat.params and trial_config(cfg, first.params) == trial_config(cfg, repeat.params)
    assert "same_as" not in first.user_attrs and repeat.user_attrs["same_as"] == 0
    assert repeat.values == first.values and repeat.user_attrs["curve"] == first.user_attrs["curve"]
    assert summary["repeats"] == 1 and summary["trained"] == 2
    out = cfg.run_dir / "search"
    assert 1 not in pd.read_csv(out / "pareto.csv")["number"].tolist()
    assert "1" not in read_json(out / "rerank.json")["trials"]  # retrained once, as trial 0


def test_single_objective_hpo_over_config_keys(tmp_path, shared_competition):
    cfg = search_cfg(tmp_path, shared_competition, "search.arch.enabled=false", "search.objectives=[accuracy]",
                     "search.sampler=tpe", "search.pruner=median", "search.n_trials=3",
                     "search.space={train.lr: {log_uniform: [0.001, 0.1]}, train.loss: {choice: [ce, focal]}}")
    summary = search.run(cfg)
    trials = pd.read_csv(cfg.run_dir / "search" / "trials.csv")
    assert summary["trials"] == 3 and trials["params_train.lr"].between(0.001, 0.1).all()
    assert set(trials["params_train.loss"]) <= {"ce", "focal"}
    best = load_config(cfg.run_dir / "search" / "best" / "most_accurate.yaml")
    row = trials.set_index("number").loc[summary["best"]["most_accurate"]["trial"]]
    assert best.model.name == "airnet_tiny" and best.train.lr == pytest.approx(row["params_train.lr"])


@pytest.mark.parametrize("override, message", [("search.objectives=[accuracy, size]", "unknown objective"),
                                               ("search.space={train.lr: {normal: [0, 1]}}", "expected one of"),
                                               ("search.arch.heads=[linear, mlp]", "search.arch.heads"),
                                               ("search.arch.pools=[mean]", "search.arch.pools"),
                                               ("search.sampler=cmaes", "cmaes")])
def test_bad_search_settings_fail_clearly(tmp_path, shared_competition, override, message):
    try:
        import cmaes  # noqa: F401
        if "cmaes" in override:
            pytest.skip("cmaes is installed")
    except ImportError:
        pass
    cfg = search_cfg(tmp_path, shared_competition, override, "search.n_trials=1")
    with pytest.raises((ConfigError, RuntimeError), match=message):
        search.run(cfg)


def worker(tmp_path, root, *overrides) -> subprocess.Popen:
    argv = [sys.executable, "-m", "pipeline.search", "--config", str(DEFAULT_CONFIG)]
    for text in config_overrides(tmp_path, root, *SMALL, *overrides):
        argv += ["--set", text]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_a_trial_killed_mid_way_fails_and_is_retried_when_the_study_resumes(tmp_path, shared_competition):
    cfg = search_cfg(tmp_path, shared_competition, "search.n_trials=3", "search.heartbeat=1", "search.epochs=30")
    storage = f"sqlite:///{cfg.run_dir / 'search' / 'study.db'}"
    proc = worker(tmp_path, shared_competition, "search.n_trials=3", "search.heartbeat=1", "search.epochs=30")
    running, deadline = None, time.time() + 120
    while running is None and time.time() < deadline:  # kill the worker during a trial's training
        time.sleep(0.2)
        if not (cfg.run_dir / "search" / "study.db").is_file():
            continue
        try:
            study = optuna.load_study(study_name=cfg.experiment, storage=storage)
        except (KeyError, SQLAlchemyError):  # not made yet, or the worker is creating its tables this instant
            continue
        running = next((t for t in study.trials if t.state.name == "RUNNING" and t.user_attrs.get("curve")), None)
    proc.kill()
    proc.wait()
    assert running is not None, "no trial started training"
    time.sleep(2.5)  # past the heartbeat's grace period
    search.run(with_values(cfg, {"search.epochs": 1}))  # the same command (shorter trials) resumes
    study = optuna.load_study(study_name=cfg.experiment, storage=storage)
    states = {t.number: t.state.name for t in study.trials}
    assert states[running.number] == "FAIL"
    retry = [t for t in study.trials if t.number > running.number and t.params == running.params]
    assert retry and retry[0].state.name in ("COMPLETE", "PRUNED")
    assert sum(s in ("COMPLETE", "PRUNED") for s in states.values()) == 3


@pytest.mark.slow
def test_two_workers_share_a_journal_study_without_losing_or_duplicating_trials(tmp_path, shared_competition):
    journal = tmp_path / "study.log"
    search_cfg(tmp_path, shared_competition)
    overrides = (f"search.storage={journal}", "search.n_trials=8", "search.epochs=2")
    procs = [worker(tmp_path, shared_competition, *overrides, f"search.worker={w}") for w in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    ran = [set(map(int, re.findall(r"trial (\d+) (?:complete|pruned)", text))) for text in logs]
    study = optuna.load_study(study_name="demo", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))) and 8 <= len(numbers) <= 9  # a last trial may start in both
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert ran[0] and ran[1] and not ran[0] & ran[1] and ran[0] | ran[1] == set(numbers)
    assert len({t._trial_id for t in study.trials}) == len(numbers)
    assert study.trials[0].params != study.trials[1].params  # the workers' samplers are seeded apart
