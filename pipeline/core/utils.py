"""Shared helpers: atomic writes, JSON, seeding, logging, devices and precision."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

log = logging.getLogger("pipeline")


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.

    An interrupted or failing write therefore never leaves a half-written file nor loses the old one. A write
    that fails on a read-only folder or a full disk raises ``OSError`` naming ``path`` (:func:`write_error`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    except OSError as err:
        raise OSError(err.errno, err.strerror, str(path)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as err:
        named = write_error(err, path, tmp_path)
        if named is None:
            raise
        raise named from err
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


FULL_DISK_BYTES = 1 << 20  # a write that fails with less room than this left on its disk failed for want of room


def write_error(err: Exception, path: Path, tmp: Path) -> Optional[OSError]:
    """What a failed write of ``path`` (through the temporary ``tmp``) raises instead of ``err``, or None to raise
    ``err`` as it is: an ``OSError`` naming ``path`` where ``err`` names no file or the temporary, and a full disk
    (ENOSPC) where the disk has no room left, whatever the writer raised (torch and safetensors raise their own
    errors, numpy an ``OSError`` without a number)."""
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, err.strerror, str(path)) if err.filename in (None, str(tmp)) else None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if disk_full(path.parent) else None


def disk_full(folder: str | Path) -> bool:
    """Whether the disk holding ``folder`` has less than :data:`FULL_DISK_BYTES` left (False when unknown)."""
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < FULL_DISK_BYTES


def reserve_space(path: Path) -> None:
    """Allocate the whole file at ``path`` on its disk now: stores into a memory-mapped file that a full disk
    cannot hold kill the process (SIGBUS); this raises ``OSError`` (no space left) instead, before any is made."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system that cannot: the write will tell
            raise OSError(err.errno, err.strerror, str(path)) from None
    finally:
        os.close(fd)


# atomic_path's temporaries: "." + the target's name + "." + mkstemp's 8 random characters + the target's suffix
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\.[^.]*)?")


def temporary_target(name: str) -> Optional[str]:
    """The file name a temporary of :func:`atomic_path` called ``name`` was to replace, or None when ``name`` is
    not such a temporary (a write killed halfway leaves one behind)."""
    match = _TEMPORARY.fullmatch(name)
    if match is None or (match["suffix"] or "") != Path(match["name"]).suffix:
        return None
    return match["name"]


def hide_password(url: str) -> str:
    """``url`` with its password replaced by ``***`` (SQLAlchemy URLs); anything else (a journal file's path) as
    it is. What is written to a file, a log or the screen goes through this."""
    from sqlalchemy.engine import make_url  # heavy and needed only for a storage URL
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not a URL, or one SQLAlchemy cannot parse: mask what looks like one
        return re.sub(r"^([A-Za-z0-9+.-]+://[^:/@]*):.*@", r"\1:***@", url)
    return url if parsed.password is None else parsed.render_as_string(hide_password=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def write_csv(path: str | Path, frame: "pd.DataFrame") -> None:  # noqa: F821
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_backends(deterministic: bool) -> None:
    """cuDNN autotuning (the fastest kernels for the fixed training shapes), or, with ``train.deterministic``,
    repeatable kernels: cuDNN's deterministic algorithms and torch's deterministic mode (an op with no
    deterministic form warns, naming itself). Process-wide: set by every stage that trains."""
    import torch

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it before its first call
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the root logger once (entry points only; library code just logs)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")


def resolve_device(name: str = "auto") -> "torch.device":  # noqa: F821
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matrix units (AMX or AVX512-BF16), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" amx_bf16", " avx512_bf16"))


def resolve_precision(precision: str, device: "torch.device") -> "torch.dtype | None":  # noqa: F821
    """The autocast dtype for ``precision`` on ``device`` (None: plain fp32)."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def device_name(device: "torch.device") -> str:  # noqa: F821
    """The GPU's name, or the CPU's model and core count (what ``pipeline.bench`` records its figures under)."""
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return f"cpu: {names[0] if names else platform.machine()} ({os.cpu_count()} cores)"


def autocast(device: "torch.device", dtype: "torch.dtype | None"):  # noqa: F821
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context for plain fp32 (``dtype`` None)."""
    import torch

    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def try_lock(path: Path, info: dict) -> "int | None":
    """An open descriptor holding an exclusive ``flock`` on ``path`` (``info`` written into it), or None if held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


def holder(path: Path) -> dict:
    """What the process holding a lock file wrote into it ({} when unreadable)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
