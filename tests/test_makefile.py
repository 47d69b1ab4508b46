"""`make setup`'s bubblewrap step, run with stand-in `id`, `apt-get` and `bwrap` on PATH: it
installs bubblewrap when it can, names the command when it cannot, and never fails."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAKE = shutil.which("make")
pytestmark = pytest.mark.skipif(MAKE is None, reason="needs make")


def fake_bin(folder: Path, uid: int, apt: str | None, bwrap: bool = False) -> Path:
    """A PATH folder with `id -u` printing `uid` and, unless `apt` is None, an `apt-get`
    that logs its arguments to folder/apt.log and behaves as `apt` says: "ok" installs,
    "fails" always fails, "stale" fails to install until `apt-get update` has run."""
    bin_ = folder / "bin"
    bin_.mkdir()
    scripts = {"id": f"#!/bin/sh\necho {uid}\n"}
    if apt is not None:
        log, updated = folder / "apt.log", folder / "updated"
        scripts["apt-get"] = (
            f'#!/bin/sh\necho "$*" >> {log}\n'
            f'case "$1" in update) : > {updated}; exit 0;; esac\n'
            f'case {apt} in ok) exit 0;; fails) exit 100;; esac\n'
            f'[ -e {updated} ]\n'
        )
    if bwrap:
        scripts["bwrap"] = "#!/bin/sh\nexit 0\n"
    for name, text in scripts.items():
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    return bin_


def make_bubblewrap(tmp_path: Path, **fake) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `make bubblewrap` (the step `make setup` runs) with only the stand-ins on PATH;
    (the result, the apt-get calls)."""
    bin_ = fake_bin(tmp_path, **fake)
    done = subprocess.run([MAKE, "-s", "-C", str(REPO), "bubblewrap"], env={"PATH": str(bin_)},
                          capture_output=True, text=True, timeout=60)
    log = tmp_path / "apt.log"
    return done, log.read_text().splitlines() if log.exists() else []


def test_setup_runs_the_bubblewrap_step():
    rules = subprocess.run([MAKE, "-pn", "-C", str(REPO), "setup"], capture_output=True,
                           text=True, timeout=60).stdout
    setup = next(line for line in rules.splitlines() if line.startswith("setup:"))
    assert "bubblewrap" in setup.split(":", 1)[1].split()


def test_root_with_apt_installs_bubblewrap(tmp_path):
    done, calls = make_bubblewrap(tmp_path, uid=0, apt="ok")
    assert done.returncode == 0
    assert calls == ["install -y -q bubblewrap"]


def test_root_with_stale_package_lists_updates_them_and_installs(tmp_path):
    done, calls = make_bubblewrap(tmp_path, uid=0, apt="stale")
    assert done.returncode == 0
    assert calls == ["install -y -q bubblewrap", "update -q", "install -y -q bubblewrap"]
    assert "bubblewrap is missing" not in done.stdout


def test_a_user_is_told_the_one_command_to_run(tmp_path):
    done, calls = make_bubblewrap(tmp_path, uid=1000, apt="ok")
    assert done.returncode == 0 and calls == []
    assert done.stdout.strip().endswith("install it with: sudo apt-get install -y bubblewrap")


def test_a_failed_install_does_not_fail_setup(tmp_path):
    done, calls = make_bubblewrap(tmp_path, uid=0, apt="fails")
    assert done.returncode == 0 and calls[0] == "install -y -q bubblewrap"
    assert done.stdout.strip().endswith("install it with: apt-get install -y bubblewrap")


def test_an_installed_bubblewrap_is_left_alone(tmp_path):
    done, calls = make_bubblewrap(tmp_path, uid=0, apt="ok", bwrap=True)
    assert done.returncode == 0 and calls == [] and done.stdout == ""
