"""Piecewise tokenization (sekft.pieces) equals tokenizing each text whole, on every fixture
tokenizer and on small tokenizers built to have each position- or context-dependent feature."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from template_oracles import ADVERSARIAL, FIXTURES, TOKENIZER_FOLDERS
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers

from sekft.pieces import encode_texts, piece_splitter
from sekft.tokenizer import load_tokenizer

# Whitespace where Python and Rust disagree (\x1c is space to Python only), or that Rust
# counts and plain ASCII tests miss (\u3000, \x85): what an rstrip token swallows.
WHITESPACE = [" ", "\n", "\t", "\r\n", "\u3000", "\x85", "\xa0", "\x1c", "\x1f", "  \n "]
WORDS = ["ls", " -la", "alpha", "12", "é", "🙂", "\x1b[0m", "$ ", "x" * 300, ""]

TOKENIZERS: dict[str, Tokenizer] = {}


def fixture_tokenizer(folder: str) -> Tokenizer:
    if folder not in TOKENIZERS:
        TOKENIZERS[folder] = load_tokenizer(FIXTURES / folder)
    return TOKENIZERS[folder]


def whole(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoding = tokenizer.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets


def texts_of(tokenizer: Tokenizer):
    """Texts made of the tokenizer's own added tokens, adversarial chat content, whitespace
    Rust and Python disagree on, and words, in any order (so pieces repeat across texts)."""
    added = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
    parts = st.sampled_from(added + ADVERSARIAL + WHITESPACE + WORDS)
    return st.lists(st.lists(parts, max_size=14).map("".join), min_size=1, max_size=6)


def assert_piecewise_equals_whole(tokenizer: Tokenizer, texts: list[str]) -> None:
    got = encode_texts(tokenizer, texts)
    for text, (ids, offsets, ends) in zip(texts, got, strict=True):
        assert (ids, offsets) == whole(tokenizer, text)
        assert ends == [e for _, e in offsets]


@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_piecewise_tokens_and_offsets_equal_whole_text_on_fixture_tokenizers(folder):
    tokenizer = fixture_tokenizer(folder)
    assert piece_splitter(tokenizer) is not None

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(texts=texts_of(tokenizer))
    def same(texts):
        assert_piecewise_equals_whole(tokenizer, texts)

    same()


def tiny_tokenizer(
    pre_tokenizer=None, normalizer=None, added: list[AddedToken] = ()
) -> Tokenizer:
    """A small BPE trained on shell-ish text, with the given pre-tokenizer, normalizer and
    added tokens."""
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.normalizer = normalizer
    corpus = ["ls -la alpha beta 12 $ exit", "usage: provider --help é 🙂", "x" * 40] * 5
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["[UNK]"], show_progress=False))
    tokenizer.add_tokens(list(added))
    return tokenizer


SEP = AddedToken("<sep>", special=True, normalized=False)
CONTEXT_DEPENDENT = {
    "metaspace-always": dict(pre_tokenizer=pre_tokenizers.Metaspace(prepend_scheme="always"),
                             added=[SEP]),
    "bytelevel-prefix-space": dict(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=True),
                                   added=[SEP]),
    # Llama/Mistral's legacy normalizer prepends ▁ to each piece.
    "prepend-normalizer": dict(normalizer=normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]), added=[SEP]),
    "nfkc-normalizer": dict(pre_tokenizer=pre_tokenizers.Whitespace(),
                            normalizer=normalizers.NFKC(), added=[SEP]),
    # rstrip swallows the whitespace after the token (Rust's idea of whitespace).
    "rstrip-token": dict(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False),
                         added=[SEP, AddedToken("<end>", special=True, normalized=False,
                                                rstrip=True)]),
    # A normalized added token is matched inside pieces, after normalization.
    "normalized-token": dict(pre_tokenizer=pre_tokenizers.Whitespace(),
                             normalizer=normalizers.Lowercase(),
                             added=[SEP, AddedToken("stop", normalized=True)]),
    # Overlapping added tokens: tokenizers matches the longest at the leftmost position.
    "overlapping-tokens": dict(pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False),
                               added=[SEP, AddedToken("<sep><sep>", special=True,
                                                      normalized=False),
                                      AddedToken("<se", special=True, normalized=False)]),
}


@pytest.mark.parametrize("kind", list(CONTEXT_DEPENDENT))
def test_piecewise_equals_whole_text_on_context_dependent_tokenizers(kind):
    tokenizer = tiny_tokenizer(**CONTEXT_DEPENDENT[kind])
    assert piece_splitter(tokenizer) is not None

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(texts=texts_of(tokenizer))
    def same(texts):
        assert_piecewise_equals_whole(tokenizer, texts)

    same()


def test_metaspace_prepending_only_at_offset_zero_makes_texts_tokenize_whole():
    """Under prepend_scheme "first", "ls" at the start and after <sep> tokenize differently,
    and a piece tokenized alone is always at the start."""
    first_only = pre_tokenizers.Sequence([pre_tokenizers.Digits(),
                                          pre_tokenizers.Metaspace(prepend_scheme="first")])
    tokenizer = tiny_tokenizer(first_only, added=[SEP])
    assert whole(tokenizer, "ls")[0] != whole(tokenizer, "<sep>ls")[0][1:]
    assert piece_splitter(tokenizer) is None
    assert_piecewise_equals_whole(tokenizer, ["ls<sep>ls", "<sep>ls", "ls"])


@pytest.mark.parametrize("token", [
    AddedToken("<end>", special=True, normalized=False, lstrip=True),
    AddedToken("<end>", special=True, normalized=False, single_word=True),
])
def test_tokens_that_look_left_or_at_words_make_texts_tokenize_whole(token):
    tokenizer = tiny_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), added=[token])
    assert piece_splitter(tokenizer) is None
    assert_piecewise_equals_whole(tokenizer, ["ls <end> ls", "a<end>b", " <end>"])


def test_truncation_or_encoding_special_tokens_as_text_make_texts_tokenize_whole():
    tokenizer = tiny_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), added=[SEP])
    tokenizer.enable_truncation(4)
    assert piece_splitter(tokenizer) is None
    assert_piecewise_equals_whole(tokenizer, ["ls -la<sep>alpha beta gamma"])
    tokenizer.no_truncation()
    tokenizer.encode_special_tokens = True
    assert piece_splitter(tokenizer) is None
    assert_piecewise_equals_whole(tokenizer, ["ls<sep>ls"])


def test_a_shared_cache_gives_the_same_tokens_in_a_later_call():
    tokenizer = fixture_tokenizer("smollm2")
    cache: dict = {}
    texts = ["<|im_start|>user\nls<|im_end|>\n", "<|im_start|>assistant\nls<|im_end|>"]
    first = encode_texts(tokenizer, texts, cache)
    assert cache
    assert encode_texts(tokenizer, texts[::-1], cache) == first[::-1]
    assert_piecewise_equals_whole(tokenizer, texts)
