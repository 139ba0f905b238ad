"""The CI script: Chromium is installed with apt-get when no browser is on PATH (so the EDA and results pages are
checked in a real browser), left alone when one is, and a failed or impossible install never fails the run."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from conftest import REPO

BROWSER_SCRIPT = REPO / ".ci" / "browser"


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{shutil.which('bash')}\n{body}\n")
    path.chmod(0o755)


def browser_script(tmp_path: Path, uid: int = 0, apt_status: int = 0, browser: str = "") -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run .ci/browser with only stubs on PATH: ``id -u`` says ``uid``, apt-get logs its arguments, says a line and
    exits ``apt_status`` (making ``chromium`` when it installs successfully), ``browser`` is already there.
    Returns the run and apt-get's calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "apt-calls"
    bin_dir.mkdir(parents=True)
    stub(bin_dir, "id", f"echo {uid}")
    stub(bin_dir, "apt-get", f'echo "$*" >> {calls}\necho "E: stub apt-get says {apt_status}"\n'
                             f'if [ "$1" = install ] && [ {apt_status} = 0 ]; then printf "#!/bin/sh\\n" > {bin_dir}/chromium; '
                             f'chmod +x {bin_dir}/chromium; fi\nexit {apt_status}')
    for tool in ("tail", "rm", "chmod", "printf"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))
    if browser:
        stub(bin_dir, browser, "exit 0")
    done = subprocess.run([shutil.which("bash"), str(BROWSER_SCRIPT)], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(bin_dir), "TMPDIR": str(tmp_path)})
    return done, calls.read_text().splitlines() if calls.is_file() else []


def test_ci_installs_the_browser_before_the_tests():
    steps = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert steps.index(".ci/browser") < steps.index("./run.sh test")
    assert os.access(BROWSER_SCRIPT, os.X_OK)


def test_chromium_is_installed_when_absent(tmp_path):
    done, calls = browser_script(tmp_path)
    assert done.returncode == 0 and calls == ["update -qq", "install -y -qq --no-install-recommends chromium"]
    assert done.stderr.splitlines() == ["ci: installing Chromium with apt-get for the browser checks",
                                        "ci: Chromium installed"]
    assert list(tmp_path.glob("ci-chromium-*.log")) == []  # apt-get's output kept quiet, then removed


def test_a_browser_on_path_is_left_alone(tmp_path):
    for name in ("chromium", "chromium-browser", "google-chrome"):
        done, calls = browser_script(tmp_path / name, browser=name)
        assert done.returncode == 0 and calls == [] and done.stderr == ""


def test_a_failed_install_says_so_and_does_not_fail_ci(tmp_path):
    done, calls = browser_script(tmp_path, apt_status=100)
    assert done.returncode == 0 and calls == ["update -qq"]
    assert "ci: Chromium could not be installed, the browser checks will be skipped; apt-get said:" in done.stderr
    assert "E: stub apt-get says 100" in done.stderr


def test_without_root_nothing_is_installed(tmp_path):
    done, calls = browser_script(tmp_path, uid=1000)
    assert done.returncode == 0 and calls == []
    assert "no root apt-get to install it: the browser checks will be skipped" in done.stderr
