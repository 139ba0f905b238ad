"""Search stage: an Optuna study over compact architectures and any config key (multi- or single-objective).

``python -m pipeline.search --config CONFIG`` (``./run.sh search CONFIG``) reads the ``search:`` section and
the preprocess cache. Each trial samples a spec (:mod:`pipeline.search.space`) and config values, measures
parameters, MACs and 1-thread CPU latency, refuses models over the hard constraints before training, and
trains the rest with the train stage's building blocks on a stratified subsample held in memory (one holdout,
``search.epochs`` epochs, ``search.trial_timeout``). Single-objective studies prune with Optuna's pruners on
per-epoch scores; multi-objective studies stop a trial once ``search.prune_dominated`` finished trials with
no more parameters beat it at the same epoch. A trial whose training config an earlier trial already trained
(the samplers draw parameters that a block type ignores) takes that trial's result instead of training again.

The study's storage, its samplers and pruners: :mod:`pipeline.search.storage`. Outputs: see
:mod:`pipeline.search.report`.
"""
from __future__ import annotations

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import optuna
import torch
from sklearn.model_selection import train_test_split

from pipeline.cli import stage_main
from pipeline.core.config import Config, to_yaml, with_values
from pipeline.core.utils import configure_backends, read_json, resolve_device, seed_everything, write_json, write_text
from pipeline.evaluation.metrics import score
from pipeline.models.factory import create_model, model_costs
from pipeline.provenance import training_fingerprint
from pipeline.rundir import RunDir, SearchDir, load_manifest, load_split, without_secrets
from pipeline.search.report import rerank_candidates, trial_line, trials_table, write_outputs
from pipeline.search.space import (OBJECTIVES, check_references, check_search, reference_config, reference_label,
                                   suggest, trial_config)
from pipeline.search.storage import enqueue_seed_specs, open_study, sqlite_worker, warm_start
from pipeline.training.recipe import Training, build_training, refuse

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data and one trial


@dataclass
class TrialData:
    """The stratified subsample, in memory, split into train and holdout rows."""
    images: np.ndarray
    labels: np.ndarray
    train_rows: np.ndarray
    valid_rows: np.ndarray
    classes: list
    manifest: dict  # the preprocess manifest (dataset mean/std; pretrained models use their own)


def load_trial_data(cfg: Config) -> TrialData:
    """Read ``search.subsample`` stratified images from the preprocess cache into memory; split a holdout."""
    manifest = load_manifest(cfg.run_dir)
    images, index = load_split(cfg.run_dir, "train", manifest)
    labels = index["label_idx"].to_numpy()
    rows = np.arange(len(labels))
    search = cfg.search
    if search.subsample and search.subsample < len(rows):
        rows, _ = train_test_split(rows, train_size=search.subsample, stratify=labels, random_state=search.seed)
    rows = np.sort(rows)
    train_rows, valid_rows = train_test_split(np.arange(len(rows)), test_size=search.holdout,
                                              stratify=labels[rows], random_state=search.seed)
    return TrialData(np.ascontiguousarray(images[rows]), labels[rows], np.sort(train_rows), np.sort(valid_rows),
                     manifest["classes"], manifest)


# settings a trial cannot honour: it is scored on its last epoch against one stratified holdout of the subsample
UNHONOURED = {
    "train.early_stopping": "a trial is scored on its last epoch",
    "train.head_init": "the linear probe embeds the whole train split, a trial trains on a subsample",
    "train.teacher": "teacher probabilities are per train row, a trial trains on a subsample",
    "train.mode": "trials train networks; the features mode fits heads",
}


def trial_training(cfg: Config, data: TrialData, device: torch.device) -> Training:
    """The train stage's recipe on the trial's training rows, seeded as fold 0 of the train stage is."""
    refuse(cfg, "a search trial", UNHONOURED)
    return build_training(cfg, data.images, data.labels, data.train_rows, data.manifest, device, cfg.seed)


def fit(cfg: Config, data: TrialData, device: torch.device, on_epoch: Callable[[int, dict], None],
        deadline: Optional[float] = None) -> dict:
    """Train ``cfg``'s model with the train stage's recipe (:func:`~pipeline.training.recipe.build_training`) on
    the trial data for ``cfg.train.epochs`` (or until ``deadline``), scoring the holdout after each epoch."""
    training = trial_training(cfg, data, device)
    metrics: dict = {}
    for epoch in range(cfg.train.epochs):
        train_loss, late = training.run_epoch(epoch, f"trial epoch {epoch + 1}/{cfg.train.epochs}", deadline)
        logits = training.predict(data.images, data.valid_rows)
        metrics = {**score(data.labels[data.valid_rows], logits.softmax(1).numpy()), "train_loss": train_loss}
        training.schedule.step_epoch(metrics["log_loss"])
        on_epoch(epoch, metrics)
        if late:
            metrics["timed_out"] = True
            break
    return metrics


def primary_metric(cfg: Config) -> str:
    """The score curves and plots use: the first maximized objective (accuracy when there is none)."""
    return next((o for o in cfg.search.objectives if OBJECTIVES[o] == "maximize"), "accuracy")


class Objective:
    """One trial: sample, build, measure, check the constraints, train, return the objective values."""

    def __init__(self, cfg: Config, data: TrialData, device: torch.device) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        self.metric = primary_metric(cfg)
        self.multi = len(cfg.search.objectives) > 1

    def __call__(self, trial: optuna.Trial) -> tuple | float:
        search = self.cfg.search
        cfg_t = trial_config(self.cfg, suggest(trial, search), epochs=search.epochs)
        key = config_sha1(cfg_t)
        trial.set_user_attr("config_sha1", key)
        twin = twin_of(trial.study, key)
        if twin is not None:
            return self.repeat(trial, twin)
        seed_everything(cfg_t.seed)
        model = create_model(cfg_t.model, len(self.data.classes))
        costs = model_costs(model, cfg_t.data.image_size, search.record_latency)
        violations = {k: float(costs[k]) - float(bound) for k, bound in search.constraints.items()}
        for key, value in violations.items():
            trial.set_constraint(key, value)  # the samplers and best_trials rank infeasible trials last
        feasible = all(v <= 0 for v in violations.values())
        for key, value in {**costs, "feasible": feasible}.items():
            trial.set_user_attr(key, value)
        if not feasible:  # never trained: the constraint, not these placeholder scores, rules it out
            return self.values({"accuracy": 0.0, "macro_f1": 0.0, **costs})
        deadline = time.monotonic() + search.trial_timeout if search.trial_timeout else None
        metrics = fit(cfg_t, self.data, self.device, partial(self.on_epoch, trial, costs["params"]), deadline)
        trial.set_user_attr("timed_out", bool(metrics.get("timed_out")))
        return self.values({**metrics, **costs})

    def repeat(self, trial: optuna.Trial, twin: optuna.trial.FrozenTrial) -> tuple | float:
        """The result of ``twin``, which trained this exact configuration: the samplers also draw the parameters
        a block type ignores (a ConvPool's expansion ratio) and strides the downsampling cap overrides, so equal
        models recur, and seeded training would only repeat the same scores."""
        for key, value in twin.constraints.items():
            trial.set_constraint(key, value)
        for key, value in twin.user_attrs.items():
            trial.set_user_attr(key, value)
        trial.set_user_attr("same_as", twin.number)
        if twin.state == optuna.trial.TrialState.PRUNED:
            raise optuna.TrialPruned(f"as trial {twin.number}")
        return tuple(twin.values) if self.multi else twin.values[0]

    def values(self, measured: dict) -> tuple | float:
        out = tuple(float(measured[o]) for o in self.cfg.search.objectives)
        return out if self.multi else out[0]

    def on_epoch(self, trial: optuna.Trial, params: int, epoch: int, metrics: dict) -> None:
        value = metrics[self.metric]
        trial.set_user_attr("curve", list(trial.user_attrs.get("curve", [])) + [round(value, 5)])
        last = epoch + 1 >= self.cfg.search.epochs
        if not self.multi:
            trial.report(value, epoch)
            if not last and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch + 1}")
        elif not last and self.cfg.search.prune_dominated and losing(trial.study, params, epoch, value,
                                                                     self.cfg.search.prune_dominated):
            raise optuna.TrialPruned(f"pruned at epoch {epoch + 1}")


def config_sha1(cfg: Config) -> str:
    """What decides a trial's scores: its training config and the search's data and fidelity settings."""
    return hashlib.sha1(fidelity(cfg)[2].encode()).hexdigest()


def is_repeat(trial: optuna.trial.FrozenTrial) -> bool:
    """True for a trial that repeated an earlier trial's configuration and took its result untrained."""
    return "same_as" in trial.user_attrs


def twin_of(study: optuna.Study, key: str) -> Optional[optuna.trial.FrozenTrial]:
    """The first finished trial that trained the configuration ``key`` (not a repeat, not cut by the timeout)."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)):
        attrs = t.user_attrs
        if attrs.get("config_sha1") == key and not is_repeat(t) and not attrs.get("timed_out"):
            return t
    return None


def losing(study: optuna.Study, params: int, epoch: int, value: float, k: int) -> bool:
    """True when ``k`` finished trials (repeats counted once) with no more parameters scored higher at the
    same epoch."""
    beaten = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        curve = t.user_attrs.get("curve", [])
        if t.user_attrs.get("feasible") and not is_repeat(t) and t.user_attrs["params"] <= params \
                and len(curve) > epoch and curve[epoch] > value:
            beaten += 1
    return beaten >= k


# --------------------------------------------------------------------------- storage and study


def search_dir(cfg: Config) -> SearchDir:
    return RunDir.of(cfg).search


def fidelity(cfg: Config, rerank: bool = False) -> tuple[Optional[int], int, str]:
    """``(subsample, epochs, protocol)`` of the proxy trials, or of the re-rank (``search.rerank_subsample``
    images at ``train.epochs``); the protocol string keys the caches of trained scores."""
    search = cfg.search
    subsample, epochs = (search.rerank_subsample, cfg.train.epochs) if rerank else (search.subsample, search.epochs)
    return subsample, epochs, training_fingerprint(cfg) + repr((subsample, search.holdout, epochs, search.seed))


def open_cache(path: Path, protocol: str, field: str) -> dict:
    """A JSON cache of trained models' scores, started afresh when the training protocol changed."""
    cached = read_json(path) if path.is_file() else {}
    return cached if cached.get("protocol") == protocol else {"protocol": protocol, field: {}}


def score_references(cfg: Config, data: TrialData, device: torch.device, rerank: bool = False) -> list[dict]:
    """The ``search.references`` models trained with the trials' protocol (cached in references.json), or with
    the re-rank's (cached in rerank_references.json)."""
    path = search_dir(cfg).file("rerank_references.json" if rerank else "references.json")
    _, epochs, protocol = fidelity(cfg, rerank)
    cached = open_cache(path, protocol, "models")
    for ref in cfg.search.references:
        name = reference_label(ref)
        if name not in cached["models"]:
            cfg_r = reference_config(cfg, ref, epochs)
            seed_everything(cfg_r.seed)
            costs = model_costs(create_model(cfg_r.model, len(data.classes)), cfg_r.data.image_size,
                                cfg.search.record_latency)
            start = time.perf_counter()
            metrics = fit(cfg_r, data, device, lambda e, m: None)
            cached["models"][name] = {**costs, **metrics, "seconds": round(time.perf_counter() - start, 1)}
            log.info("reference %s%s: params %d, accuracy %.4f", name, " (re-rank)" if rerank else "",
                     costs["params"], metrics["accuracy"])
            write_json(path, cached)
    return [{"name": n, **cached["models"][n]} for n in map(reference_label, cfg.search.references)]


def rerank(cfg: Config, study: optuna.Study, device: torch.device) -> dict:
    """Multi-fidelity: retrain the proxy's best trials (:func:`rerank_candidates`) and the references at
    ``train.epochs`` on ``search.rerank_subsample`` images, one holdout; cached in rerank.json, so a resumed
    study retrains only new candidates. Returns ``{"trials": {number: metrics}, "references": [...]}``."""
    search = cfg.search
    numbers = rerank_candidates(trials_table(study, cfg), cfg)
    if not numbers:
        return {}
    subsample, _, protocol = fidelity(cfg, rerank=True)
    data = load_trial_data(with_values(cfg, {"search.subsample": subsample}))
    path = search_dir(cfg).file("rerank.json")
    cached = open_cache(path, protocol, "trials")
    log.info("search: re-ranking trials %s at %d epochs on %d train / %d holdout images", numbers,
             cfg.train.epochs, len(data.train_rows), len(data.valid_rows))
    trials, metric = study.get_trials(deepcopy=False), primary_metric(cfg)
    for number in numbers:
        if str(number) in cached["trials"]:
            continue
        cfg_t = trial_config(cfg, trials[number].params)  # at train.epochs
        start = time.perf_counter()
        metrics = fit(cfg_t, data, device, lambda e, m: log.info(
            "re-rank trial %d epoch %d/%d: %s %.4f", number, e + 1, cfg_t.train.epochs, metric, m[metric]))
        cached["trials"][str(number)] = {**metrics, "seconds": round(time.perf_counter() - start, 1)}
        proxy = dict(zip(search.objectives, trials[number].values)).get(metric, float("nan"))
        log.info("re-rank trial %d: %s %.4f (proxy %.4f) in %.0f s", number, metric, metrics[metric], proxy,
                 cached["trials"][str(number)]["seconds"])
        write_json(path, cached)
    return {"trials": {n: cached["trials"][str(n)] for n in numbers},
            "references": score_references(cfg, data, device, rerank=True)}


# --------------------------------------------------------------------------- the stage


def run(cfg: Config) -> dict:
    """Run (or resume, or join) the study, then write the tables, figures and best configs."""
    check_search(cfg.search)
    check_references(cfg)
    out = search_dir(cfg)
    out.root.mkdir(parents=True, exist_ok=True)
    write_text(out.file("config.yaml"), to_yaml(without_secrets(cfg)))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    device = resolve_device(cfg.train.device)
    configure_backends(cfg.train.deterministic)
    data = load_trial_data(cfg)
    with sqlite_worker(cfg):
        return _search(cfg, data, device)


def _search(cfg: Config, data: TrialData, device: torch.device) -> dict:
    """Open (or join) the study, run this worker's trials, re-rank and write the outputs."""
    study = open_study(cfg)
    if cfg.search.warm_start:
        warm_start(study, cfg)
    enqueue_seed_specs(study, cfg)
    references = score_references(cfg, data, device)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    n_trials = cfg.search.n_trials
    log.info("search: study '%s' (%s, %s), %d trials done, %d train / %d holdout images, %d epochs a trial",
             study.study_name, cfg.search.sampler, "/".join(cfg.search.objectives), done, len(data.train_rows),
             len(data.valid_rows), cfg.search.epochs)
    callbacks = [lambda s, t: log.info(trial_line(s, t, cfg))]
    if n_trials is not None:
        callbacks.insert(0, optuna.study.MaxTrialsCallback(n_trials, states=finished))
    remaining = None if n_trials is None else max(0, n_trials - done)
    if remaining != 0:
        study.optimize(Objective(cfg, data, device), n_trials=remaining, timeout=cfg.search.timeout,
                       callbacks=callbacks, catch=(RuntimeError, ValueError),
                       show_progress_bar=remaining is not None or cfg.search.timeout is not None)
    reranked = rerank(cfg, study, device) if cfg.search.rerank_top else {}
    return write_outputs(study, cfg, references, reranked)


def main(argv=None) -> int:
    return stage_main(run, __doc__.splitlines()[0], argv, exclusive=False)  # workers share the run folder


if __name__ == "__main__":
    raise SystemExit(main())
