"""Real chat templates the other fixtures do not cover, and the ways a checkpoint delivers its
template: sekft's render equals transformers', its mask equals one computed from
transformers' renders and tokens, and a template that rewrites past turns or forces a prefix
on the reply is reported and left untrained, never guessed.

The templates are real (tests/fixtures/templates/SOURCES.md); their tokenizers are not here
(Gemma's and Llama 3's tokenizer.json are over 4 MiB), so each mask runs on a stand-in: a
fixture tokenizer of the same kind with the template's special tokens added (Qwen2.5's
byte-level BPE splits newlines as Llama 3's does, Mistral v0.2's sentencepiece stands in for
the [INST] templates).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from template_oracles import (
    FIXED_NOW,
    FIXTURES,
    SHELL_SESSIONS,
    canonical,
    fixed_transformers_clock,
    sessions,
)
from tokenizers import AddedToken

from sekft.data import read_sessions
from sekft.errors import TemplateError
from sekft.mask import IGNORE, encode_session, main
from sekft.template import ChatTemplate
from sekft.tokenizer import load_special_tokens, load_tokenizer

GEMMA = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
LLAMA3 = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
MISTRAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
DEEPSEEK = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"}
GRANITE = {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>"}
PHI = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}
COHERE = {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>", "pad_token": "<PAD>"}
HERMES = {"bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>"}

GEMMA_MARKERS = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>")
DEEPSEEK_MARKERS = (
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
)


@dataclass(frozen=True)
class Case:
    """One real template: where it is, its named tokens, the stand-in tokenizer (a fixture
    folder plus the template's markers as special tokens), what closes an assistant turn, what
    a trained turn is (`reply`, read off the template by hand), and which check the turns the
    contract cannot train fail on the shell session."""

    template: str
    special: dict
    base: str
    markers: tuple[str, ...]
    closer: str
    untrainable: str | None = None  # "history": all turns but the last; "serve-prefix": all
    reply: str = "{content}{closer}"


CASES = {
    # No system role (raise_exception), role "model", `| trim`, bos_token in the template.
    "gemma-2": Case("gemma-2-2b-it", GEMMA, "smollm2", GEMMA_MARKERS, "<end_of_turn>"),
    # Delivered as chat_template.json; folds a system turn into the first user turn itself.
    "gemma-3": Case("gemma-3-it", GEMMA, "smollm2", GEMMA_MARKERS, "<end_of_turn>"),
    # Date header from strftime_now, a system header even without a system turn, tools.
    "llama-3.1": Case("llama-3.1-8b-instruct", LLAMA3, "qwen2.5-instruct",
                      ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                       "<|eot_id|>", "<|eom_id|>"), "<|eot_id|>"),
    # [INST] without spaces; a system turn goes to the LAST user turn (normalize folds it first).
    "mistral-nemo": Case("mistral-nemo-instruct-2407", MISTRAL, "mistral-7b-instruct-v0.2",
                         ("[INST]", "[/INST]"), "</s>"),
    # [SYSTEM_PROMPT] with a default system prompt and today's date when none is given.
    "mistral-small-3.2": Case("mistral-small-3.2-24b-instruct", MISTRAL,
                              "mistral-7b-instruct-v0.2",
                              ("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"), "</s>"),
    # Think blocks: the last assistant turn after the last user query gets <think>\n\n</think>,
    # so every earlier turn is written differently once a later user turn exists.
    "qwen3": Case("qwen3-0.6b", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                  "qwen2.5-instruct", ("<think>", "</think>"), "<|im_end|>", "history",
                  "<think>\n\n</think>\n\n{content}{closer}"),
    # The revised R1-Distill template ends the generation prompt with "<think>\n", which no
    # rendered past turn has: no turn can be served as it is trained.
    "deepseek-r1-distill": Case("deepseek-r1-distill-qwen-32b", DEEPSEEK, "qwen2.5-instruct",
                                DEEPSEEK_MARKERS, "<｜end▁of▁sentence｜>", "serve-prefix"),
    # The first R1-Distill release: AddedToken dicts in tokenizer_config.json, namespace().
    "deepseek-r1-distill-jan2025": Case("deepseek-r1-distill-qwen-32b-jan2025", {},
                                        "qwen2.5-instruct", DEEPSEEK_MARKERS,
                                        "<｜end▁of▁sentence｜>"),
    # <|start_of_role|>, a default system prompt with today's date.
    "granite-3.3": Case("granite-3.3-2b-instruct", GRANITE, "smollm2",
                        ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"),
                        "<|end_of_text|>"),
    # eos_token after the last turn unless add_generation_prompt.
    "phi-3.5": Case("phi-3.5-mini-instruct", PHI, "phi-3-mini-4k-instruct",
                    ("<|user|>", "<|assistant|>", "<|end|>"), "<|end|>"),
    # The reply is wrapped in <|START_RESPONSE|>...<|END_RESPONSE|>: glue the model writes.
    "command-r7b": Case("command-r7b-12-2024/tool_use.jinja", COHERE, "smollm2",
                        ("<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                         "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                         "<|START_RESPONSE|>", "<|END_RESPONSE|>"), "<|END_OF_TURN_TOKEN|>",
                        reply="<|START_RESPONSE|>{content}<|END_RESPONSE|>{closer}"),
}


def our_template(case: Case) -> ChatTemplate:
    special = case.special or None  # {} means: read them from the folder
    template = ChatTemplate.from_folder(FIXTURES / case.template, special_tokens=special)
    template.clock = lambda: FIXED_NOW
    return template


@cache
def hf_renderer(name: str):
    """transformers' renderer for a case: a placeholder vocabulary carrying the template and
    the same named tokens (enough for `apply_chat_template(tokenize=False)`)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    template = our_template(CASES[name])
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()),
                                 **template.special_tokens)
    hf.chat_template = template.source
    return hf


@cache
def stand_in(name: str):
    """(sekft's tokenizer, transformers' tokenizer) for a case: the base fixture's tokenizer
    with the template's markers added as special tokens, loaded independently by each."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    case = CASES[name]
    ours = load_tokenizer(FIXTURES / case.base)
    ours.add_special_tokens([AddedToken(m, normalized=False, special=True) for m in case.markers])
    path = FIXTURES / case.base / "tokenizer.json"
    if path.exists():
        theirs = PreTrainedTokenizerFast(tokenizer_file=str(path))
    else:
        theirs = AutoTokenizer.from_pretrained(FIXTURES / case.base)
    theirs.add_special_tokens({"additional_special_tokens": list(case.markers)})
    return ours, theirs


def shell_session(system: bool) -> list[dict]:
    messages = read_sessions(SHELL_SESSIONS)[0].messages
    return canonical([m for m in messages if system or m["role"] != "system"])


def oracle_mask(name: str, messages: list[dict]):
    """The contract computed with transformers alone: (input_ids, trained token indices,
    {turn: failed check}). A span runs from the end of P_i to the end of the first closer after
    it; a turn whose P_i is not a prefix of R (as text or tokens) fails serve-prefix, one whose
    own render differs from R through its closer fails history, unless its own render trains
    it (P_i a prefix of render(m[:i+1]), as text and tokens): then `own[i]` holds that
    render's (input_ids, trained token indices)."""
    hf, (_, enc) = hf_renderer(name), stand_in(name)
    closer = CASES[name].closer

    def render(part, prompt=False):
        return hf.apply_chat_template(part, tokenize=False, add_generation_prompt=prompt)

    text = render(messages)
    encoded = enc(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans, failed, own = [], {}, {}
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], prompt=True)
        prompt_ids = enc.encode(prompt, add_special_tokens=False)
        if not text.startswith(prompt) or ids[: len(prompt_ids)] != prompt_ids:
            failed[i] = "serve-prefix"
            continue
        end = text.index(closer, len(prompt)) + len(closer)
        history = render(messages[: i + 1])
        if history[:end] != text[:end]:
            mine = enc(history, add_special_tokens=False, return_offsets_mapping=True)
            if history.startswith(prompt) and mine["input_ids"][: len(prompt_ids)] == prompt_ids:
                stop = history.index(closer, len(prompt)) + len(closer)
                own[i] = (mine["input_ids"], [k for k, (s, e) in enumerate(mine["offset_mapping"])
                                              if len(prompt) <= s and e <= stop])
            else:
                failed[i] = "history"
            continue
        spans.append((len(prompt), end))
    trained = [k for k, (s, e) in enumerate(offsets) if any(a <= s and e <= b for a, b in spans)]
    return ids, trained, failed, own


@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_render_equals_transformers_on_every_prefix_of_a_shell_session(name, system,
                                                                        monkeypatch):
    fixed_transformers_clock(monkeypatch)
    template, hf = our_template(CASES[name]), hf_renderer(name)
    messages = shell_session(system)
    for end in range(1, len(messages) + 1):
        for prompt in (False, True):
            expected = hf.apply_chat_template(messages[:end], tokenize=False,
                                              add_generation_prompt=prompt)
            assert template.render(messages[:end], prompt) == expected


@pytest.mark.parametrize("name", CASES)
def test_render_equals_transformers_on_adversarial_sessions(name, monkeypatch):
    fixed_transformers_clock(monkeypatch)
    template, hf = our_template(CASES[name]), hf_renderer(name)

    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=sessions(max_turns=8), prompt=st.booleans())
    def same(messages, prompt):
        messages = canonical(messages)
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert template.render(messages, prompt) == expected

    same()


@pytest.mark.parametrize("system", [True, False])
@pytest.mark.parametrize("name", CASES)
def test_mask_equals_the_contract_computed_with_transformers(name, system, monkeypatch):
    fixed_transformers_clock(monkeypatch)
    case, messages = CASES[name], shell_session(system)
    encoded = encode_session(messages, our_template(case), stand_in(name)[0])
    ids, trained, failed, own = oracle_mask(name, messages)
    assert encoded.input_ids == ids
    assert [k for k, label in enumerate(encoded.labels) if label != IGNORE] == trained
    assert {v.turn: v.check for v in encoded.violations} == failed
    assert {o.spans[0].turn: (o.input_ids, [k for k, label in enumerate(o.labels)
                                            if label != IGNORE])
            for o in encoded.own_renders} == own
    # What the case says by hand: the untrainable turns are reported, the rewritten ones train
    # from their own render, the others train exactly their reply (command, closer, and glue
    # the prompt leaves to the model).
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if case.untrainable == "serve-prefix":
        assert failed == dict.fromkeys(assistant, "serve-prefix")
    elif case.untrainable == "history":
        assert failed == {} and list(own) == assistant[:-1]
    else:
        assert failed == {} and own == {}
    trainers = {s.turn: (encoded, s) for s in encoded.spans if s.turn not in failed | own}
    trainers |= {o.spans[0].turn: (o, o.spans[0]) for o in encoded.own_renders}
    for turn, (part, span) in sorted(trainers.items()):
        reply = case.reply.format(content=messages[turn]["content"], closer=case.closer)
        assert part.text[span.start : span.end] == reply


def test_qwen3_trains_every_turn_with_its_empty_think_block_in_its_own_render(monkeypatch):
    """Qwen3 writes `<think>\\n\\n</think>\\n\\n` before the last turn's reply, which the model
    must produce after the served prompt `<|im_start|>assistant\\n`, and drops it once a user
    turn follows: R trains the last turn, each earlier turn trains from its own render."""
    fixed_transformers_clock(monkeypatch)
    messages = shell_session(True)
    encoded = encode_session(messages, our_template(CASES["qwen3"]), stand_in("qwen3")[0])

    def trained(part):
        return "".join(part.text[s:e] for (s, e), label in zip(part.offsets, part.labels,
                                                                strict=True) if label != IGNORE)

    commands = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [trained(part) for part in encoded.own_renders + [encoded]] == [
        f"<think>\n\n</think>\n\n{c}<|im_end|>" for c in commands]
    assert encoded.violations == []
    off = encode_session(messages, our_template(CASES["qwen3"]), stand_in("qwen3")[0],
                         own_renders=False)
    assert off.own_renders == [] and trained(off) == trained(encoded)
    assert all("rewrites this turn" in v.detail for v in off.violations)
    assert len(off.violations) == len(commands) - 1


def test_chat_template_json_is_read_when_the_tokenizer_has_no_template(tmp_path):
    """Gemma 3 4B ships its template only in a processor's chat_template.json."""
    folder = FIXTURES / "gemma-3-it"
    source = json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))
    template = ChatTemplate.from_folder(folder, special_tokens=GEMMA)
    assert template.source == source["chat_template"]
    shutil.copy(folder / "chat_template.json", tmp_path / "chat_template.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>"}))
    assert ChatTemplate.from_folder(tmp_path).render([{"role": "user", "content": "hi"}]) == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n"
    )


def test_chat_template_json_and_the_tokenizers_template_must_agree(tmp_path):
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "P"}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "P"}))
    assert ChatTemplate.from_folder(tmp_path).source == "P"
    (tmp_path / "chat_template.jinja").write_text("J")
    with pytest.raises(TemplateError, match="chat_template.json and the tokenizer's template"):
        ChatTemplate.from_folder(tmp_path)
    assert ChatTemplate.from_folder(tmp_path / "chat_template.json").source == "P"


def test_named_templates_pick_default_and_a_tool_template_fails_with_a_clear_reason(tmp_path):
    """Hermes 3 lists named templates; its `tool_use` one iterates `tools` (None here), which
    fails at the first turn of any session: the error must not blame normalization."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tool_use = (FIXTURES / "hermes-3-llama-3.1-8b" / "tool_use.jinja").read_text(encoding="utf-8")
    chatml = ("{{bos_token}}{% for message in messages %}{{'<|im_start|>' + message['role'] + "
              "'\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    named = [{"name": "default", "template": chatml}, {"name": "tool_use", "template": tool_use}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**HERMES, "chat_template": named}))
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), **HERMES)
    hf.chat_template = {t["name"]: t["template"] for t in named}
    messages = shell_session(True)
    assert ChatTemplate.from_folder(tmp_path).render(messages) == hf.apply_chat_template(
        messages, tokenize=False)
    tools = ChatTemplate.from_folder(tmp_path, name="tool_use")
    assert tools.source == tool_use
    with pytest.raises(TypeError):
        hf.apply_chat_template(messages, chat_template="tool_use", tokenize=False)
    with pytest.raises(TemplateError) as raised:
        tools.render(messages)
    assert "already normalized" in str(raised.value)
    assert "--template-name" in str(raised.value)
    with pytest.raises(TemplateError, match="need the session normalized"):
        tools.render([{"role": "system", "content": "S"}, *messages])


def test_added_token_dicts_give_the_special_tokens_transformers_gives(tmp_path):
    from transformers import AutoTokenizer

    shutil.copy(FIXTURES / "deepseek-r1-distill-qwen-32b-jan2025" / "tokenizer_config.json",
                tmp_path / "tokenizer_config.json")
    stand_in("deepseek-r1-distill-jan2025")[0].save(str(tmp_path / "tokenizer.json"))
    expected = AutoTokenizer.from_pretrained(tmp_path).special_tokens_map
    assert load_special_tokens(tmp_path) == expected
    assert ChatTemplate.from_folder(tmp_path).special_tokens == expected


def stand_in_folder(tmp_path: Path, name: str, *template_files: Path) -> Path:
    """A model folder for the inspector: the stand-in tokenizer, its named tokens, then the
    given files (a real tokenizer_config.json replaces the written one)."""
    folder = tmp_path / name
    folder.mkdir()
    stand_in(name)[0].save(str(folder / "tokenizer.json"))
    special = CASES[name].special
    (folder / "tokenizer_config.json").write_text(json.dumps(special, ensure_ascii=False))
    for file in template_files:
        shutil.copy(file, folder / file.name)
    return folder


def test_inspector_runs_on_each_delivery_variant(tmp_path, capsys):
    gemma3 = FIXTURES / "gemma-3-it" / "chat_template.json"
    gemma = stand_in_folder(tmp_path, "gemma-3", gemma3)
    data = ["--inspect", "--data", str(SHELL_SESSIONS)]
    assert main([*data, "--base", str(gemma)]) == 0
    assert main([*data, "--tokenizer", str(gemma), "--template", str(gemma3)]) == 0
    gemma2 = FIXTURES / "gemma-2-2b-it" / "chat_template.jinja"
    assert main([*data, "--tokenizer", str(gemma), "--template", str(gemma2)]) == 0
    config = FIXTURES / "deepseek-r1-distill-qwen-32b-jan2025" / "tokenizer_config.json"
    deepseek = stand_in_folder(tmp_path, "deepseek-r1-distill-jan2025", config)
    assert main([*data, "--base", str(deepseek)]) == 0
    assert capsys.readouterr().out.count("0 violations: ok") == 4
    qwen3 = stand_in_folder(tmp_path, "qwen3", FIXTURES / "qwen3-0.6b" / "chat_template.jinja")
    assert main([*data, "--base", str(qwen3), "--session", "0"]) == 0
    out = capsys.readouterr().out
    assert "=== session 0 (turn 1, trained from its own render)" in out
    assert out.endswith("0 violations: ok\n")
    assert main([*data, "--base", str(qwen3), "--session", "0", "--json"]) == 0
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    turns = [n for n, m in enumerate(shell_session(True)) if m["role"] == "assistant"]
    assert [own["turn"] for own in record["own_renders"]] == turns[:-1]
    assert all(own["trained_text"].startswith("<think>\n\n</think>\n\n")
               and own["trained_text"].endswith("<|im_end|>") for own in record["own_renders"])


def test_template_vars_parse_as_json_or_strings_and_refuse_what_sekft_sets():
    from sekft.errors import ConfigError
    from sekft.template import parse_template_vars

    assert parse_template_vars(["enable_thinking=false", "n=3", "name=x y", "s=\"q\""]) == {
        "enable_thinking": False, "n": 3, "name": "x y", "s": "q"}
    for bad in ("enable_thinking", "=1", "messages=[]", "eos_token=x", "a-b=1"):
        with pytest.raises(ConfigError, match=r"--template-var .*KEY=VALUE"):
            parse_template_vars([bad])


def test_qwen3_non_thinking_mode_trains_each_command_after_the_served_think_block(monkeypatch):
    """Served with chat_template_kwargs {"enable_thinking": false}, Qwen3's prompt already ends
    with the empty think block, so each turn trains its command and <|im_end|> alone, in the
    render the server sent (transformers given the same variable is the oracle)."""
    fixed_transformers_clock(monkeypatch)
    messages = shell_session(True)
    template = our_template(CASES["qwen3"])
    template.variables = {"enable_thinking": False}
    tokenizer = stand_in("qwen3")[0]
    encoded = encode_session(messages, template, tokenizer)
    hf = hf_renderer("qwen3")
    assert encoded.violations == []
    commands = [(i, m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]
    for part, (i, command) in zip(encoded.own_renders + [encoded], commands, strict=True):
        prompt = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True,
                                        enable_thinking=False)
        assert prompt.endswith("<think>\n\n</think>\n\n")
        assert part.text.startswith(prompt)
        trained = "".join(part.text[a:b] for (a, b), label in zip(part.offsets, part.labels,
                                                                  strict=True) if label != IGNORE)
        assert trained == f"{command}<|im_end|>"


def test_mask_cli_takes_template_vars(tmp_path, capsys):
    qwen3 = stand_in_folder(tmp_path, "qwen3", FIXTURES / "qwen3-0.6b" / "chat_template.jinja")
    data = ["--inspect", "--data", str(SHELL_SESSIONS), "--base", str(qwen3), "--session", "0"]
    assert main([*data, "--template-var", "enable_thinking=false"]) == 0
    out = capsys.readouterr().out
    assert "⟦<think>" not in out and "</think>\n\n⟦" in out
