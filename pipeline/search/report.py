"""What the search stage writes into ``runs/<experiment>/search/``, and the comparison of several studies.

* ``trials.csv``: one row per trial (state, seconds, objectives, params/MACs/latency, curve, parameters),
* ``pareto.csv``: the feasible non-dominated trials, ``pareto.png``: parameters vs the score coloured by
  trial order with the front drawn and the ``search.references`` models marked, ``hypervolume.png``,
* ``best/<rule>.yaml``: complete configs (``./run.sh full`` trains them as they are) for the rules
  ``most_accurate``, ``smallest_within`` (``search.best_within`` of the best score) and
  ``smallest_above_floor`` (score >= ``search.best_floor``), plus ``most_accurate_under_<N>`` for each
  parameter budget in ``search.best_budgets``; ``summary.json``. With ``search.rerank_top``, the proxy's best
  trials (and the proxy's picks for the two smallest_* rules) are retrained at ``train.epochs`` (``rerank.json``,
  column ``rerank_<metric>``) and every rule picks by that score,
* TensorBoard hparams (``tensorboard --logdir runs/<experiment>/search/tb``), one run per finished trial.

* ``chart/``: a config per searched model of the re-ranked front and per reference, to train K-fold
  (:mod:`pipeline.search.chart`).

``python -m pipeline.search.report --compare DIR... --out FIG`` draws the hypervolume of several studies
(e.g. NSGA-II, MOTPE, random at the same budget) against the same reference point;
``python -m pipeline.search.report --chart DIR [--runs RUN...]`` draws the chart of ``chart/``'s trained runs.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import optuna
import pandas as pd

from pipeline.core.config import Config, load_config, to_yaml, with_values
from pipeline.report.figures import save_png
from pipeline.rundir import RunDir, SearchDir, without_secrets
from pipeline.search.chart import markdown, write_chart
from pipeline.search.space import OBJECTIVES, reference_config, reference_label, trial_config
from pipeline.core.utils import setup_logging, write_csv, write_json, write_text

log = logging.getLogger(__name__)

DEFAULT_REFERENCE = {"accuracy": 0.0, "macro_f1": 0.0, "params": 1_000_000, "macs": 100_000_000, "latency_ms": 10.0}
RULES = ("most_accurate", "smallest_within", "smallest_above_floor")


def metric_of(cfg: Config) -> str:
    return next((o for o in cfg.search.objectives if OBJECTIVES[o] == "maximize"), "accuracy")


def trials_table(study: optuna.Study, cfg: Config) -> pd.DataFrame:
    """One row per trial, in trial order."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row = {"number": t.number, "state": t.state.name,
               "seconds": t.duration.total_seconds() if t.duration else None,
               "start": t.datetime_start.isoformat() if t.datetime_start else None}
        if t.values is not None:
            row.update(zip(cfg.search.objectives, t.values))
        row.update({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in t.user_attrs.items()})
        row.update({f"params_{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def usable(table: pd.DataFrame) -> pd.DataFrame:
    """Complete, feasible trials that trained (a repeat of an earlier trial's configuration is left out)."""
    if table.empty or "feasible" not in table:
        return table.iloc[0:0]
    trained = table["same_as"].isna() if "same_as" in table else True
    return table[(table["state"] == "COMPLETE") & (table["feasible"] == True) & trained]  # noqa: E712 (NaN-safe)


def losses(table: pd.DataFrame, objectives: Sequence[str]) -> np.ndarray:
    """Objective values as minimisation losses (maximised ones negated)."""
    sign = np.array([-1.0 if OBJECTIVES[o] == "maximize" else 1.0 for o in objectives])
    return table[list(objectives)].to_numpy(dtype=float) * sign


def pareto_mask(loss: np.ndarray) -> np.ndarray:
    """True for the rows no other row dominates (no worse everywhere, better somewhere)."""
    le = (loss[:, None, :] >= loss[None, :, :]).all(-1)
    lt = (loss[:, None, :] > loss[None, :, :]).any(-1)
    return ~(le & lt).any(1)


def reference_point(cfg: Config) -> dict:
    """Per objective: search.hv_reference, else the constraint bound, else a fixed default."""
    search = cfg.search
    return {o: float(search.hv_reference.get(o, search.constraints.get(o, DEFAULT_REFERENCE[o])))
            for o in search.objectives}


def hypervolume_curve(table: pd.DataFrame, cfg: Config, reference: Optional[dict] = None) -> pd.DataFrame:
    """Hypervolume of the feasible trials up to each trial, minimised objectives scaled by their reference
    (so the volume is in units of score × fraction of the reference budget)."""
    from optuna._hypervolume import compute_hypervolume

    reference = reference or reference_point(cfg)
    objectives = list(cfg.search.objectives)
    ref = np.array([-reference[o] if OBJECTIVES[o] == "maximize" else 1.0 for o in objectives])
    scale = np.array([1.0 if OBJECTIVES[o] == "maximize" else reference[o] for o in objectives])
    good = usable(table).sort_values("number")
    points = losses(good, objectives) / scale if len(good) else np.empty((0, len(objectives)))
    rows, seconds = [], 0.0
    inside = (points < ref).all(1) if len(points) else np.zeros(0, bool)
    for number in table.sort_values("number")["number"]:
        mask = inside & (good["number"].to_numpy() <= number)
        value = float(compute_hypervolume(points[mask], ref)) if mask.any() else 0.0
        seconds += float(table.loc[table["number"] == number, "seconds"].fillna(0).sum())
        rows.append({"number": int(number), "hypervolume": value, "seconds": seconds})
    return pd.DataFrame(rows)


def ranked(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows by ``column``, best first; ties go to the smaller model."""
    return table.sort_values([column, "params"], ascending=[False, True])


def rerank_candidates(table: pd.DataFrame, cfg: Config) -> list[int]:
    """The trials the re-rank retrains: the proxy's top ``search.rerank_top``, overall and under each budget."""
    good, k = usable(table), cfg.search.rerank_top
    if not k or good.empty or "params" not in good:
        return []
    ordered = ranked(good, metric_of(cfg))
    numbers = list(ordered["number"].head(k))
    for budget in cfg.search.best_budgets:
        numbers += list(ordered[ordered["params"] <= budget]["number"].head(k))
    numbers += [row["number"] for row in smallest_picks(good, metric_of(cfg), cfg).values()]  # by the proxy
    return sorted({int(n) for n in numbers})


def reranked_rows(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows the re-rank scored (column ``rerank_<metric>`` filled); empty without a re-rank."""
    column = f"rerank_{metric}"
    return rows.dropna(subset=[column]) if column in rows else rows.iloc[0:0]


def top_pick(candidates: pd.DataFrame, metric: str) -> pd.Series:
    """The first of ``candidates`` (ordered by the proxy score), or, where some were re-ranked, the best of
    those by the re-rank score (column ``rerank_<metric>``)."""
    rescored = reranked_rows(candidates, metric)
    return ranked(rescored, f"rerank_{metric}").iloc[0] if len(rescored) else candidates.iloc[0]


def smallest_picks(rows: pd.DataFrame, score: str, cfg: Config) -> dict:
    """smallest_within (``search.best_within`` of the best ``score`` in ``rows``) and smallest_above_floor
    (``score`` >= ``search.best_floor``): the smallest qualifying row of each, a rule with none left out."""
    picks, best = {}, rows[score].max()
    for rule, floor in (("smallest_within", best - cfg.search.best_within),
                        ("smallest_above_floor", cfg.search.best_floor)):
        ok = rows[rows[score] >= floor - 1e-12].sort_values(["params", score], ascending=[True, False])
        if len(ok):
            picks[rule] = ok.iloc[0]
    return picks


def best_trials(table: pd.DataFrame, cfg: Config) -> dict:
    """The rules' trial rows (a rule with no qualifying trial is left out). Where the re-rank scored trials
    (column ``rerank_<metric>``), every rule judges by that score: most_accurate* among all trials by
    :func:`top_pick`, the smallest_* rules among the re-ranked ones (the proxy's picks are re-ranked too)."""
    good = usable(table)
    if good.empty or "params" not in good:
        return {}
    metric = metric_of(cfg)
    ordered = ranked(good, metric)
    picks = {"most_accurate": top_pick(ordered, metric)}
    rescored = reranked_rows(good, metric)
    picks.update(smallest_picks(rescored, f"rerank_{metric}", cfg) if len(rescored)
                 else smallest_picks(good, metric, cfg))
    for budget in cfg.search.best_budgets:
        ok = ordered[ordered["params"] <= budget]
        if len(ok):
            picks[f"most_accurate_under_{budget}"] = top_pick(ok, metric)
    return picks


def export_best(study: optuna.Study, cfg: Config, picks: dict, out: SearchDir) -> dict:
    """``best/<rule>.yaml``: the trial's full config at the configured (not the search's) epochs."""
    exported = {}
    for rule, row in picks.items():
        trial = study.get_trials(deepcopy=False)[int(row["number"])]
        config = with_values(trial_config(cfg, trial.params), {"experiment": f"{cfg.experiment}-{rule}"})
        header = (f"# search '{study.study_name}' trial {trial.number} ({rule}): "
                  + ", ".join(f"{k} {row[k]:.6g}" for k in ("accuracy", "macro_f1", "params", "macs",
                                                              f"rerank_{metric_of(cfg)}")
                              if k in row and pd.notna(row[k]))
                  + f"\n# searched on {cfg.search.subsample} images, {cfg.search.epochs} epochs; trains at "
                    f"train.epochs={config.train.epochs}: ./run.sh full {out.best(rule)}\n")
        write_text(out.best(rule), header + to_yaml(without_secrets(config)))
        kept = ("accuracy", "params", f"rerank_{metric_of(cfg)}")
        exported[rule] = {"trial": trial.number, **{k: row[k] for k in kept if k in row and pd.notna(row[k])}}
    return exported


def chart_trials(table: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """The searched models of the chart: the re-ranked trials no smaller re-ranked trial beats at full epochs,
    or without a re-rank the proxy's front of parameters against the score."""
    metric = metric_of(cfg)
    good = usable(table)
    rows = reranked_rows(good, metric)
    score = f"rerank_{metric}" if len(rows) else metric
    rows = rows if len(rows) else good
    if rows.empty or "params" not in rows:
        return rows
    loss = np.c_[-rows[score].to_numpy(float), rows["params"].to_numpy(float)]
    return rows[pareto_mask(loss)].sort_values("params")


def export_chart(study: optuna.Study, cfg: Config, table: pd.DataFrame, out: SearchDir) -> list[str]:
    """``chart/``: one config per searched model of :func:`chart_trials` (``trial<N>.yaml``) and per
    ``search.references`` entry (``ref-<label>.yaml``), each trained like ``best/*.yaml`` (the study's config at
    ``train.epochs``); configs no longer on the chart are removed. Returns the names."""
    trials = study.get_trials(deepcopy=False)
    configs = {f"trial{int(n)}": trial_config(cfg, trials[int(n)].params) for n in chart_trials(table, cfg)["number"]}
    configs.update({f"ref-{reference_label(ref)}": reference_config(cfg, ref) for ref in cfg.search.references})
    out.chart.mkdir(parents=True, exist_ok=True)
    for old in out.chart.glob("*.yaml"):
        if old.stem not in configs:
            old.unlink()
    for name, config in configs.items():
        path = out.chart / f"{name}.yaml"
        config = with_values(config, {"experiment": f"{cfg.experiment}-{name}"})
        header = (f"# the search chart's {name} ({cfg.train.epochs} epochs, {cfg.folds.n_splits}-fold): "
                  f"./run.sh full {path}\n# then: python -m pipeline.search.report --chart {out}\n")
        write_text(path, header + to_yaml(without_secrets(config)))
    return sorted(configs)


def plot_pareto(table: pd.DataFrame, cfg: Config, references: list[dict], path: Path) -> None:
    """The search's figure: parameters vs score, coloured by trial order, front drawn, references marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric_of(cfg)
    good = usable(table)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(good):
        dots = ax.scatter(good["params"], good[metric], c=good["number"], cmap="viridis", s=22)
        fig.colorbar(dots, ax=ax, label="trial")
        front = good[pareto_mask(losses(good, [metric, "params"]))].sort_values("params")
        ax.step(front["params"], front[metric], where="post", color="crimson", lw=1.2, label="Pareto front")
    for ref in references:
        ax.scatter(ref["params"], ref[metric], marker="*", s=160, color="black", zorder=3)
        ax.annotate(ref["name"], (ref["params"], ref[metric]), textcoords="offset points", xytext=(-8, -14),
                    ha="right")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"holdout {metric} ({cfg.search.epochs} epochs, {cfg.search.subsample} images)")
    ax.set_title(f"{cfg.experiment}: {len(good)} trained trials, {cfg.search.sampler}")
    ax.grid(alpha=0.3)
    if len(good):
        ax.legend(loc="lower right")
    save_figure(fig, path)


def plot_hypervolume(curves: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        axes[0].plot(curve["number"] + 1, curve["hypervolume"], label=name, drawstyle="steps-post")
        axes[1].plot(curve["seconds"] / 60, curve["hypervolume"], label=name, drawstyle="steps-post")
    axes[0].set_xlabel("trials")
    axes[1].set_xlabel("trial minutes (sum of trial durations)")
    for ax in axes:
        ax.set_ylabel("hypervolume")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Write a pyplot figure atomically (:func:`save_png`) and release it."""
    import matplotlib.pyplot as plt

    save_png(fig, path)
    plt.close(fig)


def write_outputs(study: optuna.Study, cfg: Config, references: list[dict], reranked: Optional[dict] = None) -> dict:
    """Every table, figure and config of the search folder, and the summary (returned). ``reranked``: the
    re-rank's ``{"trials": {number: metrics}, "references": [...]}`` (column ``rerank_<metric>`` of trials.csv)."""
    out = RunDir.of(cfg).search
    table = trials_table(study, cfg)
    reranked = reranked or {}
    if reranked.get("trials") and len(table):
        metric = metric_of(cfg)
        table[f"rerank_{metric}"] = table["number"].map(lambda n: reranked["trials"].get(int(n), {}).get(metric))
    write_csv(out.file("trials.csv"), table)
    good = usable(table)
    pareto = good[pareto_mask(losses(good, cfg.search.objectives))] if len(good) else good
    write_csv(out.file("pareto.csv"), pareto.sort_values(list(cfg.search.objectives)[-1]) if len(pareto) else pareto)
    curve = hypervolume_curve(table, cfg)
    plot_pareto(table, cfg, references, out.file("pareto.png"))
    plot_hypervolume({cfg.search.sampler: curve}, out.file("hypervolume.png"), f"{cfg.experiment}: hypervolume")
    states = table["state"].value_counts().to_dict() if len(table) else {}
    summary = {"study": study.study_name, "sampler": cfg.search.sampler, "objectives": list(cfg.search.objectives),
               "trials": len(table), "states": states, "trained": len(good),
               "repeats": int(table["same_as"].notna().sum()) if "same_as" in table else 0,
               "infeasible": int((table.get("feasible") == False).sum()) if len(table) else 0,  # noqa: E712
               "hypervolume": float(curve["hypervolume"].iloc[-1]) if len(curve) else 0.0,
               "reference_point": reference_point(cfg), "pareto": pareto["number"].tolist(),
               "best": export_best(study, cfg, best_trials(table, cfg), out), "references": references,
               "rerank": {str(n): m for n, m in reranked.get("trials", {}).items()},
               "rerank_references": reranked.get("references", []),
               "chart": export_chart(study, cfg, table, out)}
    write_json(out.file("summary.json"), summary)
    log.info("search: %d trials (%s), %d on the Pareto front, hypervolume %.4f; best configs in %s", len(table),
             states, len(pareto), summary["hypervolume"], out.file("best"))
    return summary


def trial_line(study: optuna.Study, trial: optuna.trial.FrozenTrial, cfg: Config) -> str:
    """The per-trial log line (and its TensorBoard hparams when it trained)."""
    attrs, metric = trial.user_attrs, metric_of(cfg)
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    head = f"trial {trial.number} {trial.state.name.lower()}: params {attrs.get('params', 0):,}"
    if "same_as" in attrs:
        return f"{head}, the configuration of trial {attrs['same_as']}: its result, not trained again"
    if trial.state == optuna.trial.TrialState.COMPLETE and not attrs.get("feasible", True):
        bounds = ", ".join(f"{k} {attrs.get(k)} > {v}" for k, v in cfg.search.constraints.items()
                           if float(attrs.get(k, 0)) > float(v))
        return f"{head}, infeasible ({bounds}): not trained, {seconds:.1f}s"
    curve = attrs.get("curve", [])
    score = f"{metric} {curve[-1]:.4f} after {len(curve)} epochs" if curve else "no score"
    pareto = ""
    if trial.state == optuna.trial.TrialState.COMPLETE:
        log_hparams(trial, cfg)
        best = study.best_trials if len(cfg.search.objectives) > 1 else [study.best_trial]
        pareto = ", Pareto" if any(b.number == trial.number for b in best) else ""
    return f"{head}, macs {attrs.get('macs', 0) / 1e6:.2f}M, {score}, {seconds:.1f}s{pareto}"


def log_hparams(trial: optuna.trial.FrozenTrial, cfg: Config) -> None:
    from torch.utils.tensorboard import SummaryWriter

    hparams = {k: v for k, v in trial.params.items() if isinstance(v, (int, float, str, bool))}
    metrics = {f"hparam/{k}": float(v) for k, v in zip(cfg.search.objectives, trial.values or [])}
    metrics.update({f"hparam/{k}": float(trial.user_attrs[k]) for k in ("params", "macs", "latency_ms")
                    if k in trial.user_attrs})
    with SummaryWriter(str(RunDir.of(cfg).search.file("tb"))) as writer:
        writer.add_hparams(hparams, metrics, run_name=f"trial{trial.number:04d}")


def compare(dirs: Sequence[str | Path], out: str | Path) -> dict:
    """Hypervolume curves of several search folders against the first one's reference point."""
    configs = [load_config(SearchDir(Path(d)).file("config.yaml")) for d in dirs]
    reference = reference_point(configs[0])
    curves, finals = {}, {}
    for d, cfg in zip(dirs, configs):
        table = pd.read_csv(SearchDir(Path(d)).file("trials.csv"))
        name = f"{cfg.search.sampler} ({Path(d).parent.name})"
        curves[name] = hypervolume_curve(table, configs[0], reference)
        finals[name] = {"trials": len(table), "trained": len(usable(table)),
                        "hypervolume": float(curves[name]["hypervolume"].iloc[-1]) if len(table) else 0.0}
    plot_hypervolume(curves, Path(out), f"hypervolume, reference {reference}")
    return {"reference_point": reference, "studies": finals}


def main(argv=None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(description="Compare the hypervolume of several search folders, or draw a "
                                                 "search's chart of its models and references trained K-fold.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--compare", nargs="+", metavar="SEARCH_DIR")
    what.add_argument("--chart", metavar="SEARCH_DIR", help="the chart of SEARCH_DIR/chart/*.yaml's run folders")
    parser.add_argument("--runs", nargs="*", default=[], metavar="RUN_DIR", help="--chart: more run folders")
    parser.add_argument("--out", help="--compare: the figure (.png); --chart: a folder (default SEARCH_DIR/chart)")
    parser.add_argument("--no-latency", action="store_true", help="--chart: skip the CPU latency measurement")
    args = parser.parse_args(argv)
    if args.chart:
        try:
            result = write_chart(args.chart, args.runs, args.out, latency=not args.no_latency)
        except (ValueError, FileNotFoundError) as err:
            log.error("%s", err)
            return 2
        print(markdown_of(result))
        return 0
    if not args.out:
        parser.error("--compare needs --out FIGURE.png")
    result = compare(args.compare, args.out)
    write_json(Path(args.out).with_suffix(".json"), result)
    print(json.dumps(result, indent=2))
    return 0


def markdown_of(chart: dict) -> str:
    """The chart's table and the commands of its configs not trained yet (the command's output)."""
    text = markdown(pd.DataFrame(chart["rows"]))
    return text + "".join(f"not trained yet: {c}\n" for c in chart["not_trained"])


if __name__ == "__main__":
    raise SystemExit(main())
