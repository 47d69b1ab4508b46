"""Evaluation fanned out: over several servers (--endpoint URL1,URL2), and split into shards
(--shard I/N) merged back by `sekft-eval merge`."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sekft.errors import ConfigError
from sekft.eval import Episode, main, write_outputs
from sekft.evalshard import parse_shard, select_shard
from sekft.sandbox import find_bwrap

FIXTURES = Path(__file__).parent / "fixtures" / "scenarios"
needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
SCRIPT = ["cat TODO", "echo ok > done", "exit"]


@given(st.integers(0, 20), st.integers(1, 6))
def test_shards_partition_the_suite_in_order(n, count):
    items = list(range(n))
    shards = [select_shard(items, i, count) for i in range(1, count + 1)]
    assert sorted(x for s in shards for x in s) == items
    assert all(s == sorted(s) for s in shards)


@pytest.mark.parametrize("text", ["0/3", "4/3", "3", "a/b", "1/0", "-1/2"])
def test_a_shard_outside_1_to_n_is_refused(text):
    with pytest.raises(ConfigError, match="give I/N"):
        parse_shard(text)


def suite(tmp_path: Path, copies: int = 3) -> Path:
    """`copies` of each fixture scenario under new ids: 2 x copies scenarios, two families."""
    root = tmp_path / "suite"
    for source in FIXTURES.iterdir():
        for k in range(copies):
            folder = shutil.copytree(source, root / f"{source.name}-{k}")
            spec = json.loads((folder / "scenario.json").read_text())
            (folder / "scenario.json").write_text(json.dumps({**spec, "id": folder.name}))
    return root


class _Scripted(BaseHTTPRequestHandler):
    """A chat-completions stand-in replying with SCRIPT's next command line, counting the
    requests each server answers."""

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        turn = sum(m["role"] == "assistant" for m in request["messages"])
        self.server.requests += 1
        reply = SCRIPT[turn] if turn < len(SCRIPT) else "exit"
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}],
                           "usage": {"completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def servers():
    """Two stand-in servers; yields their URLs and servers."""
    started = []
    for _ in range(2):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
        server.requests = 0
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in started], started
    for s in started:
        s.shutdown()


def evaluate(url: str, scenarios: Path, out: Path, *extra: str) -> None:
    assert main(["--endpoint", url, "--model", "m", "--scenarios", str(scenarios),
                 "--out", str(out), *extra]) == 0


def transcripts(out: Path) -> list[dict]:
    """transcripts.jsonl without the wall-clock `seconds` of each episode."""
    lines = (out / "transcripts.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@needs_bwrap
def test_three_shards_merged_have_the_counts_and_rates_of_the_unsplit_run(tmp_path, servers):
    (url, _), _ = servers
    scenarios = suite(tmp_path)
    evaluate(url, scenarios, tmp_path / "whole", "--jobs", "2")
    shards = [tmp_path / f"shard{i}" for i in (1, 2, 3)]
    for i, out in enumerate(shards, 1):
        evaluate(url, scenarios, out, "--shard", f"{i}/3", "--jobs", "2")
    assert sorted(len(transcripts(s)) for s in shards) == [2, 2, 2]
    assert main(["merge", *map(str, reversed(shards)), "--out", str(tmp_path / "merged")]) == 0
    whole, merged = results(tmp_path / "whole"), results(tmp_path / "merged")
    assert merged["runs"] == whole["runs"]  # every count, rate and Wilson interval
    assert whole["runs"]["m"]["overall"]["checker_pass"]["k"] == 3  # notes pass, blocked fail
    assert [t["messages"] for t in transcripts(tmp_path / "merged")] == [
        t["messages"] for t in transcripts(tmp_path / "whole")]
    assert "blocked-key-2" in (tmp_path / "merged" / "report.html").read_text()


@needs_bwrap
def test_two_endpoints_give_the_transcripts_of_one_and_both_serve(tmp_path, servers):
    urls, started = servers
    scenarios = suite(tmp_path, copies=2)
    evaluate(urls[0], scenarios, tmp_path / "one")
    alone = started[0].requests
    evaluate(",".join(urls), scenarios, tmp_path / "two")
    # --jobs 1 per server: two episodes at a time, one thread bound to each server.
    assert started[0].requests > alone and started[1].requests > 0
    assert started[0].requests - alone + started[1].requests == alone
    assert transcripts(tmp_path / "two") == transcripts(tmp_path / "one")


def _shard(tmp_path: Path, name: str, shard: str, scenario: str) -> Path:
    """A shard's output folder as sekft-eval writes it, with one episode."""
    out = tmp_path / name
    episode = Episode(scenario, "notes", "heldout", "exit", "m", ending="exit", passed=True,
                      messages=[{"role": "user", "content": "$ "}])
    write_outputs(out, [episode], {"shard": shard, "suite": {"scenarios": 2}, "model": "m"})
    return out


def test_merge_refuses_a_missing_shard_in_one_line(tmp_path, capsys):
    a = _shard(tmp_path, "a", "1/3", "x")
    c = _shard(tmp_path, "c", "3/3", "z")
    assert main(["merge", str(a), str(c), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shard 2/3 is missing" in err
    assert not (tmp_path / "m").exists()


def test_merge_refuses_a_shard_given_twice_in_one_line(tmp_path, capsys):
    a = _shard(tmp_path, "a", "1/2", "x")
    again = _shard(tmp_path, "again", "1/2", "x")
    b = _shard(tmp_path, "b", "2/2", "y")
    assert main(["merge", str(a), str(b), str(again), "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"shard 1/2 given twice: {a} and {again}" in err


def test_merge_refuses_shards_of_another_model(tmp_path, capsys):
    a = _shard(tmp_path, "a", "1/2", "x")
    b = _shard(tmp_path, "b", "2/2", "y")
    data = results(b)
    data["config"]["model"] = "other"
    (b / "results.json").write_text(json.dumps(data))
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 1
    assert "its model differ" in capsys.readouterr().err


def test_merging_complete_shards_recomputes_rates_from_counts(tmp_path):
    a = _shard(tmp_path, "a", "1/2", "x")
    b = _shard(tmp_path, "b", "2/2", "y")
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 0
    passed = results(tmp_path / "m")["runs"]["m"]["overall"]["checker_pass"]
    assert (passed["k"], passed["n"]) == (2, 2) and passed["low"] == pytest.approx(0.3424, abs=1e-4)
    assert [t["scenario"] for t in transcripts(tmp_path / "m")] == ["x", "y"]
