"""The frozen-feature fast path (``train.mode: features``), shared by the train and infer stages.

Every cached image is embedded once per TTA view by the frozen pretrained backbone (``model.name`` with
``model.pretrained`` / ``model.weights``, its classifier removed); the embeddings are cached beside the image
cache, under ``<data.cache_dir>/features/``, keyed by the backbone, its weights, the image size, the view and
the image cache's signature, so a second run (or another head) reuses them and any change of those recomputes
them. A head per fold is then fitted on the other folds' embeddings in seconds: ``train.head: logreg``
(scikit-learn's LogisticRegression on standardised features, ``train.head_c``) folded into one ``nn.Linear``,
or ``mlp`` (a small torch MLP, ``train.head_hidden``, ``train.head_steps``), saved like any checkpoint
(``fold<k>/best.safetensors``), so OOF, CV, TTA, ensembling and submission work unchanged. Training rows are
embedded under every TTA view and all of them train the head (flips as free augmentation); the OOF uses the
identity view, ``infer`` averages the views as for a fine-tuned model. The backbone runs through ``infer.engine``
(:mod:`pipeline.models.engines`); :class:`FeaturesMode` registers the mode and what it refuses.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler
from torch import nn
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from pipeline.core.config import Config
from pipeline.core.registry import Registry
from pipeline.core.utils import atomic_path, resolve_device
from pipeline.data.dataset import center_crop, iter_batches, to_float
from pipeline.evaluation.metrics import score
from pipeline.evaluation.tta import get_view
from pipeline.models.engines import FrozenPass
from pipeline.models.factory import architecture_id, create_model
from pipeline.models.weights import is_pretrained, normalization, weights_id
from pipeline.rundir import RunDir, load_split
from pipeline.training.checkpoints import load_weights
from pipeline.training.losses import class_weights
from pipeline.training.mode import FOLD_OVERHEAD_S, TRAIN_MODES, Cost, FoldData, Predict, Rates, TrainMode, \
    cached_pass_refusals
from pipeline.training.precision import compute_settings
from pipeline.training.record import FoldRecord

log = logging.getLogger(__name__)

HEADS: Registry = Registry("feature head")


def train_views(cfg: Config) -> list[str]:
    """The views the head trains on: identity first (it scores the OOF), then the other TTA views, then
    ``train.crop_views`` seeded random resized crops (``crop0``, ``crop1``, …)."""
    tta = cfg.infer.tta if isinstance(cfg.infer.tta, list) else []
    return ["identity"] + [v for v in tta if v != "identity"] + [f"crop{k}" for k in range(cfg.train.crop_views)]


def crop_boxes(count: int, view: str, height: int, width: int) -> np.ndarray:
    """``count`` × (top, left, height, width, flip, brightness, contrast) of the random resized crop view
    ``crop<k>``: a seeded draw per image (seed ``k``), so the view is the same in every run and its cache valid.
    Area 25–100 % of the cached image, aspect ratio 3/4–4/3, a horizontal flip half the time, brightness and
    contrast within ±20 %."""
    rng = np.random.default_rng([0x5EED, int(view[4:])])
    area = rng.uniform(0.25, 1.0, count) * height * width
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), count))
    h = np.clip(np.round(np.sqrt(area / ratio)), 8, height).astype(int)
    w = np.clip(np.round(np.sqrt(area * ratio)), 8, width).astype(int)
    top = (rng.uniform(0, 1, count) * (height - h + 1)).astype(int)
    left = (rng.uniform(0, 1, count) * (width - w + 1)).astype(int)
    flip = rng.uniform(0, 1, count) < 0.5
    jitter = rng.uniform(0.8, 1.2, (count, 2))
    return np.column_stack([top, left, h, w, flip, jitter]).astype(np.float64)


def crop_view(batch: torch.Tensor, boxes: np.ndarray, size: int) -> torch.Tensor:
    """The random resized crops ``boxes`` (rows of :func:`crop_boxes`) of a float batch in 0–255, each resized
    (antialiased bilinear) to ``size``, flipped and jittered in brightness and contrast."""
    out = []
    for image, (top, left, h, w, flip, bright, contrast) in zip(batch, boxes):
        crop = TF.resized_crop(image, int(top), int(left), int(h), int(w), [size, size], antialias=True)
        crop = TF.horizontal_flip(crop) if flip else crop
        mean = crop.mean()
        out.append(((crop * bright - mean * bright) * contrast + mean * bright).clamp(0, 255))
    return torch.stack(out)


def is_crop(view: str) -> bool:
    return view.startswith("crop") and view[4:].isdigit()


def features_path(cfg: Config, manifest: dict, split: str, view: str) -> Path:
    """Where the embeddings of ``split`` under ``view`` live: the key names everything they depend on."""
    key = f"{split}-{pass_setting(cfg)}-{frozen_key(cfg, view.replace('+', '_'))}-{manifest[split]['signature'][:12]}"
    return Path(cfg.data.cache_dir) / "features" / f"{key}.npy"


def pass_setting(cfg: Config) -> str:
    """What a cached pass's numbers depend on beside the backbone and the images: the precision it runs at on
    this machine and ``infer.engine`` (a bf16 pass is not reused where fp32 is asked for)."""
    dtype = compute_settings(cfg, resolve_device(cfg.train.device))[0]
    return f"{str(dtype).removeprefix('torch.') if dtype is not None else 'fp32'}-{cfg.infer.engine}"


def backbone(cfg: Config, device: torch.device) -> nn.Module:
    """The pretrained model without its classifier (pooled features), frozen, in eval mode."""
    if not is_pretrained(cfg.model):
        raise ValueError("train.mode=features needs a pretrained backbone: set model.pretrained=true "
                         "(efficientnet_lite0 ships offline) or model.weights=PATH")
    model = create_model(cfg.model, num_classes=1)
    model.reset_classifier(0)
    return model.to(device).eval().requires_grad_(False)


def frozen_key(cfg: Config, part: str) -> str:
    """What names a frozen pass of the backbone (``part``: ``pooled`` features or the front before ``last<k>``):
    the backbone (:func:`architecture_id`), its weights and the input size."""
    return f"{architecture_id(cfg.model)}-{weights_id(cfg.model)}-{cfg.data.image_size}px-{part}"


@torch.no_grad()
def embed_views(model: nn.Module, images: np.ndarray, views: list[str], cfg: Config, mean, std,
                device: torch.device, desc: str, key: str, dtype: type = np.float32) -> list[np.ndarray]:
    """``model``'s output for every image under each view (TTA views of the centre ``data.image_size`` square,
    or ``crop<k>`` views of the whole cached image), as ``dtype`` arrays in row order; the pass runs through
    ``infer.engine`` (:class:`pipeline.models.engines.FrozenPass`, its graph named by ``key``)."""
    run = FrozenPass(model, cfg, key, device, compute_settings(cfg, device)[0])
    size, batch_size = cfg.data.image_size, cfg.infer.batch_size
    height, width = images.shape[1:3]
    boxes = {v: crop_boxes(len(images), v, height, width) for v in views if is_crop(v)}
    fns = {v: get_view(v) for v in views if not is_crop(v)}
    out: list[list[np.ndarray]] = [[] for _ in views]
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
    batches = iter_batches(images, np.arange(len(images)), batch_size)
    for i, batch in enumerate(tqdm(batches, total=-(-len(images) // batch_size), desc=desc, unit="batch",
                                   leave=False, mininterval=1.0)):
        centre = to_float(center_crop(batch, size), mean, std, device, cfg.train.channels_last)
        for slot, view in zip(out, views):
            if is_crop(view):
                x = (crop_view(batch.to(device).float(), boxes[view][i * batch_size:][:len(batch)], size) - m) / s
                x = x.contiguous(memory_format=torch.channels_last) if cfg.train.channels_last else x
            else:
                x = fns[view](centre)
            slot.append(run(x).cpu().numpy().astype(dtype))
    return [np.concatenate(o) if o else np.zeros((0, 0), dtype) for o in out]


def read_cached(path: Path, rows: int) -> Optional[np.ndarray]:
    """The cached pass at ``path`` (embeddings or activations, one row per image), or None when it is missing or
    damaged (truncated, garbled, another row count): a warning names the file, which the caller computes again."""
    if not path.is_file():
        return None
    try:
        array = np.load(path)
    except (OSError, ValueError, EOFError) as err:
        log.warning("%s is damaged (%s): computing it again", path, " ".join(str(err).split()))
        return None
    if array.ndim == 0 or len(array) != rows:
        log.warning("%s holds %s, not %d rows: computing it again", path, array.shape, rows)
        return None
    return array


def embeddings(cfg: Config, manifest: dict, split: str, views: list[str],
               device: torch.device) -> dict[str, np.ndarray]:
    """The embeddings (N×D float32) of every image of ``split`` under each view, computed once and cached (again
    when a cached file is damaged)."""
    paths = {v: features_path(cfg, manifest, split, v) for v in views}
    cached = {v: read_cached(p, manifest[split]["n"]) for v, p in paths.items()}
    missing = [v for v, array in cached.items() if array is None]
    if missing:
        images, _ = load_split(cfg.run_dir, split, manifest)
        start = time.perf_counter()
        model = backbone(cfg, device)
        mean, std = normalization(cfg.model, manifest)
        arrays = embed_views(model, images, missing, cfg, mean, std, device, f"embed {split}",
                             frozen_key(cfg, "pooled"))
        seconds = time.perf_counter() - start
        for view, array in zip(missing, arrays):
            cached[view] = array.astype(np.float32)
            paths[view].parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(paths[view]) as tmp:
                np.save(tmp, cached[view])
        log.info("features: %s %d images × %d view(s) %s embedded in %.1fs (%.1f img/s), %d dims", split,
                 len(images), len(missing), missing, seconds, len(images) * len(missing) / max(seconds, 1e-9),
                 arrays[0].shape[1])
    if len(missing) < len(views):
        log.info("features: %s cached for %s", split, [v for v in views if v not in missing])
    return cached


# --------------------------------------------------------------------------- heads


HEAD_S = (1.0, 1e-3)  # the planner's estimate of a head per fold: 1 s + 1 ms per training row and view
HEAD_CS = (0.03, 0.1, 0.3, 1.0, 3.0)  # logreg_cv's grid of C (inverse L2 strength on standardised features)


def _class_weight(cfg: Config) -> Optional[Union[str, dict[int, float]]]:
    """scikit-learn's ``class_weight`` for ``train.class_weights``: ``balanced``, a weight per class index, or
    None."""
    spec = cfg.train.class_weights
    return dict(enumerate(map(float, spec))) if isinstance(spec, list) else spec


@HEADS.register("logreg")
def logreg_head(cfg: Config, x: np.ndarray, y: np.ndarray, num_classes: int,
                groups: Optional[np.ndarray] = None) -> nn.Module:
    """Multinomial logistic regression on standardised features (``train.head_c``; ``train.class_weights:
    balanced`` weighs classes inversely to their counts), as one ``nn.Linear`` on raw features."""
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=cfg.train.head_c, max_iter=2000, class_weight=_class_weight(cfg))
    return _as_linear(clf.fit(scaler.transform(x), y), scaler, x.shape[1], num_classes)


@HEADS.register("logreg_cv")
def logreg_cv_head(cfg: Config, x: np.ndarray, y: np.ndarray, num_classes: int,
                   groups: Optional[np.ndarray] = None) -> nn.Module:
    """The logistic regression with C chosen from :data:`HEAD_CS` by the log loss of a 3-fold cross-validation
    inside the rows it is given (a fold's training rows: the held-out fold never chooses its own head). Rows
    of one image under several views share a group, so an image's flip never scores its identity view."""
    scaler = StandardScaler().fit(x)
    groups = np.arange(len(y)) if groups is None else groups
    splits = list(StratifiedGroupKFold(n_splits=3, shuffle=True, random_state=cfg.seed).split(x, y, groups))
    clf = LogisticRegressionCV(Cs=list(HEAD_CS), cv=splits, scoring="neg_log_loss", max_iter=2000,
                               class_weight=_class_weight(cfg))
    with warnings.catch_warnings():  # scikit-learn's notices of its own attribute changes, not about the data
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(scaler.transform(x), y)
    log.info("logreg_cv: C %.3g chosen by inner 3-fold log loss (grid %s)", float(np.ravel(clf.C_)[0]),
             list(HEAD_CS))
    return _as_linear(clf, scaler, x.shape[1], num_classes)


def _as_linear(clf, scaler: StandardScaler, dim: int, num_classes: int) -> nn.Linear:
    """A fitted scikit-learn logistic regression on standardised features as one ``nn.Linear`` on raw ones."""
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sigmoid(z) = softmax([-z/2, z/2])
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    weight = np.zeros((num_classes, dim))
    bias = np.full(num_classes, -1e4)  # a class absent from the training folds is never predicted
    weight[clf.classes_] = coef / scaler.scale_
    bias[clf.classes_] = intercept - (coef / scaler.scale_) @ scaler.mean_
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight))
        head.bias.copy_(torch.from_numpy(bias))
    return head


class MLPHead(nn.Sequential):
    """Standardise (statistics of the training folds, kept as buffers), one hidden GELU layer, dropout, linear."""

    def __init__(self, dim: int, num_classes: int, hidden: int, dropout: float = 0.2) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.mean) / self.scale)


@HEADS.register("mlp")
def mlp_head(cfg: Config, x: np.ndarray, y: np.ndarray, num_classes: int,
             groups: Optional[np.ndarray] = None) -> nn.Module:
    """A small MLP (``train.head_hidden`` units) trained full-batch with AdamW for ``train.head_steps`` steps
    (``train.weight_decay``, label smoothing ``train.label_smoothing``, ``train.class_weights``); seeded, seconds
    on a CPU."""
    torch.manual_seed(cfg.seed)
    head = MLPHead(x.shape[1], num_classes, cfg.train.head_hidden)
    xt, yt = torch.from_numpy(np.asarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    head.mean.copy_(xt.mean(0))
    head.scale.copy_(xt.std(0).clamp_min(1e-6))
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=cfg.train.weight_decay)
    weight = class_weights(cfg.train.class_weights, y, num_classes)
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
    head.train()
    for _ in range(cfg.train.head_steps):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(head(xt), yt).backward()
        optimizer.step()
    return head.eval()


def build_head(cfg: Config, dim: int, num_classes: int) -> nn.Module:
    """An empty head of the configured kind, to load a fold's saved weights into."""
    HEADS.get(cfg.train.head)  # unknown names list the valid ones
    if cfg.train.head == "mlp":
        return MLPHead(dim, num_classes, cfg.train.head_hidden)
    return nn.Linear(dim, num_classes)


@torch.no_grad()
def head_probs(head: nn.Module, feats: list[np.ndarray]) -> np.ndarray:
    """Mean softmax of the head over the views' embeddings (rows aligned)."""
    head.eval()
    return np.mean([head(torch.from_numpy(np.asarray(f))).softmax(1).numpy() for f in feats], axis=0)


def fit_fold(cfg: Config, fold: int, feats: dict[str, np.ndarray], index: pd.DataFrame, folds: pd.DataFrame,
             classes: list[str]) -> dict:
    """Fit the head on the other folds (every view), score the fold (identity view), save like a checkpoint."""
    record = FoldRecord(cfg, fold)
    labels = index["label_idx"].to_numpy()
    fold_of = folds["fold"].to_numpy()
    train_rows, valid_rows = np.flatnonzero(fold_of != fold), np.flatnonzero(fold_of == fold)
    x = np.concatenate([f[train_rows] for f in feats.values()])
    y = np.tile(labels[train_rows], len(feats))
    head = HEADS.build(cfg.train.head, cfg, x, y, len(classes), groups=np.tile(train_rows, len(feats)))
    first = next(iter(feats.values()))
    probs = head_probs(head, [first[valid_rows]])
    metrics = score(labels[valid_rows], probs)
    record.keep(head, probs, record.meta(0, classes, metrics, head=cfg.train.head, views=list(feats)))
    result = record.finish(0, 1, metrics, sum(p.numel() for p in head.parameters()))
    log.info("fold %d: %s head on %d×%d features: acc %.4f log_loss %.4f (%.1fs)", fold, cfg.train.head,
             *x.shape, metrics["accuracy"], metrics["log_loss"], result["seconds"])
    return result


def predict_fold(cfg: Config, fold: int, manifest: dict, split: str, rows: np.ndarray, views: list[str],
                 device: torch.device) -> np.ndarray:
    """A fold head's probabilities for ``rows`` of ``split``, averaged over the TTA ``views``."""
    feats = embeddings(cfg, manifest, split, views, device)
    dim = next(iter(feats.values())).shape[1]
    best = RunDir.of(cfg).model(fold).weights("best")
    head = load_weights(build_head(cfg, dim, len(manifest["classes"])), best)
    return head_probs(head, [feats[v][rows] for v in views])


# a head is fitted in closed form (or a few hundred full-batch steps): there is no network training loop. The
# loop's core recipe (how long, how fast, which loss, which epoch is kept), which a config shared with a trained
# mode sets for that mode, is not used (and named in the log); the loop's opt-in extras are refused
_RECIPE = ("epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "loss", "focal_gamma", "scheduler",
           "warmup_epochs", "min_lr", "plateau_patience", "plateau_factor", "monitor", "resume", "min_steps",
           "ema_decay", "bn", "tune_blocks")
_NO_LOOP = "a head is fitted in closed form, with no training loop"
_EXTRAS = ("accum_steps", "early_stopping", "lookahead_k", "lookahead_alpha", "freeze_epochs", "backbone_lr_mult",
           "head_init")
_IMAGES = "the frozen backbone embeds fixed views: its augmentation is train.crop_views and the TTA views"


@TRAIN_MODES.register("features")
class FeaturesMode(TrainMode):
    """``train.mode: features``: every image embedded once per view by the frozen backbone (cached), then a head
    per fold (``train.head``) fitted on the other folds' embeddings."""
    name = "features"
    verb = "fitted"
    unused = tuple(f"train.{key}" for key in _RECIPE)
    refused = {**{f"train.{key}": _NO_LOOP for key in _EXTRAS}, **cached_pass_refusals(_IMAGES, "the head")}

    def prepare(self, data: FoldData) -> dict[str, np.ndarray]:
        return embeddings(data.cfg, data.manifest, "train", train_views(data.cfg), data.device)

    def fit_fold(self, data: FoldData, fold: Optional[int], prepared: dict[str, np.ndarray]) -> dict:
        return fit_fold(data.cfg, fold, prepared, data.index, data.folds, data.classes)

    def predictor(self, cfg: Config, fold: Optional[int], manifest: dict, device: torch.device) -> Predict:
        return lambda split, rows, views: predict_fold(cfg, fold, manifest, split, rows, views, device)

    def cache_key(self, cfg: Config) -> tuple:
        return ("features", cfg.model.name, cfg.data.image_size, None)

    def cost(self, rates: Rates, cfg: Config, before: set[tuple]) -> Cost:
        """Every image embedded once per view not embedded before, then a head per fold."""
        k, rows = cfg.folds.n_splits, rates.facts.images * len(train_views(cfg))
        head = HEAD_S[0] + HEAD_S[1] * rows * (k - 1) / k
        new, train = rates.new_images(cfg, before), rates.new_images(cfg, before, ("train",))
        rate = rates.frozen_rate(cfg, "pooled", lambda: backbone(cfg, rates.device)) if new else 1.0
        return Cost(new / rate + k * (head + FOLD_OVERHEAD_S), once=train / rate, infer=(new - train) / rate)
