"""The embedded default base: it is a real checkpoint every code path accepts, its tokenizer
keeps the closed words whole, its template masks recorded trajectories cleanly; and the
recipe's pieces (copy curriculum, tokenizer, initial checkpoint, copy accuracy) do what
they say."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from sekft import default_base as db
from sekft.base import load_base
from sekft.eval import EpisodeConfig
from sekft.mask import encode_session
from sekft.quant import is_4bit
from sekft.sandbox import find_bwrap
from sekft.scenarios import HELDOUT_FAMILIES, TRAIN_FAMILIES
from sekft.scenarios.record import instances, record
from sekft.scenarios.words import WORDS
from sekft.template import ChatTemplate
from sekft.tokenizer import load_tokenizer

SHIPPED = db.DEFAULT_BASE
needs_shipped = pytest.mark.skipif(not (SHIPPED / "model.safetensors").exists(),
                                   reason="the default base is not built (make base)")
needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")


@pytest.fixture(scope="module")
def shipped():
    return load_base(SHIPPED, dtype=torch.float32, device="cpu")


# ---------------------------------------------------------------- the shipped base


@needs_shipped
def test_shipped_base_is_a_small_llama_with_tied_embeddings(shipped):
    assert shipped.config.model_type == "llama"
    assert shipped.config.tie_embeddings
    assert shipped.model.lm_head.weight is shipped.model.model.embed_tokens.weight
    assert sum(p.numel() for p in shipped.model.parameters()) < 2_000_000


@needs_shipped
def test_shipped_folder_fits_the_package_budget():
    size = sum(p.stat().st_size for p in SHIPPED.iterdir() if p.is_file())
    assert size <= 25 * 1024 * 1024


@needs_shipped
def test_shipped_base_carries_recipe_metrics_and_loss_curve():
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    metrics = [json.loads(line) for line in (SHIPPED / "metrics.jsonl").read_text().splitlines()]
    assert recipe["base_families"] == list(db.BASE_FAMILIES)
    assert recipe["adapter_families"] == list(db.ADAPTER_FAMILIES)
    assert any("copy_accuracy" in m for m in metrics)
    assert (SHIPPED / "loss.svg").read_text().lstrip().startswith("<svg")


@needs_shipped
def test_shipped_base_loads_in_4bit_and_predicts_like_the_float_model(shipped):
    quantized = load_base(SHIPPED, device="cpu", load_4bit=True)
    assert is_4bit(quantized.model.model.layers[0].self_attn.q_proj)
    ids = torch.tensor([shipped.tokenizer.encode("<|im_start|>user\nls\n").ids])
    with torch.no_grad():
        reference = shipped.model(ids).softmax(-1)
        approx = quantized.model(ids).softmax(-1)
    # Total variation distance of the next-token distributions: NF4 moves it a little.
    assert (reference - approx).abs().sum(-1).max() / 2 < 0.25


@needs_shipped
def test_shipped_base_logits_equal_transformers_llama():
    transformers = pytest.importorskip("transformers")
    oracle = transformers.AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32)
    ours = load_base(SHIPPED, dtype=torch.float32, device="cpu").model
    ids = torch.tensor([load_tokenizer(SHIPPED).encode("cat $MAIL\nledger --help").ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), oracle(ids).logits, atol=1e-4, rtol=1e-4)


@needs_shipped
def test_shipped_tokenizer_keeps_every_closed_word_a_single_token():
    assert db.split_words(load_tokenizer(SHIPPED)) == []


@needs_shipped
def test_shipped_template_renders_like_transformers():
    transformers = pytest.importorskip("transformers")
    oracle = transformers.AutoTokenizer.from_pretrained(SHIPPED)
    messages = [{"role": "user", "content": "host: Debian\nuser@sandbox:~$ "},
                {"role": "assistant", "content": "ls"}]
    ours = ChatTemplate.from_folder(SHIPPED)
    for prompt in (False, True):
        assert ours.render(messages, add_generation_prompt=prompt) == oracle.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt)


@needs_shipped
@needs_bwrap
def test_recorded_trajectories_pass_the_mask_checks_with_the_shipped_template(shipped):
    todo = instances("train", [0], [db.BASE_FAMILIES[0], db.ADAPTER_FAMILIES[0]])
    template = ChatTemplate(shipped.chat_template, shipped.special_tokens)
    for trajectory in record(todo, EpisodeConfig(sandbox=True), jobs=2):
        encoded = encode_session(trajectory["messages"], template, shipped.tokenizer, strict=True)
        assert encoded.violations == []
        assert any(label != -100 for label in encoded.labels)


# ---------------------------------------------------------------- the recipe's pieces


def test_base_and_adapter_families_split_the_training_families():
    assert set(db.BASE_FAMILIES).isdisjoint(db.ADAPTER_FAMILIES)
    assert set(db.BASE_FAMILIES) | set(db.ADAPTER_FAMILIES) == set(TRAIN_FAMILIES)
    assert set(HELDOUT_FAMILIES).isdisjoint(db.BASE_FAMILIES + db.ADAPTER_FAMILIES)


def test_copy_sessions_are_deterministic_in_the_seed():
    assert db.copy_sessions(3, 20) == db.copy_sessions(3, 20)
    assert db.copy_sessions(3, 20) != db.copy_sessions(4, 20)


def test_every_copied_word_is_shown_before_the_command_that_types_it():
    for record_ in db.copy_sessions(0, 200):
        seen = ""
        for message in record_["messages"]:
            if message["role"] == "user":
                seen += message["content"]
                continue
            for word in message["content"].replace(".", " ").split()[1:]:
                if word in WORDS:
                    assert word in seen.replace(".", " ").split(), message["content"]


def test_copy_sessions_vary_their_shape_and_words():
    commands = [r["messages"][1]["content"].split()[0] for r in db.copy_sessions(0, 60)]
    assert set(commands) == {"echo", "cat", "ls"}


def test_trained_tokenizer_keeps_closed_words_whole_even_when_the_text_lacks_them():
    tokenizer = db.train_tokenizer(["user@sandbox:~$ ls -la"])
    assert db.split_words(tokenizer) == []
    assert tokenizer.token_to_id(db.EOS_TOKEN) == db.SPECIAL_TOKENS.index(db.EOS_TOKEN)


def test_tokenizer_training_is_deterministic():
    texts = [m["content"] for r in db.copy_sessions(0, 50) for m in r["messages"]]
    assert db.train_tokenizer(texts).to_str() == db.train_tokenizer(texts).to_str()


@pytest.fixture(scope="module")
def initial(tmp_path_factory):
    tokenizer = db.train_tokenizer(["user@sandbox:~$ ls -la"])
    return db.initial_checkpoint(tmp_path_factory.mktemp("init"), tokenizer, seed=0)


def test_initial_checkpoint_loads_with_our_loader_at_the_recipe_size(initial):
    base = load_base(initial, dtype=torch.float32, device="cpu")
    assert base.config.hidden_size == db.ARCHITECTURE["hidden_size"]
    assert base.config.num_layers == db.ARCHITECTURE["num_hidden_layers"]
    assert base.chat_template == db.CHAT_TEMPLATE
    assert base.special_tokens["eos_token"] == db.EOS_TOKEN


def test_initial_weights_have_the_configured_scale(initial):
    model = load_base(initial, dtype=torch.float32, device="cpu").model
    std = model.model.layers[0].mlp.up_proj.weight.std().item()
    assert std == pytest.approx(db.ARCHITECTURE["initializer_range"], rel=0.1)
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))


def test_initial_checkpoint_is_deterministic_in_the_seed(tmp_path):
    tokenizer = db.train_tokenizer(["ls"])
    a = db.initial_checkpoint(tmp_path / "a", tokenizer, seed=1)
    b = db.initial_checkpoint(tmp_path / "b", tokenizer, seed=1)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


class _Copier(torch.nn.Module):
    """A stand-in decoder whose next token is always the current one (hidden = one-hot)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids, self.vocab).float()

    def output_weight(self) -> torch.Tensor:
        return torch.eye(self.vocab)


def test_copy_accuracy_counts_only_word_targets_and_hand_computed_hits():
    from sekft.pack import Example

    # Position i predicts labels[i + 1] and the copier guesses input_ids[i]: 5 after 5 is a
    # hit, 9 is no word (not counted), 7 after 9 is a miss.
    example = Example([5, 5, 9, 7], [-100, 5, 9, 7], "x")
    assert db.copy_accuracy(_Copier(10), [example], {5, 7}) == pytest.approx(0.5)


def test_copy_accuracy_is_nan_without_word_targets():
    from sekft.pack import Example

    example = Example([1, 2, 3], [-100, 2, 3], "x")
    assert math.isnan(db.copy_accuracy(_Copier(10), [example], {7}))


def test_word_forms_are_bare_and_space_prefixed():
    word = random.Random(0).choice(WORDS)
    assert db.word_forms(word) == (word, " " + word)
