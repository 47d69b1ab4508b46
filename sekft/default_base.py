"""The embedded default base: a tiny Llama pretrained here, from a seed, to operate the shell.

What ships in `sekft/assets/default-base/` is a standard checkpoint folder (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json with our ChatML-style template)
so every real code path runs on it: loader, 4-bit, LoRA, mask, generation, eval. Next to
the weights: recipe.json (every setting and data digest), metrics.jsonl (the trainer's
lines plus the held-out copy accuracy) and loss.svg.

The recipe, in order (`python -m sekft.default_base`, what `make base` runs):

1. data: expert trajectories of the BASE_FAMILIES recorded through the eval harness
   (`sekft.scenarios.record`), their held-out split for the copy-accuracy figure, and
   synthetic copy sessions (`copy_sessions`): an observation shows words, the command
   repeats one of them. ADAPTER_FAMILIES are never shown to the base: they are what the
   demo's LoRA adapter learns; the suite's held-out families stay unseen by both.
2. tokenizer: byte-level BPE trained on that text, with every closed-list word
   (`sekft.scenarios.words`) a single token both bare and after a space, so copying a
   name is copying one token.
3. an initial random checkpoint (`initial_checkpoint`), then full-parameter training with
   our own trainer (`sft.train` with `full=True`), every weight, a flat-ish schedule.

Why these sizes (measured on a 2-core CPU, see issue 7): a model this small learns the
protocol (discovery, command shapes, exit/panic) quickly, but copying a word from an
observation into a command appears suddenly, after thousands of steps, at a step that
varies by seed. More steps mattered more than more width, so the model is 2 blocks of
width 128 and the run is long; `copy_accuracy` on held-out sessions shows when it appears.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sekft import sft
from sekft.base import load_base
from sekft.errors import ConfigError, TrainError, run_cli
from sekft.eval import EpisodeConfig
from sekft.mask import encode_sessions
from sekft.model import Decoder, ModelConfig
from sekft.pack import Example
from sekft.rundir import replace_dir
from sekft.scenarios import TRAIN_FAMILIES, record
from sekft.scenarios.words import WORDS
from sekft.template import ChatTemplate

ASSETS = Path(__file__).parent / "assets"
DEFAULT_BASE = ASSETS / "default-base"

# The training families split between the base and the demo's adapter (see module doc).
ADAPTER_FAMILIES = ("rename", "stash")
BASE_FAMILIES = tuple(f for f in TRAIN_FAMILIES if f not in ADAPTER_FAMILIES)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML-style: each message is `<|im_start|>role\ncontent<|im_end|>\n`; a generation
# prompt opens an assistant turn. `<|im_end|>` ends a turn and is the eos, so the trained
# assistant span ends with the token that stops generation.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

VOCAB_SIZE = 2048
MAX_POSITIONS = 2048
ARCHITECTURE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": MAX_POSITIONS,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}


def hf_config(vocab_size: int) -> dict:
    """The base's config.json: `ARCHITECTURE` with the vocabulary and special-token ids."""
    return {
        **ARCHITECTURE,
        "vocab_size": vocab_size,
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "torch_dtype": "float32",
    }


# ---------------------------------------------------------------- copy curriculum


def _login(rng: random.Random) -> str:
    return f"{rng.choice(WORDS)}: Debian GNU/Linux 12\n"


PROMPT = "user@sandbox:~$ "


def copy_session(rng: random.Random) -> list[dict]:
    """One synthetic episode whose commands copy words shown in an observation.

    Three shapes, all in the suite's observation format (output, then the prompt): say a
    word back (`echo W`), answer a lookup (`answer V` for the key asked about in a `k: v`
    table), open a listed file (`cat W.txt`). Each ends with `exit`.
    """
    words = rng.sample(WORDS, 6)
    shape = rng.randrange(3)
    if shape == 0:
        word = words[0]
        return [
            {"role": "user", "content": f"{_login(rng)}The word is {word}.\n{PROMPT}"},
            {"role": "assistant", "content": f"echo {word}"},
            {"role": "user", "content": f"{word}\n{PROMPT}"},
            {"role": "assistant", "content": "exit"},
        ]
    if shape == 1:
        keys, values = words[:3], words[3:]
        asked = rng.randrange(3)
        table = "".join(f"{k}: {v}\n" for k, v in zip(keys, values, strict=True))
        return [
            {"role": "user", "content": f"{_login(rng)}{PROMPT}"},
            {"role": "assistant", "content": "cat pairs.txt"},
            {"role": "user", "content": f"{table}ask: {keys[asked]}\n{PROMPT}"},
            {"role": "assistant", "content": f"answer {values[asked]}"},
            {"role": "user", "content": f"right\n{PROMPT}"},
            {"role": "assistant", "content": "exit"},
        ]
    wanted = rng.randrange(4)
    return [
        {"role": "user", "content": f"{_login(rng)}Open the {words[wanted]} file.\n{PROMPT}"},
        {"role": "assistant", "content": "ls"},
        {"role": "user", "content": "  ".join(f"{w}.txt" for w in words[:4]) + f"\n{PROMPT}"},
        {"role": "assistant", "content": f"cat {words[wanted]}.txt"},
        {"role": "user", "content": f"{words[4]} {words[5]}\n{PROMPT}"},
        {"role": "assistant", "content": "exit"},
    ]


def copy_sessions(seed: int, n: int) -> list[dict]:
    """`n` copy sessions as training-data records (deterministic in `seed`)."""
    rng = random.Random(f"copy:{seed}")
    return [{"messages": copy_session(rng), "family": "copy"} for _ in range(n)]


# ---------------------------------------------------------------- tokenizer


def word_forms(word: str) -> tuple[str, str]:
    """The two ways a byte-level pre-tokenizer cuts a word out of text: bare (after `/`,
    a newline, a tab...) and with its leading space."""
    return word, " " + word


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`, `SPECIAL_TOKENS` at 0..2.

    Every closed-list word is shown to the trainer often in both `word_forms`, so its merges
    win and each form ends as one token; `split_words` checks it.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    drill = ["".join(f" {w}/{w}" for w in WORDS)] * 200
    tokenizer.train_from_iterator(texts + drill, trainer=trainer)
    return tokenizer


def split_words(tokenizer) -> list[str]:
    """The closed-list word forms `tokenizer` does not keep as a single token."""
    return [form for w in WORDS for form in word_forms(w)
            if len(tokenizer.encode(form, add_special_tokens=False).ids) != 1]


def write_tokenizer(tokenizer, folder: Path) -> None:
    """tokenizer.json and a tokenizer_config.json with our template, bos, eos, pad, unk."""
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": PAD_TOKEN,
        "add_bos_token": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------- model


def init_weights(model: Decoder, seed: int, std: float) -> None:
    """Normal(0, std) linears and embeddings, unit norms (as transformers inits Llama)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def initial_checkpoint(folder: Path, tokenizer, seed: int) -> Path:
    """Write a random-init checkpoint folder (weights, config, tokenizer, template)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(tokenizer.get_vocab_size())
    model = Decoder(ModelConfig.from_hf(config))
    init_weights(model, seed, config["initializer_range"])
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(tokenizer, folder)
    return folder


def word_token_ids(tokenizer) -> set[int]:
    """Ids of the single tokens of every closed-list word form."""
    return {tokenizer.token_to_id(tokenizer.encode(form, add_special_tokens=False).tokens[0])
            for w in WORDS for form in word_forms(w)}


@torch.no_grad()
def copy_accuracy(model: Decoder, examples: list, word_ids: set[int]) -> float:
    """Share of trained positions whose target is a closed-list word where the model's most
    likely next token is that word (teacher forcing; `examples` are `sekft.pack.Example`s).

    The words of an episode are drawn per seed, so on held-out sessions the only way to
    get them right is to copy them from the observations earlier in the context.
    """
    was_training = model.training
    model.eval()
    hits = total = 0
    wanted = torch.tensor(sorted(word_ids))
    for example in examples:
        ids = torch.tensor([example.input_ids])
        labels = torch.tensor(example.labels)
        targets = labels[1:]
        at = torch.isin(targets, wanted).nonzero().flatten()
        if at.numel() == 0:
            continue
        hidden = model.hidden(ids)[0, :-1][at]
        predicted = (hidden @ model.output_weight().T).argmax(-1)
        hits += int((predicted == targets[at]).sum())
        total += at.numel()
    model.train(was_training)
    return hits / total if total else float("nan")


# ---------------------------------------------------------------- the recipe


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(records: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record_base_data(work: Path, seeds: int, heldout_seeds: int, jobs: int) -> tuple[Path, Path]:
    """Expert trajectories of BASE_FAMILIES: `seeds` train and `heldout_seeds` held-out
    instances per family, recorded once into `work` (kept if already there)."""
    paths = []
    for split, n in (("train", seeds), ("heldout", heldout_seeds)):
        path = work / f"{split}-{n}.jsonl"
        if not path.exists():
            print(f"default-base: recording {n} {split} seeds of {len(BASE_FAMILIES)} "
                  "families", file=sys.stderr)
            records = record.record(record.instances(split, range(n), BASE_FAMILIES),
                                    EpisodeConfig(sandbox=True), jobs)
            record.write_jsonl(records, path)
        paths.append(path)
    return paths[0], paths[1]


def pretrain(work: Path, init: Path, data: Path, heldout: Path, args) -> Path:
    """Full-parameter training of `init` on `data` with `sft.train`, printing the held-out
    copy accuracy every `args.copy_every` steps into the run's copy.jsonl; the run folder
    (weights of the last step, metrics.jsonl, loss.svg) is returned."""
    base = load_base(init, dtype=torch.float32, device="cpu")
    template = ChatTemplate(base.chat_template, base.special_tokens)
    held = [r["messages"] for r in read_jsonl(heldout)]
    examples = [Example(e.input_ids, e.labels, "heldout")
                for e in encode_sessions(held, template, base.tokenizer)]
    word_ids = word_token_ids(base.tokenizer)
    cfg = sft.TrainConfig(
        data=str(data), base=str(init), out=str(work / "run"), full=True, lr=args.lr,
        warmup_ratio=0.01, min_lr_ratio=args.min_lr_ratio, weight_decay=0.0,
        max_steps=args.steps, batch_tokens=args.batch_tokens, max_len=1024, seed=args.seed,
        save_every=1000, eval_every=500, log_every=10, val_fraction=0.02, device="cpu",
        dtype="float32", overwrite=not args.resume, resume=args.resume,
    )
    copy_log = work / "copy.jsonl"
    if not args.resume:
        copy_log.unlink(missing_ok=True)
    stop = threading.Event()
    reached: list[int] = []

    def report(line: str, **fields) -> None:
        step = fields.get("step")
        if step is None or step % 100 == 0:
            print(line, file=sys.stderr, flush=True)
        if step is None or step % args.copy_every:
            return
        accuracy = copy_accuracy(base.model, examples, word_ids)
        with copy_log.open("a") as f:
            f.write(json.dumps({"step": step, "copy_accuracy": accuracy}) + "\n")
        print(f"step {step}: held-out copy accuracy {accuracy:.3f}", file=sys.stderr, flush=True)
        if accuracy >= args.copy_target and not reached:
            reached.append(step)
        if reached and step >= reached[0] + args.margin:
            stop.set()

    sft.train(cfg, base=base, stop=stop, report=report)
    return work / "run"


def ship(run: Path, out: Path, recipe: dict, copy_log: Path) -> None:
    """Copy the trained checkpoint and its records into `out` (replacing it atomically)."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "loss.svg"):
        shutil.copy2(run / name, tmp / name)
    copies = {r["step"]: r["copy_accuracy"] for r in read_jsonl(copy_log)}
    metrics = []
    for r in read_jsonl(run / "metrics.jsonl"):
        if r["step"] in copies:
            r["copy_accuracy"] = copies[r["step"]]
        metrics.append(r)
    write_jsonl(metrics, tmp / "metrics.jsonl")
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    for path in tmp.iterdir():
        path.chmod(0o644)  # the trainer writes private files; package data is world-readable
    replace_dir(tmp, out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sekft.default_base",
                                description="Rebuild the embedded default base from a seed.")
    p.add_argument("--work", type=Path, default=Path("build/base"), help="scratch folder")
    p.add_argument("--out", type=Path, default=DEFAULT_BASE, help="where the base is shipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=200, help="recorded train seeds per family")
    p.add_argument("--heldout-seeds", type=int, default=8)
    p.add_argument("--copy-share", type=float, default=0.5,
                   help="copy sessions per recorded session")
    p.add_argument("--steps", type=int, default=9000)
    p.add_argument("--batch-tokens", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.3)
    p.add_argument("--copy-every", type=int, default=250)
    p.add_argument("--copy-target", type=float, default=0.95,
                   help="held-out copy accuracy that counts as copying learned")
    p.add_argument("--margin", type=int, default=1500,
                   help="steps trained after the copy target is first reached, then stop")
    p.add_argument("--jobs", type=int, default=4, help="episodes recorded at the same time")
    # The thread count changes the order of float sums, so the same seed gives the same
    # weights only with the same count; one thread was also the fastest on a busy CPU.
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--resume", action="store_true", help="continue the run in --work")
    return p.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.seeds < 1 or not 0 <= args.copy_share <= 4:
        raise ConfigError("--steps and --seeds must be positive, --copy-share in [0, 4]")
    if args.threads < 1:
        raise ConfigError("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = record_base_data(work, args.seeds, args.heldout_seeds, args.jobs)
    recorded = read_jsonl(train)
    mixed = recorded + copy_sessions(args.seed, round(args.copy_share * len(recorded)))
    random.Random(args.seed).shuffle(mixed)
    data = work / "pretrain.jsonl"
    write_jsonl(mixed, data)
    template = ChatTemplate(CHAT_TEMPLATE, {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN})
    tokenizer = train_tokenizer([template.render(r["messages"]) for r in mixed])
    broken = split_words(tokenizer)
    if broken:
        raise TrainError(f"the tokenizer splits {len(broken)} closed-list word forms (e.g. "
                         f"{broken[:3]}); raise --vocab or add them to the word drill")
    init = initial_checkpoint(work / "init", tokenizer, args.seed)
    run = pretrain(work, init, data, heldout, args)
    recipe = {
        "command": "python -m sekft.default_base " + " ".join(argv or sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "base_families": BASE_FAMILIES,
        "adapter_families": ADAPTER_FAMILIES,
        "data": {"recorded_sessions": len(recorded), "copy_sessions": len(mixed) - len(recorded),
                 "train_sha256": sha256_file(train), "heldout_sha256": sha256_file(heldout),
                 "pretrain_sha256": sha256_file(data)},
        "vocab_size": tokenizer.get_vocab_size(),
        "config": hf_config(tokenizer.get_vocab_size()),
    }
    ship(run, args.out, recipe, work / "copy.jsonl")
    print(f"default-base: shipped {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli("sekft.default_base", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
