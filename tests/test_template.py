"""ChatTemplate renders equal transformers' apply_chat_template(tokenize=False), byte for byte;
normalize_for_template is the documented canonical form."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from template_oracles import (
    FIXTURES,
    TEMPLATE_FOLDERS,
    ZEPHYR_TOKENS,
    canonical,
    fixed_transformers_clock,
    hf_tokenizer,
    our_template,
    sessions,
)

from sekft.errors import TemplateError
from sekft.template import ChatTemplate, compile_template, normalize_for_template

SHELL_SESSION = [
    {"role": "system", "content": "You are at a POSIX shell."},
    {"role": "user", "content": "Welcome\n$ "},
    {"role": "assistant", "content": "ls"},
    {"role": "user", "content": "\x1b[01;34mbin\x1b[0m  notes.txt\n$ "},
    {"role": "assistant", "content": "exit"},
]


def oracle_render(folder: str, messages: list[dict], add_generation_prompt: bool) -> str:
    return hf_tokenizer(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("folder", TEMPLATE_FOLDERS)
def test_render_equals_transformers_on_a_shell_session(folder, add_generation_prompt, monkeypatch):
    fixed_transformers_clock(monkeypatch)
    messages = canonical(SHELL_SESSION)
    ours = our_template(folder).render(messages, add_generation_prompt)
    assert ours == oracle_render(folder, messages, add_generation_prompt)


@pytest.mark.parametrize("folder", TEMPLATE_FOLDERS)
def test_render_equals_transformers_on_adversarial_sessions(folder, monkeypatch):
    fixed_transformers_clock(monkeypatch)
    template = our_template(folder)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=sessions(max_turns=12), add_generation_prompt=st.booleans())
    def same_render(messages, add_generation_prompt):
        messages = canonical(messages)
        ours = template.render(messages, add_generation_prompt)
        assert ours == oracle_render(folder, messages, add_generation_prompt)

    same_render()


@pytest.mark.parametrize("folder", TEMPLATE_FOLDERS)
def test_render_equals_transformers_on_very_long_turns(folder, monkeypatch):
    fixed_transformers_clock(monkeypatch)
    output = "".join(f"line {n}: " + "x" * (n % 300) + "\x1b[0m\n" for n in range(400))
    messages = [
        {"role": "user", "content": output},
        {"role": "assistant", "content": "cat " + "a/" * 2000},
        {"role": "user", "content": output + "\n\n"},
    ]
    for add_generation_prompt in (False, True):
        ours = our_template(folder).render(messages, add_generation_prompt)
        assert ours == oracle_render(folder, messages, add_generation_prompt)


def test_llama_date_line_comes_from_the_clock(monkeypatch):
    fixed_transformers_clock(monkeypatch)
    messages = [{"role": "user", "content": "hi"}]
    ours = our_template("llama-3.2-3b-instruct").render(messages)
    assert "Today Date: 26 Jul 2024\n" in ours
    assert ours == oracle_render("llama-3.2-3b-instruct", messages, False)


def test_llama_date_is_today_by_default():
    from datetime import datetime

    template = ChatTemplate.from_folder(FIXTURES / "llama-3.2-3b-instruct")
    rendered = template.render([{"role": "user", "content": "hi"}])
    assert f"Today Date: {datetime.now().strftime('%d %b %Y')}\n" in rendered


def test_qwen_injects_its_default_system_prompt():
    rendered = our_template("qwen2.5-instruct").render([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_mistral_non_alternating_roles_raise_template_error_naming_the_turn():
    template = our_template("mistral-7b-instruct-v0.2")
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(TemplateError, match=r"turn 2 \(role 'assistant'\).*must alternate"):
        template.render(messages)


def test_template_syntax_error_is_a_template_error_with_the_line():
    with pytest.raises(TemplateError, match="line 2"):
        ChatTemplate("{{ messages }}\n{% for %}", {})


def test_same_source_compiles_once():
    source = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert ChatTemplate(source).compiled is ChatTemplate(source).compiled
    assert compile_template.cache_info().hits >= 1


TEMPLATE_FEATURES = (
    "{%- set ns = namespace(n=0) -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' %}{% continue %}{% endif -%}"
    "{%- set ns.n = ns.n + 1 -%}"
    "{{ ns.n }}:{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=true) }}"
    "{%- if ns.n > 3 %}{% break %}{% endif %}\n"
    "{%- endfor -%}"
    "{% generation %}{{ dict(a=1) | tojson(separators=(',', ':')) }}{% endgeneration %}"
    "  {{ bos_token }}{{ eos_token }}{{ pad_token is defined }}{{ tools is none }}"
    "{% if add_generation_prompt %}<gen>{% endif %}"
)


@settings(max_examples=25, deadline=None)
@given(messages=sessions(max_turns=8))
def test_jinja_environment_matches_transformers(messages):
    """Loop controls, namespace, tojson arguments, generation tags, whitespace control, tokens."""
    hf = hf_tokenizer("smollm2")
    ours = ChatTemplate(TEMPLATE_FEATURES, hf.special_tokens_map).render(messages, True)
    oracle = hf.apply_chat_template(
        messages, chat_template=TEMPLATE_FEATURES, tokenize=False, add_generation_prompt=True
    )
    assert ours == oracle


def test_message_keys_that_are_none_are_dropped_as_transformers_does():
    source = "{% for m in messages %}{{ m.name is defined }}{% endfor %}"
    rendered = ChatTemplate(source).render([{"role": "user", "content": "x", "name": None}])
    assert rendered == "False"


def test_namespace_refuses_underscore_attributes():
    template = ChatTemplate("{% set ns = namespace(_x=1) %}{{ ns._x }}")
    with pytest.raises(TemplateError):
        template.render([{"role": "user", "content": "x"}])


def test_sandbox_refuses_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(TemplateError, match="unsafe"):
        template.render([{"role": "user", "content": "x"}])


def test_sandbox_refuses_mutation_every_time():
    """The sandbox's verdicts are memoized: a refused attribute stays refused."""
    template = ChatTemplate("{{ messages.append(1) }}{{ messages | length }}")
    for _ in range(2):
        with pytest.raises(TemplateError, match="unsafe"):
            template.render([{"role": "user", "content": "x"}])
    assert ChatTemplate("{{ messages.index(messages[0]) }}").render([{"role": "u"}]) == "0"


def test_from_folder_reads_chat_template_jinja(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("J{{ bos_token }}")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "C", "bos_token": "<s>"})
    )
    assert ChatTemplate.from_folder(tmp_path).render([]) == "J<s>"


def test_from_folder_picks_a_named_template_from_the_config_list(tmp_path):
    templates = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert ChatTemplate.from_folder(tmp_path).render([]) == "D"
    assert ChatTemplate.from_folder(tmp_path, name="tool_use").render([]) == "T"
    with pytest.raises(TemplateError, match="no chat template named 'rag'"):
        ChatTemplate.from_folder(tmp_path, name="rag")


def test_from_folder_without_template_names_the_folder(tmp_path):
    with pytest.raises(TemplateError, match=str(tmp_path)):
        ChatTemplate.from_folder(tmp_path)


def test_end_of_turn_strings_are_the_templates_closers_and_eos():
    assert our_template("phi-3-mini-4k-instruct").end_of_turn_strings == (
        "<|end|>",
        "<|endoftext|>",
    )
    assert our_template("qwen2.5-instruct").end_of_turn_strings == ("<|im_end|>",)
    assert our_template("zephyr-7b-beta").end_of_turn_strings == (ZEPHYR_TOKENS["eos_token"],)


def test_normalize_folds_a_leading_system_turn_into_the_first_user_turn():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    assert normalize_for_template(messages) == [
        {"role": "user", "content": "S\n\nU"},
        {"role": "assistant", "content": "A"},
    ]


def test_normalize_merges_consecutive_same_role_turns_with_a_newline():
    messages = [
        {"role": "user", "content": "out 1"},
        {"role": "user", "content": "out 2"},
        {"role": "assistant", "content": "ls"},
        {"role": "assistant", "content": "pwd"},
    ]
    assert normalize_for_template(messages) == [
        {"role": "user", "content": "out 1\nout 2"},
        {"role": "assistant", "content": "ls\npwd"},
    ]


def test_normalize_joins_empty_contents_without_a_joiner():
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "U"},
        {"role": "user", "content": ""},
    ]
    assert normalize_for_template(messages) == [{"role": "user", "content": "U"}]


def test_normalize_turns_a_system_turn_before_an_assistant_into_a_user_turn():
    messages = [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]
    assert normalize_for_template(messages) == [
        {"role": "user", "content": "S"},
        {"role": "assistant", "content": "A"},
    ]


roles = st.sampled_from(["system", "user", "assistant"])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=5)})))
def test_normalize_is_a_fixed_point(messages):
    once = normalize_for_template(messages)
    assert normalize_for_template(once) == once


@settings(max_examples=100, deadline=None)
@given(st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=5)})))
def test_normalized_sessions_alternate_after_a_leading_turn(messages):
    normalized = normalize_for_template(messages)
    assert all(a["role"] != b["role"] for a, b in zip(normalized, normalized[1:], strict=False))
    assert all(m["role"] != "system" for m in normalized[:1])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=5)})))
def test_normalize_keeps_every_non_empty_content_in_order(messages):
    joined = "".join(m["content"] for m in normalize_for_template(messages))
    kept = iter(joined)
    assert all(ch in kept for m in messages for ch in m["content"])
