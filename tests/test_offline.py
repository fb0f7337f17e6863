"""Offline robustness of the edge (issue 7): the cloud dies, stalls, and comes back.

Fault injection on loopback: a CloudServer runs in-thread on a fixed port, so it can be
stopped and a new one started on the same port. The draft is wrapped so the test decides at
which draft step the cloud goes away and comes back (no timing luck). Every wait has a deadline.
"""
from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from pipesd.cloud import CloudConfig, CloudServer
from pipesd.edge import CloudUnavailableError, EdgeClient, EdgeConfig, StreamEvent
from pipesd.edge.offline import Backoff, EventText, Reconnector
from pipesd.sampling import SamplingParams

from runtime_helpers import reference_greedy, tiny_pair

torch.set_num_threads(1)

PROMPT = [5, 9, 11, 13]
N_NEW = 40
FAST = dict(reconnect_initial_s=0.02, reconnect_max_s=0.1, verdict_timeout_s=10.0)


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def ref(pair):
    return reference_greedy(pair[2], PROMPT, N_NEW)


@pytest.fixture(scope="module")
def draft_ref(pair):
    """The draft's own greedy continuation: what the edge produces with the cloud gone."""
    d = pair[0]
    d.reset(PROMPT)
    return [d.step(SamplingParams()).token for _ in range(N_NEW)]


class Cloud:
    """A cloud server on a fixed loopback port that can be killed and restarted there."""

    def __init__(self, target, **cfg) -> None:
        self.target, self.cfg = target, cfg
        self.server = None
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Cloud":
        self.server = CloudServer(self.target, CloudConfig(port=self.port, **self.cfg))
        self.server.start_in_thread()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture
def cloud(pair):
    c = Cloud(pair[1])
    yield c.start()
    c.stop()


class Gated:
    """A draft model that calls ``before(n)`` ahead of its n-th step (0-based): the test's
    fault injection, driven by the edge's progress rather than by timing."""

    def __init__(self, draft) -> None:
        self._d = draft
        self.steps = 0
        self.before = None

    def __getattr__(self, name):
        return getattr(self._d, name)

    def step(self, *a, **kw):
        if self.before is not None:
            self.before(self.steps)
        self.steps += 1
        return self._d.step(*a, **kw)


def wait_for(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.005)


def replay(events: list) -> tuple[list, list]:
    """Apply a stream of events: (verified ids, unverified tail ids); checks retract's contract."""
    verified, tail = [], []
    for ev in events:
        assert isinstance(ev, StreamEvent)
        if ev.kind == "verified":
            assert not tail, "verified text arrived while unverified text was shown"
            verified += ev.token_ids
        elif ev.kind == "unverified":
            tail += ev.token_ids
        else:
            assert ev.kind == "retract" and list(ev.token_ids) == tail, "retract must withdraw the unverified tail"
            tail = []
    return verified, tail


def kill_then_restart(cloud, client, kill_at: int = 6, restart_after: int = 4):
    """A ``before`` hook: kill the cloud before draft step ``kill_at``; after ``restart_after``
    offline steps start a new cloud on the same port, and hold further offline steps until it
    has the edge connected (so the run cannot end offline first)."""
    state = {"offline": 0}

    def sees_edge() -> bool:
        s = cloud.server
        return s is not None and s.stats.clients_connected >= 1

    def before(n: int) -> None:
        if n == kill_at:
            cloud.stop()
        if client.offline:
            state["offline"] += 1
            if state["offline"] == restart_after:
                cloud.start()
            if state["offline"] >= restart_after:
                wait_for(sees_edge)

    return before


# ------------------------------------------------------------------------ policies
def test_policy_fail_raises_a_clear_error_quickly(pair, cloud):
    draft = Gated(pair[0])
    draft.before = lambda n: cloud.stop() if n == 3 else None
    with EdgeClient(cloud.url, draft, EdgeConfig(offline_policy="fail", **FAST)) as client:
        t0 = time.monotonic()
        with pytest.raises(CloudUnavailableError, match="offline_policy 'fail'") as ei:
            client.generate(PROMPT, N_NEW)
        assert time.monotonic() - t0 < 10  # no deadline involved: the loss is seen at once
        assert isinstance(ei.value, ConnectionError) and ei.value.cause is not None
        assert "lost the cloud at 127.0.0.1" in str(ei.value)
        assert not client.offline


def test_policy_fail_when_the_cloud_is_gone_before_the_generation(pair, cloud):
    with EdgeClient(cloud.url, pair[0], EdgeConfig(offline_policy="fail", **FAST)) as client:
        cloud.stop()
        wait_for(lambda: client.conn.closed)
        with pytest.raises(CloudUnavailableError):
            client.generate(PROMPT, 8)


def test_policy_wait_recovers_losslessly(pair, ref, cloud):
    draft = Gated(pair[0])
    restarter = threading.Timer(0.3, cloud.start)

    def before(n: int) -> None:
        if n == 5:
            cloud.stop()
            restarter.start()

    draft.before = before
    cfg = EdgeConfig(offline_policy="wait", offline_wait_s=30, **FAST)
    try:
        with EdgeClient(cloud.url, draft, cfg) as client:
            events = list(client.stream_events(PROMPT, N_NEW))
            g = client.last_generation
    finally:
        restarter.join(15)
    assert g.token_ids == ref and g.verified and g.unverified_from is None
    assert all(ev.kind == "verified" for ev in events)  # "wait" never shows draft-only text
    assert replay(events) == (ref, [])
    assert g.stats.offline_episodes == 1 and g.stats.reconnects == 1 and g.stats.offline_tokens == 0


def test_policy_wait_gives_up_after_offline_wait_s(pair, cloud):
    draft = Gated(pair[0])
    draft.before = lambda n: cloud.stop() if n == 3 else None
    with EdgeClient(cloud.url, draft, EdgeConfig(offline_policy="wait", offline_wait_s=0.5, **FAST)) as client:
        t0 = time.monotonic()
        with pytest.raises(CloudUnavailableError, match="did not come back within offline_wait_s=0.5"):
            client.generate(PROMPT, N_NEW)
        assert time.monotonic() - t0 < 20


# ------------------------------------------------------------------------ policy draft
def test_draft_kill_and_restart_is_lossless_after_recovery(pair, ref, cloud):
    """The cloud dies mid-generation; the edge drafts alone (flagged); a new cloud on the same
    port: the unverified suffix is verified, rolled back where needed, and the final output is
    exactly target-only greedy. Verified text is never retracted."""
    draft = Gated(pair[0])
    cfg = EdgeConfig(**FAST)
    assert cfg.offline_policy == "draft"  # the default
    with EdgeClient(cloud.url, draft, cfg) as client:
        draft.before = kill_then_restart(cloud, client)
        events = list(client.stream_events(PROMPT, N_NEW))
        g = client.last_generation
        assert not client.offline
    assert any(ev.kind == "unverified" for ev in events), "the edge never drafted offline"
    assert g.token_ids == ref and g.unverified_from is None
    verified, tail = replay(events)  # also: verified text never retracted, retract = the unverified tail
    assert verified == ref and tail == []
    assert any(ev.kind == "retract" for ev in events)
    st = g.stats
    assert st.offline_episodes == 1 and st.reconnects == 1 and st.offline_tokens >= 4 and st.unverified_tokens == 0


def test_draft_ends_offline_with_a_flagged_suffix(pair, ref, cloud):
    """max_new_tokens reached while the cloud is still gone: the output ends with the draft's
    tokens, flagged from the position where the cloud was lost; the verified prefix is the target's."""
    draft = Gated(pair[0])
    draft.before = lambda n: cloud.stop() if n == 6 else None
    with EdgeClient(cloud.url, draft, EdgeConfig(**FAST)) as client:
        events = list(client.stream_events(PROMPT, N_NEW))
        g = client.last_generation
    k = g.unverified_from
    assert k is not None and not g.verified and 0 <= k < N_NEW
    assert len(g.token_ids) == N_NEW and g.stats.new_tokens == N_NEW
    assert g.token_ids[:k] == ref[:k] == g.verified_token_ids
    d = pair[0]  # after the loss the edge went on with the draft alone, from the verified prefix
    d.reset(PROMPT + ref[:k])
    assert g.token_ids[k:] == [d.step(SamplingParams()).token for _ in range(N_NEW - k)]
    verified, tail = replay(events)
    assert verified == ref[:k] and tail == g.token_ids[k:]
    assert g.stats.unverified_tokens == N_NEW - k and g.stats.offline_episodes == 1 and g.stats.reconnects == 0


def test_stream_raises_when_the_run_ends_offline(pair, ref, cloud):
    """stream() yields verified text only: it will not pass a draft-only suffix off as output."""
    draft = Gated(pair[0])
    draft.before = lambda n: cloud.stop() if n == 6 else None
    with EdgeClient(cloud.url, draft, EdgeConfig(**FAST)) as client:
        with pytest.raises(CloudUnavailableError, match="unreachable when the generation ended") as ei:
            for _ in client.stream(PROMPT, N_NEW):
                pass
        g = ei.value.generation
        assert g is client.last_generation and g.unverified_from is not None
        assert g.verified_token_ids == ref[: g.unverified_from]


def test_draft_cloud_gone_before_the_generation_then_back(pair, ref, cloud):
    """The connection died between generations: the next one starts offline (everything
    unverified) and is reconciled from position 0 when the cloud returns."""
    draft = Gated(pair[0])
    with EdgeClient(cloud.url, draft, EdgeConfig(**FAST)) as client:
        cloud.stop()
        wait_for(lambda: client.conn.closed)
        draft.before = kill_then_restart(cloud, client, kill_at=-1, restart_after=3)
        events = list(client.stream_events(PROMPT, N_NEW))
        g = client.last_generation
    assert g.token_ids == ref and g.verified
    assert events[0].kind == "unverified"
    assert replay(events) == (ref, [])


def test_delayed_verdicts_trigger_the_offline_path(pair, ref):
    """Verdicts slower than the deadline: the edge treats the cloud as lost, drafts alone and
    retries; once verdicts are fast again it reconciles, and the output is the target's."""
    c = Cloud(pair[1], verify_pad_s=2.5).start()
    srv = c.server
    try:
        draft = Gated(pair[0])
        cfg = EdgeConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2, verdict_timeout_s=0.8)
        with EdgeClient(c.url, draft, cfg) as client:
            def before(n: int) -> None:
                if client.offline:  # the deadline passed: make the cloud fast again, and hold the
                    srv.config.verify_pad_s = 0.0  # edge until the slow verification is over and it is back
                    wait_for(lambda: srv.stats.verifications >= 1 and srv.stats.clients_connected >= 1)

            draft.before = before
            events = list(client.stream_events(PROMPT, N_NEW))
            g = client.last_generation
    finally:
        c.stop()
    assert any(ev.kind == "unverified" for ev in events)
    assert g.token_ids == ref and g.verified
    assert replay(events) == (ref, [])
    assert g.stats.offline_episodes >= 1 and g.stats.reconnects >= 1


def test_delayed_verdicts_until_the_end_flag_everything(pair, draft_ref):
    """The cloud never answers in time: the whole output is the draft's, all flagged."""
    c = Cloud(pair[1], verify_pad_s=2.0).start()
    try:
        cfg = EdgeConfig(reconnect_initial_s=0.05, reconnect_max_s=0.2, verdict_timeout_s=0.3)
        with EdgeClient(c.url, pair[0], cfg) as client:
            g = client.generate(PROMPT, 12)
    finally:
        c.stop()
    assert g.unverified_from == 0 and g.token_ids == draft_ref[:12]
    assert g.stats.offline_episodes == 1 and g.stats.unverified_tokens == 12


def test_sampled_run_recovers(pair, cloud):
    """Sampling mode: offline drafts keep their q, the re-opened session verifies them, and the
    run completes verified with the requested length."""
    draft = Gated(pair[0])
    with EdgeClient(cloud.url, draft, EdgeConfig(**FAST)) as client:
        draft.before = kill_then_restart(cloud, client, kill_at=4)
        events = list(client.stream_events(PROMPT, 24, SamplingParams(temperature=1.0, seed=3)))
        g = client.last_generation
    assert g.verified and len(g.token_ids) == 24
    assert any(ev.kind == "unverified" for ev in events)
    assert replay(events) == (g.token_ids, [])
    assert g.stats.offline_episodes == 1 and g.stats.reconnects == 1


def test_long_unverified_suffix_is_verified_in_chunks():
    """A cloud that takes at most 2 drafts in flight: the offline suffix goes up in chunks of 2;
    fully accepted chunks become verified and the rest stays flagged until its own verdict.
    (A draft equal to the target, so that whole chunks are accepted.)"""
    pair = tiny_pair(noise=0.0)
    ref = reference_greedy(pair[2], PROMPT, N_NEW)
    c = Cloud(pair[1], max_draft_in_flight=2).start()
    try:
        draft = Gated(pair[0])
        with EdgeClient(c.url, draft, EdgeConfig(lookahead=2, **FAST)) as client:
            draft.before = kill_then_restart(c, client, kill_at=3, restart_after=10)
            events = list(client.stream_events(PROMPT, N_NEW))
            g = client.last_generation
    finally:
        c.stop()
    assert g.token_ids == ref and g.verified
    assert replay(events) == (ref, [])
    assert g.stats.offline_tokens >= 10
    kinds = "".join(ev.kind[0] for ev in events)  # v(erified), u(nverified), r(etract)
    assert "rvu" in kinds  # a chunk accepted, the rest of the tail shown again as unverified


@pytest.mark.parametrize("method", ["target-per-token", "cloud-stream"])
def test_cloud_decoding_methods_recover(pair, ref, method):
    """target-per-token and cloud-stream have no draft online; offline they draft like the
    others, then reconcile (cloud-stream: a fresh stream for what is left)."""
    c = Cloud(pair[1], verify_pad_s=0.05).start()
    try:
        draft = Gated(pair[0])
        with EdgeClient(c.url, draft, EdgeConfig.for_method(method, **FAST)) as client:
            draft.before = kill_then_restart(c, client, kill_at=-1, restart_after=3)
            events = []
            for ev in client.stream_events(PROMPT, N_NEW):
                events.append(ev)
                if len(events) == 2:
                    c.stop()  # mid-generation: 38 round trips of >= 50 ms are still to come
            g = client.last_generation
    finally:
        c.stop()
    assert any(ev.kind == "unverified" for ev in events)
    assert g.token_ids == ref and g.verified
    assert replay(events) == (ref, [])


# ------------------------------------------------------------------------ pieces
def test_config_validation():
    with pytest.raises(ValueError, match="offline_policy"):
        EdgeConfig(offline_policy="maybe")
    with pytest.raises(ValueError, match="reconnect_initial_s"):
        EdgeConfig(reconnect_initial_s=2.0, reconnect_max_s=1.0)
    with pytest.raises(ValueError, match="offline_wait_s"):
        EdgeConfig(offline_wait_s=0)
    assert EdgeConfig.for_method("vanilla-sd", offline_policy="wait").offline_policy == "wait"


def test_backoff_grows_to_the_cap_and_resets():
    b = Backoff(0.1, 0.8, jitter=0.0)
    assert [b.next() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 0.8, 0.8]
    b.reset()
    assert b.next() == 0.1


def test_reconnector_retries_then_stops_on_a_permanent_refusal():
    calls = []

    def dial():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("refused")
        raise ValueError("the cloud serves another tokenizer")

    rc = Reconnector(dial, Backoff(0.01, 0.02)).start()
    try:
        with pytest.raises(ValueError, match="another tokenizer"):
            rc.wait(10)
    finally:
        rc.stop()
    assert len(calls) == 3 and isinstance(rc.last_error, ConnectionRefusedError)


def test_event_text_holds_partial_characters_and_retracts_only_the_tail():
    table = {1: b"a", 2: "\u00e9".encode()[:1], 3: "\u00e9".encode()[1:], 4: b"b"}

    def decode(ids):
        return b"".join(table[i] for i in ids).decode("utf-8", errors="replace")

    out = []
    et = EventText(decode, out.append)
    et.verified([1])
    et.verified([2])  # half a character: held
    assert [e.text for e in out] == ["a"]
    et.verified([3])
    et.unverified([4])
    et.unverified([1])
    et.retract()
    et.verified([4])
    assert [(e.kind, e.text, e.token_ids) for e in out] == [
        ("verified", "a", (1,)), ("verified", "\u00e9", (2, 3)), ("unverified", "b", (4,)),
        ("unverified", "a", (1,)), ("retract", "ba", (4, 1)), ("verified", "b", (4,))]


def test_cli_prints_unverified_text_apart(capsys):
    from pipesd.cli import _print_events, build_parser

    events = [StreamEvent("verified", "ab", (1,)), StreamEvent("unverified", "cd", (2,)),
              StreamEvent("retract", "cd", (2,)), StreamEvent("verified", "cX", (3,)),
              StreamEvent("unverified", "ef", (4,))]
    _print_events(iter(events), tty=False)  # a pipe: stdout gets the target's text only
    out, err = capsys.readouterr()
    assert out == "abcX" and "unverified (draft-only) suffix:\nef\n" in err and "cloud unreachable" in err
    _print_events(iter(events), tty=True)  # a terminal: dimmed, erased on retraction
    out, _ = capsys.readouterr()
    assert out == "ab\x1b7\x1b[2mcd\x1b[0m\x1b8\x1b[JcX\x1b7\x1b[2mef\x1b[0m"
    args = build_parser().parse_args(["generate", "hi", "--cloud", "h:1", "--offline-policy", "wait",
                                      "--verdict-timeout", "5"])
    assert args.offline_policy == "wait" and args.verdict_timeout == 5.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--cloud", "h:1", "--offline-policy", "maybe"])
