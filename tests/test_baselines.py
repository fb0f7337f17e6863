"""The methods as users and the paper know them (``pipesd.edge.config.METHODS``): each new or
renamed one is lossless with two edges at once (greedy: the target's own tokens; sampling:
the target's distribution), ``cloud-stream`` is one request batched like any job and stops
when closed, ``hsl`` sends one message per round, ``edgellm``'s threshold follows its rule, and
the old names still work."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from pipesd import cli
from pipesd.cloud.verifier import Verifier
from pipesd.edge import EdgeClient, EdgeConfig
from pipesd.edge.config import ALIASES, METHODS, canonical_method
from pipesd.edge.trigger import EdgeLLMTrigger, TriggerConfig
from pipesd.sampling import SamplingParams
from pipesd.transport import conn
from pipesd.transport import messages as M

import _stats
from runtime_helpers import reference_greedy, running_server, tiny_pair
from test_runtime_lossless import _exact_marginals

PROMPTS = [[1, 2, 3], [7], [5, 9, 11, 13, 2, 4], [30, 31]]
N_NEW = 20
NEW = ["cloud-stream", "target-per-token", "hsl", "edgellm", "dual-no-pipeline", "pipe-fixed-k", "pipe-token-only",
       "pipe-seq-only"]  # new or renamed by issue 15


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def refs(pair):
    return {tuple(p): reference_greedy(pair[2], p, N_NEW) for p in PROMPTS}


def _two_edges(url, cfgs, prompts, n_new, sampling=None, draft=None, setup=None):
    """Run ``prompts`` on two edges at once (each its own draft and connection); returns each
    edge's generations. ``sampling``: a function of (edge, i) giving the SamplingParams;
    ``setup``: called with each client before it generates."""
    out: dict = {}

    def work(e):
        d = draft() if draft is not None else tiny_pair()[0]
        with EdgeClient(url, d, cfgs[e]) as c:
            if setup is not None:
                setup(c)
            out[e] = [c.generate(p, n_new, sampling(e, i) if sampling else None) for i, p in enumerate(prompts[e])]

    ts = [threading.Thread(target=work, args=(e,)) for e in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    assert set(out) == {0, 1}, "an edge failed"
    return out


# --------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("method", NEW)
def test_greedy_is_the_targets_with_two_edges_at_once(pair, refs, method):
    with running_server(pair[1]) as (srv, url):
        cfg = EdgeConfig.for_method(method)
        out = _two_edges(url, [cfg, cfg], [PROMPTS, PROMPTS[::-1]], N_NEW)
    for e, prompts in ((0, PROMPTS), (1, PROMPTS[::-1])):
        for g, p in zip(out[e], prompts):
            assert g.token_ids == refs[tuple(p)], f"{method} diverged from the target's greedy output on {p}"
            assert g.stats.method == method


def test_cloud_stream_beside_pipesd_stays_exact(pair, refs):
    """A stream's jobs share launches with another edge's draft verifications."""
    with running_server(pair[1]) as (srv, url):
        cfgs = [EdgeConfig.for_method("cloud-stream"), EdgeConfig.for_method("pipesd")]
        out = _two_edges(url, cfgs, [PROMPTS, PROMPTS], N_NEW)
    assert [g.token_ids for g in out[0]] == [g.token_ids for g in out[1]] == [refs[tuple(p)] for p in PROMPTS]


def _open_sessions(srv):
    for _ in range(3):
        try:
            return [s for c in list(srv._clients) for s in list(c.sessions.values())]
        except RuntimeError:  # a dict changed size under us (the server's loop owns it): look again
            continue
    return []


def test_cloud_stream_is_one_request_and_its_jobs_are_batched(pair, refs):
    """Two streams waiting on a busy verifier are verified in one launch; each edge sends one
    message for the whole generation, and gets a verdict (with its cost) per token."""
    with running_server(pair[1]) as (srv, url):
        gate = threading.Event()
        srv._executor.submit(gate.wait, 60)  # the verifier thread is busy until both streams are in
        out: dict = {}

        def work(e):
            with EdgeClient(url, tiny_pair()[0], EdgeConfig.for_method("cloud-stream")) as c:
                out[e] = c.generate(PROMPTS[e], N_NEW)

        ts = [threading.Thread(target=work, args=(e,)) for e in (0, 1)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 60
        while sum(s.proto.stream_left > 0 for s in _open_sessions(srv)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        for t in ts:
            t.join(120)
        assert max(srv.stats.batch_size_counts) >= 2, "two waiting streams were not verified together"
    for e in (0, 1):
        g = out[e]
        assert g.token_ids == refs[tuple(PROMPTS[e])]
        assert g.stats.messages_sent == 1  # the stream request (open and close are not counted)
        assert g.stats.verifications == N_NEW  # a verdict per token
        assert g.stats.cloud_forwards >= N_NEW and g.stats.cloud_busy_s > 0


@pytest.mark.parametrize("method", ["cloud-stream", "target-per-token"])
def test_cloud_decoding_is_billed_like_every_method(pair, method):
    """The run's cloud forwards and busy time are what the server spent on it (one edge alone)."""
    with running_server(pair[1]) as (srv, url):
        with EdgeClient(url, pair[0], EdgeConfig.for_method(method)) as c:
            f0, b0 = srv.stats.target_forwards, srv.stats.busy_s
            g = c.generate(PROMPTS[2], N_NEW)
        assert g.stats.cloud_forwards == srv.stats.target_forwards - f0
        assert g.stats.cloud_busy_s == pytest.approx(srv.stats.busy_s - b0)


def test_closing_a_stream_stops_the_clouds_work(pair, refs):
    """CloseSession mid-stream: at most the round in flight runs for it after the close, even
    while another edge keeps the verifier going."""
    with running_server(pair[1], verify_pad_s=0.01) as (srv, url):
        launched: list = []
        run = srv.verifier.run

        def spy(work):  # the verifier thread: which sessions each launch verifies
            launched.extend(s.sid for s, _ in work)
            return run(work)

        srv.verifier.run = spy
        host, port = url.rsplit(":", 1)
        c = conn.EdgeConnection.connect(host, int(port), tls=False)
        sid = 99  # apart from the EdgeClient's session ids below
        c.send(M.OpenSession(session_id=sid, prompt_ids=np.array(PROMPTS[0], np.int32), max_new_tokens=400))
        assert isinstance(c.recv(30), M.SessionOpened)
        c.send(M.StreamRequest(session_id=sid, epoch=0, first_pos=0, budget=400))
        got = [c.recv(30) for _ in range(3)]
        assert [v.start_pos for v in got] == [0, 1, 2] and [v.token for v in got] == refs[tuple(PROMPTS[0])][:3]
        c.send(M.CloseSession(session_id=sid))
        deadline = time.monotonic() + 30
        while srv.stats.sessions_open and time.monotonic() < deadline:
            time.sleep(0.005)
        assert srv.stats.sessions_open == 0
        at_close = launched.count(sid)
        with EdgeClient(url, pair[0], EdgeConfig.for_method("target-per-token")) as other:  # 20 more rounds
            assert other.generate(PROMPTS[1], N_NEW).token_ids == refs[tuple(PROMPTS[1])]
        c.close()
    assert launched.count(sid) <= at_close + 1, "the cloud kept streaming a closed session"
    assert launched.count(sid) < 400


# --------------------------------------------------------------------------- sampling
V, DEPTH = 12, 3
N_DRAWS, N_PLANTED = 600, 1000  # the planted rule is caught at p ~ 1e-14 with 600 draws already
SAMPLING = SamplingParams(temperature=0.7)


@pytest.fixture(scope="module")
def spair():
    return tiny_pair(vocab=V, noise=0.6, wire_topk=4)


@pytest.fixture(scope="module")
def exact(spair):
    return _exact_marginals(spair[2], [1, 2], SAMPLING, DEPTH)


def _sampled_counts(spair, method, verifier_cls=None, n=N_DRAWS, setup=None, draft=None) -> np.ndarray:
    """Position histograms of ``n`` sampled generations, split over two edges at once
    (``setup``: see :func:`_two_edges`; ``draft``: makes each edge's draft, default spair's)."""
    with running_server(spair[1]) as (srv, url):
        if verifier_cls is not None:
            srv.verifier = verifier_cls(srv.target, srv.config, srv.stats, srv.energy)
        cfg = EdgeConfig.for_method(method)
        half = n // 2
        out = _two_edges(url, [cfg, cfg], [[[1, 2]] * half] * 2, DEPTH,
                         sampling=lambda e, i: SamplingParams(SAMPLING.temperature, seed=e * half + i),
                         draft=draft or (lambda: tiny_pair(vocab=V, noise=0.6, wire_topk=4)[0]), setup=setup)
    counts = np.zeros((DEPTH, V))
    for g in out[0] + out[1]:
        for d, t in enumerate(g.token_ids):
            counts[d, t] += 1
    return counts


@pytest.mark.slow
@pytest.mark.parametrize("method", NEW)
def test_sampling_follows_the_targets_distribution(spair, exact, method):
    counts = _sampled_counts(spair, method)
    for d in range(DEPTH):
        _stats.check(torch.tensor(counts[d]), torch.tensor(exact[d]), f"{method}, position {d}")


class _TemperatureTwice(Verifier):
    """Planted: a stream's token is drawn with the temperature applied twice (logits / T / T)."""

    def _score(self, sessions, jobs):
        logits = super()._score(sessions, jobs)
        for i, (s, j) in enumerate(zip(sessions, jobs)):
            if j.stream:
                logits[i] /= s.params.temperature
        return logits


def test_the_sampling_check_catches_a_wrong_stream_rule(spair, exact):
    counts = _sampled_counts(spair, "cloud-stream", _TemperatureTwice, N_PLANTED)
    assert any(_stats.fails(torch.tensor(counts[d]), torch.tensor(exact[d])) for d in range(DEPTH))


# --------------------------------------------------------------------------- hsl and edgellm
class _Recorder:
    """Wraps an EdgeClient's connection: keeps every DraftBatch it sends."""

    def __init__(self, client: EdgeClient) -> None:
        self.send, self.batches = client.conn.send, []
        client.conn.send = self

    def __call__(self, msg) -> None:
        if isinstance(msg, M.DraftBatch):
            self.batches.append(msg)
        self.send(msg)


def test_hsl_stops_at_the_trigger_and_sends_one_message_per_round(pair, refs):
    with running_server(pair[1]) as (srv, url):
        with EdgeClient(url, pair[0], EdgeConfig.for_method("hsl")) as c:
            rec = _Recorder(c)
            g = c.generate(PROMPTS[0], N_NEW)
    assert g.token_ids == refs[tuple(PROMPTS[0])]
    assert all(b.verify for b in rec.batches)  # the whole draft goes up at the trigger
    assert len(rec.batches) == g.stats.messages_sent == g.stats.verifications  # one message, one verdict
    assert g.stats.drafted == sum(len(b.tokens) for b in rec.batches)  # nothing drafted while waiting
    assert set(g.stats.trigger_reasons) <= {"token", "cap", "end", "eos"}


def test_edgellm_sends_at_the_trigger_only_and_moves_its_threshold(pair, refs):
    with running_server(pair[1]) as (srv, url):
        cfg = EdgeConfig.for_method("edgellm")
        with EdgeClient(url, pair[0], cfg) as c:
            rec = _Recorder(c)
            g = c.generate(PROMPTS[2], N_NEW)
    assert g.token_ids == refs[tuple(PROMPTS[2])]
    assert rec.batches and all(b.verify for b in rec.batches)  # no DP batches: tokens go up at the trigger
    assert g.stats.tau_seq != cfg.trigger.tau_seq  # the verdicts moved alpha
    assert cfg.pipeline and cfg.trigger.tau_tok == 0.0


def test_edgellm_trigger_fires_below_alpha_and_follows_the_update_rule():
    t = EdgeLLMTrigger(TriggerConfig(tau_seq=0.5, tau_tok=0.0, max_draft=16))
    assert [t.update(p) for p in (0.9, 0.6, 0.9)] == [None, None, "sequence"]  # C: 0.9, 0.54, 0.486 < 0.5
    assert t.confidence == 1.0  # reset after firing
    t.on_verdict(4, 4, 0.3)  # all accepted: draft longer
    assert t.alpha == pytest.approx(0.25)
    t.on_verdict(4, 2, 0.25)  # half rejected: alpha / C ** (2 / 4)
    assert t.alpha == pytest.approx(0.25 / 0.25 ** 0.5)
    t.on_verdict(0, 0, 1.0)  # a round of no drafts says nothing
    assert t.alpha == pytest.approx(0.5)
    for _ in range(40):
        t.on_verdict(3, 3, 0.9)
    assert t.alpha == EdgeLLMTrigger.ALPHA_MIN  # bounded below: the cap decides then
    assert [t.update(0.5) for _ in range(15)] == [None] * 13 + ["sequence", None]  # 0.5**14 < 1e-4
    t.on_verdict(5, 0, 0.0)
    assert t.alpha == EdgeLLMTrigger.ALPHA_MAX


# --------------------------------------------------------------------------- names
def test_methods_and_their_deprecated_aliases():
    assert len(set(METHODS)) == len(METHODS) and not set(ALIASES) & set(METHODS)
    for old, new in ALIASES.items():
        assert new in METHODS
        with pytest.warns(DeprecationWarning, match=new):
            assert EdgeConfig.for_method(old).method == new
        with pytest.warns(DeprecationWarning):
            assert EdgeConfig(method=old).method == new
        with pytest.warns(DeprecationWarning):
            assert EdgeConfig.for_method(old) == EdgeConfig.for_method(new)
    with pytest.raises(ValueError, match="target-per-token"):
        canonical_method("target-only-please")


def test_presets_are_what_the_papers_ran():
    hsl = EdgeConfig.for_method("hsl")
    assert (hsl.batching, hsl.pipeline, hsl.trigger.tau_seq, hsl.trigger.tau_tok) == ("trigger", False, 0.0, 0.99)
    assert EdgeConfig.for_method("hsl", tau_tok=0.7).trigger.tau_tok == 0.7  # HSL's math setting
    e = EdgeConfig.for_method("edgellm")
    assert (e.batching, e.pipeline, e.trigger_rule, e.trigger.tau_tok) == ("trigger", True, "edgellm", 0.0)
    d, p = EdgeConfig.for_method("dual-no-pipeline"), EdgeConfig.for_method("pipesd")
    assert d.replace(method="pipesd", pipeline=True) == p  # the ablation differs from pipesd in the pipeline only


@pytest.mark.parametrize("argv,method,tau_tok", [
    (["--method", "target-only"], "target-per-token", 0.5),
    (["--method", "single-threshold"], "pipe-token-only", 0.5),
    (["--method", "hsl"], "hsl", 0.99),
    (["--method", "hsl", "--tau-seq", "0.2"], "hsl", 0.99),
    (["--method", "hsl", "--tau-tok", "0.7"], "hsl", 0.7),
    (["--method", "cloud-stream"], "cloud-stream", 0.5),
])
def test_cli_generate_takes_every_name(argv, method, tau_tok):
    args = cli.build_parser().parse_args(["generate", "hi", "--cloud", "127.0.0.1:1", *argv])
    cfg = cli._generate_config(args)
    assert cfg.method == method and cfg.trigger.tau_tok == tau_tok


def test_cli_refuses_an_unknown_method(capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["generate", "hi", "--cloud", "127.0.0.1:1", "--method", "turbo"])
    assert e.value.code == 2 and "turbo" in capsys.readouterr().err
