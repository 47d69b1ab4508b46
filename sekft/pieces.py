"""Tokenizing many texts piece by piece, each distinct piece once.

`tokenizers` cuts a text at every added token matched on raw text (`normalized=False`) before
it normalizes or pre-tokenizes anything, and tokenizes the pieces between those tokens
independently. So the tokens of a text are the concatenation of its added tokens and the
tokens of its pieces, each piece tokenized alone, offsets shifted by where the piece starts.
Rendered chat sessions are mostly repeated pieces (role headers, system prompts, banners,
commands, `--help` outputs), and a dataset's distinct pieces are far fewer characters than its
texts.

What can make a piece's tokens depend on more than the piece is handled, not assumed away:
- an added token with `rstrip` swallows the whitespace after it (Rust's `char::is_whitespace`):
  matched here with the same whitespace set;
- Metaspace's `prepend_scheme="first"` prepends ▁ only to the piece at offset 0 of the text,
  which a piece tokenized alone always is; tokens with `lstrip` or `single_word`, encoding
  special tokens as text, truncation, padding and BPE dropout: `piece_splitter` returns None
  for such a tokenizer and texts are tokenized whole.
Pieces are keyed by (starts the text, content) all the same, so what sits at offset 0 never
shares a cache entry with what does not.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from operator import itemgetter

from tokenizers import Tokenizer

# Rust's char::is_whitespace (the White_Space property), which tokenizers' rstrip uses.
# Python's str.isspace differs (it counts \x1c-\x1f), so the set is spelled out.
RUST_WHITESPACE = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"

# (ids, offsets, ends): token ids [T], character ranges (start, end) [T], and the ends alone
# [T] (what bisecting for a character position needs).
Encoding = tuple[list[int], list[tuple[int, int]], list[int]]


def piece_splitter(
    tokenizer: Tokenizer,
) -> tuple[re.Pattern, dict[str, int], frozenset[str]] | None:
    """How to cut raw text where `tokenizer` does: (a pattern matching its raw-text added
    tokens, their ids, the ones that strip whitespace after them), or None when piecewise
    tokenization is not known to equal tokenizing whole texts with this tokenizer.

    Alternatives are longest first, so re's leftmost-first search finds what tokenizers'
    leftmost-longest matching finds.
    """
    if tokenizer.encode_special_tokens or tokenizer.truncation or tokenizer.padding:
        return None
    if getattr(tokenizer.model, "dropout", None):
        return None
    pre_tokenizer = tokenizer.pre_tokenizer
    if pre_tokenizer is not None and b'"prepend_scheme":"first"' in pre_tokenizer.__getstate__():
        return None
    raw = {i: t for i, t in tokenizer.get_added_tokens_decoder().items() if not t.normalized}
    if any(t.lstrip or t.single_word for t in raw.values()):
        return None
    contents = sorted((t.content for t in raw.values()), key=len, reverse=True)
    # One flat alternation: re scans for its first characters quickly, nested groups do not.
    pattern = re.compile("|".join(map(re.escape, contents)) if contents else "(?!)")
    ids = {t.content: i for i, t in raw.items()}
    return pattern, ids, frozenset(t.content for t in raw.values() if t.rstrip)


def encode_texts(
    tokenizer: Tokenizer, texts: Sequence[str], cache: dict | None = None
) -> list[Encoding]:
    """(ids, offsets, ends) of each text: ids and offsets equal `tokenizer.encode(text,
    add_special_tokens=False)`'s, offsets in characters of the text, ends their second items.

    Distinct pieces not yet in `cache` (a dict the caller may share across calls with the same
    tokenizer) are tokenized in one batched call; texts are tokenized whole when
    `piece_splitter` gives None.
    """
    splitter = piece_splitter(tokenizer)
    if splitter is None:
        whole = [(e.ids, e.offsets) for e in tokenizer.encode_batch(texts,
                                                                    add_special_tokens=False)]
        return [(ids, offsets, list(map(itemgetter(1), offsets))) for ids, offsets in whole]
    cache = {} if cache is None else cache
    layouts = [text_layout(text, *splitter) for text in texts]
    missing = list({key for layout in layouts for _, key in layout
                    if isinstance(key[0], bool) and key not in cache})
    for key, e in zip(missing, tokenizer.encode_batch([k[1] for k in missing],
                                                      add_special_tokens=False), strict=True):
        cache[key] = (e.ids, e.offsets)
    return [assemble(layout, cache) for layout in layouts]


STRIPPED = re.compile(RUST_WHITESPACE + "*")


def text_layout(
    text: str, pattern: re.Pattern, ids: dict[str, int], rstrip: frozenset[str]
) -> list[tuple[int, tuple[bool, str] | tuple[int, int]]]:
    """A text as (start, what) in order: what is a piece key (starts the text, content) or an
    added token (id, end); an `rstrip` token's end includes the whitespace it swallows."""
    layout: list = []
    at = 0
    while (match := pattern.search(text, at)) is not None:
        start, end = match.span()
        if start > at:
            layout.append((at, (at == 0, text[at:start])))
        token = match.group()
        if token in rstrip:
            end = STRIPPED.match(text, end).end()
        layout.append((start, (ids[token], end)))
        at = end
    if at < len(text):
        layout.append((at, (at == 0, text[at:])))
    return layout


def assemble(layout: Sequence[tuple[int, tuple]], cache: dict) -> Encoding:
    """Concatenate the tokens of a text's pieces and added tokens, shifting piece offsets."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for start, what in layout:
        if isinstance(what[0], bool):
            piece_ids, piece_offsets = cache[what]
            ids += piece_ids
            if start:
                piece_offsets = [(s + start, e + start) for s, e in piece_offsets]
            offsets += piece_offsets
        else:
            ids.append(what[0])
            offsets.append((start, what[1]))
    return ids, offsets, list(map(itemgetter(1), offsets))
