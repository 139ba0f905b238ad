"""Engines for frozen forward passes (``infer.engine``): the backbone that embeds every image (``train.mode:
features``) and the frozen front whose activations partial fine-tuning caches run through PyTorch or ONNX Runtime.

``torch`` runs the module eagerly at the configured precision (bf16 where the CPU has it) and memory format.
``onnxruntime`` runs the same module exported once (``torch.onnx``, fp32, any batch size) to
``<data.cache_dir>/graphs/<key>.onnx``, keyed like the cached activations (backbone, weights, size, cut), and
checked once against PyTorch on the first real batch: a graph that differs by more than :data:`PARITY` (max
absolute difference) is not used (one warning; PyTorch serves the pass). ``auto`` (the default) times both on
that batch for a few seconds and keeps the faster; the rates and the choice are recorded beside the graph
(``<key>.json``, per machine, thread count, batch and precision), so the choice is made once. Off the CPU, and
where the onnxruntime package is missing, ``auto`` is PyTorch.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from pipeline.core.config import Config, ConfigError
from pipeline.core.timing import Effort, timed
from pipeline.core.utils import atomic_path, autocast, device_name, read_json, write_json

log = logging.getLogger(__name__)

ENGINES = ("torch", "onnxruntime")
PARITY = 1e-4  # the largest absolute difference from PyTorch (fp32) a graph may show on a real batch
OPSET = 17
CHOICE_SECONDS, CHOICE_ROUNDS = 1.5, 3  # each engine's timing when ``auto`` chooses, in rounds

Run = Callable[[torch.Tensor], torch.Tensor]


def graph_path(cfg: Config, key: str) -> Path:
    """Where the exported graph of the frozen pass named ``key`` lives (its record beside it, ``.json``)."""
    return Path(cfg.data.cache_dir) / "graphs" / f"{key}.onnx"


def onnxruntime_module(required: bool) -> Optional[Any]:
    """The onnxruntime package, or None when missing (an error naming the setting when ``required``)."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError:
        if required:
            raise ConfigError("infer.engine=onnxruntime: the onnxruntime package is not installed "
                              "(pip install onnxruntime), or set infer.engine=torch") from None
        return None


def torch_run(module: nn.Module, device: torch.device, dtype: Optional[torch.dtype]) -> Run:
    """The eager pass at ``dtype`` (None: fp32, even inside a caller's autocast), float32 out."""
    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, dtype) if dtype is not None else torch.autocast(device.type, enabled=False):
            return module(x.float() if dtype is None else x).float()
    return run


def export(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``module`` as an fp32 ONNX graph with a free batch dimension, written atomically."""
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad(), \
            torch.autocast(example.device.type, enabled=False):  # fp32 even inside a caller's autocast
        warnings.simplefilter("ignore")  # the exporter's notices about its own future, not about this graph
        torch.onnx.export(module, (example.float().contiguous(),), str(tmp), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=OPSET, dynamo=False)


def ort_run(ort: Any, path: Path, threads: int) -> Run:
    """A session over the graph at ``path`` on the CPU with ``threads`` threads, float32 tensors in and out."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # its threads sleep between calls instead of spinning: PyTorch's own threads prepare the next batch meanwhile
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        return torch.from_numpy(session.run(None, {"x": array})[0])
    return run


def rate(run: Run, x: torch.Tensor, seconds: float) -> float:
    """Images/s of ``run`` on ``x`` (one warm-up call, then calls for about ``seconds``: the bench's timing)."""
    return timed(lambda: len(run(x)), 1, Effort(batches=10**6, seconds=seconds))


class FrozenPass:
    """A frozen module's forward pass through the configured engine, chosen on the first batch it sees."""

    def __init__(self, module: nn.Module, cfg: Config, key: str, device: torch.device,
                 dtype: Optional[torch.dtype], choice_key: Optional[str] = None) -> None:
        """``key`` names the graph (the module's weights); ``choice_key`` the record of the engines' rates, shared
        by modules that differ only in their weights (default: ``key``), so only the first one is timed."""
        self.module, self.cfg, self.key, self.device, self.dtype = module, cfg, key, device, dtype
        self.choice_key = choice_key or key
        self.run: Optional[Run] = None
        self.engine = ""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.run is None:
            self.engine, self.run = self.choose(x)
        return self.run(x)

    def choose(self, x: torch.Tensor) -> tuple[str, Run]:
        """(engine, run) for ``infer.engine`` on this machine, the graph exported and checked on ``x`` (not even
        exported when ``auto`` already timed this setting and PyTorch won)."""
        known = self.known_rates(x)
        if self.cfg.infer.engine == "auto" and set(known) == set(ENGINES) and max(known, key=known.get) == "torch":
            return "torch", torch_run(self.module, self.device, self.dtype)
        runs = self.runs(x)
        if "onnxruntime" in runs and not self.same_as_torch(runs["onnxruntime"], x):
            del runs["onnxruntime"]
        if len(runs) == 1 or self.cfg.infer.engine == "onnxruntime":
            name = "onnxruntime" if "onnxruntime" in runs else "torch"
            return name, runs[name]
        rates = self.rates(x, runs)
        best = max(rates, key=rates.get)
        log.info("%s: %s (img/s at batch %d: %s)", self.key, best, len(x),
                 ", ".join(f"{k} {v}" for k, v in rates.items()))
        return best, runs[best]

    def runs(self, x: torch.Tensor) -> dict[str, Run]:
        """The engines ``infer.engine`` allows here: PyTorch, and the exported graph where it can run."""
        runs = {"torch": torch_run(self.module, self.device, self.dtype)}
        wanted = self.cfg.infer.engine
        ort = None if wanted == "torch" else onnxruntime_module(required=wanted == "onnxruntime")
        if ort is not None and self.device.type == "cpu":
            graph = self.graph(ort, x)
            if graph is not None:
                runs["onnxruntime"] = graph
        return runs

    def graph(self, ort: Any, x: torch.Tensor) -> Optional[Run]:
        """The graph's pass, exported if missing (again if unreadable); None (one warning) if it cannot be."""
        path = graph_path(self.cfg, self.key)
        for attempt in range(2):
            try:
                if attempt or not path.is_file():
                    export(self.module, x, path)
                    path.with_suffix(".json").unlink(missing_ok=True)  # a new graph: not checked or timed yet
                return ort_run(ort, path, torch.get_num_threads())
            except Exception as err:  # noqa: BLE001 - exporter and runtime raise many types: PyTorch serves it
                if attempt:
                    log.warning("%s: no ONNX graph (%s: %s): PyTorch serves this pass", self.key,
                                type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
                elif path.is_file():  # the cached graph does not load: damaged, exported again
                    log.warning("%s is damaged (%s: %s): exporting it again", path, type(err).__name__,
                                str(err).splitlines()[0][:200] if str(err) else "")
        return None

    def same_as_torch(self, run: Run, x: torch.Tensor) -> bool:
        """Whether the graph gives PyTorch's fp32 output within :data:`PARITY` on the real batch ``x`` (checked
        once per graph, recorded); a warning when it does not."""
        path = graph_path(self.cfg, self.key).with_suffix(".json")
        record = _record(path)
        if "parity" not in record:
            reference = torch_run(self.module, self.device, None)(x)
            record["parity"] = float((run(x) - reference.cpu()).abs().max())
            write_json(path, record)
        if record["parity"] <= PARITY:
            return True
        log.warning("%s: ONNX Runtime differs from PyTorch by %.2g on a real batch (> %g): PyTorch serves this pass",
                    self.key, record["parity"], PARITY)
        return False

    def rates(self, x: torch.Tensor, runs: Optional[dict[str, Run]] = None) -> dict[str, float]:
        """Images/s of each allowed engine on a batch like ``x``, timed once per machine, threads, batch and
        precision (recorded beside the graph, so ``auto`` chooses once; what the planner charges)."""
        runs = runs if runs is not None else self.runs(x)
        path = graph_path(self.cfg, self.choice_key).with_suffix(".json")
        record = _record(path)
        known = record.setdefault("rates", {}).get(self.setting(x), {})
        if set(runs) - set(known):
            known = dict.fromkeys(runs, 0.0)
            for _ in range(CHOICE_ROUNDS):  # interleaved, best of each: a passing load biases neither engine
                for name, run in runs.items():
                    known[name] = max(known[name], round(rate(run, x, CHOICE_SECONDS / CHOICE_ROUNDS), 1))
            record["rates"][self.setting(x)] = known
            write_json(path, record)
        return {name: known[name] for name in runs}

    def setting(self, x: torch.Tensor) -> str:
        """What a recorded rate holds for: the machine, threads, batch and precision."""
        return f"{device_name(self.device)} | {torch.get_num_threads()} threads | batch {len(x)} | {self.dtype}"

    def known_rates(self, x: torch.Tensor) -> dict[str, float]:
        """The rates recorded for a batch like ``x`` in this setting (empty when not timed yet)."""
        rates = _record(graph_path(self.cfg, self.choice_key)).get("rates", {})
        known = rates.get(self.setting(x), {}) if isinstance(rates, dict) else {}
        return known if isinstance(known, dict) else {}

    def planned_rate(self, x: torch.Tensor) -> float:
        """The images/s this pass will run at: the configured engine's, or ``auto``'s choice."""
        rates = self.rates(x)
        return rates.get(self.cfg.infer.engine, max(rates.values()))


def _record(path: Path) -> dict:
    """The record of the graph at ``path`` (parity, rates), empty when missing or unreadable."""
    with contextlib.suppress(OSError, ValueError):
        record = read_json(path.with_suffix(".json"))
        if isinstance(record, dict):
            return record
    return {}
