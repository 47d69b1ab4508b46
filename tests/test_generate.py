"""Generation for the evaluator: sampling math, greedy parity with transformers, the reply
round-trip through the chat template, and the full sekft-eval path on a tiny random model."""

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from sekft.base import load_base
from sekft.eval import ContextExhausted, main
from sekft.generate import (
    EndpointPolicy,
    ModelPolicy,
    Sampling,
    generate_ids,
    reply_content,
    top_p_filter,
)
from sekft.sandbox import find_bwrap
from sekft.template import ChatTemplate

FIXTURES = Path(__file__).parent / "fixtures" / "scenarios"
GREEDY = Sampling(max_new_tokens=8)
# Glue: the assistant turn renders as "A: " + content, the generation prompt is only "A:".
GLUE_TEMPLATE = (
    "{% for m in messages %}{% if m.role == 'user' %}U: {{ m.content }}\n"
    "{% else %}A: {{ m.content }}</s>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}"
)
USER = [{"role": "user", "content": "user@sandbox:~$ "}]


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = torch.tensor([0.5, 0.2, 0.3])
    assert torch.allclose(top_p_filter(probs.clone(), 0.6), torch.tensor([0.625, 0.0, 0.375]))
    assert torch.allclose(top_p_filter(probs.clone(), 0.5), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(top_p_filter(probs.clone(), 1.0), probs)


def test_greedy_generation_matches_transformers(tiny_llama):
    from transformers import AutoModelForCausalLM

    base = load_base(tiny_llama, device="cpu")
    prompt = base.tokenizer.encode("<|im_start|>user\nls -la<|im_end|>\n").ids
    ours = generate_ids(base.model, prompt, frozenset(), 8, GREEDY, torch.Generator())
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32)
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == expected


def test_generation_stops_at_an_end_of_turn_token_and_keeps_it(tiny_llama):
    base = load_base(tiny_llama, device="cpu")
    prompt = base.tokenizer.encode("ls").ids
    first = generate_ids(base.model, prompt, frozenset(), 1, GREEDY, torch.Generator())[0]
    assert generate_ids(base.model, prompt, frozenset({first}), 8, GREEDY,
                        torch.Generator()) == [first]


def test_sampling_is_reproducible_from_the_seed(tiny_llama):
    base = load_base(tiny_llama, device="cpu")
    hot = Sampling(temperature=1.5, top_p=0.9, max_new_tokens=8)
    runs = [generate_ids(base.model, [1, 5, 9], frozenset(), 8, hot,
                         torch.Generator().manual_seed(7)) for _ in range(2)]
    assert runs[0] == runs[1]


def test_reply_takes_off_the_template_glue():
    template = ChatTemplate(GLUE_TEMPLATE, {"eos_token": "</s>"})
    assert reply_content(USER, " ls -la</s>", ["</s>"], template) == ("ls -la", None)


def test_reply_that_cannot_round_trip_is_a_violation():
    template = ChatTemplate(GLUE_TEMPLATE, {"eos_token": "</s>"})
    content, violation = reply_content(USER, "ls-without-glue</s>", ["</s>"], template)
    assert content == "ls-without-glue" and "does not round-trip" in violation


def test_chatml_reply_is_the_text_before_end_of_turn(tiny_llama):
    template = ChatTemplate.from_folder(tiny_llama)
    assert reply_content(USER, "pwd<|im_end|>", ["<|im_end|>"], template) == ("pwd", None)


def test_session_longer_than_the_context_exhausts_it(tiny_llama):
    base = load_base(tiny_llama, device="cpu")
    template = ChatTemplate.from_folder(tiny_llama)
    policy = ModelPolicy(base.model, base.tokenizer, template, GREEDY, max_context=8)
    with pytest.raises(ContextExhausted):
        policy(USER)


def _fast_scenarios(tmp_path):
    """The fixture scenarios with short timeouts and budgets: a random model's commands."""
    root = shutil.copytree(FIXTURES, tmp_path / "scenarios")
    for spec in root.glob("*/scenario.json"):
        data = json.loads(spec.read_text())
        spec.write_text(json.dumps({**data, "command_timeout": 1, "turn_budget": 3}))
    return root


def _transcripts(out):
    return [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]


class _StandIn(BaseHTTPRequestHandler):
    """A chat-completions server answering with our own model policy (as vLLM would)."""

    policy = None
    model_name = "tiny"

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if request["model"] != self.model_name:
            self.send_error(404, "no such model")
            return
        reply = self.policy(request["messages"])
        body = json.dumps({
            "choices": [{"message": {"role": "assistant", "content": reply.content}}],
            "usage": {"completion_tokens": reply.tokens},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
def test_tiny_model_end_to_end_and_the_same_replies_through_an_endpoint(
    tiny_llama, tmp_path, capsys
):
    scenarios = _fast_scenarios(tmp_path)
    common = ["--scenarios", str(scenarios), "--max-new-tokens", "6"]
    assert main(["--base", str(tiny_llama), "--out", str(tmp_path / "local"), *common]) == 0
    table = capsys.readouterr().out
    assert "cmd-first" in table and "ALL" in table
    results = json.loads((tmp_path / "local" / "results.json").read_text())
    assert results["runs"]["base"]["overall"]["episodes"] == 2

    base = load_base(tiny_llama, device="cpu")
    template = ChatTemplate.from_folder(tiny_llama)
    _StandIn.policy = ModelPolicy(base.model, base.tokenizer, template,
                                  Sampling(max_new_tokens=6), max_context=256)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        # Every reply of the local run, asked again through the endpoint with the same
        # messages, comes back the same. (Whole runs can differ: a pipeline's two stderr
        # streams interleave as the scheduler pleases, and the model then sees another
        # observation.)
        remote = EndpointPolicy(url, "tiny", Sampling(max_new_tokens=6))
        for transcript in _transcripts(tmp_path / "local"):
            messages = transcript["messages"]
            for i, message in enumerate(messages):
                if message["role"] == "assistant":
                    assert remote(messages[:i]).content == message["content"]
        assert main(["--endpoint", url, "--model", "tiny", "--out", str(tmp_path / "remote"),
                     *common]) == 0
    finally:
        server.shutdown()
    assert len(_transcripts(tmp_path / "remote")) == 2


def _adapter(base_dir, out, seed=0):
    from sekft.lora import attach_lora, reset_lora, save_adapter

    base = load_base(base_dir, device="cpu")
    attach_lora(base.model, r=4, alpha=8)
    reset_lora(base.model, seed)
    with torch.no_grad():
        for name, p in base.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_adapter(base.model, out, str(base_dir))
    return out


@pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
def test_baseline_runs_base_and_adapter_and_prints_differences(tiny_llama, tmp_path, capsys):
    adapter = _adapter(tiny_llama, tmp_path / "adapter")
    scenarios = _fast_scenarios(tmp_path)
    code = main(["--base", str(tiny_llama), "--adapter", str(adapter), "--baseline",
                 "--scenarios", str(scenarios), "--out", str(tmp_path / "out"),
                 "--max-new-tokens", "4"])
    assert code == 0
    assert "adapter vs base" in capsys.readouterr().out
    runs = {t["run"] for t in _transcripts(tmp_path / "out")}
    assert runs == {"adapter", "base"}


def test_adapter_for_a_different_base_is_one_line_error(tmp_path, tiny_llama, capsys):
    from tiny import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", kind="llama", intermediate_size=48)
    adapter = _adapter(other, tmp_path / "adapter")
    code = main(["--base", str(tiny_llama), "--adapter", str(adapter), "--no-sandbox",
                 "--scenarios", str(FIXTURES), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "sekft-eval: error:" in err and "another base" in err


def _play_turns(policy, turns=4):
    """A scripted episode: the same observations whatever the replies, so two policies can
    be compared on their replies alone."""
    messages = list(USER)
    replies = []
    for turn in range(turns):
        reply = policy(messages)
        replies.append(reply)
        messages += [{"role": "assistant", "content": reply.content},
                     {"role": "user", "content": f"output {turn}\nuser@sandbox:~$ "}]
    return messages, replies


def _counting_fed_tokens(model, monkeypatch):
    fed = []
    hidden = model.hidden

    def spy(input_ids, *args, **kwargs):
        fed.append(input_ids.shape[1])
        return hidden(input_ids, *args, **kwargs)

    monkeypatch.setattr(model, "hidden", spy)
    return fed


def _plain_words_only(base, monkeypatch):
    """Greedy over tokens of letters, digits and `./-_` only: a random model's replies then
    re-tokenize as generated (broken UTF-8 or glue whitespace would not, and a later turn
    could not reuse the cache; that case has its own test)."""
    import string

    import sekft.generate

    allowed = set(string.ascii_letters + string.digits + "./-_")
    vocab = base.tokenizer.get_vocab_size()
    ok = torch.tensor([bool(t) and set(t) <= allowed
                       for t in (base.tokenizer.decode([i]) for i in range(vocab))])
    assert ok.sum() > 20

    def restricted(logits, sampling, generator):
        return int(torch.argmax(logits[:vocab].masked_fill(~ok, float("-inf"))))

    monkeypatch.setattr(sekft.generate, "next_token", restricted)


def test_kv_reuse_episode_gives_the_same_transcript_as_re_prefilling(tiny_llama, monkeypatch):
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    template = ChatTemplate.from_folder(tiny_llama)
    _plain_words_only(base, monkeypatch)
    fed = _counting_fed_tokens(base.model, monkeypatch)
    sampling = Sampling(max_new_tokens=6)
    whole, _ = _play_turns(ModelPolicy(base.model, base.tokenizer, template, sampling, 256,
                                       reuse_cache=False))
    fed_whole = sum(fed)
    fed.clear()
    reused, replies = _play_turns(ModelPolicy(base.model, base.tokenizer, template, sampling,
                                              256))
    assert reused == whole
    # And the reuse happened: later turns fed only their new tokens.
    assert not any(r.full_prefill for r in replies)
    assert sum(fed) < fed_whole / 2


def test_a_later_turn_that_does_not_extend_the_cache_is_prefilled_whole(tiny_llama):
    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    template = ChatTemplate.from_folder(tiny_llama)
    sampling = Sampling(max_new_tokens=6)
    policy = ModelPolicy(base.model, base.tokenizer, template, sampling, 256)
    fresh = ModelPolicy(base.model, base.tokenizer, template, sampling, 256,
                        reuse_cache=False)
    messages, _ = _play_turns(policy, turns=2)
    # The model "said" something else at turn 0: the prompt no longer extends the cache.
    edited = [messages[0], {"role": "assistant", "content": "echo edited"}, *messages[2:]]
    reply = policy(edited)
    assert reply.full_prefill
    assert reply.content == fresh(edited).content
    assert not fresh(edited).full_prefill


def test_generate_ids_refuses_a_prompt_that_does_not_extend_the_conversation(tiny_llama):
    from sekft.generate import Conversation
    from sekft.model import KVCache

    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    conversation = Conversation([5, 6], KVCache(len(base.model.model.layers)))
    with pytest.raises(ValueError, match="does not extend"):
        generate_ids(base.model, [5, 7, 8], frozenset(), 2, GREEDY, torch.Generator(),
                     conversation)


def _in_threads(calls):
    """Run each zero-argument call in its own thread, all started together; their results
    (or the exceptions they raised) in order."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(i):
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as e:  # noqa: BLE001 - returned for the test to inspect
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def _worker_ends(batcher) -> bool:
    """Whether the batcher's worker thread exits (it may still be on its last lap)."""
    worker = batcher._worker
    if worker is not None:
        worker.join(10)
    return batcher._worker is None


def test_batched_decoding_from_several_threads_gives_each_its_generate_ids_tokens(tiny_llama):
    from sekft.generate import Conversation, DecodeBatcher
    from sekft.model import KVCache

    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")
    layers = len(base.model.model.layers)
    prompts = [[1, 5, 9], list(range(2, 30)), [7] * 11, [3, 4]]
    stops = [frozenset(), frozenset({11}), frozenset(), frozenset()]
    lengths = [12, 12, 3, 20]
    expected = [generate_ids(base.model, p, s, n, GREEDY, torch.Generator())
                for p, s, n in zip(prompts, stops, lengths, strict=True)]
    batcher = DecodeBatcher(base.model)
    conversations = [Conversation([], KVCache(layers)) for _ in prompts]
    got = _in_threads([
        lambda i=i: batcher.generate(prompts[i], stops[i], lengths[i], GREEDY,
                                     torch.Generator(), conversations[i])
        for i in range(len(prompts))
    ])
    assert got == expected
    for prompt, out, conversation in zip(prompts, got, conversations, strict=True):
        assert conversation.ids == prompt + out[:-1]
        assert conversation.cache.length == len(conversation.ids)
    assert _worker_ends(batcher)  # gone once no work is left


def test_a_failed_batched_forward_reaches_every_waiting_caller(tiny_llama, monkeypatch):
    from sekft.generate import Conversation, DecodeBatcher
    from sekft.model import KVCache

    base = load_base(tiny_llama, dtype=torch.float32, device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (stand-in)")

    monkeypatch.setattr(base.model, "decode_hidden", broken)
    batcher = DecodeBatcher(base.model)
    layers = len(base.model.model.layers)
    got = _in_threads([
        lambda: batcher.generate([1, 2, 3], frozenset(), 5, GREEDY, torch.Generator(),
                                 Conversation([], KVCache(layers)))
        for _ in range(3)
    ])
    assert all(isinstance(e, RuntimeError) and "stand-in" in str(e) for e in got)
    assert _worker_ends(batcher)
    monkeypatch.undo()
    # The batcher is usable again afterwards: a fresh worker starts for the next call.
    assert batcher.generate([1, 2, 3], frozenset(), 2, GREEDY, torch.Generator(),
                            Conversation([], KVCache(layers))) == generate_ids(
        base.model, [1, 2, 3], frozenset(), 2, GREEDY, torch.Generator())


QWEN3 = Path(__file__).parent / "fixtures/templates/qwen3-0.6b/chat_template.jinja"


def test_a_qwen3_reply_is_the_command_after_its_empty_think_block():
    """Qwen3's template writes `<think>\\n\\n</think>\\n\\n` before the last reply: the command
    alone round-trips (the shell must not be sent the think block)."""
    template = ChatTemplate(QWEN3.read_text(encoding="utf-8"), {"eos_token": "<|im_end|>"})
    generated = "<think>\n\n</think>\n\nls -la<|im_end|>"
    assert reply_content(USER, generated, ["<|im_end|>"], template) == ("ls -la", None)
    # A think block with reasoning in it does not round-trip as the bare command: kept whole.
    thought = "<think>\nlook first\n</think>\n\nls<|im_end|>"
    content, violation = reply_content(USER, thought, ["<|im_end|>"], template)
    assert content.startswith("<think>") and violation is None
