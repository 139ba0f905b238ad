"""Random-number-generator states as plain data, so that a checkpoint can restore every stream exactly.

What Lightning and the Hugging Face Trainer save with a resumable checkpoint (python, numpy, torch and CUDA
global states), plus the private generators this pipeline seeds per fold: the loader's ``torch.Generator``,
the augmentation policy's (albumentations transforms, RandAugment, timm's wrapped policies) and the mixer's.
Everything returned is made of dicts, tuples, ints, strings and tensors, so ``torch.load(weights_only=True)``
reads it back.

:func:`collect` finds the generators inside any object (walking its attributes, lists and dicts); an object
with lazily created generators defines ``rng_state()`` / ``load_rng_state(state)`` itself (RandAugment does).
"""
from __future__ import annotations

import random
import types
from typing import Any

import numpy as np
import torch

_LEAVES = (str, bytes, int, float, bool, type(None), np.ndarray, torch.Tensor, torch.nn.Module, type,
           types.FunctionType, types.MethodType, types.BuiltinFunctionType, types.ModuleType)


def generator_state(gen: Any) -> dict:
    """The state of one generator (python ``Random``, numpy ``Generator``/``RandomState``, ``torch.Generator``)."""
    if isinstance(gen, random.Random):
        return {"kind": "python", "state": gen.getstate()}
    if isinstance(gen, np.random.Generator):
        return {"kind": "numpy", "state": gen.bit_generator.state}
    if isinstance(gen, np.random.RandomState):
        return {"kind": "legacy", "state": _legacy_state(gen.get_state(legacy=False))}
    if isinstance(gen, torch.Generator):
        return {"kind": "torch", "state": gen.get_state()}
    raise TypeError(f"not a random generator: {type(gen).__name__}")


def set_generator_state(gen: Any, state: dict) -> None:
    if state["kind"] == "python":
        gen.setstate(state["state"])
    elif state["kind"] == "numpy":
        gen.bit_generator.state = state["state"]
    elif state["kind"] == "legacy":
        gen.set_state(_legacy_state(state["state"], back=True))
    else:
        gen.set_state(state["state"])


def _legacy_state(state: dict, back: bool = False) -> dict:
    """MT19937's key array as a tensor (and back): numpy arrays are not weights_only-loadable."""
    key = state["state"]["key"]
    key = key.numpy().astype(np.uint32) if back else torch.from_numpy(key.astype(np.int64))
    return {**state, "state": {**state["state"], "key": key}}


def _is_generator(obj: Any) -> bool:
    return isinstance(obj, (random.Random, np.random.Generator, np.random.RandomState, torch.Generator))


def _children(obj: Any) -> list[tuple[str, Any]]:
    if isinstance(obj, (list, tuple)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        return [(f"[{k!r}]", obj[k]) for k in sorted(obj, key=repr)]
    if isinstance(obj, _LEAVES) or not hasattr(obj, "__dict__"):
        return []
    return [(f".{k}", v) for k, v in vars(obj).items()]


def _walk(obj: Any, path: str, seen: set[int], depth: int):
    """(path, object) for every generator or ``rng_state`` owner reachable from ``obj``, in a fixed order."""
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if _is_generator(obj) or (depth > 0 and callable(getattr(obj, "rng_state", None))):
        yield path, obj
        return
    for name, child in _children(obj):
        yield from _walk(child, path + name, seen, depth + 1)


def collect(obj: Any) -> dict[str, Any]:
    """Every generator state inside ``obj``, keyed by attribute path (``.transform.transforms[0].py_random``)."""
    if obj is None:
        return {}
    if callable(getattr(obj, "rng_state", None)):
        return {"": {"kind": "custom", "state": obj.rng_state()}}
    return {path: ({"kind": "custom", "state": o.rng_state()} if not _is_generator(o) else generator_state(o))
            for path, o in _walk(obj, "", set(), 0)}


def restore(obj: Any, states: dict[str, Any]) -> None:
    """Put back what :func:`collect` returned for an object built the same way; a missing path is an error."""
    if obj is None or not states:
        return
    if "" in states:
        obj.load_rng_state(states[""]["state"])
        return
    found = dict(_walk(obj, "", set(), 0))
    missing = sorted(set(states) - set(found))
    if missing:
        raise ValueError(f"random state for {missing[:3]} has no generator to go to (the object changed)")
    for path, state in states.items():
        target = found[path]
        target.load_rng_state(state["state"]) if state["kind"] == "custom" else set_generator_state(target, state)


def global_state() -> dict:
    """The process-wide streams: python ``random``, numpy's global, torch CPU (and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": _legacy_state(np.random.get_state(legacy=False)),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(_legacy_state(state["numpy"], back=True))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
