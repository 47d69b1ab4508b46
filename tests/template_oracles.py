"""Shared by the template, mask and tokenizer tests: the fixture folders, transformers oracles
built from them (cached per process), and hypothesis strategies for adversarial sessions."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from pathlib import Path

from hypothesis import strategies as st

from sekft.template import ChatTemplate, normalize_for_template

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
SHELL_SESSIONS = Path(__file__).parent / "fixtures" / "sessions" / "shell.jsonl"

# Folders with a tokenizer (tokenizer.json, or Qwen2.5's vocab.json + merges.txt).
TOKENIZER_FOLDERS = [
    "mistral-7b-instruct-v0.2",
    "phi-3-mini-4k-instruct",
    "qwen2.5-instruct",
    "smollm2",
]
TEMPLATE_FOLDERS = [*TOKENIZER_FOLDERS, "llama-3.2-3b-instruct", "zephyr-7b-beta"]
# Zephyr's folder is its template alone; zephyr-7b-beta ships Mistral's <s>/</s> tokens.
ZEPHYR_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
FIXED_NOW = datetime(2024, 7, 26, 12, 0, 0)

ADVERSARIAL = [
    "[INST]", "[/INST]", "<|im_end|>", "<|im_start|>", "</s>", "<s>", "<|eot_id|>", "<|end|>",
    "<|endoftext|>", "<|assistant|>", "{{", "}}", "{%", "%}", "{#", "\n", "\n\n", " ", "  ",
    "\t", "\r\n", "é", "日本", "🙂", "\x1b[0m", "\x1b[01;34m", "$ ", "ls -la", "x" * 500,
]


def our_template(folder: str) -> ChatTemplate:
    special = ZEPHYR_TOKENS if folder == "zephyr-7b-beta" else None
    template = ChatTemplate.from_folder(FIXTURES / folder, special_tokens=special)
    template.clock = lambda: FIXED_NOW
    return template


@cache
def hf_tokenizer(folder: str):
    """transformers' tokenizer for a fixture folder: loaded from the folder when it has a
    tokenizer, else a placeholder vocabulary carrying the template and special tokens (enough
    for `apply_chat_template(tokenize=False)`)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if folder in TOKENIZER_FOLDERS:
        return AutoTokenizer.from_pretrained(FIXTURES / folder)
    template = our_template(folder)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE()), **template.special_tokens
    )
    hf.chat_template = template.source
    return hf


@cache
def hf_encoder(folder: str):
    """transformers' tokenizer over the folder's tokenizer files as saved.

    `AutoTokenizer` in transformers 5 rebuilds Llama-family tokenizers (Mistral, Phi-3) with
    its own Metaspace settings, so it no longer encodes as their tokenizer.json does;
    `PreTrainedTokenizerFast(tokenizer_file=...)` keeps the file's pipeline. Qwen2.5 has no
    tokenizer.json: its oracle is transformers' Qwen2Tokenizer over vocab.json + merges.txt.
    """
    from transformers import PreTrainedTokenizerFast

    path = FIXTURES / folder / "tokenizer.json"
    if not path.exists():
        return hf_tokenizer(folder)
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), **hf_tokenizer(folder).special_tokens_map
    )


def fixed_transformers_clock(monkeypatch) -> None:
    """Make transformers' `strftime_now` read FIXED_NOW, as our templates do in tests."""
    import transformers.utils.chat_template_utils as ctu

    class FixedDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return FIXED_NOW

    monkeypatch.setattr(ctu, "datetime", FixedDatetime)


contents = st.lists(
    st.one_of(st.sampled_from(ADVERSARIAL), st.text(max_size=12)), max_size=6
).map("".join)

# Environment turns carry ☃, which assistant turns never contain, to spot trained env bytes.
ENV_MARK = "\u2603"
env_contents = contents.map(lambda c: ENV_MARK + c + ENV_MARK)
assistant_contents = contents.map(lambda c: c.replace(ENV_MARK, ""))


@st.composite
def sessions(draw, min_turns: int = 1, max_turns: int = 30, system: bool = True) -> list[dict]:
    """user/assistant alternating sessions (user first), maybe a leading system turn."""
    turns = draw(st.integers(min_turns, max_turns))
    messages = []
    if system and draw(st.booleans()):
        messages.append({"role": "system", "content": draw(env_contents)})
    for n in range(turns):
        if n % 2 == 0:
            messages.append({"role": "user", "content": draw(env_contents)})
        else:
            messages.append({"role": "assistant", "content": draw(assistant_contents)})
    return messages


def canonical(messages: list[dict]) -> list[dict]:
    return normalize_for_template(messages)
