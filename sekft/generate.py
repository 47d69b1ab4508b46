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
urllib (a vLLM serving the base and the adapter, say).
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import urllib.error
import urllib.request
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
from sekft.template import ChatTemplate, normalize_for_template


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
    after = [body.rsplit("</think>", 1)[1].strip()] if "</think>" in body else []
    return list(dict.fromkeys([*after, body.strip(), body.lstrip(), body.rstrip(), body]))


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


class EndpointPolicy:
    """An OpenAI-compatible chat-completions server as a policy (urllib, no dependency)."""

    def __init__(self, url: str, model: str, sampling: Sampling, timeout: float = 600.0):
        base = url.rstrip("/")
        if not base.endswith("/chat/completions"):
            base = base + ("/chat/completions" if base.endswith("/v1") else
                           "/v1/chat/completions")
        self.url = base
        self.model = model
        self.sampling = sampling
        self.timeout = timeout

    def __call__(self, messages: list[dict]) -> Reply:
        body = {
            "model": self.model,
            "messages": normalize_for_template(messages),
            "max_tokens": self.sampling.max_new_tokens,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "seed": self.sampling.seed,
        }
        request = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            if e.code == 400 and "context" in detail.lower():
                raise ContextExhausted from None
            raise ConfigError(f"--endpoint {self.url}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(f"--endpoint {self.url}: cannot reach the server ({e}); is it "
                              "running and serving --model?") from None
        try:
            content = answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ConfigError(f"--endpoint {self.url}: not a chat-completions answer: "
                              f"{str(answer)[:200]}") from None
        tokens = (answer.get("usage") or {}).get("completion_tokens", 0)
        return Reply(content, tokens=int(tokens or 0))


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
        return {name: EndpointPool([EndpointPolicy(url, name, sampling) for url in urls])
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
    template = ChatTemplate(base.chat_template, base.special_tokens)
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
