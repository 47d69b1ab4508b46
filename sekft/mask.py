"""The assistant-only loss mask, derived from renders, and the checks that guard it.

Definitions (for a session of messages m and its chat template):
- R = render(m), the text trained on; `input_ids` tokenize R whole, special tokens recognised,
  no extra BOS (the template writes it), as a server tokenizes a rendered prompt.
- For each assistant turn i, P_i = render(m[:i], add_generation_prompt=True) is what a server
  sends before that turn. The turn's trained span is R[len(P_i) : end of its end-of-turn token],
  the end-of-turn token being the first one (`</s>`, `<|im_end|>`, `<|eot_id|>`, `<|end|>`,
  `<end_of_turn>`, eos) after the turn's content. Glue the prompt leaves to the model trains;
  glue after the end-of-turn token does not; nothing of other turns does. A span holding an
  end-of-turn string before that token (content `a<|eot_id|>b`) is one a server cuts short.
- A token trains when all its characters lie in a trained span. `labels` are unshifted (as
  transformers'): labels[k] = input_ids[k] where token k trains, else -100.

Spans come from renders, never from searching marker strings. Each rule of the contract is a
named check function (`check_serve_prefix`, `check_history`, `check_straddle`, `check_stop`,
`check_early_stop`, `check_coverage`) that tests and the inspector call; violations are values
{check, turn, detail}. A turn that fails serve-prefix, history or stop (early stop included)
does not train in R (never guessed); straddling tokens do not train (and are errors under
strict).

A turn that fails only serve-prefix or history in R (the template writes past turns
differently from the last one: Qwen3 gives the last assistant turn an empty `<think>` block
and drops it once a user turn follows, and its non-thinking prompt ends with that block) trains
from its own render instead: H_i = render(m[:i+1]), in which P_i is what the server sent and
the rest is what the model wrote, with only turn i trained. That example passes every check
or the violations stay. It costs a prefix of the session per such turn; `own_renders=False`
leaves those turns untrained.

`python -m sekft.mask --inspect --data FILE --base DIR` shows what trains.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import compress
from operator import itemgetter
from pathlib import Path
from typing import TextIO

from tokenizers import Tokenizer

from sekft.errors import ConfigError, MaskError, TemplateError, run_cli
from sekft.template import ChatTemplate, normalize_for_template, parse_template_vars
from sekft.tokenizer import load_special_tokens, load_tokenizer

IGNORE = -100

CHECKS = ("serve-prefix", "history", "straddle", "stop", "coverage")


@dataclass(frozen=True)
class Violation:
    """One broken rule: which check, at which turn (message index), and what was seen."""

    check: str
    turn: int
    detail: str


@dataclass(frozen=True)
class Span:
    """The trained characters of one assistant turn, in R's character offsets.

    `start` is len(P_i); `end` is the end of the end-of-turn token (`eot_token`, an index into
    input_ids), or None when no such token was found. `content` locates the turn's content in R
    (None when the template rewrote it beyond stripping).
    """

    turn: int
    start: int
    end: int | None
    content: tuple[int, int] | None
    eot_token: int | None


@dataclass
class Renders:
    """Every render a session's mask depends on: R, and per assistant turn i, P_i and H_i."""

    text: str
    prompts: dict[int, str]
    histories: dict[int, str]


@dataclass
class Encoded:
    """A session encoded for training, with what the checks found."""

    messages: list[dict]
    text: str
    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]
    spans: list[Span]
    straddles: list[int]
    violations: list[Violation] = field(default_factory=list)
    # Turns R cannot train, each trained from its own render (module docstring).
    own_renders: list[Encoded] = field(default_factory=list)

    @property
    def trained_tokens(self) -> int:
        """Trained tokens of R alone (each own render counts its own)."""
        return sum(label != IGNORE for label in self.labels)

    @property
    def parts(self) -> list[Encoded]:
        """What trains for this session: R, then each own render (turn order)."""
        return [self, *self.own_renders]

    @property
    def failed(self) -> bool:
        """True when a check other than straddle failed (straddles only fail under strict)."""
        return any(v.check != "straddle" for v in self.violations)


def end_of_turn_ids(template: ChatTemplate, tokenizer: Tokenizer) -> frozenset[int]:
    """Token ids of the template's end-of-turn strings that the tokenizer has as single tokens."""
    ids = (tokenizer.token_to_id(text) for text in template.end_of_turn_strings)
    return frozenset(i for i in ids if i is not None)


def session_renders(messages: Sequence[Mapping], template: ChatTemplate) -> Renders:
    """R, and for each assistant turn i: P_i (with generation prompt) and H_i = render(m[:i+1]).

    2 * (assistant turns) + 1 renders, each O(session length). They all read one instant of
    the template's clock, so a date in the template (Llama 3) cannot change between them.
    """
    now = template.clock()
    fixed = {"strftime_now": now.strftime}
    text = template.render(messages, **fixed)
    prompts, histories = {}, {}
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            try:
                prompts[i] = template.render(messages[:i], add_generation_prompt=True, **fixed)
            except TemplateError as e:
                raise TemplateError(f"the prompt before turn {i}: {e}") from e
            last = i == len(messages) - 1
            histories[i] = text if last else template.render(messages[: i + 1], **fixed)
    return Renders(text, prompts, histories)


def served(messages: Sequence[Mapping]) -> list[dict]:
    """The session as a server receives it: {role, content} only."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def untrained_turns(messages: Sequence[Mapping]) -> frozenset[int]:
    """Indices of the assistant turns marked `weight: 0` (OpenAI's fine-tuning key)."""
    return frozenset(n for n, m in enumerate(messages)
                     if m["role"] == "assistant" and m.get("weight", 1) == 0)


def locate_content(text: str, content: str, start: int, stop: int) -> tuple[int, int] | None:
    """Where `content` sits in text[start:stop]: as given, else stripped (templates that trim)."""
    if not content.strip():
        return (start, start)
    for candidate in (content, content.strip()):
        at = text.find(candidate, start, stop)
        if at >= 0:
            return (at, at + len(candidate))
    return None


def assistant_span(
    turn: int,
    renders: Renders,
    content: str,
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    ends: Sequence[int],
    eot_ids: frozenset[int],
) -> Span:
    """The trained span of assistant turn `turn` from its renders and R's tokens.

    Starts at len(P_i). Ends at the end of the first end-of-turn token that ends after the
    content and inside H_i (a token written by the turn itself); end is None when there is none.
    """
    start = len(renders.prompts[turn])
    stop = min(len(renders.histories[turn]), len(renders.text))
    content_at = locate_content(renders.text, content, start, stop)
    after = content_at[1] if content_at else start
    k = bisect_right(ends, after)
    while k < len(offsets) and offsets[k][1] <= stop:
        if input_ids[k] in eot_ids:
            return Span(turn, start, offsets[k][1], content_at, k)
        k += 1
    return Span(turn, start, None, content_at, None)


def token_mask(
    offsets: Sequence[tuple[int, int]],
    spans: Sequence[tuple[int, int]],
    ends: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Which tokens train, and which straddle a span edge.

    offsets: [T] character ranges (start, end) of the tokens, in order (ends non-decreasing);
    ends: offsets' ends when the caller has them already.
    spans: sorted, disjoint character ranges (start, end) that train.
    Returns the sorted indices of the tokens whose characters all lie in one span (they train),
    and of the tokens that overlap a span without lying inside it (they do not train).
    Only tokens near spans are visited: O(trained tokens + spans * log T).
    """
    trained: list[int] = []
    straddles: set[int] = set()
    ends = ends if ends is not None else [e for _, e in offsets]
    for a, b in spans:
        k = bisect_right(ends, a)
        while k < len(offsets) and offsets[k][0] < b:
            s, e = offsets[k]
            if a <= s and e <= b:
                trained.append(k)
            else:
                straddles.add(k)
            k += 1
    return trained, sorted(straddles)


def labels_from_mask(input_ids: Sequence[int], trained: Sequence[int]) -> list[int]:
    """Unshifted labels [T]: input_ids[k] at the trained indices, IGNORE (-100) elsewhere."""
    labels = [IGNORE] * len(input_ids)
    for k in trained:
        labels[k] = input_ids[k]
    return labels


def check_serve_prefix(
    turn: int, text: str, prompt: str, input_ids: Sequence[int], prompt_ids: Sequence[int],
    known: int = 0,
) -> list[Violation]:
    """P_i must be a prefix of R as text, and its own tokens a prefix of R's tokens.

    The prompt's tokens are input_ids[:known] + prompt_ids (see `prompt_token_ids`; known=0
    when prompt_ids are all of them).
    """
    if not text.startswith(prompt):
        at = first_difference(text, prompt)
        detail = (f"the prompt differs from the render at char {at}: render "
                  f"{text[at:at + 20]!r}, prompt {prompt[at:at + 20]!r}")
        return [Violation("serve-prefix", turn, detail)]
    if input_ids[known : known + len(prompt_ids)] != prompt_ids:
        at = known + first_difference(input_ids[known:], prompt_ids)
        prompt_ids = [*input_ids[:known], *prompt_ids]
        detail = (f"the prompt tokenizes differently from the render at token {at}: render "
                  f"{list(input_ids[at:at + 3])}, prompt {list(prompt_ids[at:at + 3])}")
        return [Violation("serve-prefix", turn, detail)]
    return []


def check_history(turn: int, text: str, history: str, span: Span) -> list[Violation]:
    """The render of m[:i+1] must agree with R through turn i's end-of-turn token."""
    through = span.end if span.end is not None else len(history)
    if through <= len(history) and text.startswith(history[:through]):
        return []
    at = first_difference(text, history)
    detail = (f"the full render rewrites this turn: it differs from the render through turn "
              f"{turn} at char {at} ({text[at:at + 20]!r} vs {history[at:at + 20]!r})")
    return [Violation("history", turn, detail)]


def check_stop(turn: int, span: Span, labels: Sequence[int]) -> list[Violation]:
    """The end-of-turn token closing the turn must exist in the turn's own render and train."""
    if span.eot_token is None:
        return [Violation("stop", turn, "no end-of-turn token after the content in the turn's "
                          "own render: a model trained on this never stops")]
    if labels[span.eot_token] == IGNORE:
        return [Violation("stop", turn, f"end-of-turn token {span.eot_token} does not train")]
    return []


def check_early_stop(
    turn: int, text: str, span: Span, offsets: Sequence[tuple[int, int]],
    end_strings: Sequence[str],
) -> list[Violation]:
    """No end-of-turn string may occur in the turn before its closing token (a `stop` failure).

    A server stops generating at the first one (`echo a<|eot_id|>b` ends after `a`), so a model
    trained on the turn would learn text it can never produce. `end_strings` are the template's
    (ChatTemplate.end_of_turn_strings); the span must have its closing token.
    """
    before = text[span.start : offsets[span.eot_token][0]]
    found = sorted((at, s) for s in end_strings if (at := before.find(s)) >= 0)
    if not found:
        return []
    at, string = found[0]
    detail = (f"the turn contains the end-of-turn string {string!r} at char {span.start + at}, "
              "before its end: a server stops generating there, so the rest cannot be produced")
    return [Violation("stop", turn, detail)]


def check_straddle(
    turn_of_token: Mapping[int, int], straddles: Sequence[int], text: str,
    offsets: Sequence[tuple[int, int]],
) -> list[Violation]:
    """Every token crossing the edge of a trained span, as one violation each."""
    return [
        Violation("straddle", turn_of_token[k], f"token {k} {text[slice(*offsets[k])]!r} "
                  f"crosses a trained span edge and does not train")
        for k in straddles
    ]


def trained_chars(
    offsets: Sequence[tuple[int, int]], labels: Sequence[int]
) -> list[tuple[int, int]]:
    """Character ranges covered by trained tokens, merged (read off labels, not the spans)."""
    ranges: list[tuple[int, int]] = []
    for k in compress(range(len(labels)), [label != IGNORE for label in labels]):
        s, e = offsets[k]
        if s == e:
            continue
        if ranges and s <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], e))
        else:
            ranges.append((s, e))
    return ranges


def check_coverage(
    spans: Sequence[Span], offsets: Sequence[tuple[int, int]], labels: Sequence[int],
    messages: Sequence[Mapping], text: str, ends: Sequence[int] | None = None,
) -> list[Violation]:
    """Every token of each trained turn's content trains, and no token outside the spans does.

    The content is checked stripped of surrounding whitespace: templates (Llama's `| trim`)
    and tokenizers (Phi-3's tokens that swallow following spaces) may drop it, and a token
    swallowing it is reported by the straddle check instead.
    """
    found = []
    ends = ends if ends is not None else [e for _, e in offsets]
    for s in spans:
        if s.content is None:
            found.append(Violation("coverage", s.turn, "the turn's content is not in its own "
                                   "render (the template rewrote it)"))
            continue
        a, b = s.content
        core = text[a:b]
        a, b = a + len(core) - len(core.lstrip()), b - (len(core) - len(core.rstrip()))
        k = bisect_right(ends, a)
        while k < len(offsets) and offsets[k][0] < b:
            if labels[k] == IGNORE and offsets[k][0] < offsets[k][1]:
                content = messages[s.turn]["content"][:20]
                found.append(Violation("coverage", s.turn, f"token {k} of the content "
                                       f"({content!r}...) does not train"))
                break
            k += 1
    allowed = [(s.start, s.end) for s in spans]
    for lo, hi in trained_chars(offsets, labels):
        if not any(a <= lo and hi <= b for a, b in allowed):
            found.append(Violation("coverage", turn_at(spans, lo), f"chars {lo}..{hi} train "
                                   "outside every assistant span"))
    return found


def splitting_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of the added tokens matched on raw text: tokenizers cuts the text at each of them and
    tokenizes the pieces between independently."""
    return frozenset(
        i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special and not t.normalized
    )


def prompt_tail(
    prompt: str, text: str, input_ids: Sequence[int], offsets: Sequence[tuple[int, int]],
    ends: Sequence[int], splitters: frozenset[int],
) -> tuple[int, str]:
    """How to tokenize a prompt P that is a prefix of R cheaply: (k, tail).

    tokens(P) == input_ids[:k] + tokens(tail) when tail = P[offsets[k][0]:] starts with R's
    k-th token, a splitting special token that ends inside P: text before a splitting token
    never changes how text after it tokenizes. (0, P) when P has no such token or is not a
    prefix of R. The caller checks tokens(tail) starts with input_ids[k].
    """
    if not text.startswith(prompt):
        return 0, prompt
    k = bisect_right(ends, len(prompt)) - 1
    while k >= 0 and input_ids[k] not in splitters:
        k -= 1
    if k < 0:
        return 0, prompt
    return k, prompt[offsets[k][0]:]


def prompt_token_ids(
    tokenizer: Tokenizer, prompts: Sequence[str], texts: Sequence[str],
    encodings: Sequence[tuple[list[int], list[tuple[int, int]], list[int]]],
) -> list[tuple[int, list[int]]]:
    """Each prompt tokenized alone, as a server would, with its render's tokens reused.

    prompts[n] is a prompt of the session whose render is texts[n] and whose (input_ids,
    offsets, ends) are encodings[n]. Returns (known, ids) per prompt: its tokens are
    input_ids[:known] + ids. Only the tail after the last splitting token is tokenized (one
    batched call); a tail that does not start as expected is tokenized whole (known=0).
    """
    splitters = splitting_token_ids(tokenizer)
    cuts = [prompt_tail(p, t, e[0], e[1], e[2], splitters)
            for p, t, e in zip(prompts, texts, encodings, strict=True)]
    tails = tokenizer.encode_batch([tail for _, tail in cuts], add_special_tokens=False)
    result = []
    for (k, _), tail, prompt, (ids, _, _) in zip(cuts, tails, prompts, encodings, strict=True):
        if k == 0 or tail.ids[:1] == [ids[k]]:
            result.append((k, tail.ids))
        else:
            result.append((0, tokenizer.encode(prompt, add_special_tokens=False).ids))
    return result


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: encoding allocates a tuple per token offset, none
    of them cyclic, and collections triggered by that churn rescan everything alive (~13% of
    encode time on 2,000 sessions)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@gc_paused()
def encode_sessions(
    sessions: Sequence[Sequence[Mapping]],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    strict: bool = False,
    normalize: bool = True,
    names: Sequence[str] | None = None,
    own_renders: bool = True,
) -> list[Encoded]:
    """`encode_session` for many sessions, tokenizing them together in batched calls.

    Each result is exactly what `encode_session` gives for that session alone.
    """
    names = list(names) if names is not None else [f"session {n}" for n in range(len(sessions))]
    eot_ids = end_of_turn_ids(template, tokenizer)
    prepared, all_renders = [], []
    for name, messages in zip(names, sessions, strict=True):
        messages = normalize_for_template(messages) if normalize else [dict(m) for m in messages]
        try:
            # rendered as served, {role, content}: `weight` only decides what trains
            all_renders.append(session_renders(served(messages), template))
        except TemplateError as e:
            raise TemplateError(f"{name}: {e}") from e
        prepared.append(messages)
    encodings = []
    for e in tokenizer.encode_batch([r.text for r in all_renders], add_special_tokens=False):
        offsets = e.offsets
        encodings.append((e.ids, offsets, list(map(itemgetter(1), offsets))))
    owners = [n for n, r in enumerate(all_renders) for _ in r.prompts]
    prompt_ids = iter(prompt_token_ids(
        tokenizer,
        [p for r in all_renders for p in r.prompts.values()],
        [all_renders[n].text for n in owners],
        [encodings[n] for n in owners],
    ))
    results = []
    for name, messages, renders, (ids, offsets, ends) in zip(
        names, prepared, all_renders, encodings, strict=True
    ):
        per_turn = {turn: next(prompt_ids) for turn in renders.prompts}
        untrained = untrained_turns(messages)
        encoded = mask_session(messages, renders, ids, offsets, ends, per_turn, eot_ids,
                               template.end_of_turn_strings, untrained)
        if own_renders:
            train_own_renders(encoded, renders, tokenizer, eot_ids, template.end_of_turn_strings,
                              untrained)
        found = [v for part in encoded.parts for v in part.violations]
        if strict and found:
            v = found[0]
            raise MaskError(f"{name}: turn {v.turn}: check {v.check} failed: {v.detail} "
                            "(see it with python -m sekft.mask --inspect)")
        results.append(encoded)
    return results


def encode_session(
    messages: Sequence[Mapping],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    strict: bool = False,
    normalize: bool = True,
    name: str = "session",
    own_renders: bool = True,
) -> Encoded:
    """input_ids and labels of one session, with every check's violations.

    `messages` are normalized first (normalize_for_template) unless normalize=False; turn
    numbers refer to `Encoded.messages`. strict=True raises MaskError on any violation,
    straddles included. Raises TemplateError (naming `name` and the turn) when the template does.
    Turns R cannot train (serve-prefix, history) train from their own renders unless
    own_renders=False.
    """
    return encode_sessions([messages], template, tokenizer, strict, normalize, [name],
                           own_renders)[0]


def train_own_renders(
    encoded: Encoded,
    renders: Renders,
    tokenizer: Tokenizer,
    eot_ids: frozenset[int],
    end_strings: Sequence[str],
    untrained: frozenset[int],
) -> None:
    """Give each turn of `encoded` that R cannot train, failing only serve-prefix or history,
    its own render.

    For such a turn i, H_i = render(m[:i+1]) is tokenized whole and masked with turn i as its
    only assistant turn (P_i, its serve prefix, is checked against H_i as usual). If nothing
    but straddles is found, the example joins `encoded.own_renders` and the turn's violations
    are dropped; otherwise they stay, the first naming what the own render failed. A weight-0
    turn gets the same checks (its findings are the same as with weight 1) and no example.
    """
    by_turn: dict[int, list[Violation]] = {}
    for v in encoded.violations:
        if v.check != "straddle":
            by_turn.setdefault(v.turn, []).append(v)
    for turn, found in sorted(by_turn.items()):
        if any(v.check not in ("serve-prefix", "history") for v in found):
            continue
        text = renders.histories[turn]
        own = Renders(text, {turn: renders.prompts[turn]}, {turn: text})
        e = tokenizer.encode(text, add_special_tokens=False)
        ids, offsets = e.ids, e.offsets
        ends = list(map(itemgetter(1), offsets))
        (per_turn,) = prompt_token_ids(tokenizer, [own.prompts[turn]], [text],
                                       [(ids, offsets, ends)])
        part = mask_session(encoded.messages[: turn + 1], own, ids, offsets, ends,
                            {turn: per_turn}, eot_ids, end_strings)
        for v in found:
            encoded.violations.remove(v)
        if part.failed:
            first = next(v for v in part.violations if v.check != "straddle")
            encoded.violations.append(Violation(
                found[0].check, turn, f"{found[0].detail}; its own render fails too: "
                f"{first.check}: {first.detail}"))
            encoded.violations += found[1:]
        elif turn not in untrained:
            encoded.own_renders.append(part)
    encoded.violations.sort(key=lambda v: (v.turn, CHECKS.index(v.check)))


def mask_session(
    messages: list[dict],
    renders: Renders,
    input_ids: list[int],
    offsets: list[tuple[int, int]],
    ends: list[int],
    prompt_ids: Mapping[int, tuple[int, list[int]]],
    eot_ids: frozenset[int],
    end_strings: Sequence[str],
    untrained: frozenset[int] = frozenset(),
) -> Encoded:
    """Spans, mask, labels and every check for one rendered and tokenized session.

    The assistant turns in `untrained` (weight 0) get every check but train nothing.
    """
    text = renders.text
    spans, violations, kept = [], [], []
    for turn in renders.prompts:
        content = messages[turn]["content"]
        span = assistant_span(turn, renders, content, input_ids, offsets, ends, eot_ids)
        spans.append(span)
        known, ids = prompt_ids[turn]
        found = check_serve_prefix(turn, text, renders.prompts[turn], input_ids, ids, known)
        found = found or check_history(turn, text, renders.histories[turn], span)
        if not found and span.eot_token is None:
            found = check_stop(turn, span, [])
        if not found:
            found = check_early_stop(turn, text, span, offsets, end_strings)
        violations += found
        if not found and turn not in untrained:
            kept.append(span)
    trained, straddles = token_mask(offsets, [(s.start, s.end) for s in kept], ends)
    labels = labels_from_mask(input_ids, trained)
    for span in kept:
        violations += check_stop(span.turn, span, labels)
    turn_of_token = {k: turn_at(kept, offsets[k][0]) for k in straddles}
    violations += check_straddle(turn_of_token, straddles, text, offsets)
    violations += check_coverage(kept, offsets, labels, messages, text, ends)
    violations.sort(key=lambda v: (v.turn, CHECKS.index(v.check)))
    return Encoded(messages, text, input_ids, labels, offsets, spans, straddles, violations)


def turn_at(spans: Sequence[Span], char: int) -> int:
    """The assistant turn whose span ends after `char` first (names straddles), else the last."""
    for span in spans:
        if span.end is not None and char < span.end:
            return span.turn
    return spans[-1].turn if spans else -1


def first_difference(a: Sequence, b: Sequence) -> int:
    """Index of the first position where a and b differ (the shorter length if one prefixes)."""
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


# ---- the inspector -------------------------------------------------------------------------

TRAINED_ON, TRAINED_OFF = "\x1b[42;30m", "\x1b[0m"
STRADDLE_ON, STRADDLE_OFF = "\x1b[43;30m", "\x1b[0m"
MARK_TRAINED = ("\u27e6", "\u27e7")  # ⟦trained⟧
MARK_STRADDLE = ("\u27ec", "\u27ed")  # ⟬straddles⟭


def visible(text: str) -> str:
    """`text` with control characters other than newline and tab shown as control pictures
    (ESC as ␛), so a session's own ANSI codes print as text instead of recolouring the view."""
    return "".join(
        chr(0x2400 + ord(c)) if ord(c) < 32 and c not in "\n\t" else c for c in text
    )


def highlight(encoded: Encoded, color: bool) -> str:
    """R with trained characters highlighted: ANSI background colour, or ⟦...⟧ markers.

    Characters of straddling tokens (which do not train) are shown yellow or ⟬...⟭; control
    characters of the text are shown as control pictures (see `visible`).
    """
    state = [0] * len(encoded.text)
    for (s, e), label in zip(encoded.offsets, encoded.labels, strict=True):
        if label != IGNORE:
            state[s:e] = [1] * (e - s)
    for k in encoded.straddles:
        s, e = encoded.offsets[k]
        state[s:e] = [2 if v == 0 else v for v in state[s:e]]
    marks = {1: (TRAINED_ON, TRAINED_OFF) if color else MARK_TRAINED,
             2: (STRADDLE_ON, STRADDLE_OFF) if color else MARK_STRADDLE}
    out, k = [], 0
    while k < len(state):
        j = k
        while j < len(state) and state[j] == state[k]:
            j += 1
        piece = visible(encoded.text[k:j])
        if state[k]:
            on, off = marks[state[k]]
            if color:
                # A newline inside a coloured run would colour the rest of the terminal line.
                piece = piece.replace("\n", off + "\n" + on)
            piece = (on + piece + off).replace(on + off, "")
        out.append(piece)
        k = j
    return "".join(out)


def session_record(index: int, encoded: Encoded, tokenizer: Tokenizer) -> dict:
    """The JSON object `--inspect --json` prints for one session."""
    trained = [t for t in encoded.labels if t != IGNORE]
    return {
        "session": index,
        "text": encoded.text,
        "input_ids": encoded.input_ids,
        "labels": encoded.labels,
        "trained_text": tokenizer.decode(trained, skip_special_tokens=False),
        "tokens": len(encoded.input_ids),
        "trained_tokens": len(trained),
        "straddles": len(encoded.straddles),
        "violations": [asdict(v) for v in encoded.violations],
        # Turns trained from their own render (render through the turn, only it trained).
        "own_renders": [{"turn": own.spans[0].turn, **session_record(index, own, tokenizer)}
                        for own in encoded.own_renders],
    }


@dataclass
class InspectReport:
    """Totals over the inspected sessions; `failed` decides the exit code."""

    sessions: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    straddles: int = 0
    violations: int = 0
    failed: bool = False


def inspect_sessions(
    sessions: Sequence[Sequence[Mapping]],
    template: ChatTemplate,
    tokenizer: Tokenizer,
    out: TextIO,
    strict: bool = False,
    as_json: bool = False,
    color: bool = False,
    indices: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
) -> InspectReport:
    """Print each session's mask (highlighted text, or one JSON object per line) and totals.

    The run fails when any check other than straddle fails, or any check at all when strict.
    `indices` are the session numbers to print (default 0, 1, ...), `names` what errors call
    them (default "session N"; the CLI passes file:line). This is what
    `python -m sekft.mask --inspect` and `sekft-train --inspect` run.
    """
    indices = list(indices) if indices is not None else list(range(len(sessions)))
    names = list(names) if names is not None else [f"session {n}" for n in indices]
    report = InspectReport()
    for index, encoded in zip(indices, encode_sessions(sessions, template, tokenizer,
                                                       names=names), strict=True):
        parts = encoded.parts
        violations = [v for part in parts for v in part.violations]
        failed = bool(violations) if strict else any(part.failed for part in parts)
        report.sessions += 1
        report.tokens += sum(len(part.input_ids) for part in parts)
        report.trained_tokens += sum(part.trained_tokens for part in parts)
        report.straddles += sum(len(part.straddles) for part in parts)
        report.violations += len(violations)
        report.failed |= failed
        if as_json:
            out.write(json.dumps(session_record(index, encoded, tokenizer)) + "\n")
            continue
        for n, part in enumerate(parts):
            own = f" (turn {part.spans[0].turn}, trained from its own render)" if n else ""
            out.write(f"=== session {index}{own}: {len(part.input_ids)} tokens, "
                      f"{part.trained_tokens} trained, {len(part.straddles)} straddles, "
                      f"{len(part.violations)} violations\n")
            out.write(highlight(part, color) + "\n")
            for v in part.violations:
                out.write(f"  {'FAIL' if failed and (strict or v.check != 'straddle') else 'note'}"
                          f" turn {v.turn} {v.check}: {v.detail}\n")
    if not as_json:
        verdict = "FAILED" if report.failed else "ok"
        out.write(f"=== {report.sessions} sessions, {report.tokens} tokens, "
                  f"{report.trained_tokens} trained, {report.straddles} straddles, "
                  f"{report.violations} violations: {verdict}\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sekft.mask",
        description="Show what trains in each session (assistant-only loss mask) and run the "
        "render-contract checks; exits 1 when a check fails.",
    )
    parser.add_argument("--inspect", action="store_true", required=True,
                        help="inspect the mask (the only mode)")
    parser.add_argument("--data", required=True, help="JSONL file or folder of *.jsonl")
    parser.add_argument("--base", help="model folder (only tokenizer files are read)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --base)")
    parser.add_argument("--template", help="chat template: folder, .jinja or "
                        "tokenizer_config.json (default: --base)")
    parser.add_argument("--template-name", help="named template to use, when there are several")
    parser.add_argument("--template-var", action="append", default=[], metavar="KEY=VALUE",
                        help="template variable for every render, as a server's "
                        "chat_template_kwargs (e.g. enable_thinking=false); repeatable")
    parser.add_argument("--session", type=int, help="inspect only this session (0-based)")
    parser.add_argument("--limit", type=int, help="inspect at most this many sessions")
    parser.add_argument("--strict", action="store_true", help="straddling tokens fail too")
    parser.add_argument("--json", action="store_true", help="one JSON object per session")
    return parser


def main(argv: list[str] | None = None) -> int:
    from sekft.data import read_sessions

    args = build_parser().parse_args(argv)
    tokenizer_dir = args.tokenizer or args.base
    template_at = args.template or args.base
    if tokenizer_dir is None or template_at is None:
        raise ConfigError("give --base DIR, or both --tokenizer DIR and --template PATH")
    tokenizer = load_tokenizer(tokenizer_dir)
    special = load_special_tokens(Path(tokenizer_dir))
    template = ChatTemplate.from_folder(template_at, args.template_name, special)
    template.variables = parse_template_vars(args.template_var)
    sessions = read_sessions(args.data)
    indices = list(range(len(sessions)))
    if args.session is not None:
        if not 0 <= args.session < len(sessions):
            raise ConfigError(f"--session {args.session}: {args.data} has {len(sessions)} "
                              "sessions (numbered from 0)")
        indices = [args.session]
    if args.limit is not None:
        indices = indices[: max(args.limit, 0)]
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    report = inspect_sessions([sessions[n].messages for n in indices], template, tokenizer,
                              sys.stdout, args.strict, args.json, color, indices,
                              [f"session {n} ({sessions[n].where})" for n in indices])
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(run_cli("sekft.mask", main, sys.argv[1:]))
