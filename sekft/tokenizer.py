"""Load a model's tokenizer and its named special tokens from a folder, without transformers.

Two layouts are read:
- `tokenizer.json` (a `tokenizers` serialization): loaded as is;
- `vocab.json` + `merges.txt` (+ `added_tokens.json`): a byte-level BPE, built as
  transformers builds it for the folder's `tokenizer_class` (Qwen2's pre-tokenizer regex and
  NFC for `Qwen2Tokenizer`, GPT-2's otherwise).

A folder with only a `tokenizer.model` (SentencePiece or tiktoken) is refused, naming the
file and how to write a tokenizer.json: sekft has no SentencePiece dependency.

Special tokens are resolved as transformers resolves them: `tokenizer_config.json` first, and
`special_tokens_map.json` over it only for legacy folders whose config has no
`added_tokens_decoder`. A tokenizer.json is completed as transformers' fast tokenizer completes
it (what vLLM serves with): tokenizer_config.json's added tokens and the named special tokens
it lacks are added.
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

# The flags of an added token; transformers compares them (with the content) to decide whether
# tokenizer_config.json's `added_tokens_decoder` entry is already the tokenizer's.
ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")

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


def model_specific_tokens(config: dict) -> dict[str, object]:
    """A config's own named tokens beyond SPECIAL_TOKEN_NAMES, as transformers 5 collects them:
    any other `*_token` key holding a string (Gemma 4's `sot_token`), and the names of an
    `extra_special_tokens` dict (Gemma 3's `image_token`); the dict wins."""
    found = {
        name: value
        for name, value in config.items()
        if name.endswith("_token") and name not in SPECIAL_TOKEN_NAMES and isinstance(value, str)
    }
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        found.update(extra)
    return found


def load_special_tokens(folder: str | Path) -> dict[str, str]:
    """Named special tokens of the tokenizer in `folder`: {"bos_token": "<s>", ...}.

    Only names with a value are returned (as transformers' `special_tokens_map`, model-specific
    names such as Gemma 3's `image_token` included: transformers passes them to templates too);
    an empty dict when the folder has neither `tokenizer_config.json` nor
    `special_tokens_map.json`.
    """
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    map_path = folder / "special_tokens_map.json"
    config = read_json(config_path) if config_path.is_file() else {}
    tokens = {name: config.get(name) for name in SPECIAL_TOKEN_NAMES if name in config}
    tokens.update(model_specific_tokens(config))
    # transformers reads special_tokens_map.json only for legacy configs, and then lets it win.
    if map_path.is_file() and "added_tokens_decoder" not in config:
        legacy = read_json(map_path)
        tokens.update({name: legacy[name] for name in SPECIAL_TOKEN_NAMES if name in legacy})
    resolved = {name: token_content(value) for name, value in tokens.items()}
    return {name: text for name, text in resolved.items() if text is not None}


def additional_special_texts(config: dict) -> list[str]:
    """The unnamed special tokens a config lists, in its order (`additional_special_tokens`, or
    transformers 5's `extra_special_tokens` list)."""
    listed = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(config.get(key), list):
            listed += config[key]
    return [text for text in map(token_content, listed) if text is not None]


def config_added_token(spec: dict) -> AddedToken:
    """An `added_tokens_decoder` entry as transformers reads it (`AddedToken(**spec)`): absent
    flags take AddedToken's defaults."""
    return AddedToken(spec["content"], **{k: spec[k] for k in ADDED_TOKEN_FLAGS if k in spec})


def same_added_token(a: AddedToken, b: AddedToken) -> bool:
    """Whether two added tokens have the same content and flags."""
    return a.content == b.content and all(
        getattr(a, flag) == getattr(b, flag) for flag in ADDED_TOKEN_FLAGS
    )


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
        return [config_added_token(spec) for _, spec in entries]
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


def complete_from_config(tokenizer: Tokenizer, folder: Path) -> None:
    """Add to a tokenizer.json's tokenizer what transformers' fast tokenizer adds when it loads
    the folder, so sekft tokenizes as a server on transformers does.

    First the `added_tokens_decoder` entries of tokenizer_config.json that tokenizer.json lacks
    or flags differently (the config's flags win: a Phi-3 tokenizer.json of one revision beside
    the tokenizer_config.json of another changes whether `<|end|>` swallows the next newline),
    then the named and additional special tokens that are no added token yet (matched whole, as
    special). Files that agree, as saved, add nothing.
    """
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    present = {t.content: t for t in tokenizer.get_added_tokens_decoder().values()}
    decoder = config.get("added_tokens_decoder")
    configured = []
    if isinstance(decoder, dict):
        configured = [config_added_token(spec) for _, spec in
                      sorted((int(i), spec) for i, spec in decoder.items())]
    missing = [t for t in configured
               if t.content not in present or not same_added_token(t, present[t.content])]
    # In transformers' order (named, then additional), which fixes the ids of new tokens.
    special = list(load_special_tokens(folder).values()) + additional_special_texts(config)
    known_special = set(special)
    known = set(present) | {t.content for t in missing}
    missing += [AddedToken(text, normalized=False, special=True)
                for text in dict.fromkeys(special) if text not in known]
    for token in missing:
        # transformers marks a named or listed special token special whatever its entry says.
        if token.content in known_special:
            token.special = True
    if missing:
        tokenizer.add_tokens(missing)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer saved in `folder`: `tokenizer.json`, else byte-level BPE from vocab + merges.

    tokenizer.json is completed from tokenizer_config.json as transformers does (see
    `complete_from_config`). Padding and truncation stored in tokenizer.json are switched off,
    as transformers and servers switch them off: sekft tokenizes one whole render at a time.
    Raises TemplateError naming the folder when neither layout is there, and what to do when
    only a `tokenizer.model` is.
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
        complete_from_config(tokenizer, folder)
        return tokenizer
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return byte_level_bpe(folder)
    if (folder / "tokenizer.model").is_file():
        # A server on transformers converts it at load; the same transformers, once, writes
        # the tokenizer.json that conversion gives, which sekft then reads as is.
        raise TemplateError(
            f"{folder}: only a tokenizer.model (SentencePiece or tiktoken), which sekft does not "
            "read; write tokenizer.json beside it once with the transformers your server runs "
            "(and sentencepiece): "
            f"python -c \"from transformers import AutoTokenizer as T; "
            f"T.from_pretrained('{folder}').save_pretrained('{folder}')\""
        )
    raise TemplateError(
        f"{folder}: no tokenizer.json and no vocab.json + merges.txt; "
        "point --base or --tokenizer at the model's tokenizer folder"
    )
