"""Places a run cannot write: a file where ``data.cache_dir`` should be, a read-only run folder, a disk that fills
up during a cache or checkpoint write. Each is one line naming the path and the setting that names the place,
earlier results are kept, and ``plan.json`` never goes on saying a member runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import folds, full, preprocess, train
from pipeline.core.utils import read_json

from conftest import DEFAULT_CONFIG, REPO, config_overrides, make_competition, stage_argv


def mount_tmpfs(path: Path, size: str) -> Path:
    """A fresh tmpfs of ``size`` at ``path`` (unmounted by the caller), or the test skipped where that is not
    allowed (it needs root with CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root with "
                    "CAP_SYS_ADMIN")
    return path


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB disk (tmpfs) at tmp_path/disk."""
    path = mount_tmpfs(tmp_path / "disk", "8m")
    yield path
    unmount(path)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free; the filler file."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_file_at_data_cache_dir_is_one_line_and_the_plan_says_failed(tmp_path, capsys):
    root = make_competition(tmp_path / "comp")
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    sets = [a for t in config_overrides(tmp_path, root) for a in ("--set", t)]
    assert full.main([str(DEFAULT_CONFIG), *sets]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line == (f"error: cannot write {cache}: File exists (a file is in the way of a folder: move it, or point "
                    "data.cache_dir elsewhere)")
    record = read_json(tmp_path / "runs" / "demo" / "plan.json")
    assert record["steps"][0]["status"] == "failed" and "running" not in [s["status"] for s in record["steps"]]
    assert cache.read_text() == "not a folder"


def read_only(folder: Path, tmp_path: Path):
    """Make ``folder`` (holding files already) read-only: a read-only tmpfs copy mounted over it as root (root
    writes through permissions), its permissions otherwise. Returns how to undo it."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return lambda: folder.chmod(0o755)
    keep = tmp_path / "kept"
    subprocess.run(["cp", "-a", str(folder), str(keep)], check=True)
    mount_tmpfs(folder, "1m")
    subprocess.run(["cp", "-a", f"{keep}/.", str(folder)], check=True)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return lambda: unmount(folder)


def test_a_read_only_run_folder_is_one_line_naming_its_lock(tmp_path, capsys):
    root = make_competition(tmp_path / "comp")
    argv = stage_argv(tmp_path, root)
    assert preprocess.main(argv) == 0
    run = tmp_path / "runs" / "demo"
    undo = read_only(run, tmp_path)
    try:
        capsys.readouterr()
        assert folds.main(argv) == 1
        line = one_line_error(capsys.readouterr().err)
    finally:
        undo()
    assert line.startswith(f"error: cannot write {run / '.lock'}: ")
    assert line.endswith("(point runs_dir at a folder you can write)")


def test_a_disk_that_fills_up_during_the_image_cache_write(tmp_path, small_disk):
    """The decoded images are written through a memory map: on a full disk that would kill the process (SIGBUS)
    had the file's space not been taken first."""
    root = make_competition(tmp_path / "comp")
    argv = stage_argv(tmp_path, root, f"data.cache_dir={small_disk}", "data.image_size=64")  # 36 x 12 kB
    filler = fill(small_disk, leave=200 * 1024)
    done = subprocess.run([sys.executable, "-m", "pipeline.preprocess", *argv], capture_output=True, text=True,
                          cwd=REPO)
    assert done.returncode == 1, done.stderr
    line = one_line_error(done.stderr)
    assert line.startswith(f"error: cannot write {small_disk}/train-64px-") and ".npy: No space left on device" in line
    assert line.endswith("(free space there, or point data.cache_dir at another disk)")
    assert [p.name for p in small_disk.iterdir()] == [filler.name]  # no half-written cache left behind


def test_a_disk_that_fills_up_during_a_checkpoint_keeps_earlier_results(tmp_path, small_disk, capsys):
    root = make_competition(tmp_path / "comp")
    argv = stage_argv(tmp_path, root, f"runs_dir={small_disk}")
    assert preprocess.main(argv) == 0 and folds.main(argv) == 0
    run = small_disk / "demo"
    kept = {p: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}  # the stages' results
    filler = fill(small_disk, leave=100 * 1024)  # room for the config and logs, not for a 300 kB checkpoint
    capsys.readouterr()
    assert train.main(argv) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: cannot write {run}/fold0/best.safetensors: No space left on device")
    assert line.endswith("(free space there, or point runs_dir at another disk)")
    assert {p for p, data in kept.items() if p.read_bytes() != data} == set()
    assert not [p for p in run.rglob(".*") if p.is_file() and p.name != ".lock"]  # no temporaries left
    filler.unlink()
    assert train.main(argv) == 0  # space freed: the same command finishes
