"""Render + tokenize + mask throughput of sekft.mask, next to transformers on the same sessions.

    .venv/bin/python bench/mask.py [--sessions 2000] [--template DIR] [--repeat 3]
    .venv/bin/python bench/mask.py --data /tmp/traj.jsonl   # recorded trajectories instead

Generates multi-turn shell sessions (banner, ls, cat, --help output with ANSI noise and long
lines, exit), then times, in one run and on the same sessions:
- sekft: `encode_sessions` (R, every P_i and H_i rendered, R and every P_i tokenized, spans,
  labels and all five checks), with the folder's stock template;
- transformers render only: `apply_chat_template(tokenize=False)`;
- transformers masking: `apply_chat_template(tokenize=True, return_dict=True,
  return_assistant_tokens_mask=True)` with a ChatML template carrying `{% generation %}` tags
  (its only masking path: one render, one tokenization, no checks).
Also times the parts of sekft's cost (its renders; tokenizing R, which transformers pays
too), the floor of this contract (those two summed: no mask built, no check run), and a floor
no masking method can beat: one render of R plus its tokenization with offsets. Reports
sessions/s, tokens/s and ratios against transformers' masking path, in CPU time (steady
when the machine is shared) and wall time; best of `--repeat` round-robin rounds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sekft.mask import encode_sessions, gc_paused, session_renders  # noqa: E402
from sekft.template import ChatTemplate, normalize_for_template  # noqa: E402
from sekft.tokenizer import load_tokenizer  # noqa: E402

# SmolLM2's ChatML template with transformers' generation tags around what the model says.
CHATML_GENERATION = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

COMMANDS = ["ls", "ls -la", "cat README", "pwd", "provider --help", "cat notes.txt", "env",
            "grep -r TODO .", "wc -l *.txt", "head -n 20 log"]
WORDS = "alpha beta gamma delta file dir usage option value error ok done".split()


def shell_output(rng: random.Random, command: str) -> str:
    """A plausible output for `command`: listings, help text, ANSI colour, a long line."""
    lines = []
    for _ in range(rng.randint(1, 12)):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        if rng.random() < 0.2:
            words = f"\x1b[1;3{rng.randint(1, 7)}m{words}\x1b[0m"
        lines.append(words)
    if command.endswith("--help"):
        lines = ["Usage: provider [OPTION]... COMMAND"] + [f"  --{w:<12} {w} it" for w in WORDS]
    if rng.random() < 0.1:
        lines.append("x" * rng.randint(200, 400))
    return "\n".join(lines) + "\n$ "


def shell_sessions(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` shell sessions of 2..12 commands, ending with `exit`, as {role, content} turns."""
    rng = random.Random(seed)
    sessions = []
    for _ in range(n):
        messages = [{"role": "system", "content": "You are operating a POSIX shell."},
                    {"role": "user", "content": "Welcome to host-7 (GNU/Linux)\nLast login: "
                     "Mon\n$ "}]
        for _ in range(rng.randint(1, 11)):
            command = rng.choice(COMMANDS)
            messages.append({"role": "assistant", "content": command})
            messages.append({"role": "user", "content": shell_output(rng, command)})
        messages.append({"role": "assistant", "content": "exit"})
        sessions.append(normalize_for_template(messages))
    return sessions


def best_times(
    contenders: list[tuple[str, Callable[[], object]]], repeat: int, clock: Callable[[], float]
) -> list[float]:
    """Best time of each contender on `clock` over `repeat` rounds, run round-robin so that
    load from elsewhere on the machine falls on every contender alike."""
    best = [float("inf")] * len(contenders)
    for _ in range(repeat):
        for n, (_, run) in enumerate(contenders):
            start = clock()
            run()
            best[n] = min(best[n], clock() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--template", default=str(ROOT / "tests/fixtures/templates/smollm2"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data", help="JSONL sessions (e.g. recorded trajectories) to use "
                        "instead of generated ones")
    args = parser.parse_args(argv)

    if args.data:
        from sekft.data import read_sessions

        sessions = [normalize_for_template(s.messages) for s in read_sessions(args.data)]
        args.sessions = len(sessions)
    else:
        sessions = shell_sessions(args.sessions)
    template = ChatTemplate.from_folder(args.template)
    tokenizer = load_tokenizer(args.template)
    generation = ChatTemplate(CHATML_GENERATION, template.special_tokens)
    encoded = encode_sessions(sessions, template, tokenizer)
    tokens = sum(len(e.input_ids) for e in encoded)
    texts = [e.text for e in encoded]
    contenders = [
        ("sekft encode_sessions (stock template, all checks)",
         lambda: encode_sessions(sessions, template, tokenizer)),
        ("  of which: renders R, every P_i and H_i",
         lambda: [session_renders(m, template) for m in sessions]),
        # The parts and floors run with the cyclic GC paused, as inside encode_sessions:
        # its collections would otherwise tax whichever builds more objects.
        ("  of which: tokenizing R with offsets (transformers pays it too)",
         gc_paused()(lambda: [(e.ids, e.offsets) for e in tokenizer.encode_batch(
             texts, add_special_tokens=False)])),
        ("floor: render R once + tokenize it (no mask)",
         gc_paused()(lambda: [(e.ids, e.offsets) for e in tokenizer.encode_batch(
             [template.render(m) for m in sessions], add_special_tokens=False)])),
        ("sekft encode_sessions (generation-tagged ChatML)",
         lambda: encode_sessions(sessions, generation, tokenizer)),
    ]
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:
        PreTrainedTokenizerFast = None
    if PreTrainedTokenizerFast is not None:
        hf = PreTrainedTokenizerFast(tokenizer_object=load_tokenizer(args.template),
                                     **template.special_tokens)
        contenders += [
            ("transformers render only (stock template)",
             lambda: hf.apply_chat_template(sessions, chat_template=template.source,
                                            tokenize=False)),
            ("transformers return_assistant_tokens_mask",
             lambda: hf.apply_chat_template(sessions, chat_template=CHATML_GENERATION,
                                            tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)),
        ]
    print(f"{args.sessions} sessions, {tokens} tokens ({tokens / args.sessions:.0f}/session), "
          f"template {args.template}, best of {args.repeat} round-robin rounds")
    # CPU time (all threads of this process) barely moves with other load on the machine;
    # wall time is what a user waits.
    for label, clock in (("CPU time", time.process_time), ("wall time", time.perf_counter)):
        times = best_times(contenders, args.repeat, clock)
        baseline = times[-1] if PreTrainedTokenizerFast is not None else None
        print(f"{label}:")
        # What the contract itself costs at least: its renders plus one tokenization of R,
        # with no mask built and no check run.
        rows = [*zip((name for name, _ in contenders), times, strict=True),
                ("floor of this contract: its renders + tokenizing R", times[1] + times[2])]
        for name, seconds in rows:
            ratio = f"{baseline / seconds:5.2f}x" if baseline else "  n/a"
            print(f"  {name:<54} {args.sessions / seconds:8.0f} sessions/s "
                  f"{tokens / seconds:10.0f} tokens/s  {ratio} vs transformers' mask path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
