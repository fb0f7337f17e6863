"""The cloud verifier's launches: greedy and sampling sessions share one launch (one target
forward, one verify_chain call per mode) without failing, every tensor is packed on the
target's device, and the path taken (Triton or the PyTorch reference) is counted."""
from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest

import _stats
import pipesd.cloud.verifier as verifier_mod
from pipesd.cloud import CloudConfig
from pipesd.cloud.server import CloudStats
from pipesd.cloud.sessions import Session
from pipesd.cloud.verifier import Verifier
from pipesd.edge import EdgeClient, EdgeConfig, TriggerConfig
from pipesd.energy import EnergyMeter
from pipesd.metrics import cloud_registry
from pipesd.protocol import CloudSession
from pipesd.sampling import SamplingParams, filtered_probs

from runtime_helpers import reference_greedy, running_server, tiny_pair

V = 12
PROMPT = [1, 2]
GREEDY_PROMPTS = [[1, 2, 3], [7], [5, 9, 11, 4]]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair(vocab=V, noise=0.6, wire_topk=4)


# --------------------------------------------------------------------------- one launch, by hand
def _q_rows(rng: np.random.Generator, n: int, kq: int = 4) -> tuple[list, list, list]:
    """``n`` drafts drawn from random top-``kq`` q rows (distinct ids, probabilities summing to 1)."""
    ids = [rng.choice(V, kq, replace=False).astype(np.int32) for _ in range(n)]
    probs = [rng.dirichlet(np.ones(kq)).astype(np.float32) for _ in range(n)]
    drafts = [int(rng.choice(i, p=p / p.sum())) for i, p in zip(ids, probs)]
    return drafts, ids, probs


def _launch(target, greedy_ref: list[int]) -> list:
    """Four ``(session, job)`` pairs, sampling and greedy interleaved, built the way the server
    builds them. The greedy drafts are the target's greedy tokens with the 4th one wrong."""
    rng = np.random.default_rng(5)
    work = []
    for sid, temperature in enumerate([1.0, 0.0, 0.7, 0.0]):
        params = SamplingParams(temperature, seed=100 + sid)
        gen = torch.Generator()
        gen.manual_seed(params.seed)
        proto = CloudSession(max_new_tokens=64)
        s = Session(sid, None, target.new_session(PROMPT), params, gen, proto)
        if params.greedy:
            drafts = greedy_ref[:3] + [(greedy_ref[3] + 1) % V] + greedy_ref[4:6]
            proto.on_batch(0, 0, drafts, verify=True)
        else:
            proto.on_batch(0, 0, *_q_rows(rng, 3 + sid), verify=True)
        work.append((s, proto.take_job()))
    return work


def _verifier(target) -> Verifier:
    return Verifier(target, CloudConfig(), CloudStats(), EnergyMeter())


def test_a_mixed_launch_is_one_forward_and_gives_each_session_its_verdict_alone(pair, monkeypatch):
    target, target_m = pair[1], pair[2]
    ref = reference_greedy(target_m, PROMPT, 8)
    alone = [_verifier(target).run([w])[0].judged for w in _launch(target, ref)]
    v = _verifier(target)
    batches = []
    score_batch = target.score_batch
    monkeypatch.setattr(target, "score_batch", lambda ss, ds: batches.append(len(ss)) or score_batch(ss, ds))
    mixed = [sc.judged for sc in v.run(_launch(target, ref))]
    assert batches == [4]  # one target forward for the whole launch
    assert [(j.accepted, j.new) for j in mixed] == [(j.accepted, j.new) for j in alone]  # in the caller's order
    for i in (1, 3):  # the greedy sessions: 3 drafts accepted, then the target's own 4th token
        assert (mixed[i].accepted, mixed[i].new) == (3, ref[:4])
    assert v.stats.verify_backends == {"torch": 2}  # CPU logits: the reference, one call per mode
    assert v.stats.verifications == 4 and v.stats.batched_launches == 1


def test_the_backend_counted_is_the_path_taken(pair, monkeypatch):
    """Forced onto the Triton kernels (interpreted on CPU), the same mixed launch counts
    "triton" and gives the reference's verdicts (both paths draw the same random numbers)."""
    target, ref = pair[1], reference_greedy(pair[2], PROMPT, 8)
    want = [(sc.judged.accepted, sc.judged.new) for sc in _verifier(target).run(_launch(target, ref))]
    monkeypatch.setenv("PIPESD_FORCE_TRITON", "1")
    v = _verifier(target)
    assert [(sc.judged.accepted, sc.judged.new) for sc in v.run(_launch(target, ref))] == want
    assert v.stats.verify_backends == {"triton": 2}


# --------------------------------------------------------------------------- the target's device
class _Seen(Exception):
    """Raised by the recording verify_chain once it has noted where its tensors are."""


class _MetaSession:
    def __init__(self, inner) -> None:
        self.inner = inner

    def score(self, draft):
        return self.inner.score(draft).to("meta")

    def commit(self, new) -> None:
        self.inner.commit(new)


class _MetaTarget:
    """A target whose logits live on the ``meta`` device, as a CUDA target's live on the GPU:
    anything the verifier builds on the host instead shows up as a ``cpu`` tensor."""

    def __init__(self, inner) -> None:
        self.inner, self.vocab_size = inner, inner.vocab_size

    @property
    def forwards(self) -> int:
        return self.inner.forwards

    def new_session(self, prompt):
        return _MetaSession(self.inner.new_session(prompt))

    def score_batch(self, sessions, drafts):
        return [r.to("meta") for r in self.inner.score_batch([s.inner for s in sessions], drafts)]


@pytest.mark.parametrize("sids", [[1, 3], [0, 2], [2]], ids=["greedy", "sampling", "one-session"])
def test_every_tensor_verify_chain_gets_is_on_the_targets_device(pair, monkeypatch, sids):
    seen = []

    def recording_verify_chain(*args, **kwargs):
        seen.append({k: t.device.type for k, t in [*enumerate(args), *kwargs.items()] if isinstance(t, torch.Tensor)})
        raise _Seen

    monkeypatch.setattr(verifier_mod, "verify_chain", recording_verify_chain)
    target = _MetaTarget(pair[1])
    work = _launch(target, reference_greedy(pair[2], PROMPT, 8))
    with pytest.raises(_Seen):
        _verifier(target).run([work[i] for i in sids])
    (devices,) = seen
    assert len(devices) >= (11 if 0 in sids or 2 in sids else 4)  # logits, drafts, lengths, bonus (+ q, knobs, seeds)
    assert set(devices.values()) == {"meta"}, devices


# --------------------------------------------------------------------------- a server, many edges
def _exact_marginals(model, prompt: list[int], params: SamplingParams, depth: int) -> list[torch.Tensor]:
    """The exact distribution of each of the first ``depth`` tokens under target sampling."""
    marg, prefixes = [], {(): 1.0}
    with torch.inference_mode():
        for _ in range(depth):
            m, nxt = torch.zeros(V, dtype=torch.float64), {}
            for pre, w in prefixes.items():
                p = filtered_probs(model(torch.tensor([prompt + list(pre)])).logits[0, -1], params.temperature,
                                   params.top_k, params.top_p, params.min_p).double()
                m += w * p
                nxt.update({pre + (t,): w * float(p[t]) for t in torch.nonzero(p > 1e-12).flatten().tolist()})
            marg.append(m)
            prefixes = nxt
    return marg


@pytest.fixture(scope="module")
def single_thread():
    yield from _stats.single_thread()


def test_greedy_and_sampling_edges_at_once_never_fail_a_launch(pair, caplog, single_thread):
    """Two greedy edges keep generating while two sampling edges draw 600 samples: launches mix
    the modes, none fails, greedy output is the target's, samples follow the target's law."""
    target_m = pair[2]
    params, depth, n_per_edge = SamplingParams(1.0), 2, 300
    exact = _exact_marginals(target_m, PROMPT, params, depth)
    refs = {tuple(p): reference_greedy(target_m, p, 8) for p in GREEDY_PROMPTS}
    stop, errors, greedy_runs, samples = threading.Event(), [], [], [[], []]

    def greedy_edge(method: str) -> None:
        try:
            with EdgeClient(url, tiny_pair(vocab=V, noise=0.6, wire_topk=4)[0], EdgeConfig.for_method(method)) as c:
                while not stop.is_set():
                    for p in GREEDY_PROMPTS:
                        greedy_runs.append(c.generate(p, 8).token_ids == refs[tuple(p)])
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def sampling_edge(e: int) -> None:
        try:
            cfg = EdgeConfig.for_method("pipesd", trigger=TriggerConfig(0.2, 0.3, 4))
            with EdgeClient(url, tiny_pair(vocab=V, noise=0.6, wire_topk=4)[0], cfg) as c:
                for i in range(n_per_edge):
                    sp = SamplingParams(params.temperature, seed=e * n_per_edge + i)
                    samples[e].append(c.generate(PROMPT, depth, sp).token_ids)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    caplog.set_level(logging.ERROR, logger="pipesd.cloud")
    with running_server(pair[1], verify_pad_s=0.002) as (srv, url):
        modes = []
        run = srv.verifier.run
        srv.verifier.run = lambda work: modes.append({s.params.greedy for s, _ in work}) or run(work)
        greedy = [threading.Thread(target=greedy_edge, args=(m,)) for m in ("pipesd", "vanilla-sd")]
        sampling = [threading.Thread(target=sampling_edge, args=(e,)) for e in (0, 1)]
        for t in greedy + sampling:
            t.start()
        for t in sampling:
            t.join(120)
        stop.set()
        for t in greedy:
            t.join(60)
        stats = srv.stats
        scrape = generate_latest(cloud_registry(srv, process=False)).decode()
    assert not errors, errors
    mixed = sum(len(m) == 2 for m in modes)
    assert mixed >= 20, f"only {mixed} of {len(modes)} launches mixed the modes: the test did not test"
    assert stats.failed_launches == 0 and stats.isolated_failures == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("pipesd.cloud")]
    assert "pipesd_cloud_failed_launches_total 0.0" in scrape
    assert f'pipesd_cloud_verify_calls_total{{backend="torch"}} {float(len(modes) + mixed)}' in scrape
    assert greedy_runs and all(greedy_runs), f"{greedy_runs.count(False)} of {len(greedy_runs)} greedy runs diverged"
    tokens = torch.tensor(samples[0] + samples[1])
    assert tokens.shape == (2 * n_per_edge, depth)
    for d in range(depth):
        _stats.check(_stats.hist(tokens[:, d], V), exact[d], f"sampling sessions in mixed launches, position {d}")
