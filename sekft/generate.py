"""Replies for the evaluator: our model (+ adapter) with its KV cache, or any OpenAI-compatible
chat-completions server, both as policies (`messages -> Reply`) for `sekft.eval`.

Local generation renders the session with the model's own chat template (after
`normalize_for_template`, as a server must), generates greedily by default (or with
temperature / top-p) until an end-of-turn token or the length limit, and turns the tokens
into the assistant message's content so that rendering the session again reproduces exactly
the tokens the model generated: glue the template puts around content (a leading space or
newline, say) is taken off. A reply that cannot round-trip is recorded as a render-contract
violation on the episode, with the closest content kept.

`--endpoint URL --model NAME` sends the same messages to URL's /v1/chat/completions through
urllib (a vLLM serving the base and the adapter, say); the reply is the command alone
(reasoning and think blocks taken off), and what servers really answer besides a reply
(busy, context full, key wanted, ...) is sorted in `EndpointPolicy`.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import ipaddress
import itertools
import json
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from sekft.checkpoint import read_json
from sekft.device import autocast
from sekft.errors import ConfigError, TemplateError
from sekft.eval import ContextExhausted, Policy, Reply
from sekft.mask import end_of_turn_ids
from sekft.model import Decoder, KVCache
from sekft.template import ChatTemplate, normalize_for_template, parse_template_vars


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: temperature 0 is greedy; top_p keeps the smallest likely set."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [V] with everything outside the nucleus zeroed, renormalised.

    The nucleus is the smallest set of most likely tokens whose mass reaches `top_p`; the
    most likely token is always kept.
    """
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return kept / kept.sum()


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token id from logits [V]: argmax when temperature is 0, else a sample."""
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    probs = top_p_filter(probs, sampling.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Conversation:
    """A conversation's KV cache and the token ids whose keys and values it holds.

    An episode's prompts grow turn by turn, each extending the last prompt and reply, so the
    next turn only needs the keys/values of its new tokens.
    """

    ids: list[int]
    cache: KVCache


def extends(prompt_ids: Sequence[int], cached_ids: Sequence[int]) -> bool:
    """True when `prompt_ids` is `cached_ids` followed by at least one more token."""
    n = len(cached_ids)
    return len(prompt_ids) > n and list(prompt_ids[:n]) == list(cached_ids)


@torch.no_grad()
def generate_ids(
    model: Decoder,
    prompt_ids: Sequence[int],
    stop_ids: frozenset[int],
    max_new_tokens: int,
    sampling: Sampling,
    generator: torch.Generator,
    conversation: Conversation | None = None,
) -> list[int]:
    """Token ids generated after `prompt_ids`, through the first stop id (kept) or
    `max_new_tokens`, one token per forward on a KV cache.

    `conversation`, when given, must hold a cache whose tokens `prompt_ids` extends (or be
    empty): only the tokens after them are prefilled, and on return it holds every token
    fed (the prompt and all generated tokens but the last).
    """
    weight = model.output_weight()
    device = weight.device
    if conversation is None:
        conversation = Conversation([], KVCache(len(model.model.layers)))
    if not extends(prompt_ids, conversation.ids):
        raise ValueError("the prompt does not extend the conversation's cached tokens")
    cache = conversation.cache

    def last_logits(ids: list[int]) -> torch.Tensor:
        # The lm_head on the last position only: on the prompt, [T, V] logits would cost
        # ~1.2 GB for 4k tokens of a 152k-token vocabulary, all but one row thrown away.
        # Under autocast in the weights' dtype, as training ran (sekft.device).
        with autocast(device, weight.dtype):
            hidden = model.hidden(torch.tensor([ids], device=device), cache=cache)
            conversation.ids += ids
            return model.lm_head(hidden[:, -1])[0]

    logits = last_logits(list(prompt_ids[len(conversation.ids):]))
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = next_token(logits, sampling, generator)
        out.append(token)
        if token in stop_ids or len(out) == max_new_tokens:
            break
        logits = last_logits([token])
    return out


@dataclass(eq=False)
class _Request:
    """One `DecodeBatcher.generate` call as the worker sees it."""

    prompt_ids: Sequence[int]
    stop_ids: frozenset[int]
    max_new_tokens: int
    sampling: Sampling
    generator: torch.Generator
    conversation: Conversation
    out: list[int]
    done: threading.Event
    error: BaseException | None = None


class DecodeBatcher:
    """`generate_ids` for many threads at once, their decoding steps run as one forward.

    Decoding one token reads every weight once, and on a CPU (or a GPU at batch 1) that
    memory traffic sets the pace, so the evaluator's concurrent episodes are stepped
    together (`Decoder.decode_hidden`): with --jobs 8, eight conversations advance for
    little more than the price of one. A caller blocks in `generate` until its tokens are
    ready. A worker thread, started when work arrives and gone when none is left, prefills
    each new request alone (a prompt is a batch of tokens already), then steps every
    unfinished conversation by one token. The worker runs its forwards inside `context()`
    (a base-only policy's `lora_disabled`, which is per thread) and under autocast in the
    weights' dtype, as `generate_ids` does. Greedy tokens equal `generate_ids`' up to float
    summation order (a test).
    """

    def __init__(self, model: Decoder, context=nullcontext):
        self.model = model
        self.context = context
        self._lock = threading.Lock()
        self._pending: list[_Request] = []
        self._worker: threading.Thread | None = None

    def generate(self, prompt_ids: Sequence[int], stop_ids: frozenset[int],
                 max_new_tokens: int, sampling: Sampling, generator: torch.Generator,
                 conversation: Conversation) -> list[int]:
        """What `generate_ids` returns for the same arguments; `conversation` is required."""
        if not extends(prompt_ids, conversation.ids):
            raise ValueError("the prompt does not extend the conversation's cached tokens")
        request = _Request(prompt_ids, stop_ids, max_new_tokens, sampling, generator,
                           conversation, [], threading.Event())
        with self._lock:
            self._pending.append(request)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="sekft-decode",
                                                daemon=True)
                self._worker.start()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.out

    def _run(self) -> None:
        active: list[_Request] = []
        try:
            with self.context(), torch.no_grad():
                while True:
                    with self._lock:
                        new, self._pending = self._pending, []
                        if not new and not active:
                            self._worker = None
                            return
                    active += [r for r in new if self._prefill(r)]
                    if active:
                        active = self._step(active)
        except BaseException as e:  # every waiting caller gets the error, none hangs
            with self._lock:
                stranded, self._pending, self._worker = active + self._pending, [], None
            for r in stranded:
                r.error = e
                r.done.set()

    def _choose(self, r: _Request, logits: torch.Tensor) -> bool:
        """Pick r's next token; True while r goes on, False (and r answered) when done."""
        token = next_token(logits, r.sampling, r.generator)
        r.out.append(token)
        if token in r.stop_ids or len(r.out) >= r.max_new_tokens:
            r.done.set()
            return False
        return True

    def _prefill(self, r: _Request) -> bool:
        weight = self.model.output_weight()
        new = list(r.prompt_ids[len(r.conversation.ids):])
        with autocast(weight.device, weight.dtype):
            hidden = self.model.hidden(torch.tensor([new], device=weight.device),
                                       cache=r.conversation.cache)
            logits = self.model.lm_head(hidden[:, -1])[0]
        r.conversation.ids += new
        return self._choose(r, logits)

    def _step(self, active: list[_Request]) -> list[_Request]:
        weight = self.model.output_weight()
        fed = [r.out[-1] for r in active]
        with autocast(weight.device, weight.dtype):
            hidden = self.model.decode_hidden(
                torch.tensor([[t] for t in fed], device=weight.device),
                [r.conversation.cache for r in active],
            )
            logits = self.model.lm_head(hidden[:, 0])
        for r, token in zip(active, fed, strict=True):
            r.conversation.ids.append(token)
        return [r for r, row in zip(active, logits, strict=True) if self._choose(r, row)]


def content_candidates(body: str) -> list[str]:
    """Ways the template may have glued `body` in, most trimmed first: the glue goes, and the
    content as generated is the last resort.

    A template that writes a think block before the last turn's reply (Qwen3's empty
    `<think>\n\n</think>\n\n`) makes the text after `</think>` the first candidate: the
    command, as a server's reasoning parser would return it; the round trip decides.
    """
    after = after_think(body)
    first = [] if after is None else [after]
    return list(dict.fromkeys([*first, body.strip(), body.lstrip(), body.rstrip(), body]))


def after_think(text: str) -> str | None:
    """What follows the last `</think>` in `text`, stripped (the command after a think
    block), or None when `text` has none."""
    return text.rsplit("</think>", 1)[1].strip() if "</think>" in text else None


def reply_content(
    messages: list[dict],
    generated: str,
    end_strings: Sequence[str],
    template: ChatTemplate,
) -> tuple[str, str | None]:
    """The assistant content for `generated` text (prompt excluded) and a violation or None.

    The content is the generated text up to its first end-of-turn string, with template glue
    taken off: the first candidate c (content_candidates) for which
    render(messages + [assistant c]) continues the generation prompt with exactly
    `generated` (or, when generation stopped at the length limit, with a prefix thereof).
    """
    ends = [i for i in (generated.find(s) for s in end_strings) if i >= 0]
    body = generated[: min(ends)] if ends else generated
    prompt = template.render(messages, add_generation_prompt=True)
    for content in content_candidates(body):
        try:
            text = template.render(messages + [{"role": "assistant", "content": content}])
        except TemplateError:
            continue
        if text.startswith(prompt + generated):
            return content, None
    return body.strip(), (
        f"the reply {generated[:60]!r} does not round-trip through the chat template: no "
        "content renders back to the generated text"
    )


def checkpoint_stop_ids(folder: str | Path, hf_config: Mapping) -> frozenset[int]:
    """The end-of-sequence ids a checkpoint declares: `eos_token_id` (one id or a list) of
    its generation_config.json, else of its config.json; empty when neither has one.

    transformers' generate and vLLM stop on these besides the tokenizer's eos: Llama 3.x
    Instruct lists <|end_of_text|>, <|eom_id|> and <|eot_id|>, Qwen2.5/Qwen3 <|im_end|> and
    <|endoftext|>, where the chat template and tokenizer name only one of them.
    """
    path = Path(folder) / "generation_config.json"
    source = read_json(path) if path.is_file() else hf_config
    eos = source.get("eos_token_id")
    if eos is None and source is not hf_config:
        eos = hf_config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return frozenset(i for i in ids if isinstance(i, int) and not isinstance(i, bool))


class ModelPolicy:
    """Our model as a policy; `base_only` runs it with its LoRA layers disabled (--baseline).

    With `reuse_cache`, each thread keeps its conversation's KV cache from one call to the
    next and prefills only the tokens a prompt adds to it. A later turn whose prompt does
    not extend the cached tokens (a reply that re-tokenizes differently, say) is prefilled
    whole and flagged on its Reply (`full_prefill`).

    Generation stops at the template's end-of-turn tokens and at `stop_ids` (the
    checkpoint's own, `checkpoint_stop_ids`); the reply's content ends before either.
    """

    def __init__(self, model: Decoder, tokenizer: Tokenizer, template: ChatTemplate,
                 sampling: Sampling, max_context: int, base_only: bool = False,
                 reuse_cache: bool = True, stop_ids: frozenset[int] = frozenset()):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.sampling = sampling
        self.max_context = max_context
        self.base_only = base_only
        self.reuse_cache = reuse_cache
        stop_ids = {i for i in stop_ids if tokenizer.id_to_token(i) is not None}
        self.stop_ids = end_of_turn_ids(template, tokenizer) | stop_ids
        stop_texts = (tokenizer.decode([i], skip_special_tokens=False) for i in sorted(stop_ids))
        self.end_strings = tuple(
            dict.fromkeys([*template.end_of_turn_strings, *filter(None, stop_texts)])
        )
        self.generator = torch.Generator().manual_seed(sampling.seed)
        self._local = threading.local()
        if base_only:
            from sekft.lora import lora_disabled

            self.batcher = DecodeBatcher(model, lambda: lora_disabled(model))
        else:
            self.batcher = DecodeBatcher(model)

    def _conversation(self, messages: list[dict], prompt_ids: list[int]
                      ) -> tuple[Conversation, bool]:
        """This thread's conversation to continue (or a fresh one), and whether a later turn
        had to start afresh."""
        kept = getattr(self._local, "conversation", None) if self.reuse_cache else None
        if kept is not None and extends(prompt_ids, kept.ids):
            return kept, False
        conversation = Conversation([], KVCache(len(self.model.model.layers)))
        if self.reuse_cache:
            self._local.conversation = conversation
        later_turn = any(m["role"] == "assistant" for m in messages)
        return conversation, self.reuse_cache and later_turn

    def __call__(self, messages: list[dict]) -> Reply:
        messages = normalize_for_template(messages)
        prompt = self.template.render(messages, add_generation_prompt=True)
        prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ContextExhausted
        conversation, full_prefill = self._conversation(messages, prompt_ids)
        ids = self.batcher.generate(prompt_ids, self.stop_ids,
                                    min(self.sampling.max_new_tokens, room), self.sampling,
                                    self.generator, conversation)
        generated = self.tokenizer.decode(ids, skip_special_tokens=False)
        content, violation = reply_content(messages, generated, self.end_strings,
                                           self.template)
        if violation is None:
            violation = self._retokenize_check(messages, content, prompt_ids, ids)
        return Reply(content, tokens=len(ids), violation=violation, full_prefill=full_prefill)

    def _retokenize_check(self, messages: list[dict], content: str, prompt_ids: list[int],
                          ids: list[int]) -> str | None:
        """The text round-trips; do its tokens? (A model can emit a non-canonical split.)"""
        text = self.template.render(messages + [{"role": "assistant", "content": content}])
        again = self.tokenizer.encode(text, add_special_tokens=False).ids
        if again[: len(prompt_ids) + len(ids)] == list(prompt_ids) + ids:
            return None
        return (f"the reply {content[:60]!r} renders to the same text but tokenizes "
                "differently from what the model generated")


# Statuses of a server that is busy or (re)starting rather than refusing the request: vLLM,
# TGI and Ollama answer 429 or 503 when their queue is full, llama.cpp 503 "Loading model"
# while it loads, a proxy 502 or 504 while the server behind it restarts.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
# Seconds to wait before each retry of a transient failure (or the server's Retry-After,
# up to MAX_RETRY_AFTER): about a minute in all, then the run fails with the last answer.
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
MAX_RETRY_AFTER = 60.0
# The key for a server started with --api-key, sent as `Authorization: Bearer`. Not
# OPENAI_API_KEY: that one is often set for OpenAI itself, and would go to any --endpoint.
API_KEY_ENV = "SEKFT_API_KEY"
# End-of-turn tokens a server can leave in the content as text when it does not stop at
# them (a GGUF whose eos is another token, an LM Studio preset); no command contains them.
END_OF_TURN_TEXTS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
                     "<|endoftext|>", "<|end|>", "<end_of_turn>")
# How servers say that a request does not fit the context window (vLLM's wordings over its
# versions, SGLang, TGI's 422, llama.cpp), then where they give the window and the prompt.
_CONTEXT_WORDS = re.compile(r"context|maximum model length|`inputs` tokens|`inputs` must have",
                            re.IGNORECASE)
_WINDOW = re.compile(r"maximum context length (?:is|of) (\d+)|context length is only (\d+)"
                     r"|maximum model length of (\d+)|must be <= (\d+)"
                     r"|context (?:length|size) \((\d+) tokens\)")
_PROMPT = re.compile(r"(\d+) in the messages|request has (\d+) input tokens"
                     r"|contains (?:at least )?(\d+) input tokens|passed (\d+) input tokens"
                     r"|(\d+) tokens from the input messages|Given: (\d+) `inputs` tokens"
                     r"|prompt \(length (\d+)\)|(?:input|request) \((\d+) tokens\)")


class _Overflow(Exception):
    """A server's refusal of a request too long for its context window; `room` is how many
    tokens it could still generate after the prompt, when the refusal says (else None)."""

    def __init__(self, room: int | None):
        super().__init__(room)
        self.room = room


class _Transient(Exception):
    """A failure worth retrying; `retry_after` is the server's own wait in seconds, or 0."""

    def __init__(self, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after


def chat_completions_url(url: str) -> str:
    """The chat-completions URL of a server given as users paste it: `http://host:8000`,
    with or without a trailing `/`, `/v1` or `/v1/`, or the full `/v1/chat/completions`."""
    base = url.strip().rstrip("/")
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise ConfigError(f"--endpoint {url!r}: give the server's URL, such as "
                          "http://127.0.0.1:8000")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def is_local_host(host: str) -> bool:
    """Whether `host` is this machine: localhost, a loopback address, or 0.0.0.0 (which
    vLLM and uvicorn print as the address they listen on)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def opener_for(url: str) -> urllib.request.OpenerDirector:
    """urllib's opener for `url`, without proxies for a server on this machine: urllib sends
    even 127.0.0.1 through HTTP_PROXY unless NO_PROXY names it, and the proxy cannot reach
    this machine's loopback (it answers 502 or 403, or never)."""
    if is_local_host(urllib.parse.urlsplit(url).hostname or ""):
        return urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return urllib.request.build_opener()


def read_body(response) -> bytes:
    """The body of an HTTP response (or HTTPError), gzip or deflate undone: urllib asks for
    no encoding, but a proxy in front of the server may compress anyway."""
    data = response.read()
    encoding = (response.headers.get("Content-Encoding") or "").strip().lower()
    try:
        if encoding in ("gzip", "x-gzip"):
            return gzip.decompress(data)
        if encoding == "deflate":
            return zlib.decompress(data, zlib.MAX_WBITS | 32)  # zlib-wrapped or raw
    except (OSError, EOFError, zlib.error):
        pass  # not compressed after all; the JSON check says what it is
    return data


def error_detail(body: bytes) -> str:
    """The message of an error body, whatever its shape: `{"error": {"message"}}` (vLLM,
    llama.cpp, Ollama), `{"message"}` (older vLLM), `{"error": "..."}` (TGI) or `{"detail"}`
    (FastAPI); else the text. At most 300 characters."""
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    found = data
    if isinstance(data, dict):
        found = data.get("error") or data.get("message") or data.get("detail") or data
        if isinstance(found, dict):
            found = found.get("message") or found
    return (found if isinstance(found, str) else json.dumps(found))[:300]


def context_room(detail: str) -> int | None:
    """Tokens left for generation after the prompt, by a context-window refusal's own
    figures (window minus prompt tokens; zero or less when the prompt alone is too long);
    None when it does not give both."""
    window, prompt = _WINDOW.search(detail), _PROMPT.search(detail)
    if window is None or prompt is None:
        return None

    def number(match: re.Match) -> int:
        return int(next(g for g in match.groups() if g is not None))

    return number(window) - number(prompt)


def retry_after(headers) -> float:
    """A Retry-After header's seconds (capped at MAX_RETRY_AFTER), or 0."""
    try:
        return min(max(float(headers.get("Retry-After") or 0), 0.0), MAX_RETRY_AFTER)
    except (TypeError, ValueError):
        return 0.0  # an HTTP date: our own delays will do


def utf8_safe(text: str) -> str:
    """`text` with lone surrogates (JSON can carry "\\ud800") replaced: they could not be
    written to transcripts.jsonl, and the run's results would be lost at the end."""
    return text.encode("utf-8", "replace").decode("utf-8")


def command_text(content: str, reasoning_apart: bool) -> str:
    """The command line in a reply's content, as the shell should get it.

    The content ends before an end-of-turn token left in it as text (END_OF_TURN_TEXTS).
    A think block left in the content (no reasoning parser: DeepSeek-R1, Qwen3, or a
    template that opens `<think>` in the prompt, so only `</think>` shows) is reasoning: the
    command is what follows `</think>`, stripped, and a block never closed (max_tokens spent
    thinking) leaves no command. When the server took the reasoning apart itself (a
    `reasoning_content` or `reasoning` field), its parser leaves the newlines that followed
    `</think>`, so the content is stripped. Any other content is kept as generated, as the
    local policy keeps it.
    """
    ends = [i for i in (content.find(s) for s in END_OF_TURN_TEXTS) if i >= 0]
    content = content[: min(ends)] if ends else content
    after = after_think(content)
    if after is not None:
        return after
    if content.lstrip().startswith("<think>"):
        return ""
    return content.strip() if reasoning_apart else content


def endpoint_reply(answer: dict, where: str) -> Reply:
    """The Reply in a chat-completions answer: the command (`command_text`) of the first
    choice, the completion tokens of `usage` (0 when the server sends none), and, when the
    server turned the reply into `tool_calls` (sekft sends no tools), a violation naming
    them, so that empty replies in a transcript have their reason beside them."""
    try:
        message = answer["choices"][0]["message"]
        content = message.get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ConfigError(f"--endpoint {where}: not a chat-completions answer: "
                          f"{str(answer)[:200]}") from None
    if not isinstance(content, str):
        raise ConfigError(f"--endpoint {where}: the reply's content is not text: "
                          f"{str(content)[:200]}")
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    violation = None
    if message.get("tool_calls"):
        violation = utf8_safe(
            f"the server answered with tool_calls {json.dumps(message['tool_calls'])[:150]} "
            "although sekft sends no tools; its tool-call parser took the reply")
    tokens = (answer.get("usage") or {}).get("completion_tokens") or 0
    return Reply(utf8_safe(command_text(content, bool(reasoning))), tokens=int(tokens),
                 violation=violation)


class EndpointPolicy:
    """An OpenAI-compatible chat-completions server as a policy (urllib, no dependency).

    Transient failures (TRANSIENT_STATUSES, and a dropped connection once the server has
    answered) are retried after each of `retry_delays`, then fail the run (ConfigError), as
    every other refusal does at once: 401/403 (with a word on API_KEY_ENV), 404 (with the
    names the server serves), 500. A refusal for the context window ends the episode
    (ContextExhausted) unless the prompt itself fits: vLLM, SGLang and TGI refuse a prompt
    plus max_tokens past the window where our own generation stops at it, so the request is
    made again for the tokens left. The reply is the command only (`endpoint_reply`).
    """

    def __init__(self, url: str, model: str, sampling: Sampling, timeout: float = 600.0,
                 api_key: str | None = None, retry_delays: Sequence[float] = RETRY_DELAYS,
                 template_vars: Mapping[str, object] | None = None):
        self.url = chat_completions_url(url)
        # Sent as `chat_template_kwargs` (vLLM, SGLang, llama.cpp): the server renders with
        # the variables training rendered with (--template-var).
        self.template_vars = dict(template_vars or {})
        self.model = model
        self.sampling = sampling
        self.timeout = timeout
        self.api_key = api_key
        self.retry_delays = tuple(retry_delays)
        self.opener = opener_for(self.url)
        self.answered = False  # the server has answered once: a lost connection is news

    def request_body(self, messages: list[dict]) -> dict:
        """The chat-completions request for `messages`. top_p goes only with sampling:
        greedy decoding ignores it everywhere, and TGI refuses top_p 1.0 (it wants < 1)."""
        body = {
            "model": self.model,
            "messages": normalize_for_template(messages),
            "max_tokens": self.sampling.max_new_tokens,
            "temperature": self.sampling.temperature,
            "seed": self.sampling.seed,
        }
        if self.sampling.temperature > 0:
            body["top_p"] = self.sampling.top_p
        if self.template_vars:
            body["chat_template_kwargs"] = self.template_vars
        return body

    def __call__(self, messages: list[dict]) -> Reply:
        body = self.request_body(messages)
        try:
            answer = self._answer(body)
        except _Overflow as overflow:
            if overflow.room is None or not 0 < overflow.room < body["max_tokens"]:
                raise ContextExhausted from None
            try:
                answer = self._answer({**body, "max_tokens": overflow.room})
            except _Overflow:
                raise ContextExhausted from None
        return endpoint_reply(answer, self.url)

    def _answer(self, body: dict) -> dict:
        """The server's JSON answer to `body`, transient failures retried."""
        for delay in self.retry_delays:
            try:
                return self._post(body)
            except _Transient as e:
                time.sleep(max(delay, e.retry_after))
        try:
            return self._post(body)
        except _Transient as e:
            raise ConfigError(f"--endpoint {self.url}: {e} (still, after "
                              f"{len(self.retry_delays) + 1} attempts)") from None

    def _post(self, body: dict) -> dict:
        """One request: its JSON answer, or _Transient, _Overflow or ConfigError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                         method="POST", headers=headers)
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                raw = read_body(response)
        except urllib.error.HTTPError as e:
            self.answered = True
            raise self._refusal(e.code, error_detail(read_body(e)), e.headers) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise self._unreachable(getattr(e, "reason", e)) from None
        self.answered = True
        try:
            answer = json.loads(raw.decode("utf-8", "replace"))
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ConfigError(f"--endpoint {self.url}: not a JSON answer: "
                              f"{raw[:200].decode('utf-8', 'replace')!r}")
        return answer

    def _refusal(self, status: int, detail: str, headers) -> Exception:
        """What an HTTP error status means for the run."""
        said = f"--endpoint {self.url}: HTTP {status}: {detail.rstrip('.')}"
        if status in (400, 413, 422) and _CONTEXT_WORDS.search(detail):
            return _Overflow(context_room(detail))
        if status in TRANSIENT_STATUSES:
            return _Transient(f"HTTP {status}: {detail}", retry_after(headers))
        if status in (401, 403):
            return ConfigError(f"{said}; the server refused the key in {API_KEY_ENV}"
                               if self.api_key else
                               f"{said}; it wants an API key: set {API_KEY_ENV} (sent as "
                               "Authorization: Bearer)")
        if status == 404:
            return ConfigError(f"{said}; {self._served_models()}")
        return ConfigError(said)

    def _unreachable(self, reason) -> Exception:
        """What a failure to get any HTTP answer means: a timeout or a certificate fails
        the run; a lost connection is retried once the server has answered before (it is
        restarting), and fails the run at once otherwise (a wrong host or port)."""
        if isinstance(reason, TimeoutError):
            return ConfigError(f"--endpoint {self.url}: no answer within {self.timeout:g} s")
        if isinstance(reason, ssl.SSLCertVerificationError):
            return ConfigError(f"--endpoint {self.url}: {reason.verify_message}; to trust "
                               "the server's own certificate, point SSL_CERT_FILE at its PEM")
        if self.answered:
            return _Transient(f"lost the connection ({reason})")
        return ConfigError(f"--endpoint {self.url}: cannot reach the server ({reason}); is "
                           "it running, at that address?")

    def _served_models(self) -> str:
        """The model names the server lists at /v1/models, as a hint after a 404."""
        url = self.url[: -len("/chat/completions")] + "/models"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            with self.opener.open(urllib.request.Request(url, headers=headers),
                                  timeout=10) as response:
                names = [m["id"] for m in json.loads(read_body(response))["data"]]
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
            return ("is --endpoint the server's base URL (http://host:port) and --model a "
                    "name it serves?")
        return f"it serves {', '.join(map(str, names)) or 'no model'}: give one as --model"


class EndpointPool:
    """Several servers as one policy: each thread that calls it is bound, at its first call,
    to the next server in turn and stays with it. With `--jobs` threads per server (the
    evaluator runs jobs x servers worker threads), every server has `--jobs` episodes in
    flight, and an episode talks to one server only (its prefix cache keeps the session)."""

    def __init__(self, servers: list[EndpointPolicy]):
        self.servers = servers
        self.bound = threading.local()
        self.turn = itertools.count()  # next() on a count is atomic under the GIL

    def __call__(self, messages: list[dict]) -> Reply:
        server = getattr(self.bound, "server", None)
        if server is None:
            server = self.bound.server = self.servers[next(self.turn) % len(self.servers)]
        return server(messages)


def policies_from_args(args: argparse.Namespace) -> dict[str, Policy]:
    """The runs `sekft-eval` asked for, by name: "adapter" (and "base" with --baseline), or
    "base" alone without an adapter; with --endpoint, the served model names."""
    if args.endpoint:
        sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed)
        names = [args.model] + ([args.baseline_model] if args.baseline else [])
        urls = args.endpoint.split(",")
        key = os.environ.get(API_KEY_ENV) or None
        variables = parse_template_vars(args.template_var)
        return {name: EndpointPool([EndpointPolicy(url, name, sampling, api_key=key,
                                                   template_vars=variables)
                                    for url in urls])
                for name in names}
    from sekft.base import load_base
    from sekft.device import choose_dtype, default_device, describe

    device = torch.device(args.device) if args.device else default_device()
    dtype, why = choose_dtype(device, args.dtype)
    print(describe(device, dtype, why))
    base = load_base(args.base, dtype=dtype, device=device, load_4bit=args.load_4bit)
    return model_policies(base, args)


def model_policies(base, args: argparse.Namespace) -> dict[str, Policy]:
    """The runs of `policies_from_args` on an already loaded `sekft.base.Base` (a cold load or
    the resident server's): the adapter goes into the model's LoRA slots (replacing slots of
    another rank or targets), the base alone runs with the slots switched off."""
    from sekft.errors import AdapterError
    from sekft.lora import detach_lora, load_adapter, lora_modules

    if base.chat_template is None:
        raise TemplateError(f"{base.path}: the base has no chat template; sekft-eval renders "
                            "sessions with the model's own template")
    model = base.model
    template = ChatTemplate(base.chat_template, base.special_tokens,
                            variables=parse_template_vars(getattr(args, "template_var", [])))
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed)
    max_context = args.max_context or base.config.max_position_embeddings
    stop_ids = checkpoint_stop_ids(base.path, base.hf_config)

    def policy(base_only: bool) -> ModelPolicy:
        return ModelPolicy(model, base.tokenizer, template, sampling, max_context, base_only,
                           stop_ids=stop_ids)

    if args.adapter:
        try:
            load_adapter(model, args.adapter)
        except AdapterError:
            if not lora_modules(model):
                raise
            detach_lora(model)
            load_adapter(model, args.adapter)
    # Generation is inference: no LoRA dropout, whatever mode a train job left the model in.
    model.eval()
    if not args.adapter:
        return {"base": policy(base_only=bool(lora_modules(model)))}
    runs = {"adapter": policy(base_only=False)}
    if args.baseline:
        runs["base"] = policy(base_only=True)
    return runs
