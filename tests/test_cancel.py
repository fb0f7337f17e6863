"""Cancelling a generation (issue 16, item 5).

``EdgeClient``: a ``cancel`` event, or closing the stream, ends a run early with what was
verified (a prefix of the target's greedy output), ``finish_reason`` ``"cancelled"``; the
cloud session is closed at once and the client serves the next generation exactly. The edge
server cancels the generation of a client that hung up and of a request a stop string ended,
so the next request does not wait for it.

The cloud pads each verification (``verify_pad_s``) so that an uncancelled run of ``LONG``
tokens would take seconds: a run that ends with fewer tokens was cancelled, not finished.
"""
from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch

from pipesd import zoo
from pipesd.edge import EdgeClient, EdgeConfig
from pipesd.serving import create_app, start_in_thread
from pipesd.serving.text import encode_text
from runtime_helpers import reference_greedy, running_server, tiny_pair, wait_until

torch.set_num_threads(1)

PROMPT = [3, 1, 4, 1, 5]
LONG = 300  # tokens asked of a run that is cancelled
CUT = 12  # verified tokens seen before the cancel
METHODS = ("pipesd", "vanilla-sd", "cloud-stream")




@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def cloud(pair):
    with running_server(pair[1], verify_pad_s=0.02) as s:
        yield s


def _ids(text: str) -> list[int]:
    """The tiny pair has no tokenizer: its text is the ids, space-separated."""
    return [int(t) for t in text.split()]


# ---------------------------------------------------------------------------- EdgeClient
@pytest.mark.parametrize("method", METHODS)
def test_cancel_event_ends_the_run_with_a_prefix_of_the_greedy_output(pair, cloud, method):
    srv, url = cloud
    cancel = threading.Event()
    with EdgeClient(url, pair[0], EdgeConfig.for_method(method)) as c:
        text = ""
        for piece in c.stream(PROMPT, LONG, cancel=cancel):
            text += piece
            if len(_ids(text)) >= CUT:
                cancel.set()
        gen = c.last_generation
        assert gen.finish_reason == "cancelled"
        assert CUT <= len(gen.token_ids) < LONG
        assert gen.token_ids == reference_greedy(pair[2], PROMPT, len(gen.token_ids))  # lossless prefix
        assert _ids(text) == gen.token_ids  # the stream showed exactly what was verified
        assert wait_until(lambda: srv.stats.sessions_open == 0), "the cloud session was not closed"
        # The client is ready at once, and late verdicts of the cancelled session change nothing.
        assert c.generate(PROMPT, 20).token_ids == reference_greedy(pair[2], PROMPT, 20)


@pytest.mark.parametrize("method", METHODS)
def test_closing_the_stream_cancels_the_generation(pair, cloud, method):
    srv, url = cloud
    with EdgeClient(url, pair[0], EdgeConfig.for_method(method)) as c:
        it = c.stream_events(PROMPT, LONG)
        first = next(it)
        assert first.kind == "verified"
        it.close()  # returns once the run has ended and its session is closed
        gen = c.last_generation
        assert gen.finish_reason == "cancelled" and 1 <= len(gen.token_ids) < LONG
        assert gen.token_ids == reference_greedy(pair[2], PROMPT, len(gen.token_ids))
        assert wait_until(lambda: srv.stats.sessions_open == 0)
        assert c.generate([7, 8], 10).token_ids == reference_greedy(pair[2], [7, 8], 10)


def test_cancel_from_another_thread_stops_generate(pair, cloud):
    """``generate(cancel=)`` set by a timer: drafting alone takes 10 ms a token, so LONG
    tokens would take seconds; the timer fires long before."""
    srv, url = cloud
    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    with EdgeClient(url, pair[0], EdgeConfig.for_method("pipesd", draft_step_s=0.01)) as c:
        timer.start()
        gen = c.generate(PROMPT, LONG, cancel=cancel)
        timer.cancel()
        assert gen.finish_reason == "cancelled" and len(gen.token_ids) < LONG
        assert gen.token_ids == reference_greedy(pair[2], PROMPT, len(gen.token_ids))


def test_a_cancel_set_before_the_start_asks_nothing_of_the_cloud(pair, cloud):
    srv, url = cloud
    cancel = threading.Event()
    cancel.set()
    with EdgeClient(url, pair[0]) as c:
        opened = srv.stats.sessions_opened
        gen = c.generate(PROMPT, LONG, cancel=cancel)
        assert (gen.finish_reason, gen.token_ids) == ("cancelled", [])
        assert srv.stats.sessions_opened == opened


# ---------------------------------------------------------------------------- edge server
MODEL = "stdlib-code"
PROMPT_TEXT = "import os\nimport sys\n\n\ndef main():\n"
MAX = 1024  # the long request: at 5 ms a draft, many seconds if it ran to the end


class _Seen:
    """The metrics hook: every Generation the server finished, cancelled ones included."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.gens: list = []

    def observe_generation(self, gen) -> None:
        self.gens.append(gen)


@pytest.fixture(scope="module")
def bundled():
    return zoo.load_pair(threads=1)


@pytest.fixture(scope="module")
def edge(bundled):
    with running_server(bundled.target, verify_pad_s=0.01) as (srv, url):
        client = EdgeClient(url, bundled.draft)
        seen = _Seen()
        app = create_app(client, model_name=MODEL, metrics=seen, max_tokens_limit=MAX, default_temperature=0,
                         config=EdgeConfig.for_method("pipesd", draft_step_s=0.005))
        try:
            with start_in_thread(app, timeout_s=30) as st:
                yield st.url, srv, seen, app.state.backend
        finally:
            client.close()


@pytest.fixture(scope="module")
def greedy(bundled):
    tok = bundled.draft.tokenizer
    ids = encode_text(tok, PROMPT_TEXT)

    def ref(n: int) -> list[int]:
        return reference_greedy(bundled.target.model, ids, n)

    return ref


def _last_cancelled(seen: _Seen, before: int):
    assert wait_until(lambda: len(seen.gens) > before, 30), "the server finished no generation"
    return seen.gens[before]


def test_a_client_that_hangs_up_mid_stream_cancels_its_generation(edge, greedy, bundled):
    url, srv, seen, backend = edge
    before, cancelled = len(seen.gens), backend.cancelled
    body = {"model": MODEL, "prompt": PROMPT_TEXT, "max_tokens": MAX, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
    # httpx closed the socket (the body was not read to the end). The next request is served
    # once the cut one has ended, which it does at its next draft step or verdict.
    short = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT_TEXT, "max_tokens": 8},
                       timeout=60)
    assert short.status_code == 200
    assert short.json()["choices"][0]["text"] == bundled.draft.tokenizer.decode(greedy(8), skip_special_tokens=True)
    gen = _last_cancelled(seen, before)
    assert gen.finish_reason == "cancelled" and len(gen.token_ids) < MAX
    assert gen.token_ids == greedy(len(gen.token_ids))  # what it verified before the cut was exact
    assert backend.cancelled == cancelled + 1
    assert httpx.get(url + "/health", timeout=10).json()["cancelled"] == backend.cancelled
    assert wait_until(lambda: srv.stats.sessions_open == 0)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_cancels_the_rest_of_the_generation(edge, greedy, bundled, stream):
    url, srv, seen, backend = edge
    tok = bundled.draft.tokenizer
    text = tok.decode(greedy(24), skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    want = text[: text.index(stop)]
    before = len(seen.gens)
    body = {"model": MODEL, "prompt": PROMPT_TEXT, "max_tokens": MAX, "stop": stop, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
        got, usage = "", None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    got += "".join(c["text"] for c in chunk["choices"])
                    usage = chunk.get("usage") or usage
    else:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got, usage = r.json()["choices"][0]["text"], r.json()["usage"]
    assert got == want
    assert 0 < usage["completion_tokens"] <= 24
    gen = _last_cancelled(seen, before)
    assert gen.finish_reason == "cancelled" and len(gen.token_ids) < MAX
    assert gen.token_ids == greedy(len(gen.token_ids))


def test_a_non_streaming_client_that_hangs_up_cancels_its_generation(edge):
    url, srv, seen, backend = edge
    before = len(seen.gens)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s: its socket closes
        httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT_TEXT, "max_tokens": MAX},
                   timeout=httpx.Timeout(60, read=1.0))
    gen = _last_cancelled(seen, before)
    assert gen.finish_reason == "cancelled" and len(gen.token_ids) < MAX
