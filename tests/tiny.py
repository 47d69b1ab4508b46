"""Tiny random Hugging Face checkpoints for tests: no hub, no network, a second or two each.

`make_tiny_checkpoint` writes a folder shaped like a real base model's: `config.json` and
safetensors weights saved by transformers itself (the oracle), a `tokenizer.json` trained
here with `tokenizers` on a small shell-flavoured corpus, and a `tokenizer_config.json`
carrying a ChatML chat template. tests/conftest.py caches one folder per kind per session
(`tiny_llama`, `tiny_mistral`, `tiny_qwen2`, `tiny_llama_sharded`, `tiny_llama_tied`).
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Token ids 0, 1, 2 in that order, as in SmolLM2's tokenizer.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

CORPUS = [
    "ls -la /home/user",
    "cd /tmp && mkdir -p build && cd build",
    "cat README.md | head -n 20",
    "grep -rn 'TODO' src/ --include='*.py'",
    "find . -name '*.log' -mtime +7 -delete",
    "echo $HOME; echo $PATH; pwd",
    "tar -czf backup.tar.gz ./data && ls -lh backup.tar.gz",
    "sed -i 's/foo/bar/g' config.txt",
    "awk '{print $1}' access.log | sort | uniq -c | sort -rn | head",
    "wc -l *.txt",
    "chmod +x run.sh && ./run.sh --verbose",
    "git status && git diff --stat",
    "python3 -c 'print(1 + 2)'",
    "total 12\ndrwxr-xr-x 2 user user 4096 Jan  1 00:00 .\n-rw-r--r-- 1 user user  220 notes.txt",
    "bash: foo: command not found",
    "No such file or directory",
    "You are a helpful assistant that operates a POSIX shell.",
    "List the files in the current directory, then count the lines of each text file.",
    "The answer is 42. Done.",
]

KINDS = ("llama", "mistral", "qwen2", "qwen3")

# Small but not degenerate: several heads, grouped-query attention (4 query heads share 2
# key/value heads), two blocks, and weights large enough that attention is not uniform.
BASE_CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
)


def train_tokenizer(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` with `SPECIAL_TOKENS` at ids 0..2.

    Its vocabulary has at most `vocab_size` entries (fewer if the corpus runs out of merges).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tokenizer


def _hf_config(kind: str, vocab_size: int, tie_embeddings: bool, overrides: dict):
    import transformers

    fields = dict(
        BASE_CONFIG,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
    )
    if kind == "llama":
        cls = transformers.LlamaConfig
    elif kind == "mistral":
        cls = transformers.MistralConfig
        # Short enough that test sequences are longer than the window.
        fields["sliding_window"] = 8
    elif kind == "qwen2":
        cls = transformers.Qwen2Config
    elif kind == "qwen3":
        cls = transformers.Qwen3Config
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    fields.update(overrides)
    return cls(**fields)


def make_tiny_checkpoint(
    folder: str | Path,
    kind: str = "llama",
    shards: int = 1,
    tie_embeddings: bool = False,
    vocab_size: int = 320,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """Write a tiny random checkpoint of `kind` (one of `KINDS`) into `folder`.

    Contract:
    - `folder` is created if needed and returned as a Path.
    - Weights: a transformers `<Kind>ForCausalLM` initialised from `torch.manual_seed(seed)`
      in float32, saved by `save_pretrained` as safetensors. `shards > 1` splits them into at
      least that many files with a `model.safetensors.index.json` (the exact count depends
      on tensor boundaries). `tie_embeddings=True` shares `lm_head` with the embeddings, and
      the file then holds no `lm_head.weight`, as on the hub.
    - Config: `BASE_CONFIG` (hidden 64, 2 blocks, 4 heads, 2 key/value heads), mistral with
      `sliding_window=8`, qwen2 with q/k/v biases and qwen3 with q/k norms (their
      architectures), then
      `config_overrides` applied last (e.g. `rope_scaling=...`, `num_hidden_layers=3`).
    - Tokenizer: `tokenizer.json` (byte-level BPE, `<|endoftext|>`=0, `<|im_start|>`=1,
      `<|im_end|>`=2, at most `vocab_size` entries, so every id fits the embedding) and
      `tokenizer_config.json` with the ChatML `CHATML_TEMPLATE`, bos `<|im_start|>`,
      eos `<|im_end|>`, pad and unk `<|endoftext|>`.
    """
    import torch
    import transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = _hf_config(kind, vocab_size, tie_embeddings, config_overrides)

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    max_shard_size = "50GB"
    if shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        max_shard_size = max(1, total // shards)
    model.save_pretrained(folder, max_shard_size=max_shard_size)

    tokenizer = train_tokenizer(vocab_size)
    assert tokenizer.get_vocab_size() <= vocab_size
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": PAD_TOKEN,
        "add_bos_token": False,
        "model_max_length": BASE_CONFIG["max_position_embeddings"],
        "chat_template": CHATML_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder
