"""The config's sections: one typed, frozen dataclass per YAML section (``data``, ``folds``, ``model``, ``augment``,
``train``, ``infer``, ``ensemble``, ``submit``, ``eda``, ``search``), each with its defaults and the checks that
span its keys. :mod:`pipeline.core.config` assembles them into a :class:`~pipeline.core.config.Config` and loads
YAML into it."""
from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional, Union

from pipeline.core.limits import (FRACTION, NON_NEGATIVE, POSITIVE, ConfigError, Limit,  # noqa: F401 - re-exported
                                 check_limits)


@dataclass(frozen=True)
class DataConfig:
    SECTION: ClassVar[str] = "data"
    LIMITS: ClassVar[dict[str, Limit]] = {
        "image_size": POSITIVE, "crop_pct": Limit(0, 1, low_open=True), "subset": POSITIVE,
        "subset_seed": NON_NEGATIVE, "num_workers": NON_NEGATIVE, "device_memory_fraction": Limit(0, 1, low_open=True),
        "max_pixels": POSITIVE}
    root: str = "data/demo"  # the competition folder; any config can be pointed elsewhere with --set data.root=
    train_csv: str = "train.csv"
    id_col: str = "id"
    label_col: str = "label"
    group_col: Optional[str] = None
    train_dir: str = "train"
    test_dir: str = "test"
    sample_submission: str = "sample_submission.csv"
    image_size: int = 32  # side of the square images the model sees
    # how a non-square image becomes a square: squash (stretch; small fixed-size images like CIFAR), crop (short
    # side to size, centre square), pad (long side to size, letterboxed)
    resize: Literal["squash", "crop", "pad"] = "squash"
    # the cache stores image_size / crop_pct: training takes random(-resized) crops of image_size from the margin
    # (augment.policy: resized_crop, basic), evaluation and TTA the centre (timm's crop_pct; 1.0: no margin)
    crop_pct: float = 1.0
    cache_dir: str = "cache"
    subset: Optional[int] = None  # keep a fixed stratified random subset of train (e.g. "small CIFAR-10")
    subset_seed: int = 0
    num_workers: int = 0  # DataLoader workers; 0 loads in the training process
    # dataloader: per-image policy in a torch DataLoader; device: the fold's uint8 rows held on the training
    # device, batches sliced and augmented there in one call (pipeline.augment.batched; airbench's way)
    loader: Literal["dataloader", "device"] = "dataloader"
    # device loader: the fold's images may take this share of the device's free memory; larger folds fall back to
    # the DataLoader, streaming from pinned host memory (the rest is left to the model and its activations)
    device_memory_fraction: float = 0.5
    # the text encoding of train.csv and sample_submission.csv (any Python codec name: latin-1, cp1252, …); a UTF-8
    # byte-order mark is skipped. The run folder's own CSVs are always UTF-8
    csv_encoding: str = "utf-8"
    # images with more pixels (width x height) are refused, naming the file, before they are decoded: 64 Mpx is above
    # every common camera sensor (<= 61 Mpx), below Pillow's decompression-bomb warning (89 Mpx), and bounds what one
    # decoding worker holds (~200 MB as RGB). null: Pillow's own limits only (it refuses images over ~179 Mpx)
    max_pixels: Optional[int] = 64_000_000
    # ids, labels and groups that a spreadsheet would read as a formula (they start with =, +, -, @, a tab or a
    # carriage return and are not plain numbers) are refused by the preprocess stage; true lets them through with a
    # warning, written as they are into the run folder's CSVs and the submission (open those in a spreadsheet at
    # your own risk)
    allow_formula_cells: bool = False

    def __post_init__(self) -> None:
        check_limits(self)
        try:
            codecs.lookup(self.csv_encoding)
        except LookupError:
            raise ConfigError(f"data.csv_encoding: unknown encoding {self.csv_encoding!r} (e.g. utf-8, latin-1, "
                              "cp1252)") from None


@dataclass(frozen=True)
class FoldsConfig:
    SECTION: ClassVar[str] = "folds"
    LIMITS: ClassVar[dict[str, Limit]] = {"n_splits": Limit(2), "seed": NON_NEGATIVE}
    n_splits: int = 5
    seed: int = 42
    # keep the EDA's exact/near-duplicate groups (reports/<experiment>/eda/duplicate_groups.csv) inside one
    # fold, so copies of an image never score each other; merged with data.group_col groups when both are set
    group_duplicates: bool = False
    # the duplicate_groups.csv those groups come from (unset: this experiment's EDA); the members of a plan read
    # the EDA of the plan's first member, so that they all split alike
    duplicates_csv: Optional[str] = None

    def __post_init__(self) -> None:
        check_limits(self)


@dataclass(frozen=True)
class ModelConfig:
    SECTION: ClassVar[str] = "model"
    LIMITS: ClassVar[dict[str, Limit]] = {"drop_rate": Limit(0, 1, high_open=True), "whiten_eps": NON_NEGATIVE,
                                         "whiten_bias_epochs": NON_NEGATIVE, "bn_momentum": FRACTION,
                                         "stem_stride": POSITIVE}
    name: str = "resnet18"  # a registered compact model or any timm model name
    # ImageNet weights: shipped with a pip package for efficientnet_lite0 / tf_efficientnet_lite0 (offline),
    # else timm's download (Hugging Face cache)
    pretrained: bool = False
    weights: Optional[str] = None  # a local .safetensors/.pth to start from (any timm model; keys mapped)
    drop_rate: float = 0.0
    # a timm model's classifier begins at zero (logits 0, loss log C): timm's EfficientNet/MobileNet init scales it
    # by 1/sqrt(num_classes), so a new head starts with huge logits (a 2-class one ~±10; MobileNetV2 from scratch on
    # 10 classes: std 5, loss 8), which a pretrained start must unlearn and a start from scratch diverges from
    zero_head: bool = True
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments for the model factory
    # the stride of the network's first convolution; None: the model's own. 1 adapts an ImageNet network to
    # small images (timm's resnet18 at 32 px keeps a 2×2 instead of a 1×1 last feature map), for 4× its MACs
    stem_stride: Optional[int] = None
    # an architecture spec (pipeline/models/arch.py): a YAML path or the mapping inline; setting it sets name: spec
    spec: Optional[Union[str, dict]] = None
    # patch-whitening initialisation of the first conv (airbench): the eigenvectors of the covariance of the
    # fold's training-image patches (normalised as the model sees them), scaled by 1/sqrt(eigenvalue + whiten_eps),
    # as +/- pairs; needs a first conv with an even number of outputs <= 2 x in_channels x k x k
    # (pipeline/models/whiten.py)
    whiten: bool = False
    whiten_eps: float = 5e-4  # airbench's value
    whiten_freeze: bool = True  # keep the whitened filters fixed (airbench); false: they train like any weight
    whiten_bias_epochs: Optional[int] = None  # the whitened conv's bias trains this many epochs (airbench: 3); None: all
    # momentum of every batch-norm layer, in torch's convention (the weight of the new batch's statistics):
    # airbench's 0.6 is Keras-style, i.e. torch momentum 0.4; None keeps each layer's own (torch: 0.1)
    bn_momentum: Optional[float] = None

    def __post_init__(self) -> None:
        check_limits(self)
        if self.spec is not None and self.name != "spec":
            object.__setattr__(self, "name", "spec")


@dataclass(frozen=True)
class AugmentConfig:
    SECTION: ClassVar[str] = "augment"
    LIMITS: ClassVar[dict[str, Limit]] = {
        "n_select": NON_NEGATIVE, "level": NON_NEGATIVE, "n_level": POSITIVE, "mixup_alpha": NON_NEGATIVE,
        "cutmix_alpha": NON_NEGATIVE, "mix_prob": FRACTION, "switch_prob": FRACTION, "sizes": POSITIVE,
        "size_epochs": NON_NEGATIVE}
    policy: str = "basic"  # see pipeline.augment.POLICIES
    # RandAugment (Cubuk et al.): n_select ops per image, magnitude = level / n_level
    n_select: int = 2
    level: int = 14
    n_level: int = 30
    random_magnitude: bool = False
    ops: Optional[list[str]] = None  # None: every op
    # batch-level mixing
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    # progressive resizing: image sizes and the epoch each starts at (e.g. [24, 32] at [0, 10])
    sizes: Optional[list[int]] = None
    size_epochs: Optional[list[int]] = None
    autoaugment_policy: str = "original"  # timm AutoAugment policy: original, originalr, v0, v0r, 3a
    # the policy's horizontal flip: random (p = 0.5) or alternate (airbench: each image flipped in every other
    # epoch; data.loader: device only)
    flip: Literal["random", "alternate"] = "random"

    def __post_init__(self) -> None:
        """Reject values no policy can use, naming the key (op names are checked by the policy)."""
        check_limits(self)
        checks = [
            (self.level <= self.n_level, f"augment.level: must be in [0, n_level={self.n_level}], got {self.level}"),
            (not self.size_epochs or (self.sizes is not None and len(self.size_epochs) == len(self.sizes)),
             f"augment.size_epochs: needs one start epoch per entry of augment.sizes ({self.sizes})"),
            (not self.size_epochs or list(self.size_epochs) == sorted(self.size_epochs),
             f"augment.size_epochs: must be ascending, got {self.size_epochs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class TrainConfig:
    SECTION: ClassVar[str] = "train"
    LIMITS: ClassVar[dict[str, Limit]] = {
        "epochs": POSITIVE, "batch_size": POSITIVE, "lr": POSITIVE, "momentum": FRACTION, "weight_decay": NON_NEGATIVE,
        "label_smoothing": Limit(0, 1, high_open=True), "focal_gamma": NON_NEGATIVE, "class_weights": NON_NEGATIVE,
        "warmup_epochs": NON_NEGATIVE, "min_lr": NON_NEGATIVE, "plateau_patience": NON_NEGATIVE,
        "plateau_factor": Limit(0, 1, low_open=True, high_open=True), "accum_steps": POSITIVE,
        "early_stopping": NON_NEGATIVE, "threads": NON_NEGATIVE, "folds": NON_NEGATIVE, "tune_blocks": POSITIVE,
        "crop_views": NON_NEGATIVE, "min_steps": NON_NEGATIVE, "freeze_epochs": NON_NEGATIVE,
        "backbone_lr_mult": NON_NEGATIVE, "ema_decay": Limit(0, 1, high_open=True), "lookahead_k": NON_NEGATIVE,
        "lookahead_alpha": Limit(0, 1, low_open=True), "head_c": POSITIVE, "head_hidden": POSITIVE,
        "head_steps": POSITIVE, "distill_alpha": FRACTION, "distill_temperature": POSITIVE}
    epochs: int = 10
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    loss: str = "ce"  # see pipeline.training.losses.LOSSES
    label_smoothing: float = 0.1
    focal_gamma: float = 2.0
    class_weights: Optional[Union[Literal["balanced"], list[float]]] = None
    scheduler: str = "cosine"  # see pipeline.training.schedulers.SCHEDULERS
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    plateau_patience: int = 2
    plateau_factor: float = 0.5
    accum_steps: int = 1
    early_stopping: int = 0  # stop after this many epochs without improvement; 0 never stops
    precision: Literal["auto", "bench", "fp32", "bf16", "fp16"] = "auto"  # bench: fastest in runs/<exp>/bench.json
    channels_last: bool = True
    device: str = "auto"
    # repeatable GPU kernels (cuDNN deterministic, torch.use_deterministic_algorithms), slower; false: cuDNN
    # autotuning (benchmark mode). The CPU kernels are repeatable either way
    deterministic: bool = False
    # torch intra-op threads; 0: this machine's usable cores, fixed once per run (runs/<experiment>/threads.json)
    # so that its results do not depend on other jobs (pipeline.core.jobs); a warning names jobs training meanwhile
    threads: int = 0
    folds: Optional[list[int]] = None  # train only these folds (None: all)
    # which epoch's weights a fold keeps: best validation accuracy/loss, or the last epoch. Choosing the epoch
    # on the held-out fold flatters the OOF score a little; "last" keeps it unbiased.
    monitor: Literal["accuracy", "loss", "last"] = "accuracy"
    resume: bool = True  # continue from a fold's last checkpoint when one exists
    # after the CV folds, train one more model on every training row with the same settings and epochs
    # (runs/<experiment>/refit/, resumable, fingerprinted like a fold; it keeps its last epoch): infer predicts the
    # test set with it and the ensemble stage combines it (ensemble.refit); the OOF/CV stay the fold models'
    refit: bool = False
    # finetune: train the whole model per fold; features: embed every image once per TTA view with the frozen
    # pretrained backbone (cached) and fit only a head per fold: minutes on a CPU; partial: cache the frozen early
    # blocks' output once per view and train the last tune_blocks blocks, the head convolution and a classifier
    # per fold on the cache (see pipeline.training.modes; each mode refuses the settings it cannot honour)
    mode: str = "finetune"
    tune_blocks: int = 3  # partial: how many of the backbone's last blocks train (the rest stay frozen, cached)
    # features / partial: extra training views, each a seeded random resized crop (and flip) of every training
    # image, embedded (or cached) once beside the TTA views; 0: the TTA views only
    crop_views: int = 0
    # partial: at least this many optimizer steps per fold (more epochs on small data, where a few epochs are
    # only a few dozen steps); 0: exactly train.epochs
    min_steps: int = 0
    # fine-tuning a pretrained backbone (pipeline/training/finetune.py)
    freeze_epochs: int = 0  # train only the classifier for this many first epochs
    backbone_lr_mult: float = 1.0  # the backbone's learning rate = lr × this
    # the new classifier's start: random (model.zero_head), or linear_probe: a logistic regression fitted on the
    # frozen pretrained features of the fold's training rows (LP-FT, Kumar et al. 2022: fine-tuning from a
    # fitted head distorts the pretrained features less than from a random one; the features are cached)
    head_init: Literal["random", "linear_probe"] = "random"
    ema_decay: float = 0.0  # weight EMA (timm ModelEmaV3, warmed up) evaluated and kept as best; 0: off
    # Lookahead (timm.optim.Lookahead around the optimizer): every lookahead_k steps the slow weights move
    # lookahead_alpha of the way to the fast ones and the fast restart from them; 0: off
    lookahead_k: int = 0
    lookahead_alpha: float = 0.5
    bn: Literal["train", "frozen"] = "train"  # frozen: batch norm keeps pretrained statistics (tiny batches)
    head: str = "logreg"  # features mode: see pipeline.training.features.HEADS
    head_c: float = 1.0  # logreg: inverse L2 strength on standardised features
    head_hidden: int = 256  # mlp: hidden units
    head_steps: int = 300  # mlp: full-batch AdamW steps
    # distillation: a teacher's OOF probabilities (a run folder, an experiment name, or an OOF CSV such as an
    # ensemble's ensemble_oof.csv) mixed with the hard labels, see pipeline.training.distill
    teacher: Optional[str] = None
    distill_alpha: float = 0.5  # weight of the teacher's probabilities in the targets (1 - alpha: the label)
    distill_temperature: float = 1.0  # > 1 softens the teacher's probabilities

    def __post_init__(self) -> None:
        check_limits(self)
        if self.refit and self.scheduler == "plateau":
            raise ConfigError("train.refit: trains a model without held-out rows, so it needs a schedule fixed in "
                              "advance (not plateau)")


@dataclass(frozen=True)
class InferConfig:
    SECTION: ClassVar[str] = "infer"
    LIMITS: ClassVar[dict[str, Limit]] = {"batch_size": POSITIVE}
    # the TTA views, or "auto": from tta_candidates, greedily keep the views that improve the OOF tta_metric
    tta: Union[Literal["auto"], list[str]] = field(default_factory=lambda: ["identity", "hflip"])
    tta_candidates: list[str] = field(default_factory=lambda: [
        "identity", "hflip", "shift_left", "shift_right", "shift_up", "shift_down", "scale_up", "scale_down"])
    tta_metric: Literal["accuracy", "log_loss"] = "accuracy"
    batch_size: int = 512
    oof_tta: bool = True  # score the OOF predictions with the same TTA views
    # the frozen passes of the features and partial modes (embeddings, cached activations): torch, onnxruntime
    # (an exported graph), or auto: the faster of the two on this machine, timed once (pipeline.models.engines)
    engine: Literal["auto", "torch", "onnxruntime"] = "auto"

    def __post_init__(self) -> None:
        check_limits(self)


@dataclass(frozen=True)
class EnsembleConfig:
    SECTION: ClassVar[str] = "ensemble"
    LIMITS: ClassVar[dict[str, Limit]] = {"weights": NON_NEGATIVE, "hill_climb_steps": NON_NEGATIVE, "stack_cs": POSITIVE,
                                         "refit_weight": FRACTION}
    members: list[str] = field(default_factory=list)  # other experiments' run folders; this run is always in
    # an ensemble config: its member experiments' config files (paths from the working directory). `./run.sh full
    # THIS.yaml` runs each member's stages, then this run's ensemble of them; this run is then not a member itself
    member_configs: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None  # soft/hard only: one per experiment, this run first
    method: str = "soft"  # soft, hard, hill_climb, stack (see pipeline.ensemble.ENSEMBLERS)
    metric: Literal["log_loss", "accuracy"] = "log_loss"  # what hill_climb improves on the OOF
    hill_climb_steps: int = 50  # at most this many picks (with replacement) after the best member
    # hill_climb: each member first re-tempered with its own T fitted on the rows the weights are fitted on, so a
    # member left under-confident (label smoothing) is judged by what it knows, not by its confidence
    temper_members: bool = False
    stack_cs: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])  # stack: C chosen by CV
    # temperature: one scalar T fitted on the OOF log loss re-tempers the test probabilities (p ∝ p^(1/T)), for
    # log-loss competitions; labels and accuracy are unchanged (pipeline/evaluation/calibration.py). Needs the OOF
    calibrate: Literal["none", "temperature"] = "none"
    # an experiment trained with train.refit: its refit model's test predictions are used "with" its fold models
    # (refit_weight of the experiment's test probabilities, the folds' mean the rest) or "instead" of them;
    # the OOF scores and fitted weights stay the fold models' (the refit has no held-out rows)
    refit: Literal["with", "instead"] = "with"
    refit_weight: float = 0.5

    def __post_init__(self) -> None:
        check_limits(self)
        if self.weights is not None and not sum(self.weights) > 0:
            raise ConfigError(f"ensemble.weights: at least one must be positive, got {self.weights}")


@dataclass(frozen=True)
class SubmitConfig:
    SECTION: ClassVar[str] = "submit"
    LIMITS: ClassVar[dict[str, Limit]] = {}
    dir: str = "submissions"
    # labels: the label column holds the predicted class; probs: one probability column per class. "auto"
    # follows the sample submission: probs when its columns (after the id) are the classes, else labels
    format: Literal["auto", "labels", "probs"] = "auto"

    def __post_init__(self) -> None:
        check_limits(self)


@dataclass(frozen=True)
class EdaConfig:
    SECTION: ClassVar[str] = "eda"
    LIMITS: ClassVar[dict[str, Limit]] = {"near_dup_threshold": Limit(0, 64), "near_dup_min_corr": Limit(-1, 1),
                                         "samples_per_class": POSITIVE, "max_classes_in_grid": POSITIVE}
    out_dir: str = "reports"
    near_dup_threshold: int = 4  # max Hamming distance between perceptual hashes (64 bits)
    near_dup_min_corr: float = 0.85  # …and min correlation of 16×16 grey thumbnails (drops pHash look-alikes)
    samples_per_class: int = 8
    max_classes_in_grid: int = 20

    def __post_init__(self) -> None:
        check_limits(self)


def _slot_channels() -> list[list[int]]:
    return [[8, 16, 24, 32], [16, 24, 32, 48], [16, 24, 32, 48, 64], [24, 32, 48, 64, 96],
            [32, 48, 64, 96, 128], [48, 64, 96, 128, 160], [64, 96, 128, 160, 256]]


@dataclass(frozen=True)
class ArchSpaceConfig:
    """The architecture space of the search: 7 block slots and a fixed head (pipeline/models/arch.py)."""
    SECTION: ClassVar[str] = "search.arch"
    LIMITS: ClassVar[dict[str, Limit]] = {
        "channels": POSITIVE, "repeats": POSITIVE, "kernels": POSITIVE, "expansions": POSITIVE,
        "width_multipliers": POSITIVE, "depth_multipliers": POSITIVE, "max_downsample": POSITIVE}
    enabled: bool = True  # false: keep model.* as configured (plain hyperparameter search)
    types: list[str] = field(default_factory=lambda: ["Conv", "DWConv", "InvertedResidualv2",
                                                       "InvertedResidualv3", "ConvPool", "Pass"])  # Pass never in slot 1
    pools: list[str] = field(default_factory=lambda: ["avg", "max"])  # the head's global pool
    heads: list[str] = field(default_factory=lambda: ["linear"])  # linear, airnet (bias-free, logits × 1/9)
    channels: list[list[int]] = field(default_factory=_slot_channels)  # output channel choices, one list a slot
    repeats: list[int] = field(default_factory=lambda: [1, 3])  # [low, high]
    kernels: list[int] = field(default_factory=lambda: [3, 5])
    expansions: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0, 6.0])
    width_multipliers: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    depth_multipliers: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    max_downsample: Optional[int] = None  # cap on the product of strides; None: image side // 4

    def __post_init__(self) -> None:
        check_limits(self)
        if not self.channels or len(self.repeats) != 2 or self.repeats[0] > self.repeats[1] \
                or not set(self.types) - {"Pass"}:
            raise ConfigError("search.arch: needs channel lists (one per slot), repeats [low, high] with low <= high "
                              "and a type other than Pass")


@dataclass(frozen=True)
class SearchConfig:
    """The search stage (pipeline/search/): an Optuna study over architectures and any config key."""
    SECTION: ClassVar[str] = "search"
    LIMITS: ClassVar[dict[str, Limit]] = {
        "n_trials": POSITIVE, "timeout": POSITIVE, "trial_timeout": POSITIVE, "seed": NON_NEGATIVE,
        "worker": NON_NEGATIVE, "subsample": POSITIVE, "holdout": Limit(0, 1, low_open=True, high_open=True),
        "epochs": POSITIVE, "prune_dominated": NON_NEGATIVE, "population_size": Limit(2),
        "startup_trials": NON_NEGATIVE, "heartbeat": NON_NEGATIVE, "best_within": NON_NEGATIVE,
        "best_floor": FRACTION, "best_budgets": POSITIVE, "rerank_top": NON_NEGATIVE, "rerank_subsample": POSITIVE}
    n_trials: Optional[int] = 40  # finished trials the study stops at (all workers together); None: no cap
    timeout: Optional[float] = None  # seconds this worker searches (the study time limit)
    trial_timeout: Optional[float] = None  # seconds a trial trains; then it stops and is scored as it is
    sampler: str = "nsga2"  # see pipeline.search.storage.SAMPLERS: nsga2, motpe, random, tpe, cmaes
    pruner: str = "median"  # single objective: none, median, hyperband (per-epoch validation scores)
    seed: int = 0
    worker: int = 0  # this worker's index: its sampler is seeded with seed + worker (workers sharing a study)
    # maximize accuracy or macro_f1; minimize params, macs, latency_ms (1-thread CPU, batch 1)
    objectives: list[str] = field(default_factory=lambda: ["accuracy", "params"])
    constraints: dict = field(default_factory=dict)  # hard upper bounds checked before training: {params: 1e5}
    hv_reference: dict = field(default_factory=dict)  # hypervolume reference per objective (defaults: 0 / bound)
    space: dict = field(default_factory=dict)  # dotted key -> {uniform|log_uniform|int|choice: [...]}
    arch: ArchSpaceConfig = field(default_factory=ArchSpaceConfig)
    subsample: Optional[int] = 5000  # stratified images the trials use (held in memory); None: all
    holdout: float = 0.2  # share of the subsample held out for scoring
    epochs: int = 3
    prune_dominated: int = 3  # multi-objective: stop a trial once this many smaller trials beat it at an epoch
    population_size: int = 16  # nsga2
    startup_trials: int = 8  # tpe/motpe random start
    storage: Optional[str] = None  # Optuna storage URL or a journal file (*.log); default SQLite in search/
    study_name: Optional[str] = None  # default: the experiment name
    heartbeat: int = 30  # seconds; RDB storages mark a silent trial failed after 2 beats and retry it once
    warm_start: Optional[str] = None  # another search folder: its pareto.csv is enqueued first
    # hand-made architectures (spec YAML paths or inline specs, at most one block a slot) enqueued as the study's
    # first trials, e.g. airnet_tiny as ConvPool blocks (configs/specs/): the samplers start from known designs
    seed_specs: list[Any] = field(default_factory=list)
    # models trained like the trials (pareto.png) and exported like best/ (search/chart/): a model name, or a
    # mapping of the settings it trains with, e.g. {model.name: resnet18, model.stem_stride: 1}
    references: list[Union[str, dict]] = field(default_factory=list)
    best_within: float = 0.01  # rule smallest_within: accuracy within this of the most accurate
    best_floor: float = 0.5  # rule smallest_above_floor
    best_budgets: list[int] = field(default_factory=list)  # also most_accurate_under_<N> (params <= N) each
    # multi-fidelity: after the study, retrain the proxy's top rerank_top trials of most_accurate and of each budget
    # (and search.references) at train.epochs on rerank_subsample images; those rules then pick by that score.
    # A few proxy epochs favour models that learn fast. 0: off
    rerank_top: int = 0
    rerank_subsample: Optional[int] = None  # None: every training image (one holdout of search.holdout)
    record_latency: bool = True

    def __post_init__(self) -> None:
        check_limits(self)
