"""Eval episodes per minute with the episode's KV cache kept across turns vs re-prefilled.

    .venv/bin/python bench/eval.py [--base DIR] [--families ledger,ticket] [--rounds 2]
                                   [--max-new-tokens 32] [--turn-budget 8] [--dtype auto]

One held-out instance per family (built-in suite, first seed, turn budget cut to
--turn-budget) is played by the base alone, greedily, with `ModelPolicy(reuse_cache=True)`
and with `reuse_cache=False`, alternating episode by episode in this one process (the
machine is shared: only the ratio means something). Both sides must produce the same
transcripts (counted), and the kept side's full prefills (later turns whose prompt did not
extend the cache) are reported. Results go to bench/results/eval.json. Needs bubblewrap
(the episodes run sandboxed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from sekft.base import load_base
from sekft.device import DTYPE_CHOICES, choose_dtype, describe
from sekft.eval import EpisodeConfig, run_suite
from sekft.generate import ModelPolicy, Sampling
from sekft.scenario import load_scenarios
from sekft.scenarios import generate
from sekft.template import ChatTemplate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_BASE = ROOT / "build" / "smollm2-135m-instruct"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(DEFAULT_BASE) if DEFAULT_BASE.is_dir()
                   else str(ROOT / "sekft" / "assets" / "default-base"))
    p.add_argument("--families", default="ledger,tally,ticket")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--turn-budget", type=int, default=8,
                   help="turns per episode (a base alone plays to its budget)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    dtype, why = choose_dtype("cpu", args.dtype)
    print(describe("cpu", dtype, why))
    base = load_base(args.base, dtype=dtype, device="cpu")
    template = ChatTemplate(base.chat_template, base.special_tokens)
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    sides = ("kept", "re-prefilled")
    seconds = dict.fromkeys(sides, 0.0)
    episodes = dict.fromkeys(sides, 0)
    full_prefills = turns = same = compared = 0
    config = EpisodeConfig()
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            generate(family, 0, tmp, split="heldout")
        scenarios = [replace(s, turn_budget=args.turn_budget) for s in load_scenarios(tmp)]
        # Alternate per episode, and the order each time: the machine's load drifts.
        for round_ in range(args.rounds):
            for i, scenario in enumerate(scenarios):
                order = sides if (round_ + i) % 2 == 0 else sides[::-1]
                played = {}
                for side in order:
                    policy = ModelPolicy(base.model, base.tokenizer, template, sampling,
                                         base.config.max_position_embeddings,
                                         reuse_cache=side == "kept")
                    start = time.perf_counter()
                    [episode] = run_suite([scenario], lambda s, p=policy: p, config)
                    seconds[side] += time.perf_counter() - start
                    episodes[side] += 1
                    played[side] = episode
                    print(f"round {round_ + 1} {scenario.id} {side:13s} "
                          f"{time.perf_counter() - start:7.1f} s", flush=True)
                full_prefills += played["kept"].full_prefills
                turns += played["kept"].turns
                same += played["kept"].messages == played["re-prefilled"].messages
                compared += 1
    rate = {side: 60 * episodes[side] / seconds[side] for side in sides}
    result = {
        "base": args.base,
        "cpu": platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "families": args.families,
        "max_new_tokens": args.max_new_tokens,
        "turn_budget": args.turn_budget,
        "episodes_per_minute": rate,
        "speedup": rate["kept"] / rate["re-prefilled"],
        "same_transcripts": f"{same}/{compared}",
        "full_prefills": f"{full_prefills} of {turns} turns",
    }
    print(f"episodes/min: kept cache {rate['kept']:.2f}, re-prefilled "
          f"{rate['re-prefilled']:.2f}: {result['speedup']:.2f}x; same transcripts "
          f"{same}/{compared}; full prefills {full_prefills} of {turns} turns")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
