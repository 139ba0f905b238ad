"""Augmentation policies, chosen in YAML by name and built through a registry.

A policy works on one uint8 HWC image (what the cache stores) and returns a uint8 HWC image of the same
size; normalisation happens later, on the whole batch. Batch-level mixing (mixup/cutmix) and progressive
resizing also live here, as does ``python -m pipeline.augment --config CFG --preview [--out PNG]``, which
writes a grid of augmented training images from the cache.

One module per concern: ``policies`` (registry, :class:`Policy`, the simple policies), ``randaugment`` (the
op table with its magnitudes), ``mixing`` (mixup/cutmix), ``resize`` (progressive resizing), ``preview``
(the grid and its command line), ``batched`` (whole NCHW tensors on any device, for
``data.loader: device``). Everything public is re-exported here.

Interface used by the train stage (keep it stable):

* ``build_policy(cfg: AugmentConfig, image_size: int, seed=None) -> Policy`` (uint8 HWC → uint8 HWC);
  ``policy.batch(images NHWC uint8)`` augments a whole batch at once: a loader should call it on the
  batch it has gathered, since RandAugment then costs a fraction of the per-image calls (see the bench)
* ``build_mixer(cfg: AugmentConfig, num_classes: int, seed=None) -> Mixer | None`` where
  ``mixer(images: Tensor[N,C,H,W] float, targets: LongTensor[N]) -> (images, soft_targets[N, num_classes])``
* ``size_at_epoch(cfg: AugmentConfig, epoch: int, default: int) -> int`` and
  ``resize_batch(images NCHW, size) -> images`` (progressive resizing from the one cached size)
* ``preview_grid(images NHWC uint8, cfg, image_size, n=32, seed=0) -> HWC uint8``

Policies (``augment.policy``): ``none``; ``basic`` (flip, shift/scale/rotate, pad-and-crop); ``flip_crop``
(flip, reflect-pad-and-crop by size/16: airbench's); ``resized_crop``
(random-resized crop + flip, for photos cached with a margin);
``randaugment`` (below); ``autoaugment`` (timm's AutoAugment, ``augment.autoaugment_policy`` picks
``original``/``v0``/``3a``…) and ``trivialaugment`` (timm's RandAugment with one op per image at a magnitude
drawn uniformly up to the maximum, applied always: TrivialAugment's recipe). Albumentations 2.0 has neither
of the last two; timm's operate on PIL images and are wrapped to take and return uint8 HWC arrays.

RandAugment's op table, with each op's magnitude range, is documented in :mod:`pipeline.augment.randaugment`.
"""
from .batched import BATCHED_OPS, BATCHED_POLICIES, BatchAugment, BatchedRandAugment
from .mixing import Mixer, build_mixer
from .policies import FILL, POLICIES, PilTransform, Policy, build_policy
from .preview import main, preview_grid, run
from .randaugment import RANDAUGMENT_OPS, Op, RandAugment, build_op, randaugment_ops
from .resize import resize_batch, size_at_epoch

__all__ = ["BATCHED_OPS", "BATCHED_POLICIES", "BatchAugment", "BatchedRandAugment", "FILL", "POLICIES", "Mixer", "Op", "PilTransform", "Policy", "RANDAUGMENT_OPS", "RandAugment",
           "build_mixer", "build_op", "build_policy", "main", "preview_grid", "randaugment_ops", "resize_batch",
           "run", "size_at_epoch"]
