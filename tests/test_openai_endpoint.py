"""The OpenAI-compatible edge endpoint, driven by the real ``openai`` client.

A cloud (bundled pair's target) and the edge server (uvicorn on a thread) run in this
process on loopback; references are the target's own greedy decoding, computed without a
KV cache and without PipeSD. Every server start and stop has a deadline.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client import CollectorRegistry, Counter

from pipesd import zoo
from pipesd.cloud import CloudConfig, CloudServer
from pipesd.edge import EdgeClient
from pipesd.serving import create_app, start_in_thread
from pipesd.serving.schemas import ChatMessage
from pipesd.serving.text import FALLBACK_STOP, StopCutter, encode_text, render_chat, tokens_for_chars
from runtime_helpers import reference_greedy, running_server

torch.set_num_threads(1)

MODEL = "stdlib-code"
N = 20  # max_tokens of most requests: small keeps the file fast
PROMPTS = ["def read_config(path):\n", "import os\nimport sys\n\n\ndef main():\n"]


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair(threads=1)


@pytest.fixture(scope="module")
def tok(pair):
    return pair.draft.tokenizer


@pytest.fixture(scope="module")
def greedy(pair, tok):
    """Target-only greedy text for a prompt: ``greedy(prompt_text, n) -> (text, ids, prompt_ids)``."""
    cache = {}

    def ref(prompt: str, n: int = N):
        if (prompt, n) not in cache:
            ids = encode_text(tok, prompt)
            out = reference_greedy(pair.target.model, ids, n)
            if tok.eos_token_id in out:
                out = out[: out.index(tok.eos_token_id) + 1]
            cache[(prompt, n)] = (tok.decode(out, skip_special_tokens=True), out, ids)
        return cache[(prompt, n)]

    return ref


@pytest.fixture(scope="module")
def cloud(pair):
    with running_server(pair.target) as (srv, url):
        yield url


class _Metrics:
    """The metrics hook's contract: ``observe_generation(gen)`` and a prometheus ``registry``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter("edge_test_tokens", "generated tokens", registry=self.registry)
        self.seen = []

    def observe_generation(self, gen) -> None:
        self.seen.append(gen)
        self.tokens.inc(gen.stats.new_tokens)


@pytest.fixture(scope="module")
def metrics():
    return _Metrics()


@pytest.fixture(scope="module")
def server(pair, cloud, metrics):
    client = EdgeClient(cloud, pair.draft)
    app = create_app(client, model_name=MODEL, tokenizer=pair.draft.tokenizer, default_method="pipesd",
                     metrics=metrics, max_tokens_limit=64)
    st = start_in_thread(app, timeout_s=30)
    try:
        yield st
    finally:
        st.stop(timeout_s=15)
        client.close()


@pytest.fixture(scope="module")
def oc(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def _complete(oc, prompt, **kw):
    kw.setdefault("max_tokens", N)
    kw.setdefault("temperature", 0)
    return oc.completions.create(model=MODEL, prompt=prompt, **kw)


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, chunks


# ---------------------------------------------------------------------------- unit: text helpers
def test_stop_cutter_does_not_depend_on_how_text_is_split():
    text = "alpha beta\nUser: gamma abcd"
    for stops, want in [(["beta"], "alpha "), (["\nUser:"], "alpha beta"), (["zzz"], text),
                        (["abcd", "bc"], "alpha beta\nUser: gamma a"),  # "bc" completes first
                        (["ta\nU", "a b"], "alph")]:
        for size in (1, 2, 3, 7, len(text)):
            c = StopCutter(stops)
            out = "".join(c.feed(text[i: i + size]) for i in range(0, len(text), size)) + c.flush()
            assert out == want, (stops, size)
            assert c.stopped == (want != text)


def test_stop_cutter_holds_back_a_possible_stop_prefix():
    c = StopCutter(["\nUser:"])
    assert c.feed("hello\nUs") == "hello"  # "\nUs" may become the stop string
    assert c.feed("eful") == "\nUseful"
    assert c.flush() == ""


def test_fallback_chat_template_is_documented_format(tok):
    assert not getattr(tok, "chat_template", None)  # the bundled tokenizer has none
    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="hi"),
            ChatMessage(role="assistant", content="hello"),
            ChatMessage(role="user", content=[{"type": "text", "text": "more"}])]
    text, fallback = render_chat(tok, msgs)
    assert fallback
    assert text == "System: Be brief.\nUser: hi\nAssistant: hello\nUser: more\nAssistant:"


def test_chat_template_of_the_tokenizer_is_used():
    t = zoo.load_tokenizer()
    t.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                       "{% if add_generation_prompt %}<assistant>{% endif %}")
    text, fallback = render_chat(t, [ChatMessage(role="user", content="hi")])
    assert not fallback and text == "<user>hi</user><assistant>"
    # An explicit template wins over the tokenizer's.
    text, _ = render_chat(t, [ChatMessage(role="user", content="hi")], chat_template="[{{ messages[0]['content'] }}]")
    assert text == "[hi]"


def test_tokens_for_chars_counts_up_to_the_stop(tok):
    ids = encode_text(tok, "def read_config(path):\n    return path")
    full = tok.decode(ids)
    for n_chars in (1, 5, len(full) // 2, len(full)):
        k = tokens_for_chars(tok, ids, n_chars)
        assert len(tok.decode(ids[:k])) >= n_chars > len(tok.decode(ids[: k - 1]))


# ---------------------------------------------------------------------------- live endpoint
def test_models_and_health(oc, server):
    models = oc.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert oc.models.retrieve(MODEL).id == MODEL
    h = httpx.get(server.url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["cloud_connected"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_target_greedy_with_usage(oc, greedy, prompt):
    want, ids, prompt_ids = greedy(prompt)
    r = _complete(oc, prompt)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == ("stop" if len(ids) < N else "length")
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.total_tokens == len(prompt_ids) + len(ids)
    stats = r.model_extra["pipesd"]
    assert stats["method"] == "pipesd" and stats["new_tokens"] == len(ids) and stats["verifications"] >= 1


def test_streaming_equals_non_streaming(oc, greedy):
    want, ids, prompt_ids = greedy(PROMPTS[0])
    stream = _complete(oc, PROMPTS[0], stream=True, stream_options={"include_usage": True})
    text, chunks = _stream_text(stream)
    assert text == want
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert len(reasons) > 2  # it really streamed pieces
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), len(ids))


@pytest.mark.parametrize("method,canonical", [("vanilla-sd", "vanilla-sd"), ("cloud-stream", "cloud-stream"),
                                              ("target-only", "target-per-token")])  # a deprecated alias
def test_method_extension(oc, greedy, method, canonical):
    want, _, _ = greedy(PROMPTS[1])
    r = _complete(oc, PROMPTS[1], extra_body={"pipesd": {"method": method}})
    assert r.choices[0].text == want
    assert r.model_extra["pipesd"]["method"] == canonical


def test_chat_completions_both_ways(oc, greedy):
    msgs = [{"role": "user", "content": "write a function"}]
    prompt = "User: write a function\nAssistant:"  # the fallback template
    want, _, prompt_ids = greedy(prompt)
    want = want.split(FALLBACK_STOP)[0]
    r = oc.chat.completions.create(model=MODEL, messages=msgs, max_tokens=N, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(prompt_ids)
    chunks = list(oc.chat.completions.create(model=MODEL, messages=msgs, max_tokens=N, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings(oc, greedy, tok):
    want, ids, _ = greedy(PROMPTS[0])
    stop = want[8:11]  # a few characters from the middle of the greedy text
    cut = want.index(stop)
    r = _complete(oc, PROMPTS[0], stop=[stop, "never appears"])
    assert r.choices[0].text == want[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == tokens_for_chars(tok, ids, cut + len(stop)) < len(ids)
    text, chunks = _stream_text(_complete(oc, PROMPTS[0], stop=stop, stream=True))
    assert text == want[:cut] and chunks[-1].choices[0].finish_reason == "stop"
    r = _complete(oc, PROMPTS[0], stop="never appears")
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"


def test_echo_and_token_prompts(oc, greedy):
    want, _, prompt_ids = greedy(PROMPTS[0])
    r = _complete(oc, PROMPTS[0], echo=True)
    assert r.choices[0].text == PROMPTS[0] + want
    r = _complete(oc, prompt_ids)  # a prompt of token ids
    assert r.choices[0].text == want and r.usage.prompt_tokens == len(prompt_ids)


def test_seeded_sampling_reproduces(oc):
    # Bit-reproducible for the serial methods; pipelined runs are distributed exactly as the
    # target's, but where segments end depends on timing (as OpenAI: seed is best effort).
    kw = dict(temperature=0.9, top_p=0.95, seed=11, max_tokens=12, extra_body={"pipesd": {"method": "vanilla-sd"}})
    a = _complete(oc, PROMPTS[0], **kw)
    b = _complete(oc, PROMPTS[0], **kw)
    assert a.choices[0].text == b.choices[0].text and a.usage.completion_tokens >= 1


def test_errors_in_openai_shape(oc, server):
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        _complete(oc, "x", n=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        oc.completions.create(model="gpt-nothing", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="at most 64"):
        _complete(oc, "x", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        _complete(oc, "x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        _complete(oc, "x", logprobs=2)
    with pytest.raises(openai.BadRequestError, match="pipesd.method"):
        _complete(oc, "x", extra_body={"pipesd": {"method": "magic"}})
    with pytest.raises(openai.BadRequestError, match="role"):
        oc.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}], max_tokens=4)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL}, timeout=10)  # no prompt
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] is None  # not the parse position
    assert "could not parse the JSON body" in r.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/nothing", timeout=10).json()["error"]["type"] == "not_found_error"


def test_a_request_without_model_is_refused_as_openai_does(server):
    for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})):
        r = httpx.post(server.url + path, json=body, timeout=10)
        assert r.status_code == 400, r.text
        assert r.json()["error"] == {"message": "you must provide a model parameter", "type": "invalid_request_error",
                                     "param": "model", "code": None}


def test_text_that_is_not_unicode_is_a_400_not_a_500(server):
    """JSON can carry a lone surrogate ("\\ud800"), which has no UTF-8 form; the tokenizer would crash."""
    for path, body, param in (
            ("/v1/completions", b'{"model": "%s", "prompt": "\\ud800abc", "max_tokens": 2}', "prompt"),
            ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "a\\udfffb"}], '
                                     b'"max_tokens": 2}', "messages")):
        r = httpx.post(server.url + path, content=body % MODEL.encode(), timeout=10,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and "surrogate" in err["message"] and err["type"] == "invalid_request_error"
    assert _complete(openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0), "x").choices  # still serving


def test_concurrent_requests_are_not_mixed(server, greedy):
    """Requests at once are served one after another; each gets its own text."""
    results, errors = {}, []

    def one(i: int, prompt: str) -> None:
        try:
            c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
            if i % 2 == 0:
                results[i] = _complete(c, prompt).choices[0].text
            else:
                results[i] = _stream_text(_complete(c, prompt, stream=True))[0]
        except Exception as e:  # reported below
            errors.append(e)

    jobs = [(i, PROMPTS[i % 2]) for i in range(4)]
    threads = [threading.Thread(target=one, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors and len(results) == 4
    for i, prompt in jobs:
        assert results[i] == greedy(prompt)[0]


def test_client_hanging_up_mid_stream_does_not_disturb_the_next_request(server, oc, greedy):
    body = {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": 48, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first.startswith("data: {")
    # The abandoned generation is cancelled (tests/test_cancel.py checks that); the next one is exact.
    assert _complete(oc, PROMPTS[0]).choices[0].text == greedy(PROMPTS[0])[0]


def test_metrics_hook(server, metrics):
    before = len(metrics.seen)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4,
                                                         "temperature": 0}, timeout=60)
    assert r.status_code == 200
    deadline = time.monotonic() + 10  # observed by the generation thread
    while len(metrics.seen) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(metrics.seen) > before
    m = httpx.get(server.url + "/metrics", timeout=10)
    assert m.status_code == 200 and "edge_test_tokens_total" in m.text


def test_cloud_loss_is_503_and_the_server_reconnects(pair, greedy):
    """The cloud goes away: 503 (never a hang); it comes back on its port: served again."""
    srv = CloudServer(pair.target, CloudConfig(port=0))
    host, port = srv.start_in_thread()
    url = f"{host}:{port}"
    client = EdgeClient(url, pair.draft)
    app = create_app(client, model_name=MODEL, connect=lambda: EdgeClient(url, pair.draft, connect_timeout_s=5))
    srv2 = None
    try:
        with start_in_thread(app, timeout_s=30) as st:
            c = openai.OpenAI(base_url=st.url + "/v1", api_key="x", max_retries=0, timeout=60)
            assert _complete(c, PROMPTS[0], max_tokens=6).usage.completion_tokens == 6
            srv.stop()
            deadline = time.monotonic() + 10
            while not client.conn.closed and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(openai.APIStatusError) as ei:
                _complete(c, PROMPTS[0], max_tokens=6)
            assert ei.value.status_code == 503
            assert httpx.get(st.url + "/health", timeout=30).status_code == 503
            srv2 = CloudServer(pair.target, CloudConfig(port=port))
            srv2.start_in_thread()
            r = _complete(c, PROMPTS[0], max_tokens=N)
            assert r.choices[0].text == greedy(PROMPTS[0])[0]
            assert httpx.get(st.url + "/health", timeout=30).status_code == 200
    finally:
        app.state.backend.close()
        srv.stop()  # idempotent
        if srv2 is not None:
            srv2.stop()


# ---------------------------------------------------------------------------- CLI
def test_cli_edge_server_end_to_end(cloud, greedy):
    port_file = Path(tempfile.mkdtemp(prefix="pipesd-edge-")) / "port"
    cmd = [sys.executable, "-m", "pipesd", "edge-server", "--cloud", cloud, "--port", "0", "--threads", "1",
           "--port-file", str(port_file), "--default-temperature", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PIPESD_AUTH_TOKEN="")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"edge-server exited early:\n{proc.stderr.read()}"
            assert time.monotonic() < deadline, "edge-server did not start within 120 s"
            time.sleep(0.1)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        assert httpx.get(base + "/health", timeout=10).json()["status"] == "ok"
        r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": N},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy(PROMPTS[0])[0]
        m = httpx.get(base + "/metrics", timeout=10)  # pipesd.metrics.EdgeMetrics, wired by the CLI
        assert m.status_code == 200 and "pipesd_edge_tokens_total" in m.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
    assert "edge server (OpenAI API) at http://127.0.0.1:" in out
    assert proc.returncode == 0, err
