"""Load a model's tokenizer and its named special tokens from a folder, without transformers.

Two layouts are read:
- `tokenizer.json` (a `tokenizers` serialization): loaded as is;
- `vocab.json` + `merges.txt` (+ `added_tokens.json`): a byte-level BPE, built as
  transformers builds it for the folder's `tokenizer_class` (Qwen2's pre-tokenizer regex and
  NFC for `Qwen2Tokenizer`, GPT-2's otherwise).

Special tokens are resolved as transformers resolves them: `tokenizer_config.json` first, and
`special_tokens_map.json` over it only for legacy folders whose config has no
`added_tokens_decoder`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sekft.errors import TemplateError

# The named special tokens transformers passes to a chat template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

# Qwen2's pre-tokenizer split (transformers `tokenization_qwen2.PRETOKENIZE_REGEX`): unlike
# GPT-2's, digits are split one by one and newlines are kept apart from the following word.
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def read_json(path: Path) -> dict:
    """Read a JSON object from `path`, or raise TemplateError naming the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TemplateError(f"{path}: cannot read JSON ({e}); restore it from the model") from e
    if not isinstance(value, dict):
        raise TemplateError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def token_content(value: object) -> str | None:
    """The text of a special-token entry: a string, an AddedToken dict {"content": ...}, None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def load_special_tokens(folder: str | Path) -> dict[str, str]:
    """Named special tokens of the tokenizer in `folder`: {"bos_token": "<s>", ...}.

    Only names with a value are returned (as transformers' `special_tokens_map`); an empty
    dict when the folder has neither `tokenizer_config.json` nor `special_tokens_map.json`.
    """
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    map_path = folder / "special_tokens_map.json"
    config = read_json(config_path) if config_path.is_file() else {}
    tokens = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES if name in config}
    # transformers reads special_tokens_map.json only for legacy configs, and then lets it win.
    if map_path.is_file() and "added_tokens_decoder" not in config:
        legacy = read_json(map_path)
        tokens.update({name: legacy[name] for name in SPECIAL_TOKEN_NAMES if name in legacy})
    resolved = {name: token_content(value) for name, value in tokens.items()}
    return {name: text for name, text in resolved.items() if text is not None}


def added_tokens(folder: Path, special_texts: set[str]) -> list[AddedToken]:
    """Added tokens of a vocab.json/merges.txt folder, in id order, with their `special` flag.

    `tokenizer_config.json`'s `added_tokens_decoder` is authoritative when present; otherwise
    `added_tokens.json` lists them and a token is special when it is a named or additional
    special token (as transformers decides for legacy folders).
    """
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        entries = sorted((int(i), spec) for i, spec in decoder.items())
        return [
            AddedToken(
                spec["content"],
                single_word=spec.get("single_word", False),
                lstrip=spec.get("lstrip", False),
                rstrip=spec.get("rstrip", False),
                normalized=spec.get("normalized", False),
                special=spec.get("special", True),
            )
            for _, spec in entries
        ]
    listed_path = folder / "added_tokens.json"
    listed = read_json(listed_path) if listed_path.is_file() else {}
    extra = config.get("additional_special_tokens") or []
    special = special_texts | {token_content(t) for t in extra}
    return [
        AddedToken(text, normalized=False, special=text in special)
        for text, _ in sorted(listed.items(), key=lambda item: item[1])
    ]


def byte_level_bpe(folder: Path) -> Tokenizer:
    """A byte-level BPE from `vocab.json` + `merges.txt`, configured as transformers does."""
    vocab = read_json(folder / "vocab.json")
    merges = []
    for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        left, _, right = line.partition(" ")
        merges.append((left, right))
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    add_prefix_space = bool(config.get("add_prefix_space") or False)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.decoder = decoders.ByteLevel()
    if config.get("tokenizer_class", "").startswith("Qwen2"):
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
            ]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    special_texts = set(load_special_tokens(folder).values())
    listed = added_tokens(folder, special_texts)
    tokenizer.add_special_tokens([t for t in listed if t.special])
    tokenizer.add_tokens([t for t in listed if not t.special])
    missing = sorted(special_texts - {t.content for t in listed} - set(vocab))
    if missing:
        raise TemplateError(
            f"{folder}: special tokens {missing} are in no vocabulary file; "
            "the tokenizer folder is incomplete"
        )
    # Named special tokens already in vocab.json (GPT-2's <|endoftext|>) must still match whole.
    tokenizer.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t in sorted(special_texts)]
    )
    return tokenizer


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer saved in `folder`: `tokenizer.json`, else byte-level BPE from vocab + merges.

    Padding and truncation stored in tokenizer.json are switched off, as transformers and
    servers switch them off: sekft tokenizes one whole render at a time. Raises TemplateError
    naming the folder when neither layout is there.
    """
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise TemplateError(f"{folder / 'tokenizer.json'}: cannot load ({e})") from e
        # A tokenizer re-saved after a padded batch keeps those settings (a re-saved Mistral
        # v0.3: fixed length 512, left, </s>): every render would come out 512 ids long.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return byte_level_bpe(folder)
    raise TemplateError(
        f"{folder}: no tokenizer.json and no vocab.json + merges.txt; "
        "point --base or --tokenizer at the model's tokenizer folder"
    )
