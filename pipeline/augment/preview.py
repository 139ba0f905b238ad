"""``python -m pipeline.augment --config CFG --preview [--out PNG]``: a grid of augmented training images
from the cache (after the policy and the mixer)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.cli import build_parser, stage_main
from pipeline.core.config import AugmentConfig, Config
from pipeline.rundir import RunDir, load_split
from pipeline.augment.mixing import build_mixer
from pipeline.augment.policies import build_policy

log = logging.getLogger("pipeline.augment")


def preview_grid(images: np.ndarray, cfg: AugmentConfig, image_size: int, n: int = 32, seed: int = 0,
                 mix: bool = True, min_cell: int = 96) -> np.ndarray:
    """A grid (HWC uint8) of ``n`` random training images after the policy (and the mixer when ``mix``).

    Cells are upscaled (nearest) to at least ``min_cell`` pixels so small images stay visible.
    """
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))
    policy = build_policy(cfg, image_size, seed=seed)
    batch = np.stack([policy(np.ascontiguousarray(images[i])) for i in picks])
    mixer = build_mixer(cfg, 1, seed=seed) if mix else None
    if mixer is not None:
        tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
        mixed, _ = mixer(tensor, torch.zeros(len(batch), dtype=torch.long))
        batch = mixed.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return _tile(batch, max(1, math.ceil(min_cell / batch.shape[1])))


def _tile(batch: np.ndarray, scale: int, pad: int = 2) -> np.ndarray:
    """Lay an NHWC uint8 batch out on a near-square grid, each cell upscaled ``scale``×."""
    batch = batch.repeat(scale, axis=1).repeat(scale, axis=2)
    if batch.shape[-1] == 1:
        batch = batch.repeat(3, axis=-1)
    count, h, w, c = batch.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k, image in enumerate(batch):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = image
    return grid


def run(cfg: Config, out: Optional[str | Path] = None, n: int = 32) -> Path:
    """Write the preview grid of augmented training images (from the uint8 cache) to a PNG."""
    images, _ = load_split(cfg.run_dir, "train")
    grid = preview_grid(images, cfg.augment, cfg.data.image_size, n=n, seed=cfg.seed)
    out = Path(out) if out else RunDir.of(cfg).augment_preview
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out)
    log.info("augmentation preview (%s, %d images) written to %s", cfg.augment.policy, n, out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser("Preview the augmentation policy on training images from the cache.")
    parser.add_argument("--preview", action="store_true", help="write a PNG grid of augmented samples")
    parser.add_argument("--out", default=None, help="PNG path (default runs/<experiment>/augment_preview.png)")
    parser.add_argument("-n", type=int, default=32, help="number of images in the grid")
    args, _ = parser.parse_known_args(argv)

    def preview(cfg: Config) -> Any:
        if not args.preview:
            log.info("policy %s: %r (pass --preview to write a grid)", cfg.augment.policy,
                     build_policy(cfg.augment, cfg.data.image_size).transform)
            return None
        return run(cfg, args.out, args.n)

    preview.__module__ = "pipeline.augment"  # the run-folder lock names the stage "augment"
    return stage_main(preview, "augment preview", argv, parser)
