"""Data-parallel training under torchrun, on the CPU with gloo: the step is the one-process
step at any world size, resume is exact, rank 0 alone writes, a lost rank ends the others."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_sft import write_sessions

from sekft import sft
from sekft.distributed import Group, share
from sekft.sandbox import find_bwrap
from sekft.sft import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
# Bounds a run that should take seconds: a hang fails the test instead of stalling the suite.
LIMIT = 240
needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")


# ---------------------------------------------------------------- splitting a step


@given(st.lists(st.integers(1, 2048), min_size=1, max_size=12), st.integers(1, 5))
def test_share_is_the_step_in_global_order_split_into_consecutive_runs(rows, world):
    shares = [share(rows, world, rank) for rank in range(world)]
    assert [i for s in shares for i in s] == list(range(len(rows)))


@given(st.lists(st.integers(1, 2048), min_size=1, max_size=12), st.integers(2, 5))
def test_share_balances_tokens_as_well_as_any_cut_between_two_ranks(rows, world):
    heaviest = max(sum(rows[i] for i in share(rows, 2, r)) for r in range(2))
    best = min(max(sum(rows[:c]), sum(rows[c:])) for c in range(len(rows) + 1))
    assert heaviest == best


def test_share_leaves_a_rank_empty_when_a_step_has_fewer_rows_than_ranks():
    assert [share([500], 2, r) for r in range(2)] == [[0], []]
    assert [share([100, 100, 100, 100], 2, r) for r in range(2)] == [[0, 1], [2, 3]]


def test_each_rank_trains_on_the_gpu_of_its_local_rank():
    second = Group(rank=3, world=4, local_rank=1)
    assert second.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert second.device(torch.device("cuda", 0)) == torch.device("cuda", 0)  # asked for
    assert second.device(torch.device("cpu")) == torch.device("cpu")
    assert Group().device(torch.device("cuda")) == torch.device("cuda")


# ---------------------------------------------------------------- running ranks


def config(tiny: Path, tmp_path: Path, **overrides) -> TrainConfig:
    """Steps of three or four packed rows (split 2 + 1 or 2 + 2), with dropout on."""
    data = tmp_path / "data.jsonl"
    if not data.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        write_sessions(data, 24, turns=(1, 2))
    fields = dict(
        data=str(data), base=str(tiny), out=str(tmp_path / "out"), r=4, alpha=8.0,
        dropout=0.1, lr=5e-3, max_len=300, batch_tokens=1000, val_fraction=0.1, device="cpu",
        dtype="float32", max_steps=4, save_every=2, dist_timeout=60.0,
    )  # fmt: skip
    fields.update(overrides)
    return TrainConfig(**fields)


def cli(cfg: TrainConfig) -> list[str]:
    """`cfg` as sekft-train options (the rank spelt --lora-r, as torchrun needs)."""
    args = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        flag = "--lora-r" if f.name == "r" else "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args += [flag] if value else []
        elif f.name == "template_var":  # repeatable: the flag before each value
            args += [a for item in value for a in (flag, item)]
        elif isinstance(value, list):
            args += [flag, *value]
        elif value != "":
            args += [flag, str(value)]
    return args


def torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS`, with `env` added to the environment."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *args]
    return subprocess.run(cmd, env=dict(ENV, **env), capture_output=True, text=True,
                          timeout=LIMIT)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(out) / "adapter_model.safetensors")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").open()]


# Run by torchrun: like `-m sekft.sft`, except that rank 0 asks to stop after step STOP_AT,
# as Ctrl-C does (the loop saves and returns once all ranks agree).
STOPPER = """
import os, sys, threading
from sekft import distributed, sft
cfg = sft.config_from_args(sys.argv[1:])
stop = threading.Event()
def report(line, **fields):
    if fields.get("step") == int(os.environ["STOP_AT"]):
        stop.set()
with distributed.process_group(cfg.device, cfg.dist_timeout):
    result = sft.train(cfg, stop=stop, report=report)
# One write per rank: both ranks share the pipe, and print() may split its line.
os.write(1, f"stopped after step {result.steps}\\n".encode())
"""

# Rank 1 runs with --out mounted read-only: any file it wrote there would fail the run.
READ_ONLY_OUT_FOR_OTHER_RANKS = """#!/bin/sh
if [ "$RANK" != 0 ]; then
    exec bwrap --dev-bind / / --ro-bind "$OUT" "$OUT" "$PYTHON" -m sekft.sft "$@"
fi
exec "$PYTHON" -m sekft.sft "$@"
"""


@pytest.fixture(scope="module")
def runs(tiny_llama, tmp_path_factory):
    """One process, and two ranks with --grad-ckpt (rank 1 seeing --out read-only), on the
    same data and seed."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = config(tiny_llama, tmp / "one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(cfg)
    finally:
        torch.set_num_threads(threads)
    two = dataclasses.replace(cfg, out=str(tmp / "two"), grad_ckpt=True)
    Path(two.out).mkdir()
    if find_bwrap() is None:
        done = torchrun(["-m", "sekft.sft", *cli(two)])
    else:
        wrapper = tmp / "rank0-writes.sh"
        wrapper.write_text(READ_ONLY_OUT_FOR_OTHER_RANKS)
        done = torchrun(["--no-python", "sh", str(wrapper), *cli(two)], OUT=two.out,
                        PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr[-3000:]
    return cfg, Path(one.out), Path(two.out), done


def test_every_step_has_rows_for_both_ranks_and_three_to_sum(runs):
    cfg = runs[0]
    _, template, tokenizer = sft._template_and_tokenizer(cfg, None)
    lengths = [len(e) for e in sft.prepare_data(cfg, template, tokenizer).train]
    # Three rows or more: one rank sums two, so the order of the sums differs from one
    # process's (two rows would sum alike either way).
    assert min(len(step) for step in sft.plan_run(lengths, cfg)) >= 3


def test_two_ranks_with_grad_ckpt_train_the_adapter_one_process_trains(runs):
    _, one, two, _ = runs
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys()
    assert any(t.abs().max() > 1e-3 for k, t in a.items() if "lora_B" in k)  # it trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_two_ranks_log_the_loss_curve_of_one_process(runs):
    _, one, two, _ = runs
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3, 4]
    # grad_norm too: Adam's update hardly changes if the gradients are scaled (averaged by
    # the world size, say), their norm does.
    for key in ("loss", "grad_norm", "trained_tokens", "tokens", "lr"):
        assert [m[key] for m in m2] == pytest.approx([m[key] for m in m1], rel=1e-5), key
    assert m2[-1]["val_loss"] == pytest.approx(m1[-1]["val_loss"], rel=1e-5)


@needs_bwrap
def test_only_rank_0_writes_files_and_prints_progress(runs):
    _, _, two, done = runs  # rank 1 ran with --out read-only, and the run succeeded
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert done.stderr.count("step 4/4") == 1 and done.stderr.count("sekft-train: done") == 1
    assert "data-parallel over 2 ranks" in done.stderr


def test_a_resumed_two_rank_run_equals_an_uninterrupted_one(runs, tmp_path):
    cfg, _, straight, _ = runs
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "out"), grad_ckpt=True)
    script = tmp_path / "stopper.py"
    script.write_text(STOPPER)
    first = torchrun([str(script), *cli(cfg)], STOP_AT="1")
    # Rank 0 alone is asked to stop, after step 1; both ranks stop there.
    assert first.stdout.count("stopped after step 1") == 2, first.stderr[-3000:]
    resumed = torchrun(["-m", "sekft.sft", *cli(cfg), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = adapter(straight), adapter(cfg.out)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["step"] for m in metrics(cfg.out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_one_process_run_resumed_on_two_ranks_continues_the_same_steps(runs, tmp_path):
    cfg, one, _, _ = runs
    cfg = dataclasses.replace(cfg, out=str(tmp_path / "out"))
    stop = threading.Event()

    def stop_after_two(line, **fields):
        if fields.get("step") == 2:
            stop.set()

    assert train(cfg, stop=stop, report=stop_after_two).steps == 2
    resumed = torchrun(["-m", "sekft.sft", *cli(cfg), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "saved by 1 rank(s), this run has 2: it continues the same global steps" in (
        resumed.stderr)
    a, b = adapter(one), adapter(cfg.out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_torchrun_saves_a_checkpoint_every_rank_agrees_on(tiny_llama, tmp_path, sig):
    cfg = config(tiny_llama, tmp_path, max_steps=10_000, save_every=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "sekft.sft", *cli(cfg)]
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if line.startswith("step 2/"):
                proc.send_signal(sig)
                break
        err = proc.stderr.read()
        proc.wait(timeout=LIMIT)
    finally:
        proc.kill()
    step = int(err.split("stopped at step ")[1].split("/")[0])
    assert (Path(cfg.out) / f"checkpoint-{step}" / "trainer_state.json").exists()
    assert [m["step"] for m in metrics(cfg.out)][-1] == step


# ---------------------------------------------------------------- a rank that dies

# Rank 1 sends itself SIGNAL when the second step starts (in the trained-token count).
DIER = """
import os, signal, sys
from sekft import distributed, sft
real = distributed.Group.sum_count
calls = []
def sum_count(self, n):
    calls.append(n)
    if self.rank == 1 and len(calls) == 2:
        print("dying", flush=True)
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL"]))
    return real(self, n)
distributed.Group.sum_count = sum_count
sys.exit(sft.main())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_by_hand(script: Path, cfg: TrainConfig, sig: str) -> list[subprocess.Popen]:
    """Two ranks started as torchrun would, but without its agent (which would stop the
    survivors itself): the survivors must end on their own."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, SIGNAL=sig)
        procs.append(subprocess.Popen([sys.executable, str(script), *cli(cfg)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    return procs


def test_a_killed_rank_ends_the_other_with_one_line_not_a_hang(tiny_llama, tmp_path):
    cfg = config(tiny_llama, tmp_path, max_steps=3)
    script = tmp_path / "dier.py"
    script.write_text(DIER)
    survivor, dying = _ranks_by_hand(script, cfg, "SIGKILL")
    try:
        _, err = survivor.communicate(timeout=LIMIT)
        dying.wait(timeout=LIMIT)
    finally:
        survivor.kill()
        dying.kill()
    assert dying.returncode == -signal.SIGKILL
    assert survivor.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("sekft-train: error: rank 0 of 2: lost the other ranks"), err
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_stalled_rank_ends_the_other_after_the_timeout(tiny_llama, tmp_path):
    cfg = config(tiny_llama, tmp_path, max_steps=3, dist_timeout=5.0)
    script = tmp_path / "dier.py"
    script.write_text(DIER)
    survivor, stalled = _ranks_by_hand(script, cfg, "SIGSTOP")
    try:
        _, err = survivor.communicate(timeout=LIMIT)
    finally:
        survivor.kill()
        stalled.kill()
        stalled.wait()
    assert survivor.returncode == 1
    assert "lost the other ranks" in err and "Timed out" in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_torchrun_ends_when_a_rank_is_killed(tiny_llama, tmp_path):
    cfg = config(tiny_llama, tmp_path, max_steps=3)
    script = tmp_path / "dier.py"
    script.write_text(DIER)
    done = torchrun([str(script), *cli(cfg)], SIGNAL="SIGKILL")
    assert done.returncode != 0 and "dying" in done.stdout
    assert "sekft-train: done" not in done.stderr


def test_the_cli_maps_every_field_for_torchrun():
    cfg = TrainConfig(data="d", base="b", out="o", r=8, targets=["q_proj"], grad_ckpt=True)
    assert sft.config_from_args(cli(cfg)) == cfg
