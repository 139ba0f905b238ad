"""Advice derived from the EDA figures: input size, imbalance handling, CV grouping, normalization, and the
recipe family ``recipe: auto`` takes (:func:`family`, the rule the planner, :mod:`pipeline.plan.planner`, applies).

Each suggestion is ``{"topic", "text", "set"}`` where ``set`` lists ``--set`` overrides that apply it
(empty when the advice needs a human decision).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from pipeline.core.config import Config

# a median short side at or under this many pixels is a small-image competition (CIFAR's 32, digits' 8, 64 px
# icons): a compact CNN from scratch at native size. Above it, photos: an ImageNet-pretrained backbone at its size
SMALL_SIDE = 64
PRETRAINED_SIZES = (224, 256, 288, 320, 384, 448, 512)
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _item(topic: str, text: str, overrides: Optional[list[str]] = None) -> dict:
    return {"topic": topic, "text": text, "set": overrides or []}


def input_size(props: dict, cfg: Config) -> Optional[dict]:
    """An input side from the train size distribution (native when small, else median short side)."""
    width, height = props["summary"]["width"], props["summary"]["height"]
    if not width.get("count"):
        return None
    short = int(min(width["p50"], height["p50"]))
    if short <= 64:
        median = f"{int(width['p50'])}×{int(height['p50'])}"
        size, why = short, f"images are small (median {median} px): train at native size"
    else:
        size = max(s for s in (64, 96, 128, 160, 192) + PRETRAINED_SIZES if s <= max(short, 64))
        why = f"median short side is {short} px: {size} keeps most detail without upsampling"
    spread = width["p95"] / max(width["p5"], 1)
    if spread > 2:
        why += f"; widths vary {spread:.1f}× (p5–p95), so resize with random-resized-crop or letterbox"
    size, why = _hardware_cap(size, why)
    overrides = [f"data.image_size={size}"]
    aspect = props["summary"]["aspect"].get("p50", 1.0)
    if not 0.8 <= aspect <= 1.25:
        why += f"; median aspect ratio {aspect:.2f} is far from square: pad (or crop) rather than squash"
        overrides.append("data.resize=pad")
    current = f" (data.image_size is {cfg.data.image_size})" if cfg.data.image_size != size else ""
    return _item("input size", f"Use {size}×{size}: {why}{current}.", overrides)


def _hardware_cap(size: int, why: str, cap: int = 224) -> tuple[int, str]:
    """Cap the suggested side at ``cap`` on a CPU-only machine of a few cores, saying what the larger one costs
    (compute grows with the pixel count)."""
    import os

    import torch

    cores = os.cpu_count() or 1
    if size <= cap or torch.cuda.is_available() or cores > 8:
        return size, why
    return cap, (why + f"; but this machine has {cores} CPU cores and no GPU: {size} px costs {(size / cap) ** 2:.1f}× "
                 f"the compute of {cap} px per image, so {cap} is suggested (use {size} on a GPU)")


def imbalance(classes: dict) -> Optional[dict]:
    ratio = classes["imbalance_ratio"]
    if ratio is None:
        return None
    if ratio == 1:
        return _item("imbalance", f"Every class has {max(classes['counts'].values()):,} images: balanced, "
                     "plain cross-entropy, no sampler or class weights needed.")
    text = f"Imbalance ratio {ratio:.1f} (largest '{classes['largest']}' / smallest '{classes['smallest']}'): "
    if ratio >= 10:
        return _item("imbalance", text + "strong. Use focal loss with balanced class weights (or a class-balanced "
                     "sampler) and watch per-class recall / macro-F1, not only accuracy.",
                     ["train.loss=focal", "train.class_weights=balanced"])
    if ratio >= 3:
        return _item("imbalance", text + "moderate. Weight the loss by inverse class frequency, or try focal loss.",
                     ["train.class_weights=balanced"])
    if ratio >= 1.5:
        return _item("imbalance", text + "mild. Stratified folds are enough; plain cross-entropy is fine.")
    return _item("imbalance", text + "balanced. Plain cross-entropy, no sampler needed.")


def duplicates(dups: dict, has_group: bool) -> list[dict]:
    """CV grouping when duplicates would leak across folds, plus leak and label-noise warnings."""
    out, any_ = [], dups["any"]
    if any_["within_train"]["groups"]:
        extra = " combined with your group column" if has_group else ""
        out.append(_item("cross-validation", f"{any_['within_train']['groups']} groups of (near-)duplicate train "
                         f"images ({any_['within_train']['images']} images) would land in different folds and "
                         f"inflate CV: keep them in one fold with --set folds.group_duplicates=true "
                         f"(StratifiedGroupKFold on dup_group from duplicate_groups.csv{extra}), or drop the "
                         f"redundant copies."))
    if any_["train_test"]["groups"]:
        out.append(_item("leakage", f"{any_['train_test']['test_images']} test image(s) have a (near-)duplicate in "
                         "train: the leaderboard rewards memorising them, CV does not measure it. Check the "
                         "competition rules before exploiting it; compare predictions on them with the train labels."))
    if any_["conflicting_labels"]["groups"]:
        out.append(_item("label noise", f"{any_['conflicting_labels']['groups']} duplicate groups carry different "
                         "labels: review them (listed below), drop them, or soften targets with label smoothing.",
                         ["train.label_smoothing=0.1"]))
    return out


def group_columns(candidates: list[dict]) -> list[dict]:
    """A column that looks like a user or patient id, which the folds do not respect yet."""
    return [_item("cross-validation", f"Column '{c['column']}' has {c['values']:,} values, {c['rows_per_value']} rows "
                  "each on average: if rows that share a value are related (one user, one patient, one scene), keep "
                  "them in one fold, or the CV is optimistic.", [f"data.group_col={c['column']}"]) for c in candidates]


def data_hygiene(props: dict, bad: list[dict]) -> list[dict]:
    out = []
    if bad:
        out.append(_item("corrupt files", f"{len(bad)} file(s) cannot be decoded (listed below): drop or re-download "
                         "them before training, or loaders will fail mid-epoch."))
    for split, p in props.items():
        modes = {m: c for m, c in p["modes"].items() if m != "RGB"}
        if modes:
            shown = ", ".join(f"{c} {m}" for m, c in modes.items())
            out.append(_item("colour modes", f"{split}: {shown} images; convert to RGB on load (alpha dropped, "
                             "16-bit scaled by 1/65535) so every tensor has 3 channels in [0, 1]."))
        if p["exif_rotated"]["count"]:
            out.append(_item("EXIF rotation", f"{split}: {p['exif_rotated']['count']} image(s) carry an EXIF rotation; "
                             "apply PIL.ImageOps.exif_transpose when loading so they are upright like the rest."))
    return out


def normalization(norm: dict, drift: dict) -> list[dict]:
    out = []
    if norm.get("mean"):
        out.append(_item("normalization", f"Normalize with mean={norm['mean']} std={norm['std']} (train, [0, 1] "
                         f"scale; saved in eda.json for the train stage). Models with ImageNet-pretrained weights "
                         f"usually keep the ImageNet statistics mean={IMAGENET['mean']} std={IMAGENET['std']}."))
    shifted = [f"{k} (KS {v['ks']:.2f})" for k, v in drift.items() if v["shift"]]
    if shifted:
        out.append(_item("drift", "Train and test differ in " + ", ".join(shifted) + ": augment brightness/contrast/"
                         "colour accordingly and prefer CV folds that resemble test."))
    return out


@dataclass(frozen=True)
class Facts:
    """What the recipe is chosen from: the training images' count, median size and shape, colour mode, classes,
    imbalance and duplicates, as the EDA measured them."""
    images: int
    test_images: int
    classes: int
    width: float  # median, px
    height: float
    aspect: float  # median width / height
    mode: str  # the most common colour mode (RGB, L, RGBA, ...)
    imbalance: Optional[float]  # largest / smallest class
    duplicate_groups: int  # (near-)duplicate groups within train

    @property
    def short_side(self) -> float:
        return min(self.width, self.height)

    def as_dict(self) -> dict:
        return {**asdict(self), "short_side": self.short_side}


def facts(report: dict) -> Facts:
    """The :class:`Facts` of an ``eda.json`` report."""
    train = report["images"]["train"]
    size = train["summary"]
    modes = train.get("modes") or {"RGB": 0}
    return Facts(images=int(report["counts"]["train"]), test_images=int(report["counts"]["test"]),
                 classes=int(report["counts"]["classes"]), width=float(size["width"].get("p50") or 0),
                 height=float(size["height"].get("p50") or 0), aspect=float(size["aspect"].get("p50") or 1.0),
                 mode=max(modes, key=modes.get), imbalance=report["classes"]["imbalance_ratio"],
                 duplicate_groups=int(report["duplicates"]["any"]["within_train"]["groups"]))


def family(found: Facts) -> tuple[str, str]:
    """``small`` or ``photos``, and why: the median short side against :data:`SMALL_SIDE`."""
    size = f"median train image {found.width:.0f}×{found.height:.0f} px"
    if found.short_side <= SMALL_SIDE:
        return "small", (f"{size}, short side ≤ {SMALL_SIDE} px: small images, where a compact CNN trained from "
                         "scratch at native size fits (the settings of configs/default.yaml)")
    return "photos", (f"{size}, short side > {SMALL_SIDE} px: photos, where an ImageNet-pretrained backbone at its "
                      "own input size fits (configs/photos.yaml: EfficientNet-Lite0 at 224 px)")


def recipe(report: dict, cfg: Config) -> Optional[dict]:
    """With ``recipe: auto``: which family the plan takes and why, and how that squares with the advice below
    (input size and loss settings are the family's; the members and their minutes are in the plan)."""
    if cfg.recipe != "auto" or not report["images"]["train"]["summary"]["width"].get("count"):
        return None
    name, why = family(facts(report))
    settings = ("trains at the config's data.image_size, whatever the input-size advice says"
                if name == "small" else "keeps each backbone's native input size (224 px for Lite0, 260 px for Lite2)")
    return _item("plan", f"recipe: auto takes the {name} recipe: {why}. It {settings}; the advice below applies "
                 f"to a config you write yourself. The members it trains, their estimated and actual minutes and "
                 f"OOF scores are in runs/{cfg.experiment}/plan.json and on the results page.")


def suggestions(report: dict, cfg: Config) -> list[dict]:
    """All suggestions, most consequential first (the plan's choice of recipe, with ``recipe: auto``, first)."""
    props = report["images"]
    items = [recipe(report, cfg), *data_hygiene(props, report["unreadable"]["files"]),
             *duplicates(report["duplicates"], report["groups"] is not None),
             *group_columns(report.get("group_candidates", [])),
             imbalance(report["classes"]), input_size(props["train"], cfg),
             *normalization(report["normalization"], report["drift"])]
    return [i for i in items if i]
