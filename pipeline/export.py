"""Export stage: a finished run's models as ONNX graphs, each checked with ONNX Runtime against PyTorch.

``python -m pipeline.export RUN_DIR --out DIR [--check N]`` writes one graph per model of the run's submission
(every fold model and refit model of every ensemble member), ``<member>-fold<k>.onnx`` / ``<member>-refit.onnx``,
and ``export.json``: the recipe that combines them (:class:`pipeline.predict.recipe.Recipe`: each model's share,
the ensemble's weights fitted on the OOF or its stacker, the temperature) and each graph's parity figures.

A graph is the whole prediction of one model on decoded images: input ``x``, float32 N×S×S×3, RGB pixel values
0–255 of images decoded as the run decoded its test set (EXIF-oriented, ``data.resize`` to S×S px, bicubic; its
metadata says which); inside, the centre ``data.image_size`` crop, the normalisation, every TTA view the model
kept, the network and the mean of the views' softmax; output ``y``, N×C class probabilities. Frozen-feature runs
export backbone + head and partial fine-tuning runs the whole network (front + tuned back), not their caches.
One graph per model rather than one averaging graph: members may decode at different sizes, the combination may
be a vote or a stacker, and each graph is checked on its own.

Each graph runs through ONNX Runtime on ``--check`` real images of the run (its cached test images, else its test
folder decoded again) beside the same module in PyTorch (fp32): the largest absolute difference of the
probabilities and the share of equal labels are printed and recorded, and a graph over
:data:`pipeline.models.engines.PARITY` is an error. ``python -m pipeline.predict DIR DATA --out FILE`` predicts
from the graphs (:class:`pipeline.predict.models.GraphModels`), without PyTorch models or the run folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from pipeline.core.config import Config, ConfigError
from pipeline.core.registry import Registry
from pipeline.core.utils import atomic_path, setup_logging, write_json
from pipeline.data.contract import DataError
from pipeline.evaluation.tta import get_view
from pipeline.models.engines import PARITY, export, onnxruntime_module, ort_run
from pipeline.models.weights import normalization
from pipeline.predict.images import decode_split, read_test_set
from pipeline.predict.recipe import Member, Model, load_recipe
from pipeline.predict.stage import EXPORT_RECORD, outside_runs
from pipeline.rundir import RunDir, load_split
from pipeline.training import features, partial
from pipeline.training.checkpoints import load_weights
from pipeline.training.fold import load_fold_model

log = logging.getLogger(__name__)

CHECK_IMAGES = 64
CPU = torch.device("cpu")

Network = Callable[[Config, Optional[int], int], nn.Module]  # (cfg, fold, classes) -> normalised images to logits
NETWORKS: Registry[Network] = Registry("exportable training mode")


def best_weights(cfg: Config, fold: Optional[int]) -> Path:
    return RunDir.of(cfg).model(fold).weights("best")


@NETWORKS.register("finetune")
def finetune_network(cfg: Config, fold: Optional[int], classes: int) -> nn.Module:
    """The fold's network as trained."""
    return load_fold_model(cfg, fold, classes, CPU).to(memory_format=torch.contiguous_format)


@NETWORKS.register("features")
def features_network(cfg: Config, fold: Optional[int], classes: int) -> nn.Module:
    """The frozen backbone (pooled features) followed by the fold's head."""
    body = features.backbone(cfg, CPU)
    head = load_weights(features.build_head(cfg, body.num_features, classes), best_weights(cfg, fold))
    return nn.Sequential(body, head).eval()


@NETWORKS.register("partial")
def partial_network(cfg: Config, fold: Optional[int], classes: int) -> nn.Module:
    """The whole network: the frozen front and the fold's tuned back (a fold saves both)."""
    return load_weights(partial.pretrained_model(cfg, classes), best_weights(cfg, fold)).eval()


class Deployed(nn.Module):
    """One model's prediction on decoded pixels: N×S×S×3 float (0–255) → N×C probabilities, mean over the views,
    computed as the infer stage computes it (:func:`pipeline.evaluation.tta.predict_tta`)."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float], image_size: int,
                 views: list[str]) -> None:
        super().__init__()
        self.network, self.image_size, self.views = network, image_size, [get_view(v) for v in views]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        top, left = max(0, (x.shape[-2] - self.image_size) // 2), max(0, (x.shape[-1] - self.image_size) // 2)
        x = x[..., top:top + self.image_size, left:left + self.image_size]
        x = (x - self.mean) / self.std
        return sum(self.network(view(x)).softmax(1) for view in self.views) / len(self.views)


def deployed(member: Member, model: Model) -> Deployed:
    """``model`` of ``member`` wrapped for export (its training mode's whole network, in fp32 on the CPU)."""
    cfg = member.cfg
    try:
        build = NETWORKS.get(cfg.train.mode)
    except KeyError as err:
        raise ConfigError(f"{member.dir}: train.mode={cfg.train.mode}: {err.args[0]}") from None
    network = build(cfg, model.fold, len(member.manifest["classes"]))
    mean, std = normalization(cfg.model, member.manifest)
    return Deployed(network.float().eval(), mean, std, member.image_size, model.views).eval()


def check_images(member: Member, count: int, work: Path) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Up to ``count`` real images of the run as the graph takes them, and their rows of the run's test split
    (to compare with its own predictions): its cached test images, else its test folder decoded again."""
    try:
        images, _ = load_split(member.dir, "test", member.manifest)
        rows = np.arange(min(count, len(images)))
        return np.asarray(images[rows], dtype=np.float32), rows
    except (FileNotFoundError, ValueError):
        pass  # the cache is not on this machine: the test folder the run was trained with
    test = read_test_set(member.manifest["root"], member.cfg.data)
    rows = np.arange(min(count, len(test)))
    entry = decode_split(test, rows, "check", work, member.size, member.resize, member.cfg.data.max_pixels)
    return np.load(entry["array"]).astype(np.float32), None


def write_graph(module: Deployed, example: torch.Tensor, path: Path, metadata: dict) -> None:
    """``module`` as an ONNX graph at ``path`` with ``metadata`` in its properties (values as JSON)."""
    export(module, example, path)
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        onnx.save(graph, str(tmp))


def graph_metadata(member: Member, model: Model, classes: list[str]) -> dict:
    """What a graph's user needs to feed it and read it (the ONNX model's properties)."""
    return {"input": f"x: float32 N x {member.size} x {member.size} x 3, RGB pixel values 0-255: each image "
                     f"EXIF-oriented, converted to RGB and resized to {member.size} px (data.resize={member.resize}, "
                     "bicubic)",
            "output": "y: float32 N x classes, probabilities (mean over the TTA views)",
            "classes": classes, "size": member.size, "resize": member.resize, "image_size": member.image_size,
            "views": model.views, "member": member.name, "model": model.name, "train_mode": member.cfg.train.mode}


def parity(module: Deployed, path: Path, x: torch.Tensor, threads: int) -> dict:
    """ONNX Runtime's probabilities against PyTorch's (fp32) on ``x``: the largest absolute difference and the
    share of equal labels."""
    with torch.no_grad():
        reference = torch.cat([module(x[i:i + 32]) for i in range(0, len(x), 32)])
    run = ort_run(onnxruntime_module(required=True), path, threads)
    graph = torch.cat([run(x[i:i + 32]) for i in range(0, len(x), 32)])
    return {"images": len(x), "max_abs_diff": float((graph - reference).abs().max()),
            "labels_equal": float((graph.argmax(1) == reference.argmax(1)).float().mean()),
            "probs": graph.numpy()}


def export_model(member: Member, model: Model, folder: Path, count: int, work: Path, classes: list[str]) -> dict:
    """Export, write and check one model's graph; its record for ``export.json``."""
    module = deployed(member, model)
    images, rows = check_images(member, count, work)
    x = torch.from_numpy(images)
    model.graph = f"{member.name}-{model.name}.onnx"
    path = folder / model.graph
    try:
        write_graph(module, x[:2], path, graph_metadata(member, model, classes))
    except Exception as err:  # noqa: BLE001 - the exporter raises many types: one line naming the model
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(f"{member.name} {model.name} ({member.cfg.train.mode}, views {model.views}): cannot be "
                         f"exported to ONNX: {type(err).__name__}: {first}") from None
    check = parity(module, path, x, torch.get_num_threads())
    probs = check.pop("probs")
    record = {"graph": model.graph, "member": member.name, "model": model.name, "mode": member.cfg.train.mode,
              "views": model.views, "mb": round(path.stat().st_size / 2**20, 2), **check}
    own = RunDir(member.dir).model(model.fold).predictions("test")
    if rows is not None and own.is_file():  # the run's own predictions of the same images (its precision)
        record["labels_equal_run"] = float((np.load(own)[rows].argmax(1) == probs.argmax(1)).mean())
    log.info("%s: %.2f MB, ONNX Runtime vs PyTorch on %d images: max abs diff %.2g, labels equal %.1f%%", path,
             record["mb"], record["images"], record["max_abs_diff"], 100 * record["labels_equal"])
    if record["max_abs_diff"] > PARITY:
        raise ValueError(f"{path}: ONNX Runtime differs from PyTorch by {record['max_abs_diff']:.2g} (> {PARITY:g}) "
                         f"on {record['images']} real images: the graph is not trusted")
    return record


def run(run_dir: str | Path, out: str | Path, count: int = CHECK_IMAGES) -> dict:
    """Export every model of ``run_dir``'s submission to ``out`` and check each; the ``export.json`` written."""
    run_dir, out = Path(run_dir), Path(out)
    with tempfile.TemporaryDirectory(prefix="pipeline-export-") as work:
        recipe = load_recipe(run_dir, {"data.cache_dir": work, "train.device": "cpu"})
        outside_runs(recipe, out)
        records = [export_model(member, model, out, count, Path(work), recipe.classes)
                   for member in recipe.members for model in member.models]
    record = {"source": str(run_dir), "recipe": recipe.to_dict(), "graphs": records, "parity_limit": PARITY}
    write_json(out / EXPORT_RECORD, record)
    return record


def table(record: dict) -> str:
    """The graphs' parity figures and sizes as a text table."""
    lines = ["graph | MB | images | max abs diff | labels equal (PyTorch) | labels equal (run's test.npy)"]
    for g in record["graphs"]:
        own = f"{100 * g['labels_equal_run']:.1f}%" if "labels_equal_run" in g else "-"
        lines.append(f"{g['graph']} | {g['mb']:.2f} | {g['images']} | {g['max_abs_diff']:.2g} | "
                     f"{100 * g['labels_equal']:.1f}% | {own}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="RUN_DIR", help="a finished run folder (single run, a plan's or an "
                        "ensemble config's)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the graphs and export.json go")
    parser.add_argument("--check", type=int, default=CHECK_IMAGES, metavar="N",
                        help=f"real images each graph is checked on (default {CHECK_IMAGES})")
    args = parser.parse_args(argv)
    try:
        record = run(args.source, args.out, args.check)
    except (ConfigError, DataError, KeyError, OSError, ValueError, RuntimeError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        log.error("export failed: %s", message)
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(table(record))
    print(f"export: {Path(args.out) / EXPORT_RECORD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
