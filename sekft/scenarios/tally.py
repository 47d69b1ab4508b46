"""tally: count the lines of a log that mention a word and submit the number with `tally`
(bash); directive in the mail spool or inside an archive."""

from __future__ import annotations

import random
from pathlib import Path

from sekft.scenarios.posts import apart, pick, place
from sekft.scenarios.split import draw_for_split
from sekft.scenarios.world import Instance, expect_ending, text, tool_files, write_scenario

FAMILY = "tally"
POSTS = ("mail", "archive")
ANSWER = "/usr/local/var/tally/answer"
SCRIPT = r"""#!/bin/bash
answer=/usr/local/var/tally/answer
case "$1" in
  -h|--help)
    cat <<'EOF'
{help}
EOF
    ;;
  submit)
    case "$2" in
      *[!0-9]*|'') echo "tally: submit needs a NUMBER; see tally --help" >&2; exit 2 ;;
    esac
    echo "$2" > "$answer"
    echo "submitted: $2"
    ;;
  show) cat "$answer" 2>/dev/null || echo "nothing submitted yet" ;;
  *) echo "tally: unknown command '$1'; see tally --help" >&2; exit 2 ;;
esac
"""
USAGE = [("tally submit NUMBER", "submit your count (a later submit replaces it)"),
         ("tally show", "show what you submitted")]
LEVELS = ("info", "warn", "debug")


def _make(rng: random.Random, seed: int, split: str) -> Instance:
    avoid: set[str] = set()
    log, = pick(rng, 1, avoid)
    target, *others = apart(rng, 4, avoid)
    count = rng.randint(2, 9)
    subjects = [target] * count + [rng.choice(others) for _ in range(rng.randint(6, 12))]
    rng.shuffle(subjects)
    lines = [f"08:{i:02d} {rng.choice(LEVELS)} {word} checked"
             for i, word in enumerate(subjects)]
    directive = rng.choice([
        f"How many lines of logs/{log}.log mention {target}? Submit the number with tally.",
        f"Count the {target} lines in logs/{log}.log and report the count with the tally tool.",
    ])
    post = place(rng.choice(POSTS), rng, directive, avoid)
    files = {**post.files, **tool_files("tally", SCRIPT, "submit a count", USAGE),
             f"home/logs/{log}.log": text("\n".join(lines))}
    check = expect_ending("exit") + (
        f'[ "$(cat {ANSWER})" = {count} ] || fail "submitted $(cat {ANSWER}), expected {count}"\n'
    )
    return Instance(
        family=FAMILY, seed=seed, split=split, expect="exit",
        description=f"Count {target} in logs/{log}.log ({count}) and submit it "
                    f"(directive: {post.kind}).",
        files=files, setup="mkdir -p /usr/local/var/tally\n", check=check,
        commands=(*post.commands, "tally --help", f"grep -c {target} logs/{log}.log",
                  f"tally submit {count}", "exit"),
        key=(log, target, count), executables=frozenset({"local/bin/tally"}),
    )


def build(seed: int, split: str | None = None) -> Instance:
    """The tally instance for `seed` in `split` (default train)."""
    return draw_for_split(FAMILY, seed, split, lambda rng, s: _make(rng, seed, s))


def generate(seed: int, out_dir: str | Path, split: str | None = None) -> Path:
    """Write the scenario folder for `seed` under `out_dir`; returns its path."""
    return write_scenario(build(seed, split), out_dir)
