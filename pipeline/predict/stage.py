"""Predict stage: a finished run (or its export) predicts a new folder of images, offline, into one CSV.

``python -m pipeline.predict RUN_DIR DATA --out FILE [--probs] [--time-limit 9h] [--work DIR] [--set key=value]``.
See :mod:`pipeline.predict` for what it reads and writes; the last line printed is ``predictions: <path>``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.core.config import Config, ConfigError, parse_override, with_values
from pipeline.core.jobs import training_slot, usable_cpus
from pipeline.core.timing import parse_duration
from pipeline.core.utils import read_json, setup_logging, write_csv
from pipeline.data.contract import DataError
from pipeline.predict.images import TestSet, decode_split, read_test_set, unreadable
from pipeline.predict.models import GRAPH_BATCH, Entries, GraphModels, RunModels, borrow_graphs
from pipeline.predict.recipe import RUNTIME_KEYS, Recipe, load_recipe
from pipeline.rundir import RunDir
from pipeline.submit import build_submission, resolve_format, validate

log = logging.getLogger(__name__)

EXPORT_RECORD = "export.json"  # what marks an export folder (pipeline.export writes it)
PROBE_IMAGES = 64  # --time-limit measures the rate on at least this many images

Models = Callable[[Entries, str], list[list[np.ndarray]]]


class TimeLimit(RuntimeError):
    """The measured rate cannot predict every image within ``--time-limit``: nothing is written."""


@dataclass
class Timing:
    """Seconds spent decoding and in the models, and images through each (the rate the log states)."""
    decode_s: float = 0.0
    models_s: float = 0.0
    images: int = 0


def open_source(source: Path, runtime: dict, work: Path) -> tuple[Recipe, Models]:
    """The recipe and its networks: an export folder's graphs, or a run folder's models (the run's frozen-pass
    graphs and engine choices linked into ``work``, :func:`pipeline.predict.models.borrow_graphs`)."""
    if (source / EXPORT_RECORD).is_file():
        recipe = Recipe.from_dict(read_json(source / EXPORT_RECORD)["recipe"])
        return recipe, GraphModels(recipe, source, runtime.get("infer.batch_size", GRAPH_BATCH))
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a run folder (nor an export folder with {EXPORT_RECORD})")
    recipe = load_recipe(source, {**runtime, "data.cache_dir": str(work)})
    borrow_graphs(recipe, work)
    return recipe, RunModels(recipe)


def runtime_settings(overrides: Sequence[str]) -> dict:
    """``--set`` values: only :data:`RUNTIME_KEYS` (where and how fast the models run, never what they compute)."""
    values = dict(parse_override(text) for text in overrides)
    refused = [key for key in values if key not in RUNTIME_KEYS]
    if refused:
        raise ConfigError(f"--set {', '.join(refused)}: predict uses the run's settings; it only takes "
                          f"{', '.join(RUNTIME_KEYS)}")
    return values


@contextlib.contextmanager
def work_folder(work: Optional[Path]) -> Iterator[Path]:
    """``work`` (kept), else a temporary folder removed afterwards: the decoded images and frozen passes."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="pipeline-predict-") as folder:
        yield Path(folder)


def outside_runs(recipe: Recipe, *paths: Path) -> None:
    """Refuse an output or work path inside a member's run folder: predicting never writes there."""
    for path in paths:
        for member in recipe.members:
            if member.dir is not None and path.resolve().is_relative_to(member.dir.resolve()):
                raise ValueError(f"{path} is inside the run folder {member.dir}: predict never writes there "
                                 "(give a path outside it)")


def decode(recipe: Recipe, test: TestSet, rows: np.ndarray, later: np.ndarray, split: str, work: Path) -> Entries:
    """``rows`` decoded once per geometry the members need; a failure also checks the ``later`` rows, so one
    report names every unreadable image."""
    entries = {}
    try:
        for size, resize in sorted({m.geometry for m in recipe.members}):
            entries[size, resize] = decode_split(test, rows, split, work, size, resize, recipe.data.max_pixels)
    except DataError as err:
        raise DataError(err.problems + unreadable(test, later, recipe.data.max_pixels)) from None
    return entries


def predict_rows(recipe: Recipe, models: Models, test: TestSet, rows: np.ndarray, later: np.ndarray, split: str,
                 work: Path, timing: Timing) -> tuple[list[list[np.ndarray]], Entries]:
    """Decode and predict ``rows`` as one split; the members' models' probabilities and the split's entries."""
    start = time.perf_counter()
    entries = decode(recipe, test, rows, later, split, work)
    middle = time.perf_counter()
    probs = models(entries, split)
    timing.decode_s += middle - start
    timing.models_s += time.perf_counter() - middle
    timing.images += len(rows)
    return probs, entries


def check_time_limit(models: Models, entries: Entries, split: str, probe: int, remaining: int, decode_rate: float,
                     start: float, limit: float) -> None:
    """The models' warm rate on the probe (predicted again, every engine chosen and network loaded), then a
    :class:`TimeLimit` naming the rate and what the limit needs when the ``remaining`` images cannot finish."""
    again = {g: {**e, "signature": hashlib.sha1(f"{e['signature']} again".encode()).hexdigest()}
             for g, e in entries.items()}
    begin = time.perf_counter()
    models(again, f"{split}again")
    models_rate = probe / max(time.perf_counter() - begin, 1e-9)
    rate = 1 / (1 / decode_rate + 1 / models_rate)
    elapsed = time.monotonic() - start
    needed = elapsed + remaining / rate
    log.info("--time-limit %.1f s: %.1f images/s on the first %d (decoding %.1f/s, models %.1f/s): about %.1f s "
             "for all", limit, rate, probe, decode_rate, models_rate, needed)
    if needed > limit:
        left = limit - elapsed
        needs = f"{remaining / left:.1f} images/s in the {left:.1f} s left" if left > 0 else "more time than is left"
        raise TimeLimit(f"--time-limit {limit:.1f} s: at {rate:.1f} images/s (measured on the first {probe}: "
                        f"decoding {decode_rate:.1f}/s, models {models_rate:.1f}/s) the {probe + remaining} images "
                        f"need about {needed:.1f} s; the other {remaining} would need {needs}: nothing predicted")


def probe_size(n: int, batch_size: int) -> int:
    """How many of ``n`` images ``--time-limit`` measures the rate on: a batch where that is at most a quarter of
    them, never fewer than :data:`PROBE_IMAGES`."""
    return min(n, max(PROBE_IMAGES, min(batch_size, n // 4)))


def predict_all(recipe: Recipe, models: Models, test: TestSet, work: Path, limit: Optional[float],
                start: float) -> tuple[list[list[np.ndarray]], Timing]:
    """Every image's probabilities per member and model. With ``limit`` (seconds since ``start``) the first
    images go first and their rate decides whether the rest can finish in time."""
    rows, timing = np.arange(len(test)), Timing()
    probe = probe_size(len(rows), max([1, *(m.cfg.infer.batch_size for m in recipe.members if m.cfg)]))
    parts = [rows] if limit is None or probe == len(rows) else [rows[:probe], rows[probe:]]
    outputs = []
    for i, part in enumerate(parts):
        probs, entries = predict_rows(recipe, models, test, part, np.concatenate([rows[:0], *parts[i + 1:]]),
                                      f"new{i}", work, timing)
        outputs.append(probs)
        if i == 0 and len(parts) > 1:
            check_time_limit(models, entries, "new0", len(part), len(parts[1]), len(part) / timing.decode_s,
                             start, limit)
    merged = [[np.concatenate([out[m][k] for out in outputs]) for k in range(len(outputs[0][m]))]
              for m in range(len(outputs[0]))]
    return merged, timing


def write_output(frame: pd.DataFrame, recipe: Recipe, test: TestSet, out: Path, probs: bool) -> str:
    """The probabilities (``probs``) or the submission checked against the sample submission (without one:
    id and label over the images found), written atomically; what was written."""
    if probs:
        write_csv(out, frame)
        return "probabilities"
    sample = test.sample if test.sample is not None else \
        pd.DataFrame({recipe.id_col: frame["id"].to_numpy(), recipe.label_col: ""})
    fmt = resolve_format(recipe.submit_format, sample, recipe.classes, recipe.id_col, recipe.label_col)
    submission = build_submission(frame, sample, recipe.classes, recipe.id_col, recipe.label_col, fmt)
    validate(submission, sample, recipe.classes, recipe.id_col, recipe.label_col, fmt)
    write_csv(out, submission)
    return f"submission ({fmt})"


def slot_config(recipe: Recipe, runtime: dict) -> Config:
    """The config whose ``train.threads`` this process computes with: as set, else the count the run recorded
    (``threads.json``: a thread count changes how CPU kernels split their sums), else this machine's usable
    cores; nothing is recorded in the run folder."""
    member = recipe.members[0]
    cfg = member.cfg if member.cfg is not None else with_values(Config(), runtime)
    if cfg.train.threads:
        return cfg
    recorded = None
    if member.dir is not None and RunDir(member.dir).threads.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            recorded = int(read_json(RunDir(member.dir).threads)["threads"])
    return with_values(cfg, {"train.threads": recorded if recorded and recorded > 0 else usable_cpus()})


def run(source: str | Path, data: str | Path, out: str | Path, probs: bool = False,
        time_limit: Optional[float] = None, work: Optional[str | Path] = None,
        runtime: Optional[dict] = None) -> dict:
    """Predict every image of ``data`` with the run (or export) at ``source`` into ``out``; the figures."""
    start, out = time.monotonic(), Path(out)
    runtime = dict(runtime or {})
    with work_folder(Path(work) if work else None) as folder:
        recipe, models = open_source(Path(source), runtime, folder)
        outside_runs(recipe, out, folder)
        test = read_test_set(data, recipe.data)
        log.info("predict: %d images of %s with %d model(s) of %d member(s) (%s, as the run's %s)", len(test),
                 test.folder, recipe.models(), len(recipe.members),
                 "ONNX graphs" if isinstance(models, GraphModels) else "run folder", recipe.table)
        with training_slot(slot_config(recipe, runtime), "predict") as threads:
            torch.set_num_threads(threads)
            member_probs, timing = predict_all(recipe, models, test, folder, time_limit, start)
        combined = recipe.combination(member_probs, [m.shares for m in recipe.members])
    frame = pd.DataFrame(combined, columns=recipe.classes)
    frame.insert(0, "id", test.frame["id"].to_numpy())
    what = write_output(frame, recipe, test, out, probs)
    seconds = time.monotonic() - start
    report = {"images": len(test), "seconds": round(seconds, 2), "images_per_s": round(len(test) / seconds, 2),
              "decode_s": round(timing.decode_s, 2), "models_s": round(timing.models_s, 2),
              "models": recipe.models(), "members": len(recipe.members), "out": str(out)}
    log.info("predict: %s of %d images written to %s in %.1f s: %.1f images/s (decoding %.1f s, models %.1f s)",
             what, len(test), out, seconds, report["images_per_s"], timing.decode_s, timing.models_s)
    if time_limit is not None and seconds > time_limit:
        log.warning("predict took %.1f s, over --time-limit %.1f s", seconds, time_limit)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="RUN_DIR", help="a finished run folder (single run, a plan's or an "
                        "ensemble config's), or an export folder (python -m pipeline.export)")
    parser.add_argument("data", metavar="DATA", help="a folder of images, or a test folder with its "
                        "sample_submission.csv (images in DATA/test/ or DATA itself)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the CSV to write (outside the run folder)")
    parser.add_argument("--probs", action="store_true", help="write every class's probability instead of the "
                        "submission")
    parser.add_argument("--time-limit", metavar="DURATION", help="refuse at once (nothing written) when the rate "
                        "measured on the first images cannot finish within it (90s, 15m, 9h)")
    parser.add_argument("--work", metavar="DIR", help="keep the decoded images and frozen passes here (default: a "
                        "temporary folder)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"one of {', '.join(RUNTIME_KEYS)}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        limit = parse_duration(args.time_limit, "--time-limit") if args.time_limit else None
        with logging_redirect_tqdm():
            report = run(args.source, args.data, args.out, args.probs, limit, args.work,
                         runtime_settings(args.overrides))
    except (ConfigError, DataError, KeyError, OSError, ValueError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        log.error("predict failed: %s", message)
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(f"predictions: {report['out']}")
    return 0
