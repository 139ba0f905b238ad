"""The networks of a recipe predicting a decoded split: from a run folder as its infer stage runs them
(:class:`RunModels`), or from an export's ONNX graphs (:class:`GraphModels`).

Both are called with the split's manifest entries, one per decoding geometry (``(size, resize)``), and return
each member's models' probabilities, in the recipe's order, for :class:`pipeline.predict.recipe.Combination`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipeline.core.utils import resolve_device
from pipeline.data.cache import open_array
from pipeline.infer import fold_predictor
from pipeline.models.engines import onnxruntime_module, ort_run
from pipeline.predict.recipe import Recipe
from pipeline.training.mode import Predict

Entries = dict[tuple[int, str], dict]  # (size, resize) -> a split's manifest entry
GRAPH_BATCH = 32  # images per ONNX Runtime call


class RunModels:
    """Each member's models through its training mode's predictor (:func:`pipeline.infer.fold_predictor`: the
    network on images, a head on embeddings, the tuned back on activations), each built once, on the device its
    config names. A member's ``manifest`` receives the split's entry: its predictors read the split from there."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.predictors: dict[tuple[int, int], Predict] = {}

    def __call__(self, entries: Entries, split: str) -> list[list[np.ndarray]]:
        out = []
        for i, member in enumerate(self.recipe.members):
            member.manifest[split] = entries[member.geometry]
            rows = np.arange(member.manifest[split]["n"])
            device = resolve_device(member.cfg.train.device)
            probs = []
            for j, model in enumerate(member.models):
                if (i, j) not in self.predictors:
                    self.predictors[i, j] = fold_predictor(member.cfg, model.fold, member.manifest, device)
                probs.append(np.asarray(self.predictors[i, j](split, rows, model.views), dtype=np.float64))
            out.append(probs)
        return out


class GraphModels:
    """Each model's exported graph (uint8-valued float pixels in, probabilities out) through ONNX Runtime on the
    CPU, with as many threads as PyTorch has when it first predicts."""

    def __init__(self, recipe: Recipe, folder: Path, batch_size: int = GRAPH_BATCH) -> None:
        self.ort: Any = onnxruntime_module(required=True)
        self.recipe, self.folder, self.batch_size = recipe, folder, batch_size
        self.graphs = [[graph_file(folder, model.graph) for model in member.models] for member in recipe.members]
        self.runs: Optional[list[list]] = None

    def __call__(self, entries: Entries, split: str) -> list[list[np.ndarray]]:
        if self.runs is None:
            threads = torch.get_num_threads()
            self.runs = [[ort_run(self.ort, path, threads) for path in paths] for paths in self.graphs]
        out = []
        for member, runs in zip(self.recipe.members, self.runs):
            entry = entries[member.geometry]
            images = open_array(entry["array"], entry["n"], entry["size"])
            out.append([self.predict(run, images) for run in runs])
        return out

    def predict(self, run, images: np.ndarray) -> np.ndarray:
        """One graph's probabilities for every image of a uint8 N×S×S×3 array, in batches."""
        parts = [run(torch.from_numpy(np.asarray(images[i:i + self.batch_size], dtype=np.float32))).numpy()
                 for i in range(0, len(images), self.batch_size)]
        return np.concatenate(parts).astype(np.float64)


def borrow_graphs(recipe: Recipe, work: Path) -> None:
    """Link the graphs and engine records of the members' frozen passes (``graphs/`` in each run's own
    ``data.cache_dir``, where it is on this machine) into ``work``: a pass then finds the engine the run timed and
    chose for this machine, thread count, batch and precision, and its checked graph, instead of timing the
    engines again (which may keep the other one). Links only: a pass that records or exports replaces the link
    in ``work``, never the run's file."""
    target = work / "graphs"
    for member in recipe.members:
        source = member.cache / "graphs" if member.cache is not None else None
        if source is None or not source.is_dir():
            continue
        target.mkdir(parents=True, exist_ok=True)
        for path in source.iterdir():
            link = target / path.name
            if path.is_file() and not path.name.startswith(".") and not link.exists():
                link.symlink_to(path.resolve())


def graph_file(folder: Path, name: str) -> Path:
    """An export's graph by the name its ``export.json`` gives; missing is an error naming it."""
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the export folder is incomplete (run pipeline.export again)")
    return path
