"""Escape attempts, each run inside the sandbox: none may have effect outside the world, and
the harness must keep working after each."""

import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from sekft.errors import SandboxError
from sekft.sandbox import (
    Limits,
    Sandbox,
    find_bwrap,
    make_world,
    warn_no_sandbox,
)
from sekft.shell import Shell, child_pids

pytestmark = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")


@pytest.fixture
def box():
    with Sandbox.create(limits=Limits(processes=64, file_bytes=1024**2)) as sandbox:
        yield sandbox


def run(box, command, timeout=5.0):
    with Shell(box, kill_grace=3.0) as sh:
        result = sh.run(command, timeout=timeout)
        after = sh.run("echo still here", timeout=5)
    assert after.output == b"still here\r\n", "the harness stopped working"
    return result


def test_rm_rf_root_leaves_the_harness_files_intact(box):
    run(box, "rm -rf --no-preserve-root / 2>/dev/null; echo done", timeout=10)
    assert (box.harness / "bin" / "panic").is_file()
    assert Path("/usr/bin/bash").exists()


def test_writes_to_etc_and_usr_fail(box):
    passwd = (box.harness / "etc" / "passwd").read_text()
    result = run(box, "touch /etc/sekft-pwned /usr/bin/sekft-pwned; echo x >> /etc/passwd")
    refusals = result.output.count(b"Read-only file system") + result.output.count(b"denied")
    assert refusals == 3 and (box.harness / "etc" / "passwd").read_text() == passwd
    assert not Path("/etc/sekft-pwned").exists() and not Path("/usr/bin/sekft-pwned").exists()


def test_shadow_root_and_host_tmp_are_not_there(box, tmp_path):
    (tmp_path / "host-secret").write_text("s3cret")
    result = run(box, f"cat /etc/shadow; ls /root; cat {tmp_path}/host-secret")
    assert result.output.count(b"No such file or directory") == 3
    assert b"s3cret" not in result.output and b"root:" not in result.output


def test_world_is_writable_and_lands_in_the_host_world_folder(box):
    run(box, "echo hi > ~/a; echo t > /tmp/b; mkdir -p /usr/local/bin; echo m > /var/mail/user")
    world = box.world
    assert (world / "home" / "a").read_text() == "hi\n"
    assert (world / "tmp" / "b").read_text() == "t\n"
    assert (world / "mail" / "user").read_text() == "m\n"


def test_no_network_not_even_host_loopback(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    command = (f"python3 -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 2)\""
               f" 2>&1 | tail -1; echo > /dev/tcp/127.0.0.1/{port}; "
               f"command -v curl >/dev/null && curl -s -m 2 http://127.0.0.1:{port}/; echo rc=$?")
    result = run(box, command)
    # A connection that got through would be waiting in the listen backlog by now.
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()
    assert b"Connection refused" in result.output or b"Network is unreachable" in result.output


def test_fork_bomb_is_contained_and_killed_with_the_sandbox():
    # A small process limit: the machine running the tests has other work to do.
    with Sandbox.create(limits=Limits(processes=12)) as box:
        with Shell(box, kill_grace=3.0) as sh:
            sh.run(":(){ :|:& };:", timeout=1)
            assert sh.run("ulimit -u", timeout=5).output.endswith(b"12\r\n")
            # Builtins only: the shell cannot fork while the bomb holds every process slot.
            count = sh.run("n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; echo $n", timeout=5)
            assert int(count.output.split()[-1]) <= 12 + 1  # + bubblewrap's init
            namespace = os.readlink(f"/proc/{child_pids(sh.child.pid)[0]}/ns/pid")
        assert _wait_until_empty(namespace)
        with Shell(box, kill_grace=3.0) as sh:
            assert sh.run("echo fresh", timeout=5).output == b"fresh\r\n"


def _wait_until_empty(namespace, seconds=5.0):
    """Whether no live process is left in pid `namespace` within `seconds` (the kernel tears
    a namespace down asynchronously)."""
    deadline = time.monotonic() + seconds
    while _members(namespace) and time.monotonic() < deadline:
        time.sleep(0.05)
    return _members(namespace) == 0


def _members(namespace):
    count = 0
    for link in Path("/proc").glob("[0-9]*/ns/pid"):
        try:
            count += os.readlink(link) == namespace
        except OSError:
            continue
    return count


def test_huge_file_is_stopped_at_the_file_size_limit(box):
    result = run(box, "head -c 10G /dev/zero > ~/big; fallocate -l 10G ~/big2; echo rc=$?")
    assert result.output.count(b"File too large") == 2
    assert (box.world / "home" / "big").stat().st_size <= 1024**2


def test_killing_parents_and_everything_does_not_reach_the_harness(box):
    with Shell(box, kill_grace=3.0) as sh:
        sh.run("kill -9 $PPID; kill -9 1", timeout=5)
        assert sh.run("echo alive", timeout=5).output == b"alive\r\n"
        assert b"No such process" in sh.run("kill -9 -1", timeout=5).output
        assert sh.run("kill -9 $$", timeout=5).ended
    assert os.getppid() > 0
    with Shell(box, kill_grace=3.0) as sh:
        assert sh.run("ls /proc | grep -c '^[0-9]'", timeout=5).output.strip().isdigit()


def test_only_sandbox_processes_are_visible(box):
    result = run(box, "ps -e -o comm= | sort -u | tr '\\n' ' '")
    assert b"pytest" not in result.output and b"python" not in result.output


def test_no_sandbox_refuses_when_bwrap_is_missing(monkeypatch, tmp_path):
    import sekft.sandbox as sandbox

    monkeypatch.setattr(sandbox, "find_bwrap", lambda: None)
    with pytest.raises(SandboxError, match="--no-sandbox"):
        Sandbox.create()


def test_files_mirror_the_world(tmp_path):
    files = tmp_path / "files"
    (files / "local" / "bin").mkdir(parents=True)
    (files / "local" / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (files / "local" / "bin" / "tool").chmod(0o755)
    make_world(tmp_path / "world", files)
    assert os.access(tmp_path / "world" / "local" / "bin" / "tool", os.X_OK)
    assert (tmp_path / "world" / "motd").is_file()


def test_without_sandbox_the_shell_lives_in_the_world_folder():
    with Sandbox.create(sandbox=False) as box, Shell(box, kill_grace=3.0) as sh:
        result = sh.run("echo $HOME; touch here", timeout=5)
        assert result.output == f"{box.world / 'home'}\r\n".encode()
        assert (box.world / "home" / "here").exists()


def test_no_sandbox_warning_is_loud(capsys):
    warn_no_sandbox()
    assert "UNCONFINED" in capsys.readouterr().err


def test_bubblewraps_command_line_does_not_show_the_host_path_of_the_world(box):
    result = run(box, "tr '\\0' ' ' < /proc/1/cmdline; echo; tr '\\0' ' ' < /proc/1/environ")
    assert b"bwrap" in result.output and b"--uid" not in result.output
    assert str(box.root).encode() not in result.output


def test_the_worlds_total_size_is_capped_and_none_of_it_lands_on_the_host_disk():
    limits = Limits(file_bytes=2 * 1024**2, disk_bytes=4 * 1024**2)
    with Sandbox.create(limits=limits) as box, Shell(box, kill_grace=3.0) as sh:
        result = sh.run("for i in 1 2 3 4; do head -c 1500K /dev/zero > ~/f$i; done; "
                        "head -c 1M /dev/zero > /tmp/t; panic 'the disk is full'", timeout=10)
        assert result.output.count(b"No space left on device") >= 2
        # The episode goes on: the shell answers, and panic still found room for its record.
        assert result.panic_reason == "the disk is full"
        assert sh.run("echo still here", timeout=5).output == b"still here\r\n"
        written = sum(p.stat().st_size for p in box.world.rglob("*") if p.is_file())
        assert 3 * 1024**2 < written <= 4 * 1024**2
        on_host = sum(p.stat().st_size for p in box.root.rglob("*") if p.is_file())
        assert on_host < 1024**2


def test_the_worlds_keeper_dies_with_the_harness():
    import subprocess
    import sys

    code = ("import os; from sekft.sandbox import Sandbox; box = Sandbox.create(); "
            "print(box.keeper_pid, box.root, flush=True); os._exit(0)")
    harness = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    pid, root = harness.stdout.decode().split()
    shutil.rmtree(root)
    keeper = int(pid)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{keeper}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{keeper}").exists()
