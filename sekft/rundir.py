"""What a training run writes in its `--out` folder, and reading it back to resume.

    out/
      run.json                   config, base fingerprint, template and data hashes, versions
      metrics.jsonl              one JSON object per logged step
      loss.svg                   the loss curve, redrawn as the run goes
      checkpoint-N/              weights (adapter or full), optimizer.pt, rng.pt,
                                 trainer_state.json (step, scheduler, data order)
      adapter_model.safetensors  the final adapter (PEFT format), or the full model with --full
      adapter_config.json

Every file is written to a temporary name in the same folder and renamed into place, and a
checkpoint is assembled in a hidden temporary folder and renamed to `checkpoint-N` only once
complete, so a run killed at any instant leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from sekft.errors import TrainError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# What --overwrite removes: a run's own outputs, never anything else the folder holds.
RUN_OUTPUTS = (
    "run.json",
    "metrics.jsonl",
    "loss.svg",
    "adapter_model.safetensors",
    "adapter_config.json",
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: object) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def replace_dir(new: Path, out: Path) -> None:
    """Put the complete folder `new` at `out` (same file system), replacing any folder there.
    A reader sees the old folder or the new one, never a mix: the old one is renamed aside
    first and removed only once the new one is in place."""
    if not out.exists():
        new.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    new.rename(out)
    shutil.rmtree(old)


def claim_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Make `out` ready for a run, refusing to mix two runs in one folder.

    A folder holding another run (a run.json or a checkpoint) is refused unless `resume`
    (continue it) or `overwrite` (remove that run's outputs: only the files a run writes).
    A folder holding anything else is refused unless `overwrite`, which then leaves the
    foreign files alone.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a folder; give a folder path")
    out.mkdir(parents=True, exist_ok=True)
    entries = [p for p in out.iterdir() if not p.name.startswith(".")]
    if not entries or resume:
        return
    if not overwrite:
        holds_run = (out / "run.json").exists() or any(CHECKPOINT.match(p.name) for p in entries)
        what = "another training run" if holds_run else f"{len(entries)} other files"
        raise TrainError(
            f"--out {out} already holds {what}; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    for p in entries:
        if CHECKPOINT.match(p.name):
            shutil.rmtree(p)
        elif p.name in RUN_OUTPUTS:
            p.unlink()
    for p in out.glob(".checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict:
    """Every random generator the loop draws from (dropout, shuffles): python, torch, CUDA."""
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # As many GPUs as both runs see: a resume may see fewer (CUDA_VISIBLE_DEVICES).
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    out: Path,
    step: int,
    write_weights: Callable[[Path], None],
    optimizer: torch.optim.Optimizer,
    train_state: dict,
) -> Path:
    """Write `out/checkpoint-{step}` whole or not at all; returns its path.

    `write_weights(folder)` writes the adapter (or full model) into the folder it is given;
    `train_state` (JSON-able: step, scheduler, data order) is written last. Everything goes
    into a hidden temporary folder next to the final one, which is renamed into place.
    """
    out = Path(out)
    final = out / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=out))
    try:
        write_weights(tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(train_state, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Saving the same step again (a resumed run interrupted at once): the old copy
            # is moved aside first, so some complete checkpoint-N exists at every instant
            # but the one between the two renames, when the previous step's still does.
            old = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-old-", dir=out))
            os.rename(final, old / "c")
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The complete `checkpoint-N` with the largest N in `out`, or None.

    Complete means renamed into place with its trainer_state.json; half-written temporary
    folders (hidden, `.checkpoint-*`) are never candidates.
    """
    found = []
    for p in Path(out).iterdir() if Path(out).is_dir() else []:
        m = CHECKPOINT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def load_checkpoint(folder: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer and every RNG from `folder`; returns its train_state.

    The weights are the caller's to load (an adapter or a full model).
    """
    folder = Path(folder)
    try:
        # Read onto the CPU: load_state_dict moves each state to its parameter's device, so a
        # run saved on cuda:1 resumes on cuda:0 or on a machine without the GPU.
        optimizer.load_state_dict(
            torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        )
        set_rng_state(torch.load(folder / "rng.pt", map_location="cpu", weights_only=True))
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise TrainError(
            f"{folder}: cannot resume from this checkpoint ({_first_line(e)}); delete it to "
            "resume from the one before, or start again with --overwrite"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def remove_stale_temporaries(out: Path) -> None:
    """Delete half-written checkpoint folders a killed run left behind."""
    for p in Path(out).glob(".checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)


def append_metrics(out: Path, record: dict) -> None:
    """Append one JSON line to out/metrics.jsonl (one write call per line)."""
    with open(Path(out) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(out: Path, up_to_step: int | None = None) -> list[dict]:
    """The records of out/metrics.jsonl with step <= up_to_step (all if None).

    A torn last line (the run was killed mid-write) is skipped.
    """
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if up_to_step is None or record["step"] <= up_to_step:
            records.append(record)
    return records


def rewind_metrics(out: Path, step: int) -> None:
    """Keep only metrics of steps <= `step`: a resumed run redoes the steps after it."""
    records = read_metrics(out, step)
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_atomic(Path(out) / "metrics.jsonl", lines)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round numbers (1, 2 or 5 times a power of ten apart) spanning lo..hi."""
    span = hi - lo if hi > lo else 1.0
    raw = span / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def loss_curve_svg(
    train: list[tuple[int, float]],
    val: list[tuple[int, float]] | None = None,
    width: int = 640,
    height: int = 360,
) -> str:
    """An SVG line chart of (step, loss) points: training in blue, validation in orange.

    Axes carry round tick values; an empty `train` gives a chart with no lines.
    """
    pad_l, pad_r, pad_t, pad_b = 56, 16, 16, 40
    val = val or []
    points = list(train) + list(val)
    x_hi = max((s for s, _ in points), default=1)
    y_lo = min((v for _, v in points), default=0.0)
    y_hi = max((v for _, v in points), default=1.0)
    if y_hi <= y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(step: float) -> float:
        return pad_l + plot_w * step / max(x_hi, 1)

    def y(loss: float) -> float:
        return pad_t + plot_h * (1 - (loss - y_lo) / (y_hi - y_lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" '
        'stroke="black"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" stroke="black"/>',
    ]
    for t in _nice_ticks(y_lo, y_hi):
        parts.append(
            f'<text x="{pad_l - 4}" y="{y(t) + 4:.1f}" text-anchor="end">{t:g}</text>'
            f'<line x1="{pad_l}" y1="{y(t):.1f}" x2="{pad_l + plot_w}" y2="{y(t):.1f}" '
            'stroke="#ddd"/>'
        )
    for t in _nice_ticks(0, x_hi):
        parts.append(
            f'<text x="{x(t):.1f}" y="{pad_t + plot_h + 14}" text-anchor="middle">{t:g}</text>'
        )
    parts.append(
        f'<text x="{pad_l + plot_w / 2}" y="{height - 6}" text-anchor="middle">step</text>'
    )
    series_list = ((train, "#1f77b4", "train"), (val, "#ff7f0e", "validation"))
    for k, (series, colour, name) in enumerate(series_list):
        parts.append(
            f'<text x="{pad_l + plot_w - 4}" y="{pad_t + 12 + 14 * k}" text-anchor="end" '
            f'fill="{colour}">{name}</text>'
        )
        if series:
            coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in series)
            parts.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}">'
                f"<title>{name} loss</title></polyline>"
            )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
