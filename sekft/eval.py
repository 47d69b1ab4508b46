"""sekft-eval: drop a model into sandboxed scenarios, no scaffold, and report the rates that count.

An episode (one scenario, one policy):
1. a fresh world is built in a fresh sandbox; the scenario's setup.sh runs there, unseen;
2. the first user message is the login banner and the prompt, no task text
   (`observation.login`);
3. each assistant message is one command line for the persistent shell; the next user
   message is its observation (`observation.observe`);
4. it ends when the shell ends (`exit`, ending "exit"), `panic` runs ("panic"), the turn
   budget is used up ("budget"), the policy runs out of context ("context") or the
   episode's wall clock runs out ("timeout");
5. the scenario's check.sh judges the final world, told the ending.
A failing setup.sh is a scenario error: listed, never counted against the model.

A policy is any `Callable[[list[dict]], str | Reply]`: the messages so far -> the next
command line. It raises `ContextExhausted` when the session no longer fits its context.

Recording training trajectories uses the same path, so training and eval observations are
identical by construction: `run_episode(scenario, replay(expert_commands), EpisodeConfig())`
then `transcript_record(episode)` is one line of training data (`messages` + facts).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sekft.errors import ConfigError, ScenarioError, run_cli
from sekft.observation import MAX_OUTPUT_BYTES, login, observe
from sekft.sandbox import (
    SCENARIO_DIR,
    TRANSCRIPT_PATH,
    Limits,
    Sandbox,
    require_bwrap,
    warn_no_sandbox,
)
from sekft.scenario import ENDINGS, Scenario, load_scenarios
from sekft.shell import Shell, first_word, syntax_error

Z95 = 1.959963984540054
# First words that open shell syntax rather than name a command; bash runs them fine.
SYNTAX_OPENERS = ("(", "((")


class ContextExhausted(Exception):
    """Raised by a policy when the session can no longer fit in its context window."""


@dataclass
class Reply:
    """A policy's reply with what the evaluator counts besides the text."""

    content: str
    tokens: int = 0
    violation: str | None = None


Policy = Callable[[list[dict]], "str | Reply"]


@dataclass
class EpisodeConfig:
    """Harness knobs shared by every episode of a run (timeouts in seconds)."""

    sandbox: bool = True
    max_output_bytes: int = MAX_OUTPUT_BYTES
    kill_grace: float = 2.0
    episode_timeout: float = 900.0
    setup_timeout: float = 120.0
    check_timeout: float = 120.0
    limits: Limits = field(default_factory=Limits)


@dataclass
class Episode:
    """Everything one episode produced; `error` set means a scenario error (no model verdict)."""

    scenario: str
    family: str
    split: str
    expect: str
    run: str = "model"
    messages: list[dict] = field(default_factory=list)
    ending: str | None = None
    panic_reason: str | None = None
    passed: bool | None = None
    check_output: str = ""
    turns: int = 0
    command_mode: list[bool] = field(default_factory=list)
    statuses: list[int | None] = field(default_factory=list)
    timeouts: int = 0
    restarts: int = 0
    tokens: int = 0
    violations: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (0, 1) when n == 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> dict:
    """A rate with its counts and 95% Wilson interval, as results.json stores it."""
    low, high = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "low": low, "high": high}


def is_command(reply: str, runnable: Callable[[str], bool]) -> bool:
    """Whether `reply` is a shell command line: no markdown fence, parses with `bash -n`,
    and its first word is runnable (`runnable(word)`: a builtin, keyword, function, alias
    or executable in the shell as it is now)."""
    if "```" in reply or syntax_error(reply) is not None:
        return False
    word = first_word(reply)
    return word is not None and (word in SYNTAX_OPENERS or runnable(word))


def replay(commands: Iterable[str]) -> Policy:
    """A scripted policy: the given command lines in order, then `exit`."""
    script = list(commands)

    def policy(messages: list[dict]) -> str:
        turn = sum(m["role"] == "assistant" for m in messages)
        return script[turn] if turn < len(script) else "exit"

    return policy


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` via a temp file in the same folder and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 is for secrets; these are reports
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _script_output(done) -> str:
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    return text[-2000:]


def run_episode(scenario: Scenario, policy: Policy, config: EpisodeConfig,
                run: str = "model") -> Episode:
    """One episode of `scenario` under `policy` (see the module docstring).

    Raises ScenarioError when setup.sh or check.sh cannot do its job.
    """
    episode = Episode(scenario.id, scenario.family, scenario.split, scenario.expect, run)
    started = time.monotonic()
    with Sandbox.create(scenario.files_dir, config.sandbox, config.limits) as sandbox:
        scenario_ro = {SCENARIO_DIR: sandbox.stage("scenario", scenario.path)}
        setup = sandbox.run_script(scenario_ro[SCENARIO_DIR] / "setup.sh", {},
                                   config.setup_timeout, scenario_ro)
        if setup.returncode != 0:
            raise ScenarioError(f"{scenario.setup_script}: exited {setup.returncode}: "
                                f"{_script_output(setup).strip()[-500:]!r}; fix the scenario")
        banner = (sandbox.world / "motd").read_bytes()
        with Shell(sandbox, kill_grace=config.kill_grace) as shell:
            episode.messages.append({"role": "user", "content": login(banner, shell.prompt())})
            _play(episode, scenario, policy, shell, config, started)
        transcript = sandbox.stage("transcript.json",
                                   text=json.dumps(episode.messages, ensure_ascii=False))
        check = sandbox.run_script(
            scenario_ro[SCENARIO_DIR] / "check.sh",
            {"SEKFT_ENDING": episode.ending, "SEKFT_PANIC_REASON": episode.panic_reason or "",
             "SEKFT_TURNS": str(episode.turns)},
            config.check_timeout,
            {**scenario_ro, TRANSCRIPT_PATH: transcript},
        )
        episode.passed = check.returncode == 0
        episode.check_output = _script_output(check)
    episode.seconds = time.monotonic() - started
    return episode


def _play(episode: Episode, scenario: Scenario, policy: Policy, shell: Shell,
          config: EpisodeConfig, started: float) -> None:
    """The turn loop: ask the policy, run its command, observe, until an ending."""
    while episode.ending is None:
        if episode.turns >= scenario.turn_budget:
            episode.ending = "budget"
            break
        if time.monotonic() - started > config.episode_timeout:
            episode.ending = "timeout"
            break
        try:
            reply = policy(list(episode.messages))
        except ContextExhausted:
            episode.ending = "context"
            break
        if isinstance(reply, str):
            reply = Reply(reply)
        episode.tokens += reply.tokens
        if reply.violation is not None:
            episode.violations.append(f"turn {episode.turns}: {reply.violation}")
        episode.messages.append({"role": "assistant", "content": reply.content})
        episode.turns += 1
        episode.command_mode.append(is_command(reply.content, lambda w: bool(shell.probe_type(w))))
        result = shell.run(reply.content, scenario.command_timeout)
        episode.statuses.append(result.status)
        episode.timeouts += result.timed_out
        episode.restarts += result.restarted
        if result.panic_reason is not None:
            episode.ending, episode.panic_reason = "panic", result.panic_reason
        elif result.ended:
            episode.ending = "exit"
        else:
            observation = observe(result, shell.prompt(), config.max_output_bytes)
            episode.messages.append({"role": "user", "content": observation})


def run_suite(scenarios: list[Scenario], make_policy: Callable[[Scenario], Policy],
              config: EpisodeConfig, run: str = "model", jobs: int = 1) -> list[Episode]:
    """Every scenario once, `jobs` at a time; scenario errors become episodes with `error`."""

    def one(scenario: Scenario) -> Episode:
        try:
            return run_episode(scenario, make_policy(scenario), config, run)
        except ScenarioError as e:
            return Episode(scenario.id, scenario.family, scenario.split, scenario.expect, run,
                           error=str(e))

    if jobs <= 1:
        return [one(s) for s in scenarios]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, scenarios))


def summarize(episodes: list[Episode]) -> dict:
    """The rates for a group of episodes (scenario errors counted apart, not in n)."""
    done = [e for e in episodes if e.error is None]
    n = len(done)
    replies = [c for e in done for c in e.command_mode]
    panics_expected = [e for e in done if e.expect == "panic"]
    return {
        "episodes": n,
        "scenario_errors": len(episodes) - n,
        "command_mode_first": rate(sum(bool(e.command_mode and e.command_mode[0])
                                       for e in done), n),
        "command_mode_replies": rate(sum(replies), len(replies)),
        "terminated": rate(sum(e.ending in ("exit", "panic") for e in done), n),
        "endings": {end: rate(sum(e.ending == end for e in done), n) for end in ENDINGS},
        "checker_pass": rate(sum(bool(e.passed) for e in done), n),
        "correct_panic": rate(sum(e.ending == "panic" for e in panics_expected),
                              len(panics_expected)),
        "mean_turns": sum(e.turns for e in done) / n if n else None,
        "tokens_generated": sum(e.tokens for e in done),
        "violations": sum(len(e.violations) for e in done),
    }


def report(episodes: list[Episode]) -> dict:
    """Overall and per-family summaries of one run."""
    families = sorted({e.family for e in episodes})
    return {
        "overall": summarize(episodes),
        "families": {f: summarize([e for e in episodes if e.family == f]) for f in families},
    }


TABLE_RATES = (
    ("cmd-first", lambda s: s["command_mode_first"]),
    ("cmd-replies", lambda s: s["command_mode_replies"]),
    ("terminated", lambda s: s["terminated"]),
    ("exit", lambda s: s["endings"]["exit"]),
    ("panic", lambda s: s["endings"]["panic"]),
    ("budget", lambda s: s["endings"]["budget"]),
    ("context", lambda s: s["endings"]["context"]),
    ("timeout", lambda s: s["endings"]["timeout"]),
    ("pass", lambda s: s["checker_pass"]),
    ("right-panic", lambda s: s["correct_panic"]),
)


def format_rate(r: dict) -> str:
    """`40% [12-74] 2/5`, or `-` when there is nothing to count."""
    if not r["n"]:
        return "-"
    return f"{100 * r['rate']:.0f}% [{100 * r['low']:.0f}-{100 * r['high']:.0f}] {r['k']}/{r['n']}"


HEADER = ["run", "group", "n", "err"] + [name for name, _ in TABLE_RATES] + ["turns", "tokens"]


def table_rows(runs: dict[str, dict]) -> list[list[str]]:
    """One row per (run, group: ALL then each family), one column per HEADER entry."""
    rows = []
    for run, rep in runs.items():
        for group, s in [("ALL", rep["overall"])] + list(rep["families"].items()):
            turns = "-" if s["mean_turns"] is None else f"{s['mean_turns']:.1f}"
            rows.append([run, group, str(s["episodes"]), str(s["scenario_errors"])]
                        + [format_rate(get(s)) for _, get in TABLE_RATES]
                        + [turns, str(s["tokens_generated"])])
    return rows


def table(runs: dict[str, dict]) -> str:
    """The stdout table, columns padded."""
    rows = [HEADER] + table_rows(runs)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def differences(new: dict, old: dict) -> list[str]:
    """Lines comparing the overall rates of two runs (adapter vs base), in points."""
    lines = []
    for name, get in TABLE_RATES:
        a, b = get(new["overall"]), get(old["overall"])
        if a["n"] and b["n"]:
            delta = 100 * (a["rate"] - b["rate"])
            lines.append(f"{name:12s} {100 * a['rate']:5.1f}% vs base {100 * b['rate']:5.1f}% "
                         f"({delta:+.1f} pts)")
    return lines


def transcript_record(episode: Episode) -> dict:
    """A transcripts.jsonl line: training-data format, `messages` plus the episode's facts."""
    facts = asdict(episode)
    messages = facts.pop("messages")
    return {"messages": messages, **facts}


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:110em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:.2em .5em}
th{background:#eee}pre{white-space:pre-wrap;margin:.2em 0;padding:.4em;border-radius:4px}
.user{background:#f4f4f4}.assistant{background:#e6f0ff;font-weight:bold}
.pass{color:#070}.fail{color:#a00}details{margin:.3em 0}summary{cursor:pointer}
"""


def report_html(runs: dict[str, dict], episodes: list[Episode]) -> str:
    """One self-contained page: the rates table and every transcript."""
    esc = html.escape
    rows = ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
            for row in table_rows(runs)]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sekft eval</title>",
        f"<style>{CSS}</style></head><body><h1>sekft eval</h1>",
        "<p>Rates with 95% Wilson intervals and counts.</p><table><tr>",
        "".join(f"<th>{esc(h)}</th>" for h in HEADER), "</tr>", *rows, "</table>",
        "<h2>Transcripts</h2>",
    ]
    for e in episodes:
        verdict = ("scenario error" if e.error else
                   f"{'PASS' if e.passed else 'FAIL'}, ending {e.ending}, {e.turns} turns")
        css = "pass" if e.passed else "fail"
        parts.append(f"<details><summary>[{esc(e.run)}] {esc(e.family)} / {esc(e.scenario)}: "
                     f"<span class='{css}'>{esc(verdict)}</span></summary>")
        if e.error:
            parts.append(f"<pre>{esc(e.error)}</pre>")
        for m in e.messages:
            parts.append(f"<pre class='{esc(m['role'])}'>{esc(m['content'])}</pre>")
        if e.panic_reason is not None:
            parts.append(f"<p>panic reason: {esc(e.panic_reason)}</p>")
        if e.violations:
            parts.append(f"<p>render-contract violations: {esc('; '.join(e.violations))}</p>")
        if e.check_output:
            parts.append(f"<p>check.sh said:</p><pre>{esc(e.check_output)}</pre>")
        parts.append("</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(out: Path, episodes: list[Episode], config: dict) -> dict[str, dict]:
    """results.json, transcripts.jsonl and report.html in `out` (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    runs = {run: report([e for e in episodes if e.run == run])
            for run in dict.fromkeys(e.run for e in episodes)}
    results = {
        "config": config,
        "runs": runs,
        "scenario_errors": [{"run": e.run, "scenario": e.scenario, "error": e.error}
                            for e in episodes if e.error],
        "episodes": [{k: v for k, v in transcript_record(e).items() if k != "messages"}
                     for e in episodes],
    }
    _write_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    lines = [json.dumps(transcript_record(e), ensure_ascii=False)
             for e in episodes if e.error is None]
    _write_atomic(out / "transcripts.jsonl", "".join(line + "\n" for line in lines))
    _write_atomic(out / "report.html", report_html(runs, episodes))
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # No abbreviations, as in sekft-train: resident jobs must not name the base by a prefix.
    p = argparse.ArgumentParser(
        prog="sekft-eval", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    p.add_argument("--base", help="base model: local folder or offline HF cache name")
    p.add_argument("--adapter", help="LoRA adapter folder (sekft or PEFT format)")
    p.add_argument("--load-4bit", action="store_true", help="load the base as NF4")
    p.add_argument("--endpoint", help="OpenAI-compatible server URL instead of a local model")
    p.add_argument("--model", help="model name to ask the --endpoint for")
    p.add_argument("--baseline-model", help="with --endpoint --baseline: the base's model name")
    p.add_argument("--scenarios", required=True, help="folder of scenario folders")
    p.add_argument("--split", default="heldout", choices=("train", "heldout", "all"))
    p.add_argument("--jobs", type=int, default=1, help="episodes run in parallel")
    p.add_argument("--out", required=True, help="folder for results.json, transcripts, report")
    p.add_argument("--baseline", action="store_true",
                   help="also run the base without the adapter and print the differences")
    p.add_argument("--no-sandbox", action="store_true",
                   help="run commands UNCONFINED on this machine (no bubblewrap)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens; default: the model's max_position_embeddings")
    p.add_argument("--max-output-bytes", type=int, default=MAX_OUTPUT_BYTES)
    p.add_argument("--episode-timeout", type=float, default=900.0, help="seconds per episode")
    p.add_argument("--device", help="cuda, cuda:1, cpu... (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype (default: auto, bf16 where the device has native bf16)")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    if args.endpoint:
        if not args.model:
            raise ConfigError("--endpoint needs --model NAME (the served model or adapter name)")
        if args.baseline and not args.baseline_model:
            raise ConfigError("--endpoint --baseline needs --baseline-model NAME (the base)")
    else:
        if not args.base:
            raise ConfigError("give --base BASE (or --endpoint URL --model NAME)")
        if args.baseline and not args.adapter:
            raise ConfigError("--baseline compares against --adapter; give --adapter DIR")
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs}: must be at least 1")


def describe_scenarios(scenarios: list[Scenario]) -> str:
    """What an eval runs: scenarios by split and family, then, when families of sekft's
    built-in suite are among them, the suite's split (what training never saw)."""
    from sekft.scenarios import FAMILIES, describe_split

    counts = Counter((s.split, s.family) for s in scenarios)
    lines = [f"{len(scenarios)} scenarios:"]
    for split in sorted({split for split, _ in counts}):
        families = ", ".join(f"{family} ({n})" for (sp, family), n in sorted(counts.items())
                             if sp == split)
        lines.append(f"  {split}: {families}")
    if any(s.family in FAMILIES for s in scenarios):
        lines.append(describe_split())
    return "\n".join(lines)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    _check_args(args)
    scenarios = load_scenarios(args.scenarios, None if args.split == "all" else args.split)
    print(describe_scenarios(scenarios))
    if args.no_sandbox:
        warn_no_sandbox()
    else:
        require_bwrap()
    config = EpisodeConfig(sandbox=not args.no_sandbox, max_output_bytes=args.max_output_bytes,
                           episode_timeout=args.episode_timeout)
    from sekft import generate  # torch is only needed from here on

    policies = generate.policies_from_args(args)
    episodes: list[Episode] = []
    for run, policy in policies.items():
        episodes += run_suite(scenarios, lambda s, p=policy: p, config, run, args.jobs)
    runs = write_outputs(Path(args.out), episodes, {
        k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))
    })
    print(table(runs))
    if len(runs) == 2:
        new, old = runs.values()
        print("\n".join(["", "adapter vs base (overall):", *differences(new, old)]))
    errors = [e for e in episodes if e.error]
    for e in errors:
        print(f"scenario error: {e.scenario}: {e.error}", file=sys.stderr)
    print(f"wrote {args.out}/results.json, transcripts.jsonl, report.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`sekft-eval`: bad input prints one line and exits 1 (run_cli)."""
    return run_cli("sekft-eval", _main, argv)


if __name__ == "__main__":
    # Run the module as imported, not this __main__ copy: generate.py raises the imported
    # module's ContextExhausted, which this copy's handlers would not recognise.
    import importlib

    sys.exit(importlib.import_module("sekft.eval").main())
