"""The search study's storage: samplers and pruners by name, opening or joining the study, warm starts.

The study lives in Optuna storage, ``search.storage``; the same command resumes it:

* SQLite (``runs/<experiment>/search/study.db``, the default): one worker. A second worker on the same file is
  warned (several lock each other out).
* a journal file (``*.log``): several workers on one machine. It has no heartbeat: a trial whose worker dies
  stays RUNNING and is never retried (the study still runs ``search.n_trials`` finished trials); a warning
  says so when ``search.heartbeat`` is set.
* any SQLAlchemy URL, e.g. PostgreSQL for workers on several machines: a trial whose worker died is failed
  by the heartbeat (``search.heartbeat``) and retried once. Keep the password out of the URL
  (``postgresql+psycopg2://user@host:5432/db``) and in the ``PGPASSWORD`` environment variable, which libpq
  reads; a password given in the URL is masked (``***``) in every file and message the pipeline writes.

Workers started together on a fresh storage all join: the tables and the study are created by whichever
wins, the others open them again after a short random wait.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Iterator, Optional

import optuna
import pandas as pd
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend

from pipeline.core.config import Config
from pipeline.core.registry import Registry
from pipeline.core.utils import hide_password, holder, try_lock
from pipeline.models.arch import load_spec
from pipeline.rundir import RunDir, SearchDir
from pipeline.search.space import OBJECTIVES, check_same_space, spec_params

log = logging.getLogger(__name__)

SAMPLERS: Registry = Registry("sampler")
PRUNERS: Registry = Registry("pruner")


@SAMPLERS.register("nsga2")
def _nsga2(search):
    return optuna.samplers.NSGAIISampler(population_size=search.population_size, seed=search.seed + search.worker)


@SAMPLERS.register("motpe")
@SAMPLERS.register("tpe")
def _tpe(search):
    return optuna.samplers.TPESampler(n_startup_trials=search.startup_trials, seed=search.seed + search.worker,
                                      multivariate=True)


@SAMPLERS.register("random")
def _random(search):
    return optuna.samplers.RandomSampler(seed=search.seed + search.worker)


@SAMPLERS.register("cmaes")
def _cmaes(search):
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise RuntimeError("search.sampler: cmaes needs the 'cmaes' package (pip install cmaes)") from None
    return optuna.samplers.CmaEsSampler(seed=search.seed + search.worker, n_startup_trials=search.startup_trials)


@PRUNERS.register("none")
def _no_pruner(search):
    return optuna.pruners.NopPruner()


@PRUNERS.register("median")
def _median(search):
    return optuna.pruners.MedianPruner(n_startup_trials=search.startup_trials, n_warmup_steps=0)


@PRUNERS.register("hyperband")
def _hyperband(search):
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=search.epochs)


def storage_url(cfg: Config) -> str:
    """``search.storage``, or the default SQLite file in the search folder."""
    return cfg.search.storage or f"sqlite:///{RunDir.of(cfg).search.file('study.db').resolve()}"


def is_journal(url: str) -> bool:
    return url.startswith("journal:") or url.endswith(".log")


def build_storage(cfg: Config) -> optuna.storages.BaseStorage:
    """SQLite in the search folder by default; a ``*.log``/``journal:`` path is a journal file (several
    workers on one machine); anything else is an SQLAlchemy URL (PostgreSQL for workers on many machines).
    RDB storages get a heartbeat: a trial whose worker died is failed and its parameters retried once. A journal
    has none: a dead worker's trial stays RUNNING and is never retried (a warning says so)."""
    url = storage_url(cfg)
    if is_journal(url):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        if cfg.search.heartbeat:
            log.warning("search: the journal storage %s has no heartbeat (search.heartbeat applies to SQL storages): "
                        "a trial whose worker dies stays RUNNING and is never retried (the study still runs "
                        "search.n_trials finished trials); use PostgreSQL for retries", path)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    beat = cfg.search.heartbeat
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=beat, grace_period=2 * beat,
                                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except sqlalchemy.exc.ArgumentError as err:
        raise ValueError(f"search.storage {hide_password(url)}: not a storage URL ({_first_line(err)}); give an "
                         "SQLAlchemy URL or a journal file (*.log)") from None
    except ImportError as err:
        raise RuntimeError(f"search.storage {hide_password(url)}: its database driver is not installed "
                           f"({_first_line(err)}; PostgreSQL: pip install psycopg2-binary)") from None


# what several workers opening a fresh storage at once can raise: Optuna's tables or the study created by another
# worker between this one's check and its CREATE/INSERT (PostgreSQL: UniqueViolation on pg_type; SQLite: "table
# studies already exists", "database is locked"); opened again, the storage finds them and joins
_CREATION_RACES = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError,
                   optuna.exceptions.StorageInternalError)
OPEN_ATTEMPTS = 6


def open_study(cfg: Config) -> optuna.Study:
    """Create the study or load it (resume, or join other workers); refuses changed objectives. Workers started
    together on a fresh storage race to create its tables and the study: the losers open it again after a short
    random wait, so every worker joins."""
    jitter = random.Random()  # seeded by the OS, not by seed_everything: workers must not wait in step
    url = storage_url(cfg)
    for attempt in range(1, OPEN_ATTEMPTS):
        try:
            return _open_study(cfg)
        except _CREATION_RACES as err:
            wait = jitter.uniform(0.2, 1.0) * attempt
            log.info("search: opening the study collided with another worker (%s); again in %.1f s",
                     _first_line(err), wait)
            time.sleep(wait)
    try:
        return _open_study(cfg)
    except _CREATION_RACES as err:
        raise RuntimeError(f"search.storage {hide_password(url)}: cannot open the study after {OPEN_ATTEMPTS} "
                           f"attempts ({_first_line(err)})") from None


def _open_study(cfg: Config) -> optuna.Study:
    search = cfg.search
    multi = len(search.objectives) > 1
    if not multi and search.sampler in ("nsga2", "motpe"):
        log.warning("search.sampler %s is multi-objective; one objective is configured", search.sampler)
    study = optuna.create_study(
        storage=build_storage(cfg), study_name=search.study_name or cfg.experiment, load_if_exists=True,
        sampler=SAMPLERS.build(search.sampler, search),
        pruner=PRUNERS.build(search.pruner if not multi else "none", search),
        directions=[OBJECTIVES[o] for o in search.objectives])
    recorded = study.user_attrs.get("objectives")
    if recorded is not None and recorded != list(search.objectives):
        raise ValueError(f"study '{study.study_name}' was made with objectives {recorded}, not "
                         f"{list(search.objectives)}: set search.study_name or search.storage for a new study")
    check_same_space(study, search)
    study.set_user_attr("objectives", list(search.objectives))
    return study


def _first_line(err: BaseException) -> str:
    """An exception's message as one line (SQLAlchemy's carry the statement and a link on lines of their own)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def sqlite_file(url: str) -> Optional[Path]:
    """The database file of an SQLite URL, None for any other storage (or an in-memory database)."""
    if is_journal(url) or not url.startswith("sqlite"):
        return None
    try:
        database = sqlalchemy.engine.make_url(url).database
    except (sqlalchemy.exc.ArgumentError, ValueError):
        return None  # not a URL: opening the storage says so
    return Path(database) if database and database != ":memory:" else None


@contextlib.contextmanager
def sqlite_worker(cfg: Config) -> Iterator[None]:
    """While a worker searches on SQLite, hold ``<database>.lock``; a second worker on the same file finds it held
    and is warned that SQLite is for one worker (they would lock each other out)."""
    database = sqlite_file(storage_url(cfg))
    if database is None:
        yield
        return
    lock = database.with_name(database.name + ".lock")
    fd = try_lock(lock, {"pid": os.getpid(), "worker": cfg.search.worker, "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    if fd is None:
        held = holder(lock)
        log.warning("search: another worker (pid %s, worker %s, since %s) is searching on the SQLite file %s: "
                    "SQLite is for one worker (several lock each other out, 'database is locked'); give several "
                    "workers a journal file (search.storage=%s) or PostgreSQL", held.get("pid", "?"),
                    held.get("worker", "?"), held.get("since", "?"), database, database.with_suffix(".log"))
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def warm_start(study: optuna.Study, cfg: Config) -> int:
    """Enqueue the Pareto set of another search folder (once per study); returns how many."""
    source = Path(cfg.search.warm_start)
    if study.user_attrs.get("warm_started_from") == str(source):
        return 0
    path = SearchDir(source).file("pareto.csv")
    if not path.is_file():
        raise FileNotFoundError(f"search.warm_start: {path} not found (run that search first)")
    pareto = pd.read_csv(path)
    columns = [c for c in pareto.columns if c.startswith("params_")]
    for _, row in pareto.iterrows():
        params = {c[len("params_"):]: (v.item() if hasattr(v, "item") else v) for c, v in row[columns].items()
                  if not pd.isna(v)}
        study.enqueue_trial(params, skip_if_exists=True)
    study.set_user_attr("warm_started_from", str(source))
    log.info("search: warm start with %d Pareto trials of %s", len(pareto), source)
    return len(pareto)


def enqueue_seed_specs(study: optuna.Study, cfg: Config) -> int:
    """Enqueue ``search.seed_specs`` as trials (once per study; an equal finished trial is not repeated)."""
    if not cfg.search.seed_specs or study.user_attrs.get("seed_specs_enqueued"):
        return 0
    for spec in cfg.search.seed_specs:
        study.enqueue_trial(spec_params(load_spec(spec), cfg.search.arch), skip_if_exists=True)
    study.set_user_attr("seed_specs_enqueued", True)
    log.info("search: %d hand-made architectures enqueued first (search.seed_specs)", len(cfg.search.seed_specs))
    return len(cfg.search.seed_specs)
