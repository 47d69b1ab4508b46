"""sekft-eval: drop a model into sandboxed scenarios, no scaffold, and report the rates that count.

An episode (one scenario, one policy):
1. a fresh world is built in a fresh sandbox; the scenario's setup.sh runs there, unseen;
2. the first user message is the login banner and the prompt, no task text
   (`observation.login`);
3. each assistant message is one command line for the persistent shell; the next user
   message is its observation (`observation.observe`);
4. it ends when the shell ends (`exit`, ending "exit"), `panic` runs ("panic"), the turn
   budget is used up ("budget"), the policy has stalled ("stalled", only when
   EpisodeConfig.stall_turns asks for it: see `stalled`), the policy runs out of context
   ("context") or the episode's wall clock runs out ("timeout");
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
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sekft.errors import ConfigError, ScenarioError, run_cli
from sekft.observation import MAX_OUTPUT_BYTES, login, observe
from sekft.progress import ProgressLine, format_eval_progress
from sekft.recipe import parse_with_recipe
from sekft.sandbox import (
    SCENARIO_DIR,
    TRANSCRIPT_PATH,
    Limits,
    Sandbox,
    require_bwrap,
    warn_no_sandbox,
)
from sekft.scenario import ENDINGS, Scenario, load_scenarios
from sekft.shell import Shell, blank, first_word, syntax_error

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
    # A later turn whose prompt did not extend the cached conversation (prefilled whole).
    full_prefill: bool = False


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
    # End an episode as "stalled" after this many replies in a row that are not commands,
    # or are one command line repeated (0: never; see `stalled`).
    stall_turns: int = 0


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
    full_prefills: int = 0
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
    has something to run (not blank or only comments), and its first word is runnable
    (`runnable(word)`: a builtin, keyword, function, alias or executable in the shell as it
    is now) or it has none (only assignments, `DIR=/tmp`)."""
    if "```" in reply or blank(reply) or syntax_error(reply) is not None:
        return False
    word = first_word(reply)
    # No first word in a line that is not blank: only assignments (`DIR=/tmp`), which bash runs.
    return word is None or word in SYNTAX_OPENERS or runnable(word)


def utf8_text(text: str) -> str:
    """`text` with each lone surrogate (an endpoint's JSON may carry one, `"\\ud83d"`) made
    U+FFFD, as a bad byte in an observation is: transcripts and the shell take UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def stalled(replies: list[str], command_mode: list[bool], k: int) -> bool:
    """Whether the last `k` replies show a policy that will not get anywhere: all `k` are
    not command lines (`command_mode` False: prose the shell answers with "command not
    found"), or all `k` are the same line. False while there are fewer than `k` replies,
    and always for k <= 0 (the rule is off).

    Why a harness may stop there: under greedy decoding an untrained base answers a prompt
    with prose turn after turn (0 of 1,123 replies were commands in the real-model demo),
    and a looping adapter types the same line until the turn budget; running those to the
    budget was most of an eval's time. A policy that recovers within k replies is never
    stopped; one that would have recovered later is counted as stalled, so the rule can
    only lower a pass rate.
    """
    if k <= 0 or len(replies) < k:
        return False
    last = replies[-k:]
    return not any(command_mode[-k:]) or all(r == last[0] for r in last)


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


def not_found(output: str, script: str) -> str | None:
    """bash's first "SCRIPT: line N: NAME: command not found" in a script's output (the
    script itself ran a command this machine lacks), from "line N" on; None if there is none.
    """
    pattern = rf"(?:^|/){re.escape(script)}: (line \d+: .+?: command not found)$"
    found = re.search(pattern, output, re.MULTILINE)
    return found.group(1) if found else None


def check_warnings(episodes: list[Episode]) -> list[str]:
    """One line per scenario whose check.sh ran a command that was not found.

    Not a scenario error: the missing command may be one the model should have made (a
    check that runs the tool it was asked to install). But when it is a tool this machine
    lacks, every episode of the scenario fails, so the eval says so.
    """
    seen: dict[str, tuple[str, int, int]] = {}
    for e in episodes:
        if e.error is not None:
            continue
        missing = not_found(e.check_output, "check.sh")
        said, k, n = seen.get(e.scenario, (None, 0, 0))
        seen[e.scenario] = (said or missing, k + (missing is not None), n + 1)
    return [f"warning: {scenario}: check.sh said {said!r} in {k} of {n} episodes; if it "
            "needs a tool this machine lacks, every episode fails: install it or fix the check"
            for scenario, (said, k, n) in seen.items() if said]


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
        # Without `set -e` a later line exits 0 and the world is silently incomplete.
        missing = not_found((setup.stdout + setup.stderr).decode("utf-8", "replace"),
                            "setup.sh")
        if missing is not None:
            raise ScenarioError(f"{scenario.setup_script}: {missing}: a tool the world needs "
                                "is missing here; install it or fix the scenario")
        banner = (sandbox.world / "motd").read_bytes()
        with Shell(sandbox, kill_grace=config.kill_grace) as shell:
            episode.messages.append({"role": "user", "content": login(banner, shell.prompt())})
            # The limit bounds the model's play, from the first prompt: setup and check have
            # their own limits, and a loaded machine's slow start is not the model's time.
            _play(episode, scenario, policy, shell, config, time.monotonic())
        transcript = sandbox.stage("transcript.json",
                                   text=json.dumps(episode.messages, ensure_ascii=False))
        try:
            check = sandbox.run_script(
                scenario_ro[SCENARIO_DIR] / "check.sh",
                {"SEKFT_ENDING": episode.ending,
                 "SEKFT_PANIC_REASON": episode.panic_reason or "",
                 "SEKFT_TURNS": str(episode.turns)},
                config.check_timeout,
                {**scenario_ro, TRANSCRIPT_PATH: transcript},
            )
        except ScenarioError as e:
            # Once the model has acted, a hung check is most likely its doing (a fifo where
            # a file was expected): a failed episode, not one that drops out of n.
            if episode.turns == 0:
                raise
            episode.passed, episode.check_output = False, str(e)
        else:
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
        replies = [m["content"] for m in episode.messages if m["role"] == "assistant"]
        if stalled(replies, episode.command_mode, config.stall_turns):
            episode.ending = "stalled"
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
        reply.content = utf8_text(reply.content)
        episode.tokens += reply.tokens
        episode.full_prefills += reply.full_prefill
        if reply.violation is not None:
            episode.violations.append(f"turn {episode.turns}: {reply.violation}")
        episode.messages.append({"role": "assistant", "content": reply.content})
        episode.turns += 1
        episode.command_mode.append(is_command(reply.content, lambda w: bool(shell.probe_type(w))))
        # The episode's limit holds during a command too, whatever the scenario allows one.
        left = started + config.episode_timeout - time.monotonic()
        if left <= 0:
            episode.ending = "timeout"
            break
        result = shell.run(reply.content, min(scenario.command_timeout, left))
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
              config: EpisodeConfig, run: str = "model", jobs: int = 1,
              on_done: Callable[[Episode], None] | None = None) -> list[Episode]:
    """Every scenario once, `jobs` at a time; scenario errors become episodes with `error`.
    `on_done(episode)` is called as each episode ends, from the thread that ran it."""

    def one(scenario: Scenario) -> Episode:
        try:
            episode = run_episode(scenario, make_policy(scenario), config, run)
        except ScenarioError as e:
            episode = Episode(scenario.id, scenario.family, scenario.split, scenario.expect,
                              run, error=str(e))
        if on_done is not None:
            on_done(episode)
        return episode

    if jobs <= 1:
        return [one(s) for s in scenarios]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, scenarios))


class SuiteProgress:
    """The live line of an eval: episodes done of `total`, each run's passes so far, ETA.

    `episode_done` fits `run_suite`'s `on_done`; it may be called from several threads.
    """

    def __init__(self, total: int, line: ProgressLine) -> None:
        self.total, self.line = total, line
        self.passed: dict[str, tuple[int, int]] = {}
        self.done = self.errors = 0
        self.started = time.monotonic()
        self.lock = threading.Lock()

    def show(self, fields: dict | None = None) -> None:
        """Draw the line as it stands (before the first episode ends, too)."""
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else math.inf
        self.line.update(format_eval_progress(self.done, self.total, self.passed, self.errors,
                                              eta), {"done": self.done, "total": self.total,
                                                     **(fields or {})})

    def episode_done(self, episode: Episode) -> None:
        with self.lock:
            self.done += 1
            k, n = self.passed.get(episode.run, (0, 0))
            if episode.error is None:
                self.passed[episode.run] = (k + bool(episode.passed), n + 1)
            else:
                self.passed.setdefault(episode.run, (k, n))
                self.errors += 1
            self.show({"run": episode.run, "scenario": episode.scenario,
                       "passed": episode.passed, "error": episode.error})

    def close(self) -> None:
        self.line.close()


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
        "full_prefills": sum(e.full_prefills for e in done),
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
    ("stalled", lambda s: s["endings"]["stalled"]),
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


# Rates report.html shows, grouped as on the page: (TABLE_RATES name, title, what it counts,
# which way is better: 1 up, -1 down, 0 neither: exit and panic are each right somewhere).
HTML_RATES = {
    "Rates by family": (
        ("pass", "checker pass", "check.sh accepted the final world", 1),
        ("terminated", "ended by exit or panic", "the model ended the session itself", 1),
        ("cmd-replies", "replies that are commands", "runnable command lines, of all replies", 1),
        ("cmd-first", "first reply a command", "the reply to the login prompt", 1),
        ("right-panic", "panic when expected", "of the scenarios that expect a panic", 1),
    ),
    "Endings by family": (
        ("exit", "exit", "the model typed exit", 0),
        ("panic", "panic", "the model ran panic", 0),
        ("budget", "turn budget used up", "", -1),
        ("stalled", "stalled", "--stall-turns replies in a row not commands, or one line "
                               "repeated", -1),
        ("context", "context used up", "the session outgrew the model", -1),
        ("timeout", "episode timed out", "", -1),
    ),
}
# Colour of each run's bars, in the page's run order (the reference run first).
RUN_COLOURS = ("#7a8699", "#e8780c", "#3b7dd8", "#5aa25a")

CSS = """
body{font-family:system-ui,sans-serif;margin:1.2em 1.5em;color:#222}
h1{margin-bottom:.2em}h2{margin-top:1.6em}p.note{color:#555;margin:.3em 0;max-width:60em}
table{border-collapse:collapse}td,th{border:1px solid #d4d4d4;padding:.35em .6em;vertical-align:top}
th{background:#f0f0f0;text-align:left;font-weight:600}th small{font-weight:400;color:#666}
tr.family th{background:#e4e8ef;font-size:.95em;padding-top:.5em}
tr.family small{font-weight:400;color:#555;margin-left:.6em}
.line{display:flex;align-items:center;gap:.45em;font-size:.82em;white-space:nowrap;height:1.6em}
td.runs .line{color:#444}
.track{position:relative;width:6.5em;height:.8em;background:#eee;border-radius:2px;flex:none}
.fill{position:absolute;left:0;top:0;bottom:0;border-radius:2px}
.ci{position:absolute;top:50%;height:0;border-top:1.5px solid #111}
.ci::before,.ci::after{content:"";position:absolute;top:-.45em;height:.8em;
border-left:1.5px solid #111}
.ci::before{left:0}.ci::after{right:0}
.pct{width:3.2em;text-align:right;font-weight:600}.ci-text{color:#666;font-size:.92em}
.diff{color:#666}.diff b{color:#222}
.diff.better b,b.better{color:#0a7a0a}.diff.worse b,b.worse{color:#b00}
.diff.apart b,b.apart{color:#2456b0}
.none{color:#999}.legend>span{margin-right:1.2em}
.swatch{display:inline-block;width:.9em;height:.9em;border-radius:2px;flex:none;margin-right:.3em;
vertical-align:-.1em}
pre{white-space:pre-wrap;margin:.2em 0;padding:.4em;border-radius:4px;font-size:.85em}
.user{background:#f4f4f4}.assistant{background:#e6f0ff;font-weight:bold}
.pass{color:#070;font-weight:600}.fail{color:#a00;font-weight:600}.error{color:#a60}
details{margin:.1em 0}summary{cursor:pointer}table.transcripts{width:100%;table-layout:fixed}
table.transcripts th:first-child{width:13em}
"""


def _colour(i: int) -> str:
    return RUN_COLOURS[i % len(RUN_COLOURS)]


def _bar(r: dict, colour: str) -> str:
    """A rate's bar, its 95% Wilson interval as a whisker over it, and the numbers."""
    if not r["n"]:
        return "<span class='none'>– (nothing to count)</span>"
    return (f"<span class='track'><span class='fill' style='width:{r['rate']:.1%};"
            f"background:{colour}'></span><span class='ci' style='left:{r['low']:.1%};"
            f"width:{r['high'] - r['low']:.1%}'></span></span>"
            f"<span class='pct'>{100 * r['rate']:.0f}%</span><span class='ci-text'>"
            f"[{100 * r['low']:.0f}–{100 * r['high']:.0f}] {r['k']}/{r['n']}</span>")


def _difference(new: dict, old: dict, better: int) -> str:
    """`new` - `old` in points; when the two intervals do not overlap, coloured as better,
    worse or (`better` 0) just apart."""
    if not (new["n"] and old["n"]):
        return "<div class='line diff'>–</div>"
    delta = 100 * (new["rate"] - old["rate"])
    css = ""
    if new["low"] > old["high"] or new["high"] < old["low"]:
        css = "apart" if better == 0 else "better" if delta * better > 0 else "worse"
    return f"<div class='line diff {css}'><b>{delta:+.0f} pts</b></div>"


def _rate_cell(groups: list[tuple[str, dict]], name: str, better: int) -> str:
    """One rate of one family: a line per run, then the difference when there are two."""
    get = dict(TABLE_RATES)[name]
    lines = [f"<div class='line'>{_bar(get(s), _colour(i))}</div>"
             for i, (_, s) in enumerate(groups)]
    if len(groups) == 2:
        lines.append(_difference(get(groups[1][1]), get(groups[0][1]), better))
    return "<td>" + "".join(lines) + "</td>"


def _runs_cell(groups: list[tuple[str, dict]]) -> str:
    """The row's labels, line for line with its rate cells."""
    lines = [f"<div class='line'><span class='swatch' style='background:{_colour(i)}'></span>"
             f"{html.escape(run)}</div>" for i, (run, _) in enumerate(groups)]
    if len(groups) == 2:
        lines.append(f"<div class='line diff'>{html.escape(groups[1][0])} − "
                     f"{html.escape(groups[0][0])}</div>")
    return "<td class='runs'>" + "".join(lines) + "</td>"


def _family_row(family: str, groups: list[tuple[str, dict]], width: int) -> str:
    """The heading row of a family's block: its name, how many episodes each run had, their
    mean turns and the tokens generated."""
    counts = {s["episodes"] for _, s in groups}
    detail = (f"{counts.pop()} episodes per run" if len(counts) == 1 else
              ", ".join(f"{html.escape(run)} {s['episodes']} episodes" for run, s in groups))
    errors = sum(s["scenario_errors"] for _, s in groups)
    if errors:
        detail += f", {errors} scenario errors (in no rate)"
    turns = ", ".join(f"{html.escape(run)} {s['mean_turns']:.1f}" for run, s in groups
                      if s["mean_turns"] is not None)
    tokens = ", ".join(f"{html.escape(run)} {s['tokens_generated']}" for run, s in groups)
    detail += f" · mean turns: {turns}" * bool(turns) + f" · tokens generated: {tokens}"
    label = "all families" if family == "ALL" else html.escape(family)
    return f"<tr class='family'><th colspan='{width}'>{label} <small>{detail}</small></th></tr>"


def _rates_table(runs: dict[str, dict], rates: tuple[tuple[str, str, str, int], ...]) -> str:
    """A block per family (all families first), rates across; each cell has every run's bar,
    one above the other, and the difference under them."""
    order = _page_order(runs)
    head = "".join(f"<th>{html.escape(title)}<br><small>{html.escape(hint)}</small></th>"
                   for _, title, hint, _ in rates)
    rows = [f"<tr><th>run</th>{head}</tr>"]
    families = sorted({f for rep in runs.values() for f in rep["families"]})
    for family in ["ALL", *families]:
        groups = [(run, runs[run]["overall"] if family == "ALL"
                   else runs[run]["families"].get(family)) for run in order]
        groups = [(run, s) for run, s in groups if s is not None]
        rows.append(_family_row(family, groups, len(rates) + 1))
        rows.append("<tr>" + _runs_cell(groups)
                    + "".join(_rate_cell(groups, name, better)
                              for name, _, _, better in rates) + "</tr>")
    return "<table class='rates'>" + "".join(rows) + "</table>"


def _page_order(runs: dict[str, dict]) -> list[str]:
    """Runs as the page shows them: with two, the reference (the second: the base in
    `--baseline`, as in `differences`) first, so each difference reads top to bottom."""
    names = list(runs)
    return names[::-1] if len(names) == 2 else names


def _verdict(e: Episode) -> str:
    if e.error:
        return "<span class='error'>scenario error</span>"
    css, word = ("pass", "PASS") if e.passed else ("fail", "FAIL")
    return (f"<span class='{css}'>{word}</span> ending {html.escape(str(e.ending))}, "
            f"{e.turns} turns")


def _transcript(e: Episode) -> str:
    """One episode's cell: its verdict, and the transcript folded under it."""
    esc = html.escape
    parts = [f"<details><summary>{_verdict(e)}</summary>"]
    if e.error:
        parts.append(f"<pre>{esc(e.error)}</pre>")
    parts += [f"<pre class='{esc(m['role'])}'>{esc(m['content'])}</pre>" for m in e.messages]
    if e.panic_reason is not None:
        parts.append(f"<p>panic reason: {esc(e.panic_reason)}</p>")
    if e.violations:
        parts.append(f"<p>render-contract violations: {esc('; '.join(e.violations))}</p>")
    if e.check_output:
        parts.append(f"<p>check.sh said:</p><pre>{esc(e.check_output)}</pre>")
    parts.append("</details>")
    return "<td>" + "".join(parts) + "</td>"


def _transcripts(order: list[str], episodes: list[Episode]) -> list[str]:
    """Per family, a row per scenario with each run's episode side by side."""
    by_key = {(e.scenario, e.run): e for e in episodes}
    parts = []
    for family in sorted({e.family for e in episodes}):
        scenarios = dict.fromkeys(e.scenario for e in episodes if e.family == family)
        head = "".join(f"<th><span class='swatch' style='background:{_colour(i)}'></span>"
                       f"{html.escape(run)}</th>" for i, run in enumerate(order))
        rows = [f"<tr><th>scenario</th>{head}</tr>"]
        for scenario in scenarios:
            cells = "".join(_transcript(by_key[(scenario, run)]) if (scenario, run) in by_key
                            else "<td class='none'>not run</td>" for run in order)
            rows.append(f"<tr><td>{html.escape(scenario)}</td>{cells}</tr>")
        parts.append(f"<h3>{html.escape(family)}</h3><table class='transcripts'>"
                     f"{''.join(rows)}</table>")
    return parts


def report_html(runs: dict[str, dict], episodes: list[Episode]) -> str:
    """One self-contained page (no scripts, no fetched files): per family, every run's
    rates side by side as bars with their 95% Wilson intervals and, with two runs, the
    difference; then the transcripts, each scenario's runs side by side. Every text from
    runs, scenarios and episodes is escaped."""
    esc = html.escape
    order = _page_order(runs)
    legend = "".join(f"<span><span class='swatch' style='background:{_colour(i)}'></span>"
                     f"{esc(run)}: "
                     f"{runs[run]['overall']['episodes']} episodes</span>"
                     for i, run in enumerate(order))
    title = " vs ".join(esc(run) for run in order[::-1])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>sekft eval: {title}</title><style>{CSS}</style></head><body>",
        f"<h1>sekft eval: {title}</h1><p class='legend'>{legend}</p>",
        "<p class='note'>Each bar is a rate; the black whisker over it is its 95% Wilson "
        "interval, printed after it with the counts. A difference is in percentage points; "
        "when the two intervals do not overlap it is coloured: <b class='better'>better</b>, "
        "<b class='worse'>worse</b>, or <b class='apart'>apart</b> where neither way is "
        "better.</p>",
    ]
    for heading, rates in HTML_RATES.items():
        parts += [f"<h2>{esc(heading)}</h2>", _rates_table(runs, rates)]
    errors = [e for e in episodes if e.error]
    if errors:
        parts.append("<h2>Scenario errors</h2><p class='note'>Counted in no rate.</p><ul>")
        parts += [f"<li>{esc(e.run)}: {esc(e.scenario)}: {esc(e.error)}</li>" for e in errors]
        parts.append("</ul>")
    parts += ["<h2>Transcripts</h2><p class='note'>Each scenario's runs side by side; open a "
              "verdict to read the session.</p>", *_transcripts(order, episodes),
              "</body></html>"]
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
    p.add_argument("--endpoint", help="OpenAI-compatible server URL instead of a local model; "
                   "URL1,URL2,... spreads the episodes over several servers")
    p.add_argument("--model", help="model name to ask the --endpoint for")
    p.add_argument("--baseline-model", help="with --endpoint --baseline: the base's model name")
    p.add_argument("--scenarios", required=True, help="folder of scenario folders")
    p.add_argument("--split", default="heldout", choices=("train", "heldout", "all"))
    p.add_argument("--jobs", type=int, default=1,
                   help="episodes run in parallel (per server with several --endpoint URLs)")
    p.add_argument("--shard", help="I/N: run only shard I of N of the scenarios (then "
                   "`sekft-eval merge` the N output folders)")
    p.add_argument("--out", required=True, help="folder for results.json, transcripts, report")
    p.add_argument("--baseline", action="store_true",
                   help="also run the base without the adapter and print the differences")
    p.add_argument("--no-sandbox", action="store_true",
                   help="run commands UNCONFINED on this machine (no bubblewrap)")
    p.add_argument("--template-var", action="append", default=[], metavar="KEY=VALUE",
                   help="template variable for every render (repeatable), as in training; "
                   "sent to --endpoint servers as chat_template_kwargs")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens; default: the model's max_position_embeddings")
    p.add_argument("--max-output-bytes", type=int, default=MAX_OUTPUT_BYTES)
    p.add_argument("--episode-timeout", type=float, default=900.0,
                   help="seconds of play per episode, from the first prompt")
    p.add_argument("--stall-turns", type=int, default=0,
                   help="end an episode (ending 'stalled') after this many replies in a row "
                        "that are not commands or repeat one line (0: never)")
    p.add_argument("--device", help="cuda, cuda:1, cpu... (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype (default: auto, bf16 where the device has native bf16)")
    return parse_with_recipe(p, argv)


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


def episode_config(args: argparse.Namespace) -> EpisodeConfig:
    """The harness settings sekft-eval's options (and a resident eval job's) ask for."""
    if args.stall_turns < 0:
        raise ConfigError(f"--stall-turns {args.stall_turns}: must be 0 (off) or more")
    return EpisodeConfig(sandbox=not args.no_sandbox, max_output_bytes=args.max_output_bytes,
                         episode_timeout=args.episode_timeout, stall_turns=args.stall_turns)


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
    from sekft import evalshard  # above this module: it merges what this one writes

    scenarios = load_scenarios(args.scenarios, None if args.split == "all" else args.split)
    suite = evalshard.suite_id([s.id for s in scenarios])
    if args.shard:
        scenarios = evalshard.select_shard(scenarios, *evalshard.parse_shard(args.shard))
        print(f"shard {args.shard}: {len(scenarios)} of the suite's {suite['scenarios']} "
              "scenarios")
    print(describe_scenarios(scenarios))
    if args.no_sandbox:
        warn_no_sandbox()
    else:
        require_bwrap()
    config = episode_config(args)
    from sekft import generate  # torch is only needed from here on

    policies = generate.policies_from_args(args)
    # --jobs per server: each worker thread stays with one server (generate.EndpointPool).
    jobs = args.jobs * len(args.endpoint.split(",")) if args.endpoint else args.jobs
    progress = SuiteProgress(len(scenarios) * len(policies), ProgressLine())
    progress.show()
    episodes: list[Episode] = []
    try:
        for run, policy in policies.items():
            episodes += run_suite(scenarios, lambda s, p=policy: p, config, run, jobs,
                                  progress.episode_done)
    finally:
        progress.close()  # an error's one line must not land on the live line
    runs = write_outputs(Path(args.out), episodes, {
        **{k: v for k, v in vars(args).items()
           if isinstance(v, (str, int, float, bool, type(None)))},
        "suite": suite,
    })
    print(table(runs))
    if len(runs) == 2:
        new, old = runs.values()
        print("\n".join(["", "adapter vs base (overall):", *differences(new, old)]))
    errors = [e for e in episodes if e.error]
    for e in errors:
        print(f"scenario error: {e.scenario}: {e.error}", file=sys.stderr)
    for line in check_warnings(episodes):
        print(line, file=sys.stderr)
    print(f"wrote {args.out}/results.json, transcripts.jsonl, report.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`sekft-eval`, or `sekft-eval merge RUN_DIR... --out DIR` (sekft.evalshard): bad input
    prints one line and exits 1 (run_cli)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        from sekft import evalshard

        return run_cli("sekft-eval merge", evalshard.merge_main, argv[1:])
    return run_cli("sekft-eval", _main, argv)


if __name__ == "__main__":
    # Run the module as imported, not this __main__ copy: generate.py raises the imported
    # module's ContextExhausted, which this copy's handlers would not recognise.
    import importlib

    sys.exit(importlib.import_module("sekft.eval").main())
