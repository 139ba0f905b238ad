"""The families of members behind ``recipe: auto`` and each member's config: ``small`` (the loaded config as
written, configs/default.yaml's compact CNN from scratch, then a larger one trained longer, its second seed, and a
second seed of the first where the larger one does not fit the time left)
and ``photos`` (configs/photos.yaml with the competition's keys: frozen Lite0 features, Lite0's last blocks
tuned on cached activations, frozen Lite2 features, crop views, a second seed of the fine-tune, Lite2's last
blocks tuned), in the order of their expected gain per minute: a prior, since each member after the first must
show on its first fold that it improves the ensemble before its other folds train (:mod:`pipeline.plan.screen`;
:mod:`pipeline.plan.planner` fits them to a budget). The user's ``--set`` keys are kept in every member, and the
EDA's advice that protects the CV is applied to all of them (:func:`protections`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.core.config import Config, from_dict, load_config, to_dict, with_values
from pipeline.rundir import ReportDir

log = logging.getLogger(__name__)

PHOTOS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "photos.yaml"
# the loaded config's keys that describe the competition rather than the recipe: the photos family keeps them
COMPETITION_KEYS = ("root", "train_csv", "id_col", "label_col", "group_col", "train_dir", "test_dir",
                    "sample_submission", "cache_dir", "subset", "subset_seed", "num_workers", "csv_encoding",
                    "max_pixels", "allow_formula_cells")
KEPT = ("experiment", "seed", "runs_dir", "folds", "submit", "eda")  # where results go and how the CV splits


@dataclass(frozen=True)
class Member:
    """One candidate of a family: overrides on the family's base config, and why it is there."""
    name: str
    why: str
    overrides: dict = field(default_factory=dict)
    epochs: Optional[tuple[int, int]] = None  # train.epochs fitted to the time left, within these bounds
    seed_offset: int = 0  # seed = the base config's + this
    yields: bool = False  # with a budget, the first member makes way when the next one fits the budget alone


FEATURES = {"train.mode": "features"}
PARTIAL = {"train.mode": "partial"}  # configs/photos.yaml's default: the last 3 blocks, 2 epochs
LITE2 = {"model.name": "tf_efficientnet_lite2", "data.image_size": 260}  # its native size
# configs/cifar10-small-scratch.yaml's recipe for airnet_small: larger batches, more smoothing, the flip view
# (``basic`` trains with flips), and the last epoch kept so its OOF is unbiased beside the other members'
LONG = {"model.name": "airnet_small", "train.batch_size": 128, "train.label_smoothing": 0.2, "train.monitor": "last",
        "infer.tta": ["identity", "hflip"]}
# fewer epochs leave airnet_small below the compact CNN trained for the whole time (small CIFAR-10: 0.754 after 10
# epochs against 0.762-0.768 for airnet_tiny at 26-32; 0.777 after 14), so it never makes way for fewer
LONG_EPOCHS = (14, 40)
FAMILIES: dict[str, list[Member]] = {
    "small": [
        Member("base", "the config as written: a compact CNN from scratch, the fastest strong start, with a budget "
               "for as many epochs as fit", epochs=(8, 40), yields=True),
        Member("long", "a larger CNN (airnet_small) trained as long as the budget allows: the largest gain",
               LONG, epochs=LONG_EPOCHS),
        Member("long-seed2", "the larger CNN again with another seed: ensembling two seeds", LONG, epochs=LONG_EPOCHS,
               seed_offset=1),
        Member("base-seed2", "the compact CNN again with another seed, for as many epochs as the time left allows: "
               "what fits when the larger CNN does not", epochs=(8, 40), seed_offset=1),
    ],
    "photos": [
        Member("lp", "frozen ImageNet Lite0 features and a logistic regression: strong in minutes", FEATURES),
        Member("partial", "Lite0's last 3 blocks tuned on cached activations: most of a fine-tune's gain", PARTIAL,
               epochs=(1, 2)),
        Member("lite2", "frozen Lite2 features at 260 px: another, larger backbone", {**FEATURES, **LITE2}),
        Member("crops", "Lite0 features with 2 random-resized-crop views per training image: augmentation",
               {**FEATURES, "train.crop_views": 2}),
        Member("partial-seed2", "the partial fine-tune with another seed: ensembling two seeds", PARTIAL,
               epochs=(1, 2), seed_offset=1),
        Member("lite2-partial", "Lite2's last 3 blocks tuned on cached activations at 260 px: the larger backbone "
               "fine-tuned, where the budget leaves time after the others", {**PARTIAL, **LITE2}, epochs=(1, 2)),
    ],
}


# --------------------------------------------------------------------------- the members' configs


def base_config(family: str, loaded: Config, overrides: list[str], photos: Path = PHOTOS_CONFIG) -> Config:
    """The family's first member: ``small``, the loaded config as it is; ``photos``, configs/photos.yaml with the
    loaded config's competition keys, experiment, seed, folds and output folders, then ``overrides``."""
    if family == "small":
        return loaded
    values = {f"data.{key}": getattr(loaded.data, key) for key in COMPETITION_KEYS}
    values.update({key: to_dict(loaded)[key] for key in KEPT})
    values["recipe"] = "auto"
    return from_dict(to_dict(with_values(load_config(photos), values)), overrides)


def member_config(base: Config, member: Member, first: bool, epochs: Optional[int] = None,
                  fixed: frozenset = frozenset()) -> Config:
    """``member``'s config: ``base`` with its overrides (and fitted ``epochs``) in ``<experiment>-<member>``,
    except the keys the user ``fixed`` with ``--set`` (``base`` holds their values); the first member is ``base``
    itself."""
    values = {key: value for key, value in member.overrides.items() if key not in fixed}
    if member.seed_offset:
        values["seed"] = base.seed + member.seed_offset
    if epochs is not None:
        values["train.epochs"] = epochs
    if first and not values:
        return base
    return with_values(base, {**values, "experiment": base.experiment if first else f"{base.experiment}-{member.name}"})


def protections(report: dict, base: Config, fixed: frozenset) -> tuple[Config, list[dict]]:
    """``base`` with the EDA's advice that keeps the CV honest applied, and a record of each (what, why, how to
    turn it off): (near-)duplicate train images kept in one fold, and a column that looks like a group (a user or
    patient id) used as ``data.group_col``. A key the user set with ``--set`` is left as set."""
    values, applied = {}, []
    groups = report.get("duplicates", {}).get("any", {}).get("within_train", {}).get("groups", 0)
    if groups and not base.folds.group_duplicates and "folds.group_duplicates" not in fixed:
        values["folds.group_duplicates"] = True
        values["folds.duplicates_csv"] = str(ReportDir.of(base).duplicate_groups)  # the first member's EDA
        applied.append({"set": "folds.group_duplicates=true", "off": "--set folds.group_duplicates=false",
                        "why": f"{groups} groups of (near-)duplicate train images: each kept in one fold"})
    candidates = report.get("group_candidates") or []
    if candidates and not base.data.group_col and "data.group_col" not in fixed:
        column = candidates[0]["column"]
        values["data.group_col"] = column
        applied.append({"set": f"data.group_col={column}", "off": "--set data.group_col=null",
                        "why": f"train.csv's {column} looks like a group ({candidates[0]['values']} values, "
                               f"{candidates[0]['rows_per_value']} rows each): its rows kept in one fold"})
    for item in applied:
        log.info("plan: %s (%s; %s to turn it off)", item["set"], item["why"], item["off"])
    return (with_values(base, values) if values else base), applied


# how the plan combines its members: hill climbing, each member re-tempered first
# (a label-smoothed fine-tune is under-confident, a logistic regression over-confident: tempered, each counts by what
# it gets right, not by its confidence)
ENSEMBLE = {"ensemble.method": "hill_climb", "ensemble.temper_members": True}


def final_config(first: Config, others: list[Config]) -> Config:
    """The ensemble, results and submission config in the first member's folder: every finished member,
    combined as :data:`ENSEMBLE` when there are several."""
    if not others:
        return first
    return with_values(first, {"ensemble.members": [str(c.run_dir) for c in others], **ENSEMBLE})


def overrides_of(base: Config, cfg: Config) -> dict:
    """The dotted keys where ``cfg`` differs from ``base`` (what the member changes)."""
    ours, theirs = _flat(to_dict(cfg)), _flat(to_dict(base))
    return {key: value for key, value in ours.items() if theirs.get(key) != value and key != "experiment"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
