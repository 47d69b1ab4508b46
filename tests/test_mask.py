"""The assistant-only mask: exactly the spans the render contract defines, checked against an
independent computation from transformers' renders and tokenizers; the named checks; the
inspector."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from template_oracles import (
    ENV_MARK,
    FIXTURES,
    SHELL_SESSIONS,
    TOKENIZER_FOLDERS,
    canonical,
    hf_encoder,
    hf_tokenizer,
    our_template,
    sessions,
)

from sekft.data import read_sessions
from sekft.errors import MaskError, TemplateError
from sekft.mask import (
    IGNORE,
    Span,
    Violation,
    check_coverage,
    check_early_stop,
    check_history,
    check_serve_prefix,
    check_stop,
    encode_session,
    encode_sessions,
    main,
    prompt_token_ids,
    session_renders,
    token_mask,
)
from sekft.template import ChatTemplate
from sekft.tokenizer import load_tokenizer

# What closes an assistant turn in each fixture template (read off the templates by hand).
CLOSER = {
    "mistral-7b-instruct-v0.2": "</s>",
    "phi-3-mini-4k-instruct": "<|end|>",
    "qwen2.5-instruct": "<|im_end|>",
    "smollm2": "<|im_end|>",
}

# What a server stops generating at in each fixture: the closer and the eos token (read off the
# tokenizer configs by hand). A turn holding one before its closer must not train.
STOPS = {
    "mistral-7b-instruct-v0.2": ("</s>",),
    "phi-3-mini-4k-instruct": ("<|end|>", "<|endoftext|>"),
    "qwen2.5-instruct": ("<|im_end|>",),
    "smollm2": ("<|im_end|>", "<|endoftext|>"),
}

CHATML_GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TOKENIZERS = {}


def tokenizer_of(folder: str):
    if folder not in TOKENIZERS:
        TOKENIZERS[folder] = load_tokenizer(FIXTURES / folder)
    return TOKENIZERS[folder]


def oracle_mask(folder: str, messages: list[dict]):
    """The contract computed with transformers alone: renders, tokens, spans, trained tokens.

    Returns (input_ids, offsets, spans, trained token indices, turns failing serve-prefix,
    turns failing stop). Each fixture template writes an assistant turn as its content then
    CLOSER right after P_i, so a span is [len(P_i), end of the token that starts the closer);
    a turn whose content holds one of STOPS does not train.
    """
    hf, enc = hf_tokenizer(folder), hf_encoder(folder)
    text = hf.apply_chat_template(messages, tokenize=False)
    encoded = enc(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    spans, unserved, stopped = [], [], []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = hf.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        closer_at = len(prompt) + len(message["content"])
        assert text[len(prompt) : closer_at + len(CLOSER[folder])] == (
            message["content"] + CLOSER[folder]
        )
        prompt_ids = enc.encode(prompt, add_special_tokens=False)
        if prompt_ids != ids[: len(prompt_ids)]:
            unserved.append(i)
            continue
        if any(stop in message["content"] for stop in STOPS[folder]):
            stopped.append(i)
            continue
        closer = next(k for k, (s, _) in enumerate(offsets) if s >= closer_at)
        spans.append((len(prompt), offsets[closer][1]))
    trained = [k for k, (s, e) in enumerate(offsets) if any(a <= s and e <= b for a, b in spans)]
    return ids, offsets, spans, trained, unserved, stopped


def trained_indices(encoded) -> list[int]:
    return [k for k, label in enumerate(encoded.labels) if label != IGNORE]


@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_trained_tokens_are_exactly_those_inside_the_contract_spans(folder):
    template, tokenizer = our_template(folder), tokenizer_of(folder)

    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=sessions(min_turns=1, max_turns=30))
    def exact(messages):
        messages = canonical(messages)
        ids, offsets, spans, trained, unserved, stopped = oracle_mask(folder, messages)
        encoded = encode_session(messages, template, tokenizer)
        assert encoded.input_ids == ids
        assert trained_indices(encoded) == trained
        assert encoded.labels == [t if k in set(trained) else IGNORE for k, t in enumerate(ids)]
        assert {v.turn for v in encoded.violations if v.check == "serve-prefix"} == set(unserved)
        assert {v.turn for v in encoded.violations if v.check == "stop"} == set(stopped)

    exact()


@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_trained_characters_are_the_spans_less_straddling_tokens(folder):
    template, tokenizer = our_template(folder), tokenizer_of(folder)

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=sessions(min_turns=2, max_turns=12))
    def characters(messages):
        messages = canonical(messages)
        _, offsets, spans, _, _, _ = oracle_mask(folder, messages)
        encoded = encode_session(messages, template, tokenizer)
        in_spans = {c for a, b in spans for c in range(a, b)}
        crossing = {c for k in encoded.straddles for c in range(*offsets[k])}
        trained = {c for k in trained_indices(encoded) for c in range(*offsets[k])}
        # Byte-level tokens of one astral character can all carry that character's offsets,
        # leaving the next character in no token's range: such characters cannot train.
        covered = {c for s, e in offsets for c in range(s, e)}
        assert trained == (in_spans & covered) - crossing
        for k in encoded.straddles:
            s, e = offsets[k]
            assert any(s < a < e or s < b < e or (s < a and b < e) for a, b in spans)

    characters()


@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_no_environment_byte_is_ever_trained(folder):
    template, tokenizer = our_template(folder), tokenizer_of(folder)

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=sessions(min_turns=1, max_turns=16))
    def never(messages):
        encoded = encode_session(messages, template, tokenizer)
        for k in trained_indices(encoded):
            assert ENV_MARK not in encoded.text[slice(*encoded.offsets[k])]

    never()


@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_prompt_tokens_reused_from_the_render_equal_tokenizing_the_prompt_alone(folder):
    """sekft tokenizes only a prompt's tail after its last special token: never different."""
    template, tokenizer = our_template(folder), tokenizer_of(folder)

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=sessions(min_turns=2, max_turns=12), cut=st.integers(0, 10**6))
    def same(messages, cut):
        renders = session_renders(canonical(messages), template)
        text = renders.text
        prompts = [*renders.prompts.values(), text[: cut % (len(text) + 1)]]
        encoding = tokenizer.encode(text, add_special_tokens=False)
        reuse = (encoding.ids, encoding.offsets, [e for _, e in encoding.offsets])
        got = prompt_token_ids(tokenizer, prompts, [text] * len(prompts), [reuse] * len(prompts))
        for prompt, (known, ids) in zip(prompts, got, strict=True):
            alone = tokenizer.encode(prompt, add_special_tokens=False).ids
            assert encoding.ids[:known] + ids == alone

    same()


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(sessions(min_turns=1, max_turns=10), min_size=2, max_size=4))
def test_masks_do_not_depend_on_other_sessions_in_a_batch(batch):
    folder = "smollm2"
    template, tokenizer = our_template(folder), tokenizer_of(folder)
    together = encode_sessions(batch, template, tokenizer)
    for messages, encoded in zip(batch, together, strict=True):
        alone = encode_session(messages, template, tokenizer)
        assert (encoded.input_ids, encoded.labels) == (alone.input_ids, alone.labels)
        assert encoded.violations == alone.violations


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=sessions(min_turns=2, max_turns=20, system=False))
def test_mask_equals_transformers_generation_mask_on_chatml(messages):
    """transformers' only masking path, on a ChatML template tagging content + <|im_end|>."""
    hf = hf_encoder("smollm2")
    oracle = hf.apply_chat_template(
        messages, chat_template=CHATML_GENERATION, tokenize=True, return_dict=True,
        return_assistant_tokens_mask=True,
    )
    template = ChatTemplate(CHATML_GENERATION, hf.special_tokens_map)
    encoded = encode_session(messages, template, tokenizer_of("smollm2"))
    # A turn whose prompt tokenizes differently (content starting with a newline merges with
    # the prompt's), or that holds an end-of-turn string, does not train here; transformers
    # does not check.
    assume(all(v.check not in ("serve-prefix", "stop") for v in encoded.violations))
    assert encoded.input_ids == oracle["input_ids"]
    theirs = [k for k, m in enumerate(oracle["assistant_masks"]) if m]
    # transformers also marks tokens that only partly overlap a span; sekft never trains those.
    assert trained_indices(encoded) == [k for k in theirs if k not in encoded.straddles]


def test_labels_are_unshifted_and_minus_100_elsewhere():
    messages = [{"role": "user", "content": "$ "}, {"role": "assistant", "content": "ls"}]
    encoded = encode_session(messages, our_template("smollm2"), tokenizer_of("smollm2"))
    tokens = [tokenizer_of("smollm2").id_to_token(t) for t in encoded.input_ids]
    assert [t for t, label in zip(tokens, encoded.labels, strict=True) if label != IGNORE] == [
        "ls",
        "<|im_end|>",
    ]
    assert set(encoded.labels) - set(encoded.input_ids) == {IGNORE}


def test_input_ids_carry_the_templates_bos_once():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ls"}]
    tokenizer = tokenizer_of("mistral-7b-instruct-v0.2")
    encoded = encode_session(messages, our_template("mistral-7b-instruct-v0.2"), tokenizer)
    bos = tokenizer.token_to_id("<s>")
    assert encoded.input_ids[0] == bos and bos not in encoded.input_ids[1:]


def test_encode_session_normalizes_first():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "ls"},
    ]
    encoded = encode_session(messages, our_template("mistral-7b-instruct-v0.2"),
                             tokenizer_of("mistral-7b-instruct-v0.2"))
    assert encoded.messages[0] == {"role": "user", "content": "S\n\na\nb"}
    assert encoded.text == "<s>[INST] S\n\na\nb [/INST]ls</s>"



# ---- weight 0: a turn shown in the context, not trained ---------------------------------------

@pytest.mark.parametrize("folder", TOKENIZER_FOLDERS)
def test_a_weight_0_turn_trains_nothing_and_changes_nothing_else(folder):
    template, tokenizer = our_template(folder), tokenizer_of(folder)

    @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
    @given(messages=sessions(min_turns=2, max_turns=20), picks=st.lists(st.booleans()))
    def exact(messages, picks):
        messages = canonical(messages)
        turns = [n for n, m in enumerate(messages) if m["role"] == "assistant"]
        untrained = {t for t, pick in zip(turns, picks, strict=False) if pick}
        assume(untrained)
        weighted = [{**m, "weight": 0} if n in untrained else m for n, m in enumerate(messages)]
        plain, marked = (encode_session(m, template, tokenizer) for m in (messages, weighted))
        # rendered as served: the same text and tokens, the same checks, less the findings
        # about trained edges (straddle, coverage) that an untrained span no longer has
        assert (marked.text, marked.input_ids) == (plain.text, plain.input_ids)
        assert all(v in plain.violations for v in marked.violations)
        assert {v.check for v in plain.violations if v not in marked.violations} <= {
            "straddle", "coverage"}
        shut = [(s.start, s.end) for s in plain.spans if s.turn in untrained]
        expected = [IGNORE if any(a <= o[0] and o[1] <= b for a, b in shut) else label
                    for label, o in zip(plain.labels, plain.offsets, strict=True)]
        assert marked.labels == expected
        # no character of an untrained turn's span trains; the other turns train as before
        for k in trained_indices(marked):
            assert not any(a <= marked.offsets[k][0] < b for a, b in shut)
        kept = [s for s in plain.spans if s.turn not in untrained]
        assert marked.trained_tokens == sum(
            1 for k in trained_indices(plain)
            if any(s.start <= plain.offsets[k][0] < s.end for s in kept))

    exact()


def test_weight_survives_normalizing_and_a_merged_turn_keeps_weight_0():
    from sekft.template import normalize_for_template

    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b", "weight": 0},
                {"role": "user", "content": "v"}, {"role": "assistant", "content": "c",
                                                   "weight": 1}]
    assert normalize_for_template(messages) == [
        {"role": "user", "content": "u"}, {"role": "assistant", "content": "a\nb", "weight": 0},
        {"role": "user", "content": "v"}, {"role": "assistant", "content": "c"}]
    once = normalize_for_template(messages)
    assert normalize_for_template(once) == once


def test_sft_data_with_weight_0_trains_one_turn_fewer(tmp_path):
    folder = "mistral-7b-instruct-v0.2"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ls"},
                {"role": "user", "content": "a b"}, {"role": "assistant", "content": "ls",
                                                     "weight": 0},
                {"role": "user", "content": "a b"}, {"role": "assistant", "content": "exit"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    session = read_sessions(path)[0]
    encoded = encode_session(session.messages, our_template(folder), tokenizer_of(folder))
    trained = tokenizer_of(folder).decode([t for t in encoded.labels if t != IGNORE],
                                          skip_special_tokens=False)
    assert trained.replace(" ", "") == "ls</s>exit</s>"


# ---- named checks ---------------------------------------------------------------------------

USER_ASSISTANT = [
    {"role": "user", "content": "u1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "u2"},
    {"role": "assistant", "content": "a2"},
]


def encode_with(source: str, messages=USER_ASSISTANT, **kwargs):
    return encode_session(messages, ChatTemplate(source, {"eos_token": "<|im_end|>"}),
                          tokenizer_of("smollm2"), **kwargs)


def checks_failed(encoded) -> set[tuple[str, int]]:
    return {(v.check, v.turn) for v in encoded.violations}


def test_a_prompt_that_is_not_a_prefix_of_the_render_fails_serve_prefix():
    source = (
        "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>bot\n"
        "{% else %}<|im_start|>user\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoded = encode_with(source)
    assert checks_failed(encoded) == {("serve-prefix", 1), ("serve-prefix", 3)}
    assert encoded.trained_tokens == 0


def test_a_prompt_that_tokenizes_differently_fails_serve_prefix_and_does_not_train():
    messages = [{"role": "user", "content": "$ "}, {"role": "assistant", "content": "./run"}]
    encoded = encode_session(messages, our_template("mistral-7b-instruct-v0.2"),
                             tokenizer_of("mistral-7b-instruct-v0.2"))
    assert checks_failed(encoded) == {("serve-prefix", 1)}
    assert "tokenizes differently" in encoded.violations[0].detail
    assert encoded.trained_tokens == 0


def test_a_template_rewriting_past_turns_fails_history():
    """Like Qwen3 dropping earlier reasoning: earlier assistant turns render differently."""
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(elided){% else %}{{ m.content }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoded = encode_with(source, own_renders=False)
    assert checks_failed(encoded) == {("history", 1)}
    assert encoded.labels.count(IGNORE) < len(encoded.labels)  # turn 3 still trains
    assert encoded.own_renders == []


def trained_text(encoded) -> str:
    return "".join(encoded.text[a:b] for (a, b), label in zip(encoded.offsets, encoded.labels,
                                                               strict=True) if label != IGNORE)


def test_a_turn_the_full_render_rewrites_trains_from_its_own_render():
    """Turn 1 is elided once turn 3 exists: it trains in render(m[:2]), what the server sent
    before it followed by what the model wrote, and nowhere else."""
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(elided){% else %}{{ m.content }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    template = ChatTemplate(source, {"eos_token": "<|im_end|>"})
    encoded = encode_with(source)
    assert encoded.violations == []
    assert trained_text(encoded) == USER_ASSISTANT[3]["content"] + "<|im_end|>"
    (own,) = encoded.own_renders
    assert own.text == template.render(USER_ASSISTANT[:2])
    assert own.text.startswith(template.render(USER_ASSISTANT[:1], add_generation_prompt=True))
    assert trained_text(own) == USER_ASSISTANT[1]["content"] + "<|im_end|>"
    assert own.input_ids == tokenizer_of("smollm2").encode(own.text, add_special_tokens=False).ids
    assert own.violations == [] and [s.turn for s in own.spans] == [1]


def test_an_own_render_that_fails_keeps_the_history_violation():
    """Rewritten, and its own render cannot train either (the last turn is left unclosed, so
    it has no end-of-turn token): nothing of turn 1 trains, and the violation says why."""
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(elided)<|im_end|>\n"
        "{% elif m.role == 'assistant' %}{{ m.content }}"
        "{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoded = encode_with(source)
    assert checks_failed(encoded) == {("history", 1), ("stop", 3)}
    (history,) = [v for v in encoded.violations if v.check == "history"]
    assert "its own render fails too: stop" in history.detail
    assert encoded.own_renders == [] and encoded.trained_tokens == 0


def test_weight_0_turns_get_the_own_render_check_but_no_example():
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.role == 'assistant' and not loop.last %}(elided){% else %}{{ m.content }}"
        "{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [dict(m) for m in USER_ASSISTANT]
    messages[1]["weight"] = 0
    encoded = encode_with(source, messages)
    assert encoded.own_renders == [] and encoded.violations == []
    assert trained_text(encoded) == "a2<|im_end|>"


def test_an_end_of_turn_token_attached_to_the_next_turn_fails_stop():
    source = (
        "{% for m in messages %}{% if m.role == 'user' %}"
        "{% if not loop.first %}<|im_end|>{% endif %}<|im_start|>user\n{{ m.content }}"
        "<|im_end|><|im_start|>assistant\n{% else %}{{ m.content }}{% endif %}{% endfor %}"
    )
    encoded = encode_with(source)
    assert checks_failed(encoded) == {("stop", 1), ("stop", 3)}
    assert encoded.trained_tokens == 0


@pytest.mark.parametrize(("folder", "closer"), [
    ("llama-3.2-3b-instruct", "<|eot_id|>"),
    ("smollm2", "<|im_end|>"),
    ("qwen2.5-instruct", "<|im_end|>"),
    ("mistral-7b-instruct-v0.2", "</s>"),
    ("phi-3-mini-4k-instruct", "<|end|>"),
])
def test_an_end_of_turn_string_inside_the_content_fails_stop_and_does_not_train(folder, closer):
    """A server stops at the first end-of-turn token: `echo a<|eot_id|>b` can never be produced
    whole, so the turn does not train; the session's other turns still do."""
    tokenizer = llama_tokenizer() if folder.startswith("llama") else tokenizer_of(folder)
    messages = [
        {"role": "user", "content": "list the files"},
        {"role": "assistant", "content": f"echo a{closer}b"},
        {"role": "user", "content": "a b"},
        {"role": "assistant", "content": "ls"},
    ]
    encoded = encode_session(messages, our_template(folder), tokenizer)
    assert checks_failed(encoded) == {("stop", 1)}
    assert f"end-of-turn string {closer!r}" in encoded.violations[0].detail
    trained = tokenizer.decode([t for t in encoded.labels if t != IGNORE],
                               skip_special_tokens=False)
    assert trained == "ls" + closer
    assert encoded.failed


def test_the_eos_token_inside_the_content_fails_stop_too():
    """SmolLM2 closes turns with <|im_end|>; its eos <|endoftext|> also stops a server."""
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "cat x<|endoftext|>"}]
    encoded = encode_session(messages, our_template("smollm2"), tokenizer_of("smollm2"))
    assert checks_failed(encoded) == {("stop", 1)}
    assert encoded.trained_tokens == 0


def test_an_end_of_turn_string_of_another_template_trains_as_text():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": "echo '<|eot_id|>'"}]
    encoded = encode_session(messages, our_template("smollm2"), tokenizer_of("smollm2"))
    assert encoded.violations == []
    assert "<|eot_id|>" in tokenizer_of("smollm2").decode(
        [t for t in encoded.labels if t != IGNORE], skip_special_tokens=False)


def test_a_token_crossing_a_span_edge_is_reported_and_does_not_train():
    """Phi-3's <|assistant|> swallows the whitespace after it, the content's leading space too."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ls"}]
    tokenizer = tokenizer_of("phi-3-mini-4k-instruct")
    encoded = encode_session(messages, our_template("phi-3-mini-4k-instruct"), tokenizer)
    assert checks_failed(encoded) == {("straddle", 1)}
    (k,) = encoded.straddles
    assert tokenizer.id_to_token(encoded.input_ids[k]) == "<|assistant|>"
    assert encoded.labels[k] == IGNORE
    assert not encoded.failed


def test_strict_makes_a_straddle_an_error_naming_session_turn_and_check():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ls"}]
    with pytest.raises(MaskError, match=r"session 4: turn 1: check straddle failed"):
        encode_sessions([messages], our_template("phi-3-mini-4k-instruct"),
                        tokenizer_of("phi-3-mini-4k-instruct"), strict=True, names=["session 4"])


def test_a_template_rewriting_content_fails_coverage():
    source = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | upper }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoded = encode_with(source)
    assert checks_failed(encoded) == {("coverage", 1), ("coverage", 3)}


def test_template_error_names_the_session_and_turn():
    messages = [{"role": "assistant", "content": "ls"}, {"role": "user", "content": "x"}]
    with pytest.raises(TemplateError, match=r"^data.jsonl:7: chat template failed at turn 0"):
        encode_session(messages, our_template("mistral-7b-instruct-v0.2"),
                       tokenizer_of("mistral-7b-instruct-v0.2"), name="data.jsonl:7")


def test_check_serve_prefix_compares_text_then_tokens():
    assert check_serve_prefix(1, "<p>ab", "<p>", [1, 2, 3], [1]) == []
    assert check_serve_prefix(1, "<p>ab", "<q>", [1, 2], [1])[0].check == "serve-prefix"
    (v,) = check_serve_prefix(1, "<p>ab", "<p>", [1, 2, 3], [1, 9])
    assert "at token 1" in v.detail
    assert check_serve_prefix(1, "<p>ab", "<p>a", [1, 2, 3], [2], known=1) == []
    (v,) = check_serve_prefix(1, "<p>ab", "<p>a", [1, 2, 3], [3], known=1)
    assert "at token 1: render [2, 3], prompt [3]" in v.detail


def test_check_history_allows_differences_after_the_turn():
    span = Span(turn=1, start=3, end=6, content=(3, 5), eot_token=2)
    assert check_history(1, "<p>ab|rest", "<p>ab|other", span) == []
    assert check_history(1, "<p>xb|rest", "<p>ab|", span)[0].check == "history"


def test_check_stop_requires_the_closing_token_to_train():
    span = Span(turn=1, start=0, end=4, content=(0, 2), eot_token=1)
    assert check_stop(1, span, [5, 6]) == []
    assert check_stop(1, span, [5, IGNORE]) == [
        Violation("stop", 1, "end-of-turn token 1 does not train")
    ]


def test_check_early_stop_finds_the_first_end_of_turn_string_before_the_closer():
    text = "<p>a</s>b</s>|"
    span = Span(turn=1, start=3, end=13, content=(3, 9), eot_token=3)
    offsets = [(0, 3), (3, 4), (4, 8), (9, 13)]
    assert check_early_stop(1, "<p>ab</s>|", Span(1, 3, 9, (3, 5), 2), [(0, 3), (3, 5), (5, 9)],
                            ["</s>"]) == []
    assert check_early_stop(1, text, span, offsets, ["</s>", "b"]) == [
        Violation("stop", 1, "the turn contains the end-of-turn string '</s>' at char 4, before "
                  "its end: a server stops generating there, so the rest cannot be produced")
    ]


def test_check_coverage_flags_trained_characters_outside_every_span():
    span = Span(turn=1, start=2, end=4, content=(2, 3), eot_token=1)
    offsets = [(0, 2), (2, 3), (3, 4)]
    assert check_coverage([span], offsets, [IGNORE, 7, 8], [{}, {"content": "a"}], "uua<") == []
    (v,) = check_coverage([span], offsets, [6, 7, 8], [{}, {"content": "a"}], "uua<")
    assert "outside every assistant span" in v.detail


def test_token_mask_by_hand():
    offsets = [(0, 3), (3, 5), (5, 6), (6, 9), (9, 10)]
    trained, straddles = token_mask(offsets, [(3, 6), (8, 10)])
    assert trained == [1, 2, 4]
    assert straddles == [3]


# ---- the shell fixture and the inspector ------------------------------------------------------

INSPECTED = [*TOKENIZER_FOLDERS, "zephyr-7b-beta"]


def inspect_json(folder: str, capsys, *extra: str) -> tuple[int, list[dict]]:
    base = FIXTURES / folder
    where = ["--base", str(base)]
    if folder == "zephyr-7b-beta":
        # zephyr-7b-beta is a Mistral fine-tune: Mistral's tokenizer, its own template.
        where = ["--tokenizer", str(FIXTURES / "mistral-7b-instruct-v0.2"), "--template", str(base)]
    code = main(["--inspect", "--data", str(SHELL_SESSIONS), *where, "--json", *extra])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("folder", INSPECTED)
def test_shell_fixture_trains_exactly_the_commands_and_their_closers(folder, capsys):
    _, records = inspect_json(folder, capsys)
    sessions = read_sessions(SHELL_SESSIONS)
    assert [r["session"] for r in records] == [0, 1]
    tokenizer = tokenizer_of("mistral-7b-instruct-v0.2" if folder == "zephyr-7b-beta" else folder)
    for session, record in zip(sessions, records, strict=True):
        messages = canonical(session.messages)
        if folder != "zephyr-7b-beta":
            assert record["text"] == hf_tokenizer(folder).apply_chat_template(
                messages, tokenize=False
            )
        unserved = {v["turn"] for v in record["violations"] if v["check"] == "serve-prefix"}
        trained = record["trained_text"]
        for turn, message in enumerate(messages):
            if message["role"] == "assistant" and turn not in unserved:
                assert message["content"] in trained
        for word in ("Usage: provider", "Permission denied", "queue.txt lists", ENV_MARK):
            assert word not in trained
        closers = [t for t, label in zip(record["input_ids"], record["labels"], strict=True)
                   if label != IGNORE and tokenizer.id_to_token(t) in ("</s>", "<|end|>",
                                                                         "<|im_end|>")]
        assistant_turns = sum(m["role"] == "assistant" for m in messages)
        assert len(closers) == assistant_turns - len(unserved)


def llama_tokenizer():
    """Llama 3.2's tokenizer is not in the fixtures: Qwen2.5's, whose pre-tokenizer splits text
    as Llama 3's does (newlines kept whole before a word), given Llama's header tokens."""
    from tokenizers import AddedToken

    tokenizer = load_tokenizer(FIXTURES / "qwen2.5-instruct")
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (
        "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")])
    return tokenizer


def test_shell_fixture_under_llama_trains_trimmed_commands_and_eot_id():
    tokenizer = llama_tokenizer()
    template = our_template("llama-3.2-3b-instruct")
    sessions = [s.messages for s in read_sessions(SHELL_SESSIONS)]
    for encoded in encode_sessions(sessions, template, tokenizer):
        assert encoded.violations == []
        assert "Today Date: 26 Jul 2024" in encoded.text
        trained = tokenizer.decode([t for t in encoded.labels if t != IGNORE],
                                   skip_special_tokens=False)
        commands = [m["content"] for m in encoded.messages if m["role"] == "assistant"]
        assert trained == "".join(c + "<|eot_id|>" for c in commands)


def test_shell_fixture_under_mistral_reports_the_commands_its_prompt_splits(capsys):
    """`[/INST]` + `./provider` tokenizes as `].` `/`: a served prompt ends in `]` instead."""
    code, records = inspect_json("mistral-7b-instruct-v0.2", capsys)
    assert code == 1
    assert [(v["check"], v["turn"]) for v in records[0]["violations"]] == [
        ("serve-prefix", 5),
        ("serve-prefix", 7),
    ]
    assert records[1]["violations"] == []


@pytest.mark.parametrize("folder", ["phi-3-mini-4k-instruct", "qwen2.5-instruct", "smollm2"])
def test_inspect_exits_zero_when_every_check_passes(folder, capsys):
    code, records = inspect_json(folder, capsys)
    assert code == 0
    assert all(r["violations"] == [] for r in records)


def test_inspect_highlights_trained_text_with_markers_off_a_terminal(capsys):
    code = main(["--inspect", "--data", str(SHELL_SESSIONS), "--base",
                 str(FIXTURES / "smollm2"), "--session", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "<|im_start|>assistant\n\u27e6cat /etc/motd<|im_end|>\u27e7\n" in out
    assert out.startswith("=== session 1: ")
    assert out.splitlines()[-1].endswith("0 straddles, 0 violations: ok")


def test_inspect_colours_trained_text_green_and_straddles_yellow_on_a_terminal():
    import io

    from sekft.mask import inspect_sessions

    out = io.StringIO()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ls"}]
    report = inspect_sessions([messages], our_template("phi-3-mini-4k-instruct"),
                              tokenizer_of("phi-3-mini-4k-instruct"), out, color=True)
    assert "\x1b[42;30mls<|end|>\x1b[0m" in out.getvalue()
    assert "\x1b[43;30m<|assistant|>\x1b[0m" in out.getvalue()
    assert (report.trained_tokens, report.straddles, report.failed) == (2, 1, False)


def test_inspect_shows_the_sessions_own_escape_codes_as_text(capsys):
    main(["--inspect", "--data", str(SHELL_SESSIONS), "--base", str(FIXTURES / "smollm2"),
          "--session", "0"])
    out = capsys.readouterr().out
    assert "\u241b[01;34mbin\u241b[0m" in out
    assert "\x1b" not in out and "\r" not in out


def test_inspect_limit_and_session_select_sessions(capsys):
    _, records = inspect_json("smollm2", capsys, "--limit", "1")
    assert [r["session"] for r in records] == [0]
    _, records = inspect_json("smollm2", capsys, "--session", "1")
    assert [r["session"] for r in records] == [1]


def test_inspect_strict_fails_on_a_straddle(tmp_path, capsys):
    data = tmp_path / "s.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": " ls"}]}) + "\n")
    base = str(FIXTURES / "phi-3-mini-4k-instruct")
    assert main(["--inspect", "--data", str(data), "--base", base]) == 0
    assert main(["--inspect", "--data", str(data), "--base", base, "--strict"]) == 1


def test_inspect_bad_input_prints_one_line_and_exits_nonzero(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user"}]}\n')
    run = subprocess.run(
        [sys.executable, "-m", "sekft.mask", "--inspect", "--data", str(data), "--base",
         str(FIXTURES / "smollm2")], capture_output=True, text=True,
    )
    assert run.returncode == 1
    assert run.stderr == (f"sekft.mask: error: {data}:1: field 'messages[0].content': "
                          "expected a string, got null\n")
