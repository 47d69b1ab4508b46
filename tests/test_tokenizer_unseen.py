"""Real tokenizer folders the other fixtures do not cover: sekft loads them as transformers'
fast tokenizer does (what vLLM tokenizes a rendered chat with), special tokens included.

Fixtures (tests/fixtures/templates/SOURCES.md): TinyLlama-1.1B-Chat-v1.0 as a fine-tuner saved
it (Llama 2's SentencePiece BPE with byte fallback, `legacy: false`, `add_bos_token: true`, a
template that writes no BOS, truncation at 512 stored in tokenizer.json, and the
tokenizer.model beside it); the tokenizer_config.json of an earlier Phi-3-mini revision (no
`rstrip` on `<|end|>`, unlike the fixture's tokenizer.json); Gemma 4's tokenizer_config.json
(model-specific named tokens such as `sot_token`).

The oracle is `PreTrainedTokenizerFast.from_pretrained(folder)`: transformers' loading of
tokenizer.json plus tokenizer_config.json. transformers 5's `AutoTokenizer` rebuilds Llama
tokenizers with its own whitespace handling (README, "Which tokenizer the server uses").
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import pytest
from template_oracles import ADVERSARIAL, FIXTURES, SHELL_SESSIONS

from sekft.data import read_sessions
from sekft.errors import TemplateError
from sekft.mask import encode_session, main
from sekft.template import ChatTemplate, normalize_for_template
from sekft.tokenizer import load_special_tokens, load_tokenizer

TINYLLAMA = FIXTURES / "tinyllama-1.1b-chat-v1.0"
PHI3 = FIXTURES / "phi-3-mini-4k-instruct"
PHI3_EARLY = FIXTURES / "phi-3-mini-4k-instruct-early"
GEMMA4 = FIXTURES / "gemma-4"

# Texts around the markers these tokenizers treat specially.
PROBES = [
    *ADVERSARIAL,
    "<|user|>\nls -la<|end|>\n<|assistant|>\ncat x <|end|>\n<|endoftext|>",
    "<s> <s>  </s> </s>x",
    "a<|placeholder1|>b  <|system|>  c",
    "<|im_start|>user\nls<|im_end|>\n<|im_start|>assistant\n",
]


def hf_fast(folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


@cache
def shell_renders(folder: Path) -> tuple[str, ...]:
    template = ChatTemplate.from_folder(folder)
    return tuple(
        template.render(normalize_for_template(s.messages)) for s in read_sessions(SHELL_SESSIONS)
    )


def assert_encodes_as_transformers(folder: Path, texts) -> None:
    ours, oracle = load_tokenizer(folder), hf_fast(folder)
    for text in texts:
        assert ours.encode(text, add_special_tokens=False).ids == oracle(
            text, add_special_tokens=False
        )["input_ids"], text[:80]


def added_tokens(tokenizer) -> dict[int, tuple]:
    return {
        i: (t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special)
        for i, t in tokenizer.get_added_tokens_decoder().items()
    }


def folder_of(tmp_path: Path, files: dict[str, Path]) -> Path:
    """A tokenizer folder assembled from real files of different origins."""
    for name, source in files.items():
        shutil.copyfile(source, tmp_path / name)
    return tmp_path


def test_tinyllama_encodes_its_renders_as_transformers_does():
    assert_encodes_as_transformers(TINYLLAMA, [*shell_renders(TINYLLAMA), *PROBES])


def test_tinyllama_special_tokens_resolve_as_transformers_does():
    assert load_special_tokens(TINYLLAMA) == hf_fast(TINYLLAMA).special_tokens_map


def test_tinyllama_stored_truncation_does_not_cut_a_render():
    saved = json.loads((TINYLLAMA / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["truncation"]["max_length"] == 512
    longest = max(shell_renders(TINYLLAMA), key=len)
    assert len(load_tokenizer(TINYLLAMA).encode(longest, add_special_tokens=False).ids) > 512


@pytest.mark.parametrize(
    ("folder", "bos_count"),
    [(TINYLLAMA, 0), (FIXTURES / "mistral-7b-instruct-v0.2", 1)],
    ids=["tinyllama-template-writes-no-bos", "mistral-template-writes-bos"],
)
def test_bos_is_what_the_template_wrote_whatever_add_bos_token_says(folder, bos_count):
    """Both configs say `add_bos_token: true` and both tokenizer.json add BOS in their
    post-processor; a server tokenizes the render with add_special_tokens=False, so the
    encoded session holds exactly the BOS the template wrote: none for TinyLlama, one first
    for Mistral."""
    assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is True
    tokenizer = load_tokenizer(folder)
    bos = tokenizer.token_to_id(load_special_tokens(folder)["bos_token"])
    messages = read_sessions(SHELL_SESSIONS)[0].messages
    encoded = encode_session(messages, ChatTemplate.from_folder(folder), tokenizer)
    assert encoded.input_ids.count(bos) == bos_count
    assert (encoded.input_ids[0] == bos) == (bos_count == 1)
    oracle = hf_fast(folder)(encoded.text, add_special_tokens=False)["input_ids"]
    assert encoded.input_ids == oracle


def test_mask_inspector_passes_on_tinyllama(capsys):
    assert main(["--inspect", "--data", str(SHELL_SESSIONS), "--base", str(TINYLLAMA)]) == 0
    assert "0 violations: ok" in capsys.readouterr().out


def test_config_flags_win_over_tokenizer_json(tmp_path):
    """The fixture's tokenizer.json makes `<|end|>` swallow the whitespace after it (rstrip);
    an earlier revision's tokenizer_config.json says it does not. transformers applies the
    config's flags, so the newline after `<|end|>` is a token of its own."""
    folder = folder_of(tmp_path, {"tokenizer.json": PHI3 / "tokenizer.json",
                                  "tokenizer_config.json": PHI3_EARLY / "tokenizer_config.json"})
    ours = load_tokenizer(folder)
    assert added_tokens(ours) == added_tokens(hf_fast(folder).backend_tokenizer)
    assert ours.encode("<|end|>\n", add_special_tokens=False).tokens == ["<|end|>", "▁", "<0x0A>"]
    assert_encodes_as_transformers(folder, [*shell_renders(folder), *PROBES])


def phi3_json_without(tmp_path: Path, dropped: set[str]) -> Path:
    """The Phi-3 fixture's tokenizer.json re-saved without some of its added tokens, as
    onnxruntime-extensions met it (its test data `added-tokens`): tokenizer_config.json's
    `added_tokens_decoder` still lists them."""
    saved = json.loads((PHI3 / "tokenizer.json").read_text(encoding="utf-8"))
    saved["added_tokens"] = [t for t in saved["added_tokens"] if t["content"] not in dropped]
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved), encoding="utf-8")
    shutil.copyfile(PHI3 / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    return tmp_path


def test_config_added_tokens_missing_from_tokenizer_json_are_added(tmp_path):
    folder = phi3_json_without(tmp_path, {"<|end|>", "<|assistant|>", "<|endoftext|>"})
    ours = load_tokenizer(folder)
    # tokenizers gives each the next free id, not the config's: the same as transformers.
    assert added_tokens(ours) == added_tokens(hf_fast(folder).backend_tokenizer)
    assert len(ours.encode("<|assistant|>", add_special_tokens=False).ids) == 1
    assert_encodes_as_transformers(folder, [*shell_renders(PHI3), *PROBES])


def test_listed_special_tokens_missing_from_tokenizer_json_are_added(tmp_path):
    """TinyLlama's files with ChatML markers listed as additional special tokens, as a
    fine-tuner's config may list them: transformers adds each as a new special token, in the
    config's order."""
    folder = folder_of(tmp_path, {"tokenizer.json": TINYLLAMA / "tokenizer.json"})
    config = json.loads((TINYLLAMA / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours = load_tokenizer(folder)
    assert added_tokens(ours) == added_tokens(hf_fast(folder).backend_tokenizer)
    assert ours.token_to_id("<|im_start|>") == 32000
    assert_encodes_as_transformers(folder, PROBES)


def test_model_specific_special_tokens_resolve_as_transformers_does(tmp_path):
    """Gemma 4 names its turn and tool markers (`sot_token`, `etc_token`, ...); transformers
    lists them in `special_tokens_map` and passes them to the template. Its tokenizer.json is
    over 4 MiB: TinyLlama's stands in (the named tokens do not depend on it)."""
    folder = folder_of(tmp_path, {"tokenizer.json": TINYLLAMA / "tokenizer.json",
                                  "tokenizer_config.json": GEMMA4 / "tokenizer_config.json"})
    special = load_special_tokens(folder)
    assert special["sot_token"] == "<|turn>"
    assert special == hf_fast(folder).special_tokens_map
    assert added_tokens(load_tokenizer(folder)) == added_tokens(hf_fast(folder).backend_tokenizer)


def test_a_folder_with_only_tokenizer_model_is_refused_naming_what_to_do(tmp_path):
    folder = folder_of(tmp_path, {"tokenizer.model": TINYLLAMA / "tokenizer.model",
                                  "tokenizer_config.json": TINYLLAMA / "tokenizer_config.json"})
    with pytest.raises(TemplateError, match=r"only a tokenizer\.model .*save_pretrained"):
        load_tokenizer(folder)
