"""`--endpoint` against servers that answer as the real ones do, not as our stand-in does:
reasoning parsers (vLLM, llama.cpp, Ollama, SGLang), think blocks left in the content, the
context-window refusals of vLLM (over its versions), SGLang, TGI and llama.cpp, busy and
loading servers, API keys, the URLs users paste, proxies, slow, chunked, gzip-encoded and
broken answers. Each server is a stand-in on 127.0.0.1 in a thread."""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest

from sekft.errors import ConfigError, ScenarioError
from sekft.eval import ContextExhausted, EpisodeConfig, main, run_suite
from sekft.generate import EndpointPolicy, Sampling, policies_from_args
from sekft.sandbox import find_bwrap

FIXTURES = Path(__file__).parent / "fixtures" / "scenarios"
USER = [{"role": "user", "content": "user@sandbox:~$ "}]
FAST = (0.01, 0.01)  # retry delays: the rule, not the wait


def chat(message: dict, finish: str = "stop", usage: bool = True) -> tuple[int, dict, bytes]:
    """A chat-completions answer with `message` as its only choice."""
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", **message},
                         "finish_reason": finish}]}
    if usage:
        body["usage"] = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    return 200, {}, json.dumps(body).encode()


def refuse(status: int, body: dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    return status, headers or {}, json.dumps(body).encode()


class _Server(BaseHTTPRequestHandler):
    """Answers each request with `self.server.answer(request_number, path, headers, body)`
    -> (status, headers, body bytes), or None to drop the connection unanswered; records
    (path, headers, JSON body) of each request in `self.server.seen`."""

    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._answer(body)

    def do_GET(self):
        self._answer(None)

    def _answer(self, body):
        seen = self.server.seen
        seen.append((self.path, dict(self.headers), body))
        answer = self.server.answer(len(seen), self.path, self.headers, body)
        if answer is None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status, headers, data = answer
        self.send_response(status)
        headers = {"Content-Type": "application/json", **headers}
        chunked = headers.pop("chunked", False)
        for key, value in headers.items():
            self.send_header(key, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 5):
                part = data[i:i + 5]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def serving(answer):
    """A server on 127.0.0.1 answering with `answer` (see _Server); yields it, with `url`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    server.answer, server.seen = answer, []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    # A short poll: shutdown() waits for serve_forever's next look (0.5 s by default).
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def always(answer):
    return lambda n, path, headers, body: answer


def ask(answer, messages=USER, **options):
    """One reply of an EndpointPolicy against a server answering `answer`; (reply, seen)."""
    with serving(answer) as server:
        options = {"retry_delays": FAST, "timeout": 10, **options}
        policy = EndpointPolicy(server.url, "m", options.pop("sampling", Sampling()), **options)
        return policy(messages), server.seen


# -- the reply: only the command reaches the shell ------------------------------------------

@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_taken_apart_by_the_server_is_not_the_command(field):
    # vLLM's qwen3 and deepseek_r1 parsers leave the newlines that followed </think>.
    reply, _ = ask(always(chat({"content": "\n\nls -la", field: "List the files."})))
    assert reply.content == "ls -la" and reply.tokens == 4


def test_reasoning_that_used_up_max_tokens_is_an_empty_reply():
    reply, _ = ask(always(chat({"content": None, "reasoning": "Let me think"}, "length")))
    assert reply.content == "" and reply.violation is None


@pytest.mark.parametrize("content, command", [
    ("<think>\nThe TODO first.\n</think>\n\ncat TODO", "cat TODO"),  # no reasoning parser
    ("The TODO first.\n</think>\n\ncat TODO", "cat TODO"),  # the template opened <think>
    ("<think>\n\n</think>\n\ncat TODO", "cat TODO"),  # Qwen3 with thinking off
    ("<think>\nThe TODO first, then", ""),  # max_tokens spent thinking: no command
])
def test_a_think_block_left_in_the_content_is_not_sent_to_the_shell(content, command):
    assert ask(always(chat({"content": content})))[0].content == command


def test_an_end_of_turn_token_left_as_text_ends_the_reply():
    # A server that does not stop at <|im_end|> writes the next turn on after it.
    content = "ls -la<|im_end|>\n<|im_start|>user\ntotal 0"
    assert ask(always(chat({"content": content})))[0].content == "ls -la"


@pytest.mark.parametrize("content, finish", [("ls -la\n", "stop"), ("cat fi", "length")])
def test_other_content_is_kept_as_generated(content, finish):
    # As the local policy keeps it: a trailing newline runs the same in bash, and a reply
    # cut at max_tokens is what the model managed.
    assert ask(always(chat({"content": content}, finish)))[0].content == content


def test_tool_calls_instead_of_content_are_an_empty_reply_with_the_reason_beside_it():
    call = {"id": "c1", "type": "function",
            "function": {"name": "bash", "arguments": "{\"command\": \"ls\"}"}}
    reply, _ = ask(always(chat({"content": None, "tool_calls": [call]}, "tool_calls")))
    assert reply.content == "" and "tool_calls" in reply.violation and "bash" in reply.violation


def test_an_answer_without_usage_counts_no_tokens():
    reply, _ = ask(always(chat({"content": "pwd"}, usage=False)))
    assert (reply.content, reply.tokens) == ("pwd", 0)


def test_greedy_requests_send_no_top_p_which_tgi_refuses_at_1():
    def tgi(n, path, headers, body):
        if body.get("top_p", 0.5) >= 1.0:
            return refuse(422, {"error": "Input validation error: `top_p` must be > 0.0 and "
                                         "< 1.0", "error_type": "validation"})
        return chat({"content": "pwd"})

    reply, seen = ask(tgi)
    assert reply.content == "pwd" and seen[0][2]["temperature"] == 0.0
    _, seen = ask(tgi, sampling=Sampling(temperature=0.7, top_p=0.9))
    assert seen[0][2]["top_p"] == 0.9


# -- the context window: refusals end the episode as the local policy's window does ---------

WINDOW, PROMPT = 2048, 1900  # 148 tokens left after the prompt, 256 asked for
PROMPT_PLUS_MAX_TOKENS = {
    "vllm-0.6": "This model's maximum context length is 2048 tokens. However, you requested "
                "2156 tokens (1900 in the messages, 256 in the completion). Please reduce the "
                "length of the messages or completion.",
    "vllm-0.10": "'max_tokens' or 'max_completion_tokens' is too large: 256. This model's "
                 "maximum context length is 2048 tokens and your request has 1900 input tokens "
                 "(256 > 2048 - 1900).",
    "vllm-new": "You passed 1900 input tokens and requested 256 output tokens. However, the "
                "model's context length is only 2048 tokens, resulting in a maximum input "
                "length of 1792 tokens. Please reduce the length of the input prompt. "
                "(parameter=input_tokens, value=1900)",
    "sglang": "Requested token count exceeds the model's maximum context length of 2048 "
              "tokens. You requested a total of 2156 tokens: 1900 tokens from the input "
              "messages and 256 tokens for the completion. Please reduce the number of tokens "
              "in the input messages or the completion to fit within the limit.",
    "tgi": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. "
           "Given: 1900 `inputs` tokens and 256 `max_new_tokens`",
}


@pytest.mark.parametrize("server", sorted(PROMPT_PLUS_MAX_TOKENS))
def test_a_prompt_that_fits_gets_the_tokens_left_when_prompt_plus_max_tokens_does_not(server):
    status = 422 if server == "tgi" else 400
    error = ({"error": PROMPT_PLUS_MAX_TOKENS[server], "error_type": "validation"}
             if server == "tgi" else
             {"error": {"message": PROMPT_PLUS_MAX_TOKENS[server], "type": "BadRequestError",
                        "param": None, "code": 400}})

    def answer(n, path, headers, body):
        if PROMPT + body["max_tokens"] > WINDOW:
            return refuse(status, error)
        return chat({"content": "exit"}, "stop")

    reply, seen = ask(answer)
    assert reply.content == "exit"
    assert [s[2]["max_tokens"] for s in seen] == [256, WINDOW - PROMPT]


@pytest.mark.parametrize("status, message", [
    (400, "request (4476 tokens) exceeds the available context size (4096 tokens), try "
          "increasing it"),  # llama.cpp
    (400, "the request exceeds the available context size, try increasing it"),  # older
    (400, "The decoder prompt (length 4476) is longer than the maximum model length of "
          "4096. Make sure that `max_model_len` is no smaller than the number of text "
          "tokens."),  # vLLM v1: no word "context"
    (400, "The input (4476 tokens) is longer than the model's context length (4096 "
          "tokens)."),  # SGLang
    (422, "Input validation error: `inputs` must have less than 4000 tokens. Given: 4476"),
])
def test_a_prompt_that_does_not_fit_ends_the_episode_at_once(status, message):
    with pytest.raises(ContextExhausted):
        ask(always(refuse(status, {"error": {"code": status, "message": message}})))


def test_a_second_refusal_after_asking_for_the_tokens_left_ends_the_episode():
    # A prompt count that is a lower bound ("at least") can be short by a few tokens.
    message = ("This model's maximum context length is 2048 tokens. However, you requested "
               "256 output tokens and your prompt contains at least 1900 input tokens, for a "
               "total of at least 2156 tokens.")
    with serving(always(refuse(400, {"error": {"message": message}}))) as server:
        policy = EndpointPolicy(server.url, "m", Sampling(), retry_delays=FAST)
        with pytest.raises(ContextExhausted):
            policy(USER)
        assert [s[2]["max_tokens"] for s in server.seen] == [256, 148]


# -- refusals: transient ones retried, the rest fail the run in one line --------------------

@pytest.mark.parametrize("status, body", [
    (503, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
    (429, {"error": "Model is overloaded", "error_type": "overloaded"}),
    (502, {"error": "Bad Gateway"}),
])
def test_a_busy_or_loading_server_is_asked_again(status, body):
    def answer(n, path, headers, request):
        return refuse(status, body) if n <= 2 else chat({"content": "pwd"})

    reply, seen = ask(answer)
    assert reply.content == "pwd" and len(seen) == 3


def test_a_server_busy_past_the_retries_fails_the_run_with_its_message():
    with pytest.raises(ConfigError, match=r"HTTP 503: Loading model \(still, after 3 "):
        ask(always(refuse(503, {"error": {"message": "Loading model"}})))


def test_a_server_error_fails_the_run_at_once():
    with serving(always(refuse(500, {"object": "error", "message": "EngineCore died",
                                     "type": "InternalServerError", "code": 500}))) as server:
        with pytest.raises(ConfigError, match="HTTP 500: EngineCore died$"):
            EndpointPolicy(server.url, "m", Sampling(), retry_delays=FAST)(USER)
        assert len(server.seen) == 1


def test_an_unknown_model_fails_the_run_naming_the_served_ones():
    def answer(n, path, headers, body):
        if path == "/v1/models":
            return 200, {}, json.dumps({"object": "list", "data": [
                {"id": "Qwen/Qwen3-8B", "object": "model"},
                {"id": "adapter", "object": "model"}]}).encode()
        return refuse(404, {"error": {"message": "The model `adaptr` does not exist.",
                                      "type": "NotFoundError", "param": "model", "code": 404}})

    with serving(answer) as server:
        with pytest.raises(ConfigError, match="does not exist; it serves Qwen/Qwen3-8B, "
                                              "adapter: give one as --model"):
            EndpointPolicy(server.url, "adaptr", Sampling())(USER)


def _namespace(url: str) -> argparse.Namespace:
    return argparse.Namespace(endpoint=url, model="m", baseline=False, baseline_model=None,
                              temperature=0.0, top_p=1.0, max_new_tokens=16, seed=0,
                              template_var=[])


def test_a_server_with_an_api_key_gets_the_one_in_sekft_api_key(monkeypatch):
    def answer(n, path, headers, body):
        if headers.get("Authorization") != "Bearer token-abc123":
            return refuse(401, {"error": "Unauthorized"})
        return chat({"content": "pwd"})

    with serving(answer) as server:
        monkeypatch.delenv("SEKFT_API_KEY", raising=False)
        with pytest.raises(ConfigError, match="HTTP 401: Unauthorized; it wants an API key: "
                                              "set SEKFT_API_KEY"):
            policies_from_args(_namespace(server.url))["m"](USER)
        monkeypatch.setenv("SEKFT_API_KEY", "token-abc123")
        assert policies_from_args(_namespace(server.url))["m"](USER).content == "pwd"
        monkeypatch.setenv("SEKFT_API_KEY", "wrong")
        with pytest.raises(ConfigError, match="refused the key in SEKFT_API_KEY"):
            policies_from_args(_namespace(server.url))["m"](USER)


# -- reaching the server ---------------------------------------------------------------------

@pytest.mark.parametrize("tail", ["", "/", "/v1", "/v1/", "/v1/chat/completions", "/ "])
def test_every_way_users_paste_a_base_url_reaches_chat_completions(tail):
    with serving(always(chat({"content": "pwd"}))) as server:
        EndpointPolicy(" " + server.url + tail, "m", Sampling())(USER)
        assert server.seen[0][0] == "/v1/chat/completions"


def test_a_url_without_its_scheme_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="give the server's URL, such as http://"):
        EndpointPolicy("localhost:8000", "m", Sampling())


def test_several_urls_may_be_written_with_spaces_after_the_commas():
    with serving(always(chat({"content": "pwd"}))) as a, \
            serving(always(chat({"content": "ls"}))) as b:
        pool = policies_from_args(_namespace(f"{a.url}, {b.url}"))["m"]
        assert [server(USER).content for server in pool.servers] == ["pwd", "ls"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "0.0.0.0"])
def test_a_server_on_this_machine_is_not_reached_through_http_proxy(monkeypatch, host):
    # urllib would send even 127.0.0.1 through the proxy when NO_PROXY does not name it.
    with serving(always(refuse(502, {"error": "proxy: upstream unreachable"}))) as proxy, \
            serving(always(chat({"content": "pwd"}))) as server:
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("http_proxy", proxy.url)
        port = server.server_address[1]
        assert EndpointPolicy(f"http://{host}:{port}", "m", Sampling(),
                              retry_delays=FAST)(USER).content == "pwd"
        assert proxy.seen == []
        # A remote server still goes through the proxy, which answers for it here.
        proxy.answer = always(chat({"content": "via proxy"}))
        remote = EndpointPolicy("http://gpu0.invalid:8000", "m", Sampling())
        assert remote(USER).content == "via proxy"
        assert proxy.seen[-1][0] == "http://gpu0.invalid:8000/v1/chat/completions"


def test_a_slow_first_answer_is_waited_for_and_a_silent_server_fails_the_run():
    def slow(n, path, headers, body):
        time.sleep(1.0)
        return chat({"content": "pwd"})

    assert ask(slow, timeout=5)[0].content == "pwd"
    with serving(slow) as server:
        started = time.monotonic()
        with pytest.raises(ConfigError, match="no answer within 0.3 s"):
            EndpointPolicy(server.url, "m", Sampling(), timeout=0.3, retry_delays=FAST)(USER)
        assert time.monotonic() - started < 1.0 and len(server.seen) == 1


def test_a_server_not_running_fails_the_run_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the server"):
        EndpointPolicy(f"http://127.0.0.1:{port}", "m", Sampling())(USER)
    assert time.monotonic() - started < 1.0


def test_a_connection_dropped_by_a_server_that_answered_before_is_retried():
    def answer(n, path, headers, body):
        return None if n == 2 else chat({"content": f"echo {n}"})

    with serving(answer) as server:
        policy = EndpointPolicy(server.url, "m", Sampling(), retry_delays=FAST)
        assert [policy(USER).content for _ in range(2)] == ["echo 1", "echo 3"]


# -- how the answer comes: chunked, compressed, broken ---------------------------------------

def test_a_chunked_gzip_encoded_answer_is_read():
    _, _, data = chat({"content": "pwd"})
    answer = (200, {"Content-Encoding": "gzip", "chunked": True}, gzip.compress(data))
    assert ask(always(answer))[0].content == "pwd"


def test_bytes_that_are_not_utf8_become_replacement_characters():
    _, _, data = chat({"content": "echo AB"})
    reply, _ = ask(always((200, {}, data.replace(b"AB", b"\xff\xfe"))))
    assert reply.content == "echo \ufffd\ufffd"


def test_a_lone_surrogate_in_the_json_cannot_break_the_transcripts():
    _, _, data = chat({"content": "echo X"})
    reply, _ = ask(always((200, {}, data.replace(b"X", b"\\ud800"))))
    assert reply.content == "echo ?"
    reply.content.encode("utf-8")  # transcripts.jsonl is written as UTF-8


def test_an_answer_that_is_not_json_fails_the_run_quoting_it():
    with pytest.raises(ConfigError, match="not a JSON answer: '<html>Bad Gateway"):
        ask(always((200, {"Content-Type": "text/html"}, b"<html>Bad Gateway</html>")))


# -- a whole sekft-eval run --------------------------------------------------------------------

SCRIPT = ["cat TODO", "echo ok > done", "exit"]


@pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
def test_sekft_eval_through_a_loading_reasoning_server_with_a_key(tmp_path, monkeypatch):
    """A Qwen3 behind vLLM with --reasoning-parser and --api-key, still loading at first:
    the shell gets the commands only, the transcripts hold them, the notes task passes."""

    def answer(n, path, headers, body):
        if headers.get("Authorization") != "Bearer k":
            return refuse(401, {"error": "Unauthorized"})
        if n == 1:
            return refuse(503, {"error": {"message": "Loading model"}})
        turn = sum(m["role"] == "assistant" for m in body["messages"])
        command = SCRIPT[turn] if turn < len(SCRIPT) else "exit"
        if turn % 2:  # no parser: the think block stays in the content
            return chat({"content": f"<think>\nNext: {command}\n</think>\n\n{command}"})
        return chat({"content": f"\n\n{command}", "reasoning": f"Next: {command}"})

    scenarios = shutil.copytree(FIXTURES / "write-done", tmp_path / "suite" / "write-done")
    monkeypatch.setenv("SEKFT_API_KEY", "k")
    with serving(answer) as server:
        assert main(["--endpoint", server.url + "/v1/", "--model", "m", "--scenarios",
                     str(scenarios.parent), "--out", str(tmp_path / "out")]) == 0
    [transcript] = [json.loads(line) for line in
                    (tmp_path / "out" / "transcripts.jsonl").read_text().splitlines()]
    assert [m["content"] for m in transcript["messages"] if m["role"] == "assistant"] == SCRIPT
    assert transcript["passed"] and transcript["ending"] == "exit"
    assert transcript["tokens"] == 4 * len(SCRIPT)


def test_a_server_refusing_for_good_ends_the_suite_without_running_the_queued_episodes():
    started = []

    def make_policy(scenario):
        started.append(scenario.id)
        if scenario.id == "s0":
            raise ConfigError("--endpoint ...: HTTP 500: EngineCore died")
        time.sleep(0.1)  # an episode that ends on its own (a scenario error, no sandbox)
        raise ScenarioError("setup.sh exited 1")

    scenarios = [SimpleNamespace(id=f"s{i}", family="f", split="heldout", expect="exit")
                 for i in range(12)]
    with pytest.raises(ConfigError, match="EngineCore died"):
        run_suite(scenarios, make_policy, EpisodeConfig(), jobs=2)
    assert len(started) < 6  # not all 12: the queued episodes are cancelled (Executor.map)


class _Terminal(StringIO):
    def isatty(self):
        return True


@pytest.mark.skipif(find_bwrap() is None, reason="needs bubblewrap")
def test_an_endpoint_error_is_its_own_line_after_the_live_line(tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with serving(always(refuse(404, {"error": {"message": "model not found"}}))) as server:
        assert main(["--endpoint", server.url, "--model", "m", "--scenarios", str(FIXTURES),
                     "--out", str(tmp_path / "out")]) == 1
    assert "\nsekft-eval: error: --endpoint" in terminal.getvalue()
    assert "HTTP 404: model not found" in terminal.getvalue()


def test_template_vars_go_to_the_server_as_chat_template_kwargs():
    """--template-var renders training; a server must render serving with the same."""
    _, seen = ask(always(chat({"content": "ls"})), template_vars={"enable_thinking": False})
    assert seen[0][2]["chat_template_kwargs"] == {"enable_thinking": False}
    _, seen = ask(always(chat({"content": "ls"})))
    assert "chat_template_kwargs" not in seen[0][2]


def test_sekft_eval_template_vars_reach_the_endpoint_and_the_local_template(tiny_llama):
    import argparse

    from sekft.base import load_base
    from sekft.eval import parse_args
    from sekft.generate import model_policies, policies_from_args

    args = parse_args(["--endpoint", "http://127.0.0.1:9", "--model", "m", "--scenarios", "s",
                       "--out", "o", "--template-var", "enable_thinking=false"])
    (pool,) = policies_from_args(args).values()
    assert pool.servers[0].template_vars == {"enable_thinking": False}
    local = argparse.Namespace(**{**vars(args), "adapter": None, "baseline": False})
    (policy,) = model_policies(load_base(tiny_llama, device="cpu"), local).values()
    assert policy.template.variables == {"enable_thinking": False}
