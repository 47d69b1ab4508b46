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


def resaved_with_padding_and_truncation(folder: str, tmp_path):
    """A copy of the fixture's tokenizer.json as a re-saved Mistral v0.3 carries it: padding to
    a fixed 512 ids on the left with </s>, truncation at 512."""
    saved = json.loads((FIXTURES / folder / "tokenizer.json").read_text(encoding="utf-8"))
    saved["padding"] = {"strategy": {"Fixed": 512}, "direction": "Left",
                        "pad_to_multiple_of": None, "pad_id": 2, "pad_type_id": 0,
                        "pad_token": "</s>"}
    saved["truncation"] = {"direction": "Right", "max_length": 512,
                           "strategy": "LongestFirst", "stride": 0}
    (tmp_path / "tokenizer.json").write_text(json.dumps(saved), encoding="utf-8")
    return tmp_path


def test_padding_and_truncation_stored_in_tokenizer_json_are_switched_off(tmp_path):
    from template_oracles import our_template

    from sekft.mask import encode_session

    folder = "mistral-7b-instruct-v0.2"
    plain = load_tokenizer(FIXTURES / folder)
    resaved = load_tokenizer(resaved_with_padding_and_truncation(folder, tmp_path))
    text = "<s>[INST] list the files [/INST]ls -la</s>"
    assert resaved.encode(text, add_special_tokens=False).ids == plain.encode(
        text, add_special_tokens=False).ids
    long = "word " * 2000
    assert len(resaved.encode_batch([long, "ls"])[0].ids) == len(plain.encode(long).ids) > 512
    messages = [{"role": "user", "content": "list the files"},
                {"role": "assistant", "content": "ls -la"}]
    encoded = encode_session(messages, our_template(folder), resaved)
    assert encoded.violations == []
    trained = [t for t in encoded.labels if t != -100]
    assert resaved.decode(trained, skip_special_tokens=False) == "ls -la</s>"
