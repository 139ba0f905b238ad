"""Advice derived from the EDA figures: input size, imbalance handling, CV grouping, normalization.

Each suggestion is ``{"topic", "text", "set"}`` where ``set`` lists ``--set`` overrides that apply it
(empty when the advice needs a human decision).
"""
from __future__ import annotations

from typing import Optional

from pipeline.core.config import Config

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


def suggestions(report: dict, cfg: Config) -> list[dict]:
    """All suggestions, most consequential first."""
    props = report["images"]
    items = [*data_hygiene(props, report["unreadable"]["files"]),
             *duplicates(report["duplicates"], report["groups"] is not None),
             *group_columns(report.get("group_candidates", [])),
             imbalance(report["classes"]), input_size(props["train"], cfg),
             *normalization(report["normalization"], report["drift"])]
    return [i for i in items if i]
