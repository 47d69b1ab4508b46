"""load_tokenizer / load_special_tokens agree with transformers on the fixture folders."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from template_oracles import ADVERSARIAL, FIXTURES, TOKENIZER_FOLDERS, hf_encoder, hf_tokenizer

from sekft.errors import TemplateError
from sekft.tokenizer import load_special_tokens, load_tokenizer

texts = st.lists(st.one_of(st.sampled_from(ADVERSARIAL), st.text(max_size=16)), max_size=8).map(
    "".join
)


@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_tokenizer_encodes_as_transformers_does(folder):
    ours = load_tokenizer(FIXTURES / folder)
    oracle = hf_encoder(folder)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(text=texts)
    def same_ids(text):
        assert ours.encode(text, add_special_tokens=False).ids == oracle.encode(
            text, add_special_tokens=False
        )

    same_ids()


def test_qwen_byte_level_bpe_is_built_from_vocab_and_merges():
    assert not (FIXTURES / "qwen2.5-instruct" / "tokenizer.json").exists()
    ours = load_tokenizer(FIXTURES / "qwen2.5-instruct")
    assert ours.get_vocab_size() == len(hf_tokenizer("qwen2.5-instruct"))
    text = "<|im_start|>user\nls -la 12345\r\n\n  é<|im_end|>\n"
    assert ours.encode(text, add_special_tokens=False).ids == hf_tokenizer(
        "qwen2.5-instruct"
    ).encode(text, add_special_tokens=False)


def test_qwen_non_special_added_tokens_keep_their_flag():
    decoder = load_tokenizer(FIXTURES / "qwen2.5-instruct").get_added_tokens_decoder()
    by_text = {t.content: t.special for t in decoder.values()}
    assert by_text["<|im_end|>"] is True
    assert by_text["<tool_call>"] is False


@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_special_tokens_resolve_as_transformers_does(folder):
    assert load_special_tokens(FIXTURES / folder) == hf_tokenizer(folder).special_tokens_map


def test_special_tokens_of_a_config_without_tokenizer_files():
    config = json.loads((FIXTURES / "llama-3.2-3b-instruct/tokenizer_config.json").read_text())
    assert load_special_tokens(FIXTURES / "llama-3.2-3b-instruct") == {
        "bos_token": config["bos_token"],
        "eos_token": config["eos_token"],
        "pad_token": config["pad_token"],
    }


def test_special_tokens_map_wins_in_legacy_folders(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<a>"}))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<b>", "lstrip": False}})
    )
    assert load_special_tokens(tmp_path) == {"eos_token": "<b>"}


def test_folder_without_tokenizer_files_names_the_folder(tmp_path):
    with pytest.raises(TemplateError, match=f"{tmp_path}: no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_malformed_config_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TemplateError, match="tokenizer_config.json: cannot read JSON"):
        load_special_tokens(tmp_path)
