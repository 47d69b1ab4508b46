"""The resident server: protocol, queue, failure handling and the base staying untouched.

Most tests run the server in a thread of the test process with stand-in job runners, so
they exercise the socket, the queue and the worker without training anything; the tests at
the end run the real trainer and evaluator on a tiny base.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sekft import eval as sekft_eval
from sekft import resident, sft
from sekft.errors import ConfigError, DataError, ResidentError
from sekft.sandbox import find_bwrap

REPO = Path(__file__).resolve().parent.parent
# The eval jobs below run episodes in the sandbox; the rest of this file needs no bubblewrap.
needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")


@pytest.fixture
def socket_path():
    # sun_path holds 107 bytes; pytest's tmp_path can be longer than that.
    with tempfile.TemporaryDirectory(prefix="sekft-", dir="/tmp") as folder:
        yield Path(folder) / "r.sock"


class Gate:
    """Lets a test hold a stand-in job mid-run and release it when it chooses."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()


def stand_in_train(gate: Gate | None = None):
    """A runner shaped like the real one: `--data` must exist; it reports three steps,
    waits at `gate` after the first, and stops early when asked."""

    def run(base, args, report, stop):
        data = Path(args[args.index("--data") + 1])
        if not data.is_dir():
            raise DataError(f"{data}: no such folder; pass --data a folder of *.jsonl")
        for step in range(1, 4):
            report(f"step {step}/3", step=step)
            if gate is not None and step == 1:
                gate.entered.set()
                while not gate.release.wait(0.01) and not stop.is_set():
                    pass
            if stop.is_set():
                return {"stopped_at": step}
        return {"summary": f"trained on {data}", "steps": 3, "base": base}

    return run


def stand_in_eval(base, args, report, stop):
    report("episode 1/1")
    return {"base": base}


@pytest.fixture
def serve(socket_path):
    """Start a server in a thread; returns (resident, loads) where loads counts loader calls."""
    started = []

    def start(gate: Gate | None = None):
        loads = []
        server = resident.start(
            "tiny",
            lambda: loads.append(1) or "the-base",
            {"train": stand_in_train(gate), "eval": stand_in_eval},
            socket_path,
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server, loads

    yield start
    for server, thread in started:
        server.begin_shutdown("test over")
        thread.join(60)


def connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(path))
    conn.settimeout(120)
    return conn


def read_events(conn: socket.socket | io.BufferedReader) -> list[dict]:
    """Read reply lines up to and including the terminal event.

    Pass the reader already reading a connection, not the connection: a second reader would
    miss the lines the first one buffered (the terminal event among them, on a busy machine).
    """
    events = []
    with conn.makefile("rb") if isinstance(conn, socket.socket) else conn as reader:
        for line in reader:
            events.append(json.loads(line))
            if events[-1]["event"] in resident.TERMINAL_EVENTS:
                break
    return events


def ask(path: Path, req: dict) -> list[dict]:
    return list(resident.request(path, req))


def train_request(data: Path, *extra: str, detach: bool = False) -> dict:
    args = ["--data", str(data), "--out", "out", *extra]
    return {"op": "train", "args": args, "cwd": "/tmp", "detach": detach}


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


# --- requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, field",
    [
        (b"\xff\xfe garbage\n", "not a JSON line"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"op": "finetune"}\n', "field 'op'"),
        (b'{"op": "cancel", "job": "3"}\n', "field 'job'"),
        (b'{"op": "train", "args": "--data d"}\n', "field 'args'"),
        (b'{"op": "train", "args": [], "cwd": "rel"}\n', "field 'cwd'"),
    ],
)
def test_parse_request_names_what_is_wrong(line, field):
    with pytest.raises(ResidentError, match=field):
        resident.parse_request(line)


def test_parse_request_refuses_a_job_that_sets_the_base():
    line = b'{"op": "train", "args": ["--base=other", "--data", "d"], "cwd": "/"}\n'
    with pytest.raises(ResidentError, match="--base is set by the server"):
        resident.parse_request(line)


def test_parse_request_refuses_a_recipe_the_server_would_misread():
    line = b'{"op": "eval", "args": ["--config", "r.toml"], "cwd": "/"}\n'
    with pytest.raises(ResidentError, match="--config recipes are not taken"):
        resident.parse_request(line)


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("abbreviation", ["--bas=other", "--load-4", "--dev=cpu"])
def test_job_options_refuse_an_abbreviated_server_option(command, abbreviation):
    if command == "train":
        parse, job = sft.config_from_args, ["--data", "d", "--out", "o"]
    else:
        parse, job = sekft_eval.parse_args, ["--scenarios", "s", "--out", "o"]
    server = ["--base", "served", "--device", "cpu", "--dtype", "float32"]
    with pytest.raises(ConfigError, match=f"unrecognized arguments: {abbreviation}"):
        resident.parse_job_options(parse, [abbreviation, *job, *server], f"sekft-{command}")


def test_resolve_paths_makes_path_options_absolute_against_cwd():
    args = ["--data", "d", "--out=o", "--lr", "1e-4", "--adapter", "/abs/a"]
    resolved = resident.resolve_paths(args, "/work")
    assert resolved == ["--data", "/work/d", "--out=/work/o", "--lr", "1e-4", "--adapter", "/abs/a"]


def test_default_socket_lives_in_the_users_runtime_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert resident.default_socket_path() == tmp_path / "sekft" / "resident.sock"


def test_private_dir_refuses_a_folder_others_can_enter(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    with pytest.raises(ResidentError, match="mode 0700"):
        resident.private_dir(folder)


def test_base_checksum_sees_a_changed_base_weight_but_not_lora_weights():
    import torch
    from torch import nn

    model = nn.Module()
    model.proj = nn.Linear(4, 4)
    model.lora_A = nn.Linear(4, 2, bias=False)
    before = resident.base_checksum(model)
    with torch.no_grad():
        model.lora_A.weight.add_(1.0)
        assert resident.base_checksum(model) == before
        model.proj.weight[0, 0] += 1e-6
    assert resident.base_checksum(model) != before


# --- the server answers and carries on --------------------------------------------------


def test_socket_is_private_to_its_user(serve, socket_path):
    serve()
    assert socket_path.stat().st_mode & 0o777 == 0o600


def test_garbage_on_the_socket_gets_an_error_and_the_connection_keeps_serving(serve, socket_path):
    serve()
    with connect(socket_path) as conn:
        conn.sendall(b"\x00\x01\xffnot json at all\n")
        conn.sendall(b'{"op": "status"}\n')
        reader = conn.makefile("rb")
        first, second = json.loads(reader.readline()), json.loads(reader.readline())
    assert first["event"] == "error" and "not a JSON line" in first["message"]
    assert second["event"] == "status"


def test_truncated_json_line_is_answered_and_the_server_carries_on(serve, socket_path):
    serve()
    with connect(socket_path) as conn:
        conn.sendall(b'{"op": "sta')
        conn.shutdown(socket.SHUT_WR)
        (reply,) = read_events(conn)
    assert reply["event"] == "error" and "not ended by" in reply["message"]
    assert ask(socket_path, {"op": "status"})[-1]["event"] == "status"


def test_unknown_job_type_gets_an_error_naming_the_field(serve, socket_path):
    serve()
    (reply,) = ask(socket_path, {"op": "finetune", "args": []})
    assert reply["event"] == "error" and "field 'op'" in reply["message"]


def test_failing_job_reports_its_error_and_the_next_job_runs(serve, socket_path, tmp_path):
    serve()
    failed = ask(socket_path, train_request(tmp_path / "missing"))
    assert failed[-1]["event"] == "error"
    assert failed[-1]["error"] == "DataError" and "missing: no such folder" in failed[-1]["message"]
    assert ask(socket_path, train_request(tmp_path))[-1]["event"] == "result"


def test_job_reply_streams_queued_started_progress_then_result(serve, socket_path, tmp_path):
    serve()
    events = ask(socket_path, train_request(tmp_path))
    kinds = [e["event"] for e in events]
    assert kinds == ["queued", "started", "progress", "progress", "progress", "result"]
    assert [e["line"] for e in events if e["event"] == "progress"] == [
        "step 1/3",
        "step 2/3",
        "step 3/3",
    ]
    assert {e["job"] for e in events} == {1}


def test_relative_paths_in_a_job_resolve_against_the_clients_cwd(serve, socket_path, tmp_path):
    serve()
    (tmp_path / "data").mkdir()
    req = {"op": "train", "args": ["--data", "data"], "cwd": str(tmp_path)}
    assert ask(socket_path, req)[-1]["result"]["summary"] == f"trained on {tmp_path / 'data'}"


def test_base_is_loaded_once_for_many_jobs(serve, socket_path, tmp_path):
    server, loads = serve()
    for _ in range(3):
        assert ask(socket_path, train_request(tmp_path))[-1]["result"]["base"] == "the-base"
    assert ask(socket_path, {"op": "eval", "args": []})[-1]["event"] == "result"
    assert loads == [1]
    assert ask(socket_path, {"op": "status"})[-1]["base_loads"] == 1


def test_client_killed_mid_job_does_not_kill_the_job(serve, socket_path, tmp_path):
    gate = Gate()
    server, _ = serve(gate)
    client = subprocess.Popen(
        [sys.executable, "-m", "sekft.resident", "submit", "train", "--socket", str(socket_path)]
        + ["--data", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert gate.entered.wait(60)
    client.kill()
    client.wait()
    gate.release.set()
    events = ask(socket_path, {"op": "watch", "job": 1})
    assert events[-1]["event"] == "result" and events[-1]["result"]["steps"] == 3


def test_status_shows_running_queued_and_finished_jobs(serve, socket_path, tmp_path):
    gate = Gate()
    serve(gate)
    ask(socket_path, train_request(tmp_path / "missing"))
    ask(socket_path, train_request(tmp_path, detach=True))
    assert gate.entered.wait(60)
    ask(socket_path, train_request(tmp_path, detach=True))
    (status,) = ask(socket_path, {"op": "status"})
    gate.release.set()
    assert status["running"]["job"] == 2
    assert [j["job"] for j in status["queued"]] == [3]
    assert [(j["job"], j["state"]) for j in status["finished"]] == [(1, "failed")]


def test_detached_submit_returns_at_once_and_watch_follows_the_job(serve, socket_path, tmp_path):
    gate = Gate()
    serve(gate)
    reply = ask(socket_path, train_request(tmp_path, detach=True))
    assert [e["event"] for e in reply] == ["queued", "ok"]
    gate.release.set()
    assert ask(socket_path, {"op": "watch", "job": 1})[-1]["event"] == "result"


def test_cancel_drops_a_queued_job(serve, socket_path, tmp_path):
    gate = Gate()
    serve(gate)
    ask(socket_path, train_request(tmp_path, detach=True))
    ask(socket_path, train_request(tmp_path, detach=True))
    assert ask(socket_path, {"op": "cancel", "job": 2})[-1]["event"] == "ok"
    gate.release.set()
    assert ask(socket_path, {"op": "watch", "job": 2})[-1]["event"] == "cancelled"
    assert ask(socket_path, {"op": "watch", "job": 1})[-1]["event"] == "result"


def test_cancel_stops_a_running_job_at_its_next_step(serve, socket_path, tmp_path):
    gate = Gate()
    serve(gate)
    ask(socket_path, train_request(tmp_path, detach=True))
    assert gate.entered.wait(60)
    ask(socket_path, {"op": "cancel", "job": 1})
    final = ask(socket_path, {"op": "watch", "job": 1})[-1]
    assert final["event"] == "cancelled" and final["result"] == {"stopped_at": 1}


def test_cancel_of_an_unknown_job_is_an_error(serve, socket_path):
    serve()
    (reply,) = ask(socket_path, {"op": "cancel", "job": 42})
    assert reply["event"] == "error" and "no job 42" in reply["message"]


def test_shutdown_stops_the_running_job_cancels_the_queue_and_removes_the_socket(
    serve, socket_path, tmp_path
):
    gate = Gate()
    server, _ = serve(gate)
    ask(socket_path, train_request(tmp_path, detach=True))
    ask(socket_path, train_request(tmp_path, detach=True))
    assert gate.entered.wait(60)
    assert ask(socket_path, {"op": "shutdown"})[-1]["event"] == "ok"
    assert [server.jobs[1].state, server.jobs[2].state] == ["cancelled", "cancelled"]
    assert not socket_path.exists()


def test_shutdown_answers_before_the_server_process_exits(socket_path):
    script = f"""
from pathlib import Path
from sekft import eval as sekft_eval
from sekft import resident, sft
server = resident.start("tiny", lambda: "base", {{}}, Path({str(socket_path)!r}))
server.serve_forever()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        wait_for(lambda: socket_path.exists() or proc.poll() is not None)
        assert resident.main(["shutdown", "--socket", str(socket_path)]) == 0
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not socket_path.exists()


# --- one server per socket --------------------------------------------------------------


def test_second_server_on_the_same_socket_is_refused_before_loading(serve, socket_path):
    serve()
    loads = []
    with pytest.raises(ResidentError, match=r"already serving here; stop it with"):
        resident.start("tiny", lambda: loads.append(1), {}, socket_path)
    assert loads == []
    assert ask(socket_path, {"op": "status"})[-1]["event"] == "status"


def test_stale_socket_of_a_dead_server_is_replaced(socket_path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(socket_path))
    dead.close()
    server = resident.start("tiny", lambda: "base", {}, socket_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    assert ask(socket_path, {"op": "status"})[-1]["base"] == "tiny"
    server.begin_shutdown("test over")
    thread.join(60)


def test_client_without_a_server_says_how_to_start_one(socket_path):
    with pytest.raises(ResidentError, match="no resident server at .*sekft-resident serve"):
        ask(socket_path, {"op": "status"})


# --- the command line -------------------------------------------------------------------


def test_submit_prints_progress_lines_then_the_result(serve, socket_path, tmp_path, capsys):
    serve()
    argv = ["submit", "train", "--socket", str(socket_path), "--data", str(tmp_path)]
    assert resident.main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == ["step 1/3", "step 2/3", "step 3/3", f"trained on {tmp_path}"]


def test_submit_of_a_failing_job_prints_one_line_and_exits_1(serve, socket_path, tmp_path, capsys):
    serve()
    argv = ["submit", "train", "--socket", str(socket_path), "--data", str(tmp_path / "nope")]
    assert resident.main(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("sekft-resident: error: job 1: DataError: ")


def test_uncaught_bug_in_a_job_is_reported_and_the_server_carries_on(socket_path, tmp_path):
    def broken(base, args, report, stop):
        raise ZeroDivisionError("division by zero")

    server = resident.start(
        "tiny", lambda: "b", {"train": broken, "eval": stand_in_eval}, socket_path
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        failed = ask(socket_path, {"op": "train", "args": []})[-1]
        assert failed["error"] == "ZeroDivisionError" and "internal" in failed["message"]
        assert ask(socket_path, {"op": "eval", "args": []})[-1]["event"] == "result"
    finally:
        server.begin_shutdown("test over")
        thread.join(60)


# --- the real trainer on a tiny base ------------------------------------------------------

# LoRA dropout off: a cold `sekft-eval` attaches the adapter's layers in training mode, so
# with dropout its greedy replies would not be reproducible.
TRAIN = ["--max-steps", "2", "--batch-tokens", "128", "--max-len", "96", "--val-fraction", "0"]
TRAIN += ["--dropout", "0"]
SCENARIOS = REPO / "tests" / "fixtures" / "scenarios"
EVAL = ["--scenarios", str(SCENARIOS), "--split", "all", "--max-new-tokens", "8"]


def write_sessions(folder: Path, n: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "sessions.jsonl", "w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": "user@box:~$ "},
                {"role": "assistant", "content": f"ls -la /home/user{i}"},
                {"role": "user", "content": "total 12\nuser@box:~$ "},
                {"role": "assistant", "content": "exit"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return folder


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def job_sequence(tiny_llama, tmp_path_factory):
    """Six jobs through one real server on the tiny llama: train (seed 1), train (seed 2),
    a train job on a missing data folder, an eval of the second adapter with --baseline,
    then two more trains. Records what the tests below check: base loads, base checksums,
    each job's terminal event, the eval job's progress events."""
    import sekft.base
    import sekft.sft

    work = tmp_path_factory.mktemp("resident")
    write_sessions(work / "data")
    loads = []
    real_load_base = sekft.base.load_base

    def counted_load_base(*args, **kwargs):
        loads.append(args)
        return real_load_base(*args, **kwargs)

    with (
        pytest.MonkeyPatch.context() as patch,
        tempfile.TemporaryDirectory(prefix="sekft-", dir="/tmp") as folder,
    ):
        # Wherever a job could load a base from: the loader module and the trainer's import.
        patch.setattr(sekft.base, "load_base", counted_load_base)
        patch.setattr(sekft.sft, "load_base", counted_load_base)
        path = Path(folder) / "r.sock"
        server = resident.start(
            "tiny",
            lambda: resident.load_resident(str(tiny_llama), False, "cpu", "float32"),
            {"train": resident.train_job, "eval": resident.eval_job},
            path,
        )
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        before = resident.base_checksum(server.base.base.model)

        def train(out: str, *extra: str) -> dict:
            req = {"op": "train", "args": ["--data", "data", "--out", out, *TRAIN, *extra]}
            return ask(path, dict(req, cwd=str(work)))[-1]

        eval_args = ["--adapter", "a2", *EVAL, "--baseline", "--out", "eval"]
        evaluate = {"op": "eval", "args": eval_args, "cwd": str(work)}
        finals = [train("a1", "--seed", "1"), train("a2", "--seed", "2"),
                  train("a3", "--data", "missing")]
        evaluated = ask(path, evaluate)
        finals += [evaluated[-1], *(train(f"a{n}", "--seed", str(n)) for n in (5, 6))]
        after = resident.base_checksum(server.base.base.model)
        server.begin_shutdown("test over")
        thread.join(30)
    return {"work": work, "loads": len(loads), "before": before, "after": after, "finals": finals,
            "eval_progress": [e for e in evaluated if e["event"] == "progress"]}


@needs_bwrap
def test_real_jobs_run_one_after_another_on_the_resident_base(job_sequence):
    kinds = [f["event"] for f in job_sequence["finals"]]
    assert kinds == ["result", "result", "error", "result", "result", "result"]
    assert set(job_sequence["finals"][3]["result"]["runs"]) == {"adapter", "base"}


def test_base_is_loaded_once_across_all_jobs(job_sequence):
    assert job_sequence["loads"] == 1


def test_base_weights_are_bitwise_unchanged_after_all_jobs(job_sequence):
    assert job_sequence["before"] == job_sequence["after"]


def test_job_for_a_missing_data_folder_reports_a_data_error(job_sequence):
    failed = job_sequence["finals"][2]
    assert failed["error"] == "DataError" and "missing" in failed["message"]


def test_resident_adapter_equals_a_cold_sekft_train_with_the_same_seed(job_sequence, tiny_llama):
    from sekft import sft

    work = job_sequence["work"]
    argv = ["--base", str(tiny_llama), "--data", str(work / "data"), "--out", str(work / "cold")]
    assert sft.main([*argv, *TRAIN, "--seed", "2"]) == 0
    resident_adapter, cold = adapter_tensors(work / "a2"), adapter_tensors(work / "cold")
    assert resident_adapter.keys() == cold.keys()
    for name, tensor in cold.items():
        assert torch_equal(resident_adapter[name], tensor), name
    config = json.loads((work / "a2" / "adapter_config.json").read_text())
    assert config == json.loads((work / "cold" / "adapter_config.json").read_text())


def test_different_seeds_give_different_adapters(job_sequence):
    # Guards the test above: equal adapters must come from the seed, not from training
    # doing nothing.
    work = job_sequence["work"]
    a1, a2 = adapter_tensors(work / "a1"), adapter_tensors(work / "a2")
    assert any(not torch_equal(a1[name], a2[name]) for name in a1)


@needs_bwrap
def test_resident_eval_gives_the_transcripts_of_a_cold_sekft_eval(job_sequence, tiny_llama):
    from sekft import eval as sekft_eval

    work = job_sequence["work"]
    argv = ["--base", str(tiny_llama), "--adapter", str(work / "a2"), *EVAL]
    assert sekft_eval.main([*argv, "--out", str(work / "cold-eval")]) == 0

    def adapter_episodes(folder: Path) -> list:
        records = [json.loads(line) for line in (folder / "transcripts.jsonl").open()]
        return [r["messages"] for r in records if r["run"] == "adapter"]

    resident_episodes = adapter_episodes(work / "eval")
    cold_episodes = adapter_episodes(work / "cold-eval")
    assert len(resident_episodes) == len(cold_episodes) == 2
    # The model's replies must agree for as long as what it was shown agrees: the shell's
    # output itself is not deterministic (a pipeline's stages write errors in either order).
    compared = 0
    for ours_episode, cold_episode in zip(resident_episodes, cold_episodes, strict=True):
        for ours, theirs in zip(ours_episode, cold_episode, strict=False):
            if ours["role"] == "user" and ours != theirs:
                break
            assert ours == theirs
            compared += ours["role"] == "assistant"
    assert compared >= 2


@needs_bwrap
def test_resident_eval_streams_the_progress_line_of_a_cold_sekft_eval(job_sequence):
    progress = job_sequence["eval_progress"]
    assert [(e["done"], e["total"]) for e in progress] == [(n, 4) for n in range(1, 5)]
    assert {e["run"] for e in progress} == {"adapter", "base"}
    assert progress[-1]["line"].startswith("episode 4/4  adapter pass ")
    assert " base pass " in progress[-1]["line"]


def test_memory_after_five_jobs_is_within_a_few_percent_of_after_one(job_sequence):
    first, fifth = job_sequence["finals"][0]["memory"], job_sequence["finals"][4]["memory"]
    assert fifth["live_tensors"] == first["live_tensors"]
    assert fifth["rss_bytes"] <= 1.05 * first["rss_bytes"]
    assert fifth["peak_rss_bytes"] <= 1.05 * first["peak_rss_bytes"]


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_sigterm_lets_the_training_job_checkpoint_then_the_server_exits(tiny_llama, tmp_path):
    write_sessions(tmp_path / "data")
    with tempfile.TemporaryDirectory(prefix="sekft-", dir="/tmp") as folder:
        path = Path(folder) / "r.sock"
        server = subprocess.Popen(
            [sys.executable, "-m", "sekft.resident", "serve", "--base", str(tiny_llama)]
            + ["--socket", str(path)],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(lambda: path.exists() or server.poll() is not None, timeout=120)
            # Many tiny steps: the job is mid-run when SIGTERM arrives.
            args = ["--data", "data", "--out", "run", "--max-len", "96"]
            args += ["--max-steps", "10000", "--batch-tokens", "64"]
            with connect(path) as conn:
                conn.settimeout(120)
                req = {"op": "train", "args": args, "cwd": str(tmp_path)}
                conn.sendall((json.dumps(req) + "\n").encode())
                reader = conn.makefile("rb")
                event = {}
                while not event.get("line", "").startswith("step 1/"):
                    event = json.loads(reader.readline())
                    assert event["event"] not in resident.TERMINAL_EVENTS, event
                server.send_signal(signal.SIGTERM)
                final = read_events(reader)[-1]
            assert server.wait(60) == 0, server.stderr.read()
            assert not path.exists()
        finally:
            if server.poll() is None:  # a failed assertion must not leave it running
                server.kill()
                server.wait()
    assert final["event"] == "cancelled" and "SIGTERM" in final["reason"]
    step = final["result"]["steps"]
    assert final["result"]["interrupted"] and step < 10000
    assert (tmp_path / "run" / f"checkpoint-{step}" / "adapter_model.safetensors").exists()


def test_four_bit_base_stays_bitwise_unchanged_across_train_jobs(tiny_llama, tmp_path):
    data = write_sessions(tmp_path / "data")
    hot = resident.load_resident(str(tiny_llama), True, "cpu", "float32")
    before = resident.base_checksum(hot.base.model)
    for seed in ("1", "2"):
        args = ["--data", str(data), "--out", str(tmp_path / seed), *TRAIN, "--seed", seed]
        result = resident.train_job(hot, args, lambda line, **fields: None, threading.Event())
        assert result["steps"] == 2
    assert resident.base_checksum(hot.base.model) == before
