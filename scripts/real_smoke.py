"""CI's real-model smoke run: a few LoRA steps on SmolLM2-135M-Instruct lower the validation
loss, and the adapter plays one held-out eval episode to an ending.

    .venv/bin/python scripts/real_smoke.py [BASE] [WORK]

BASE defaults to build/smollm2-135m-instruct (`make real-base`), WORK to build/real-smoke.
Exits non-zero, with one line saying what went wrong, when the loss does not fall or the
episode is a scenario error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from sekft.demo import command
from sekft.rundir import read_metrics

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def run(argv: list[str]) -> None:
    print("$ " + " ".join(argv), flush=True)
    if subprocess.run(argv).returncode != 0:
        sys.exit(f"real-smoke: failed: {' '.join(argv)}")


def main() -> int:
    base = sys.argv[1] if len(sys.argv) > 1 else "build/smollm2-135m-instruct"
    work = Path(sys.argv[2] if len(sys.argv) > 2 else "build/real-smoke")
    shutil.rmtree(work, ignore_errors=True)
    py = [sys.executable, "-m"]
    families = "ledger,tally"
    run(py + ["sekft.scenarios.record", "--split", "train", "--families", families,
              "--seeds", "6", "--out", str(work / "train.jsonl"), "--jobs", "2"])
    run(command("sekft-train", "sekft.sft") + [
        "--config", str(RECIPES / "smollm2-135m-train.toml"), "--base", base,
        "--data", str(work / "train.jsonl"), "--out", str(work / "adapter"),
        "--max-steps", "6", "--batch-tokens", "2048", "--val-fraction", "0.2", "--eval-every", "2",
    ])
    val = [m["val_loss"] for m in read_metrics(work / "adapter") if "val_loss" in m]
    print(f"real-smoke: validation loss by eval: {', '.join(f'{v:.3f}' for v in val)}")
    if len(val) < 2 or not val[-1] < val[0]:
        sys.exit(f"real-smoke: validation loss did not fall: {val}")
    run(py + ["sekft.scenarios", "--split", "heldout", "--families", "ledger", "--seeds", "1",
              "--out", str(work / "scenarios")])
    run(command("sekft-eval", "sekft.eval") + [
        "--config", str(RECIPES / "smollm2-135m-eval.toml"), "--base", base,
        "--adapter", str(work / "adapter"), "--scenarios", str(work / "scenarios"),
        "--out", str(work / "eval"),
    ])
    episodes = json.loads((work / "eval" / "results.json").read_text())["episodes"]
    if len(episodes) != 1 or episodes[0].get("error"):
        sys.exit(f"real-smoke: the eval episode did not run: {episodes}")
    e = episodes[0]
    print(f"real-smoke: one episode: ending {e['ending']}, {e['turns']} turns, "
          f"passed {e['passed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
