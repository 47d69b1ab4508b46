"""`sekft-train`: assistant-only (Q)LoRA supervised fine-tuning, the whole loop in `train`.

Data flow: trajectories (JSONL `messages`) -> `normalize_for_template` -> the model's own
chat template -> `encode_session` (input ids + assistant-only labels) -> packed rows
(`sekft.pack`) -> the loop: hidden states -> loss on trained positions only
(`sekft.loss`) -> AdamW over LoRA weights -> checkpoints and metrics (`sekft.rundir`).

Every knob is a field of `TrainConfig`, and the command line is generated from those fields
one to one (`--batch-tokens` is `batch_tokens`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

import sekft
from sekft import distributed
from sekft.base import load_base
from sekft.checkpoint import resolve_base
from sekft.data import read_sessions
from sekft.device import DTYPE_CHOICES, autocast, choose_dtype, default_device, describe
from sekft.errors import ConfigError, DataError, TemplateError, TrainError, run_cli
from sekft.lora import (
    DEFAULT_TARGETS,
    attach_lora,
    export_merged,
    load_adapter,
    lora_modules,
    lora_parameters,
    save_adapter,
)
from sekft.loss import trained_token_loss
from sekft.mask import encode_sessions, inspect_sessions
from sekft.pack import Example, Row, collate_row, drop_overlong, plan_epoch, plan_steps
from sekft.progress import ProgressLine, current_memory, format_progress, peak_memory
from sekft.recipe import parse_with_recipe
from sekft.rundir import (
    append_metrics,
    claim_out_dir,
    latest_checkpoint,
    load_checkpoint,
    loss_curve_svg,
    read_metrics,
    remove_stale_temporaries,
    rewind_metrics,
    save_checkpoint,
    write_atomic,
    write_json_atomic,
)
from sekft.template import ChatTemplate, parse_template_vars
from sekft.tokenizer import load_tokenizer

# Fields that must not change between a run and its --resume: they fix the data order, the
# model being trained and the schedule, so changing them would not continue the same run.
# The data, base and template are compared by content hash instead (paths may move).
RESUME_FIXED = (
    "full", "r", "alpha", "dropout", "targets", "rslora", "lr", "weight_decay", "warmup_ratio",
    "min_lr_ratio", "epochs", "max_steps", "batch_tokens", "max_len", "seed", "val_fraction",
    "load_4bit",
)  # fmt: skip


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    """Everything a training run depends on; `sekft-train --x-y` sets field `x_y`."""

    data: str = field(metadata=_help("JSONL file or folder of *.jsonl trajectories"))
    base: str = field(metadata=_help("base checkpoint folder, or org/name in the HF cache"))
    out: str = field(default="", metadata=_help("output folder (required unless --inspect)"))
    load_4bit: bool = field(default=False, metadata=_help("quantize the base to NF4 (QLoRA)"))
    full: bool = field(
        default=False, metadata=_help("train every weight, no LoRA; saves a full checkpoint")
    )
    r: int = field(default=16, metadata=_help("LoRA rank"))
    alpha: float = field(default=32.0, metadata=_help("LoRA alpha (scaling alpha / r)"))
    dropout: float = field(default=0.05, metadata=_help("LoRA dropout"))
    targets: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS), metadata=_help("LoRA target modules")
    )
    rslora: bool = field(default=False, metadata=_help("scale by alpha / sqrt(r) (rsLoRA)"))
    lr: float = field(default=2e-4, metadata=_help("peak learning rate"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    warmup_ratio: float = field(default=0.03, metadata=_help("share of steps in linear warmup"))
    min_lr_ratio: float = field(default=0.0, metadata=_help("cosine decays to lr * this"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping (0: off)"))
    epochs: int = field(default=1, metadata=_help("passes over the training sessions"))
    max_steps: int = field(default=0, metadata=_help("optimizer steps (0: as epochs give)"))
    batch_tokens: int = field(default=8192, metadata=_help("tokens per optimizer step (packed)"))
    max_len: int = field(default=2048, metadata=_help("row length; longer sessions are dropped"))
    seed: int = field(default=0, metadata=_help("seed of LoRA init, data order and dropout"))
    grad_ckpt: bool = field(default=False, metadata=_help("recompute activations per block"))
    save_every: int = field(default=0, metadata=_help("checkpoint every N steps (0: at the end)"))
    eval_every: int = field(default=0, metadata=_help("validation every N steps (0: at the end)"))
    log_every: int = field(default=1, metadata=_help("metrics line every N steps"))
    val_fraction: float = field(default=0.05, metadata=_help("share of sessions held out"))
    loss_chunk: int = field(default=512, metadata=_help("trained positions per lm_head chunk"))
    template: str = field(default="", metadata=_help("named chat template (default: the default)"))
    template_var: list[str] = field(
        default_factory=list,
        metadata=_help("KEY=VALUE template variable for every render, as the server's "
                       "chat_template_kwargs (e.g. enable_thinking=false); repeatable"),
    )
    device: str = field(default="", metadata=_help("cuda, cpu, ... (default: cuda if present)"))
    dtype: str = field(
        default="auto", metadata=_help("auto, bfloat16 or float32 (auto: bf16 if native here)")
    )
    strict: bool = field(default=False, metadata=_help("mask findings, dropped sessions: errors"))
    resume: bool = field(default=False, metadata=_help("continue from the newest checkpoint"))
    overwrite: bool = field(default=False, metadata=_help("replace the run already in --out"))
    inspect: bool = field(default=False, metadata=_help("show what trains, load no weights, exit"))
    dist_timeout: float = field(
        default=600.0, metadata=_help("torchrun: seconds a rank waits for the others")
    )


# ---------------------------------------------------------------- data


@dataclass
class TrainData:
    """Encoded sessions ready to pack, and what happened to the others."""

    train: list[Example]
    val: list[Example]
    sessions: list  # (index in the data, normalised Session) behind train + val, for --inspect
    untrained: list[str]  # sources of sessions with no trained token (dropped)
    overlong: list[Example]  # sessions longer than max_len (dropped)
    violations: int  # mask-check findings over kept sessions (see sekft.mask)
    sha256: str  # of the normalised sessions, in order
    # Sessions behind train and val: fewer than their examples where turns train from their
    # own renders (sekft.mask).
    train_sessions: int = 0
    val_sessions: int = 0


def split_validation(n: int, fraction: float, seed: int) -> set[int]:
    """Indices of the held-out sessions: floor(n * fraction) of range(n), chosen by `seed`."""
    k = int(n * fraction)
    return set(random.Random(f"val:{seed}").sample(range(n), k)) if k else set()


def prepare_data(cfg: TrainConfig, template, tokenizer) -> TrainData:
    """Read, normalise, render, mask and length-filter the sessions of `cfg.data`.

    Sessions that train no token (no assistant turn) are dropped and named, as are sessions
    longer than `max_len`; under `strict` either is a DataError, as is any mask violation
    (MaskError from `encode_sessions`). No session left to train is a DataError.
    """
    sessions = read_sessions(cfg.data)
    if not sessions:
        raise DataError(f"{cfg.data}: no sessions found; give JSONL lines with 'messages'")
    sources = [f"{s.source_file}:{s.source_line}" for s in sessions]
    encoded = encode_sessions(
        [s.messages for s in sessions], template, tokenizer, strict=cfg.strict, names=sources
    )
    digest = hashlib.sha256()
    # One group of examples per session: its render, then a render of its own for each turn
    # the full render cannot train (sekft.mask `train_own_renders`: Qwen3's think blocks).
    groups, kept, untrained, overlong, violations = [], [], [], [], 0
    for index, (session, source, enc) in enumerate(zip(sessions, sources, encoded, strict=True)):
        digest.update(json.dumps(enc.messages, sort_keys=True).encode() + b"\n")
        parts = [Example(enc.input_ids, enc.labels, source)] + [
            Example(own.input_ids, own.labels, f"{source} turn {own.spans[0].turn}")
            for own in enc.own_renders
        ]
        parts = [e for e in parts if e.n_trained]
        if not parts:
            has_turn = any(m["role"] == "assistant" for m in enc.messages)
            why = "trains no token" if has_turn else "has no assistant turn"
            untrained.append(f"{source} {why}")
            continue
        violations += sum(len(part.violations) for part in enc.parts)
        fit, too_long = drop_overlong(parts, cfg.max_len, cfg.strict)
        overlong += too_long
        if fit:
            groups.append(fit)
            kept.append((index, dataclasses.replace(session, messages=enc.messages)))
    if untrained and cfg.strict:
        raise DataError(f"{untrained[0]}: nothing to train on; remove it or drop --strict")
    if not groups:
        raise DataError(
            f"{cfg.data}: no session left to train on ({len(untrained)} have nothing to train, "
            f"{len(overlong)} exceed --max-len {cfg.max_len})"
        )
    # Validation holds out whole sessions, so no turn of a held-out session trains.
    held_out = split_validation(len(groups), cfg.val_fraction, cfg.seed)
    return TrainData(
        train=[e for i, group in enumerate(groups) if i not in held_out for e in group],
        val=[e for i, group in enumerate(groups) if i in held_out for e in group],
        sessions=kept,
        untrained=untrained,
        overlong=overlong,
        violations=violations,
        sha256=digest.hexdigest(),
        train_sessions=len(groups) - len(held_out),
        val_sessions=len(held_out),
    )


# ---------------------------------------------------------------- schedule


def lr_at(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    Linear warmup over the first `warmup` steps (peak * (step + 1) / warmup, so the first
    step already moves), then cosine decay from peak at step `warmup` to peak * min_ratio
    at step `total` (reached only past the last step).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def plan_run(lengths: list[int], cfg: TrainConfig) -> list[list[list[int]]]:
    """The run's steps (rows of example indices): `epochs` passes, or exactly `max_steps`
    steps (repeating the data as often as needed) when it is set."""
    if not cfg.max_steps:
        return plan_steps(lengths, cfg.max_len, cfg.batch_tokens, cfg.seed, cfg.epochs)
    steps: list = []
    epoch = 0
    while len(steps) < cfg.max_steps:
        steps += plan_epoch(lengths, cfg.max_len, cfg.batch_tokens, cfg.seed, epoch)
        epoch += 1
    return steps[: cfg.max_steps]


# ---------------------------------------------------------------- model plumbing


def resolve_device_dtype(cfg: TrainConfig) -> tuple[torch.device, torch.dtype, str]:
    """(device, compute dtype, why) for cfg.device/dtype: CUDA when present, else CPU, and
    `--dtype auto` as `sekft.device.choose_dtype` decides (bf16 where it is native)."""
    device = torch.device(cfg.device) if cfg.device else default_device()
    if cfg.dtype not in DTYPE_CHOICES or cfg.dtype == "float16":
        # float16 gradients underflow, and AdamW's state in float16 turns weights into NaN,
        # without the loss scaling sekft-train does not do.
        raise ConfigError(f"--dtype {cfg.dtype!r}: training runs in auto, bfloat16 or float32")
    return device, *choose_dtype(device, cfg.dtype)


def weights_dtype(cfg: TrainConfig, dtype: torch.dtype) -> torch.dtype:
    """The dtype the base is loaded in: `dtype`, except that `--full` keeps float32 master
    weights (AdamW's updates to bf16 weights mostly round away: a norm weight of 1.0 moves
    only by steps of 2^-7) and computes in `dtype` under autocast."""
    return torch.float32 if cfg.full else dtype


def trainable_parameters(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """Attach fresh LoRA adapters and return their weights; with `cfg.full`, every weight
    of the model instead."""
    if cfg.full:
        if lora_modules(model):
            raise ConfigError("--full trains the whole model; this model carries LoRA layers")
        for p in model.parameters():
            p.requires_grad_(True)
        return list(dict.fromkeys(model.parameters()))
    # A model that already carries LoRA layers is refused by attach_lora: detach them first
    # (the resident server does), so every run starts from a fresh, seeded adapter.
    attach_lora(model, cfg.r, cfg.alpha, cfg.dropout, cfg.targets, cfg.rslora, seed=cfg.seed)
    return list(lora_parameters(model).values())


def weight_writer(model: torch.nn.Module, cfg: TrainConfig, base_path: Path):
    """A function writing the trained weights into a folder: the PEFT adapter, or with
    `full` a complete checkpoint folder (weights, config, tokenizer) our loader reads."""
    if cfg.full:
        return lambda folder: export_merged(model, folder, base_path)
    return lambda folder: save_adapter(model, folder, cfg.base)


def load_weights(model: torch.nn.Module, cfg: TrainConfig, folder: Path) -> None:
    """Load what `weight_writer` wrote in `folder` back into `model`."""
    if not cfg.full:
        load_adapter(model, folder)
        return
    state = load_file(folder / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise TrainError(
            f"{folder}/model.safetensors does not fit the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); resume with the base the run started from"
        )


@torch.no_grad()
def evaluate(model, rows: list[Row], device: torch.device, dtype: torch.dtype,
             chunk: int) -> tuple[float, int]:
    """(Loss summed over the trained tokens of `rows`, how many there are)."""
    model.eval()
    total, count = 0.0, 0
    for row in rows:
        row = row.to(device)
        with autocast(device, dtype):
            hidden = model.hidden(row.input_ids, row.position_ids, row.doc_ids)
        loss, n = trained_token_loss(hidden, model.output_weight(), row.labels, chunk)
        total += loss.item()
        count += n
    return total, count


# ---------------------------------------------------------------- run description


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_fingerprint(folder: Path) -> str:
    """sha256 of config.json and the names and sizes of the weight files: cheap, and changes
    whenever the checkpoint does in practice (reading every weight byte would take minutes)."""
    parts = [(folder / "config.json").read_bytes()]
    for p in sorted(folder.glob("*.safetensors")):
        parts.append(f"{p.name}:{p.stat().st_size}".encode())
    return _sha256(b"\n".join(parts))


def versions() -> dict[str, str]:
    """Versions that change what a run computes. Read from package metadata: importing
    bitsandbytes only to ask costs seconds."""
    found = {"sekft": sekft.__version__, "python": platform.python_version(),
             "torch": torch.__version__, "cuda": torch.version.cuda or ""}
    for package in ("tokenizers", "bitsandbytes", "safetensors", "jinja2"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = ""
    return found


def template_identity(template: ChatTemplate) -> str:
    """What the run's template hash covers: its source, and its variables when it has any
    (a run rendered with enable_thinking=false is not resumed without it)."""
    if not template.variables:
        return template.source
    return template.source + "\n" + json.dumps(template.variables, sort_keys=True)


def describe_run(cfg: TrainConfig, base_path: Path, template_source: str, data: TrainData,
                 total_steps: int) -> dict:
    return {
        "config": dataclasses.asdict(cfg),
        "base": {"path": str(base_path), "fingerprint": base_fingerprint(base_path)},
        "template_sha256": _sha256(template_source.encode()),
        "data": {
            "sha256": data.sha256,
            "train_sessions": data.train_sessions,
            "val_sessions": data.val_sessions,
            # One per session, plus one per turn trained from its own render.
            "train_examples": len(data.train),
            "val_examples": len(data.val),
            "dropped_untrained": data.untrained,
            "dropped_overlong": [e.source for e in data.overlong],
            "mask_violations": data.violations,
            "train_tokens": sum(len(e) for e in data.train),
            "trained_tokens": sum(e.n_trained for e in data.train),
        },
        "total_steps": total_steps,
        "versions": versions(),
    }


def check_same_run(out: Path, run: dict) -> None:
    """Refuse to --resume a run whose data, base, template or fixed settings changed."""
    path = out / "run.json"
    if not path.exists():
        return
    before = json.loads(path.read_text())
    changes = [
        f"config.{k}" for k in RESUME_FIXED if before["config"].get(k) != run["config"].get(k)
    ]
    for key, now, then in (
        ("base fingerprint", run["base"]["fingerprint"], before["base"]["fingerprint"]),
        ("template", run["template_sha256"], before["template_sha256"]),
        ("data", run["data"]["sha256"], before["data"]["sha256"]),
    ):
        if now != then:
            changes.append(key)
    if changes:
        raise TrainError(
            f"{path}: --resume with a different {', '.join(changes)} than the run in --out; "
            "resume with the same settings, or start over with --overwrite"
        )


# ---------------------------------------------------------------- the loop


@contextlib.contextmanager
def ctrl_c_requests_stop(stop: threading.Event):
    """While active, Ctrl-C sets `stop` (the loop saves and ends after the current step); a
    second Ctrl-C interrupts at once. Only the main thread can own signals: elsewhere (the
    resident server's worker) the caller sets `stop` itself. Under torchrun, SIGTERM does the
    same: torchrun passes the signal it gets (SIGINT, or a scheduler's SIGTERM) on to every
    rank, and kills them 30 s later."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signals = [signal.SIGINT] + ([signal.SIGTERM] if distributed.launched() else [])
    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass
class TrainResult:
    """How a run ended: where its outputs are, how far it got, its last losses."""

    out: Path
    steps: int  # optimizer steps done, counting those before a resume
    total_steps: int
    interrupted: bool
    train_loss: float
    val_loss: float | None


def train(
    cfg: TrainConfig,
    base=None,
    stop: threading.Event | None = None,
    report: Callable[..., None] | None = None,
) -> TrainResult:
    """Run (or resume) the training run `cfg` describes; returns how it ended.

    `base` reuses a loaded `sekft.base.Base` (the resident server's); `stop`, once set, makes
    the loop save a checkpoint and return after the current step (Ctrl-C sets it);
    `report(line, **metrics)` receives every progress line. Cheap checks come first (base
    folder, tokenizer, template, data, --out), then the weights, then the loop. Ends with
    the adapter (or, with `full`, the model) in `cfg.out` and a final checkpoint.
    """
    if cfg.full and cfg.load_4bit:
        raise ConfigError("--full trains every weight in float; it cannot use --load-4bit")
    stop = stop or threading.Event()
    ranks = distributed.current()
    device, dtype, why = resolve_device_dtype(cfg)
    device = ranks.device(device)
    base_path, template, tokenizer = _template_and_tokenizer(cfg, base)
    data = prepare_data(cfg, template, tokenizer)
    out = Path(cfg.out)
    if ranks.main:  # rank 0 alone writes files; the others only read a checkpoint
        claim_out_dir(out, cfg.resume, cfg.overwrite)
    if base is None:
        base = load_base(base_path, dtype=weights_dtype(cfg, dtype), device=device,
                         load_4bit=cfg.load_4bit, compute_dtype=dtype)
    model = base.model
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    params = trainable_parameters(model, cfg)
    model.grad_ckpt = cfg.grad_ckpt
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lengths = [len(e) for e in data.train]
    plan = plan_run(lengths, cfg)
    total = len(plan)
    warmup = round(cfg.warmup_ratio * total)
    val_plan = plan_epoch([len(e) for e in data.val], cfg.max_len, 1, cfg.seed, 0)
    val_rows = [collate_row([data.val[i] for i in row]) for step in val_plan for row in step]
    my_val_rows = [val_rows[k] for k in distributed.share(
        [row.input_ids.numel() for row in val_rows], ranks.world, ranks.rank)]
    write_weights = weight_writer(model, cfg, base_path)
    run = describe_run(cfg, base_path, template_identity(template), data, total)
    run["world_size"] = ranks.world

    start = 0
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if checkpoint is not None:
        check_same_run(out, run)
        load_weights(model, cfg, checkpoint)
        state = load_checkpoint(checkpoint, optimizer)
        if state["plan"] != _plan_id(cfg, lengths, total):
            raise TrainError(f"{checkpoint}: its data order differs from this run's (other "
                             "sessions or settings); resume with the run's own data and options")
        start = state["step"]
    if ranks.main:
        if cfg.resume:
            rewind_metrics(out, start)
        remove_stale_temporaries(out)
        write_json_atomic(out / "run.json", run)
    progress = ProgressLine(report=report if ranks.main else _quiet)
    _announce(progress, cfg, data, total, start, checkpoint)
    _announce_ranks(progress, ranks, state.get("world_size", 1) if checkpoint else None)
    progress.message(describe(device, dtype, why))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = read_metrics(out)
    train_points = [(r["step"], r["loss"]) for r in history]
    val_points = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    started, tokens_done, loss, val_loss, step = time.perf_counter(), 0, math.nan, None, start

    with ctrl_c_requests_stop(stop):
        for step in range(start + 1, total + 1):
            step_rows = plan[step - 1]
            row_tokens = [sum(lengths[i] for i in row) for row in step_rows]
            mine = distributed.share(row_tokens, ranks.world, ranks.rank)
            rows = [collate_row([data.train[i] for i in step_rows[k]]).to(device) for k in mine]
            # Every rank divides by the step's global count: the step is the one-process step.
            n_trained = ranks.sum_count(sum(row.n_trained for row in rows))
            lr = lr_at(step - 1, cfg.lr, warmup, total, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.train()
            loss_sum = 0.0
            for k, row in zip(mine, rows, strict=True):
                # Dropout seeded by (seed, step, row): the same masks on any number of ranks,
                # and after a resume on any number of ranks.
                torch.manual_seed(hash((cfg.seed, step, k)) & (2**63 - 1))
                with autocast(device, dtype):
                    hidden = model.hidden(row.input_ids, row.position_ids, row.doc_ids)
                row_loss, _ = trained_token_loss(
                    hidden, model.output_weight(), row.labels, cfg.loss_chunk
                )
                # Dividing by the step's trained-token count (not the row's) makes the step's
                # gradient the mean over its trained tokens, however they were packed.
                (row_loss / n_trained).backward()
                loss_sum += row_loss.item()
            loss_sum, asked = ranks.sum_gradients(params, loss_sum, stop.is_set())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_sum / n_trained

            last = step == total or asked
            tokens = sum(row_tokens)
            tokens_done += tokens
            elapsed = time.perf_counter() - started
            record = {
                "step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": tokens, "trained_tokens": n_trained, "elapsed": elapsed,
                "tokens_per_s": tokens_done / elapsed, "peak_memory": peak_memory(device),
                "memory": current_memory(device),
            }  # fmt: skip
            if val_rows and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                val_sum, val_count = ranks.sum_pair(*evaluate(model, my_val_rows, device, dtype,
                                                              cfg.loss_chunk))
                val_loss = record["val_loss"] = val_sum / val_count if val_count else math.nan
                val_points.append((step, val_loss))
            logged = step % cfg.log_every == 0 or last
            if logged and ranks.main:
                append_metrics(out, record)
                train_points.append((step, loss))
                write_atomic(out / "loss.svg", loss_curve_svg(train_points, val_points))
            if logged or progress.tty:
                eta = elapsed / (step - start) * (total - step)
                progress.update(format_progress(step, total, loss, record["tokens_per_s"], eta,
                                                record["memory"], record["peak_memory"]), record)
            if "val_loss" in record:
                progress.message(f"step {step}: validation loss {val_loss:.4f}")
            # Asked again after the progress lines (a report may ask to stop): all ranks save
            # and end together, none is left waiting in the next step's collectives.
            stopping = ranks.any(stop.is_set())
            if (cfg.save_every and step % cfg.save_every == 0) or last or stopping:
                state = {"step": step, "plan": _plan_id(cfg, lengths, total),
                         "scheduler": {"warmup": warmup, "total": total, "last_lr": lr},
                         "world_size": ranks.world}
                if ranks.main:
                    saved = save_checkpoint(out, step, write_weights, optimizer, state)
                    progress.message(f"saved {saved}")
                ranks.barrier("the checkpoint save")
            if stopping:
                break
    progress.close()
    model.eval()  # a resident base goes back to serving: no dropout
    if ranks.main:
        write_weights(out)
    ranks.barrier("the final save")
    interrupted = step < total
    if interrupted:
        progress.message(f"stopped at step {step}/{total}; continue with --resume")
    return TrainResult(out, step, total, interrupted, loss, val_loss)


def _plan_id(cfg: TrainConfig, lengths: list[int], total: int) -> dict:
    """What the data order depends on: a resumed run recomputes the plan from these."""
    return {"seed": cfg.seed, "max_len": cfg.max_len, "batch_tokens": cfg.batch_tokens,
            "lengths_sha256": _sha256(json.dumps(lengths).encode()), "total_steps": total}


def _template_and_tokenizer(cfg: TrainConfig, base):
    """(base folder, ChatTemplate, tokenizer) without loading weights (or from `base`)."""
    variables = parse_template_vars(cfg.template_var)
    if base is not None:
        if cfg.template:
            # The named template, as --inspect (no base loaded) renders with.
            template = ChatTemplate.from_folder(base.path, cfg.template, base.special_tokens)
        elif base.chat_template is None:
            raise TemplateError(f"{base.path}: the base has no chat template to render with")
        else:
            template = ChatTemplate(base.chat_template, base.special_tokens)
        template.variables = variables
        return Path(base.path), template, base.tokenizer
    folder = resolve_base(cfg.base)
    template = ChatTemplate.from_folder(folder, name=cfg.template or None)
    template.variables = variables
    return folder, template, load_tokenizer(folder)


def _quiet(line: str, **fields) -> None:
    """Progress of ranks other than 0: rank 0 alone prints."""


def _announce_ranks(progress: ProgressLine, ranks: distributed.Group,
                    saved_world: int | None) -> None:
    if ranks.world > 1:
        progress.message(f"data-parallel over {ranks.world} ranks: each step's rows are split "
                         "by tokens, the loss is normalised by the step's global count")
    if saved_world is not None and saved_world != ranks.world:
        progress.message(f"the checkpoint was saved by {saved_world} rank(s), this run has "
                         f"{ranks.world}: it continues the same global steps and data order")


def _first_few(items: list[str], n: int = 5) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def _announce(progress: ProgressLine, cfg, data: TrainData, total: int, start: int,
              checkpoint: Path | None) -> None:
    trained = sum(e.n_trained for e in data.train)
    tokens = sum(len(e) for e in data.train)
    own = len(data.train) - data.train_sessions
    # Turns the template rewrites train from their own renders (sekft.mask): say what it costs.
    extra = f", +{own} turns in their own renders" if own else ""
    progress.message(
        f"sekft-train: {data.train_sessions} sessions{extra} ({tokens} tokens, {trained} "
        f"trained, {trained / max(tokens, 1):.0%}), {data.val_sessions} held out, {total} steps"
    )
    if data.untrained:
        progress.message(f"dropped {len(data.untrained)} sessions with nothing to train: "
                         + _first_few(data.untrained))
    if data.overlong:
        progress.message(f"dropped {len(data.overlong)} sessions longer than --max-len "
                         f"{cfg.max_len} (all listed in run.json): "
                         + _first_few([e.source for e in data.overlong]))
    if data.violations:
        progress.message(f"{data.violations} mask check findings; see sekft-train --inspect")
    if checkpoint is not None:
        progress.message(f"resuming from {checkpoint} (step {start})")
    elif cfg.resume:
        progress.message(f"no checkpoint in {cfg.out}; starting from step 0")


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """One option per `TrainConfig` field: `--name-with-dashes`, typed like its default."""
    # No abbreviations: `sekft-resident` refuses the options that name the base, and a prefix
    # such as `--load-4` must not slip past it as another spelling of `--load-4bit`.
    parser = argparse.ArgumentParser(
        prog="sekft-train",
        description="Assistant-only (Q)LoRA fine-tuning on chat trajectories.",
        allow_abbrev=False,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        elif f.name == "targets":
            parser.add_argument(flag, nargs="+", default=list(DEFAULT_TARGETS), help=help_text)
        elif f.name == "template_var":
            parser.add_argument(flag, action="append", default=[], metavar="KEY=VALUE",
                                help=help_text)
        elif f.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True, help=help_text)
        else:
            kind = type(f.default)
            # torchrun's own parser takes `--r` for an abbreviation of its --rdzv-* options
            # and stops, so under torchrun the rank is spelt --lora-r.
            aliases = ["--lora-r"] if f.name == "r" else []
            parser.add_argument(flag, *aliases, dest=f.name, type=kind, default=f.default,
                                help=f"{help_text} (default: {f.default!r})")
    return parser


def config_from_args(argv: list[str] | None) -> TrainConfig:
    args = parse_with_recipe(build_parser(), argv)
    cfg = TrainConfig(**vars(args))
    if not cfg.inspect and not cfg.out:
        raise ConfigError("--out is required: the folder for the adapter and checkpoints")
    for name in ("max_len", "batch_tokens", "epochs", "loss_chunk", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError("--val-fraction must be in [0, 1)")
    if cfg.dist_timeout <= 0:
        raise ConfigError("--dist-timeout must be a positive number of seconds")
    return cfg


def inspect(cfg: TrainConfig) -> int:
    """Run the mask inspector on exactly the sessions training would use (normalised, those
    with nothing to train and the overlong ones left out), loading no weights; 1 on failure."""
    _, template, tokenizer = _template_and_tokenizer(cfg, None)
    data = prepare_data(cfg, template, tokenizer)
    indices, sessions = zip(*data.sessions, strict=True)
    report = inspect_sessions(
        [s.messages for s in sessions], template, tokenizer, sys.stdout, strict=cfg.strict,
        color=sys.stdout.isatty(), indices=indices,
    )  # fmt: skip
    return 1 if report.failed else 0


def _main(argv: list[str] | None) -> int:
    cfg = config_from_args(argv)
    if cfg.inspect:
        return inspect(cfg)
    with distributed.process_group(cfg.device, cfg.dist_timeout) as ranks:
        result = train(cfg)
    if result.interrupted:
        return 130
    if not ranks.main:
        return 0
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"sekft-train: done: {result.steps} steps, loss {result.train_loss:.4f}{val}; "
          f"adapter in {result.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    code = run_cli("sekft-train", _main, argv)
    if code and distributed.left_broken():
        # A process group that lost a peer is never torn down (sekft.distributed), and the
        # interpreter's own teardown of it can abort in gloo (SIGABRT after the error line
        # was printed): end here, with the error's exit status, once the output is out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
