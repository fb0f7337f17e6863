"""Draft trees over the wire (``tree-sd``, :mod:`pipesd.edge.tree`, protocol 5): the protocol
commits exactly the accepted path and the target's token after it; malformed trees are refused;
with two edges in one launch greedy output is the target's and sampled output follows the
target's distribution, with a planted wrong sibling rule caught."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from pipesd import cli
from pipesd.edge import EdgeClient, EdgeConfig
from pipesd.edge import tree as tree_mod
from pipesd.protocol import CloudSession, EdgeSession, ProtocolViolation
from pipesd.transport import codec, conn
from pipesd.transport import messages as M

import _stats
from runtime_helpers import reference_greedy, running_server, tiny_pair
from test_baselines import DEPTH, N_PLANTED, V, _sampled_counts, _two_edges, exact, spair  # noqa: F401

PROMPTS = [[1, 2, 3], [7], [5, 9, 11, 13, 2, 4], [30, 31]]
N_NEW = 16
WIDE = dict(tree_width=3, tree_confidence=1.0)  # siblings at every position: every path is exercised

#  A tree of two spine nodes with a sibling each:   root -> 0 (10) -> 2 (12)
#                                                         -> 1 (11)     -> 3 (13)
TOKENS, PARENTS = [10, 11, 12, 13], [-1, -1, 0, 0]


# --------------------------------------------------------------------------- the protocol
def _round(path, target_tokens, *, max_new=100, eos=None):
    """One tree round through both sides' protocol: returns (edge outcome, cloud session)."""
    edge, cloud = EdgeSession(max_new, eos), CloudSession(max_new, eos)
    first = edge.request_tree(TOKENS, PARENTS)
    assert cloud.on_tree(0, first, TOKENS, PARENTS) == "taken" and cloud.ready
    job = cloud.take_job()
    assert job.tree and not cloud.ready
    j = cloud.judge_tree(job, path, target_tokens)
    cloud.apply(j)
    out = edge.on_tree_verdict(epoch=0, start_pos=0, path=j.path, token=j.token, rejected=j.rejected,
                               verified_len=len(cloud.generated), finished=j.finished)
    return out, cloud, j


def test_a_full_path_commits_the_spine_and_the_bonus():
    out, cloud, j = _round([0, 2], [10, 12, 99])
    assert not j.rejected and j.token == 99
    assert out.new == cloud.generated == [10, 12, 99] and out.bonus


def test_a_sibling_hit_commits_the_sibling_and_the_target_token_after_it():
    """The spine's first token is rejected; its sibling is the target's: the round commits the
    sibling and the target's token after the sibling (one more than a correction alone)."""
    out, cloud, j = _round([1], [11, 42])
    assert not j.rejected and out.new == cloud.generated == [11, 42]


def test_an_early_mismatch_commits_the_correction():
    out, cloud, j = _round([], [7])
    assert j.rejected and out.new == cloud.generated == [7] and not out.bonus


def test_eos_and_max_new_clip_the_path():
    out, cloud, j = _round([0, 2], [10, 12, 99], eos=10)
    assert cloud.generated == out.new == [10] and j.finished and j.token == -1 and out.complete
    out, cloud, j = _round([0, 2], [10, 12, 99], max_new=2)
    assert cloud.generated == out.new == [10, 12] and j.finished and out.complete


Q = ([-1, 0], [[10, 11], [12, 13]], [[0.5, 0.5], [0.6, 0.4]])  # one q row per node with children


@pytest.mark.parametrize("why,tokens,parents,q", [
    ("a parent after its child", [10, 11], [-1, 1], None),
    ("a parent out of range", [10, 11], [-1, -2], None),
    ("no q row for a node with children", TOKENS, PARENTS, ([-1], [[10, 11]], [[0.5, 0.5]])),
    ("a q row for a leaf", TOKENS, PARENTS, ([-1, 0, 2], [[10, 11], [12, 13], [1, 2]], [[.5, .5], [.6, .4], [.5, .5]])),
    ("two q rows for one node", TOKENS, PARENTS, ([-1, -1], [[10, 11], [10, 11]], [[.5, .5], [.5, .5]])),
    ("a token outside its parent's q", TOKENS, PARENTS, ([-1, 0], [[10, 11], [12, 14]], [[.5, .5], [.6, .4]])),
])
def test_a_malformed_tree_is_refused(why, tokens, parents, q):
    with pytest.raises(ProtocolViolation):
        CloudSession(100).on_tree(0, 0, tokens, parents, *(q or (None, None, None)))


def test_a_sampled_tree_with_its_q_rows_is_taken_and_a_tree_needs_nothing_pending():
    s = CloudSession(100)
    assert s.on_tree(0, 0, TOKENS, PARENTS, *Q) == "taken"
    job = s.take_job()
    assert job.q_ids[0] == [10, 11] and job.q_ids[1] == [12, 13] and job.q_ids[2] is None
    s = CloudSession(100)
    s.on_batch(0, 0, [5, 6], verify=False)
    with pytest.raises(ProtocolViolation, match="pending"):
        s.on_tree(0, 2, TOKENS, PARENTS)
    with pytest.raises(ProtocolViolation, match="gap"):
        CloudSession(100).on_tree(0, 3, TOKENS, PARENTS)


def test_the_edge_refuses_a_path_that_is_not_in_its_tree():
    edge = EdgeSession(100)
    edge.request_tree(TOKENS, PARENTS)
    with pytest.raises(ProtocolViolation, match="not a child"):
        edge.on_tree_verdict(epoch=0, start_pos=0, path=[2], token=5, rejected=False, verified_len=2, finished=False)
    with pytest.raises(ProtocolViolation, match="verified length"):
        edge.on_tree_verdict(epoch=0, start_pos=0, path=[0], token=5, rejected=True, verified_len=7, finished=False)


def test_the_wire_round_trips_a_tree_and_limits_its_size():
    r = M.TreeRequest(session_id=3, epoch=1, first_pos=5, tokens=np.array(TOKENS, np.int32),
                      parents=np.array(PARENTS, np.int32), q_rows=np.array(Q[0], np.int32),
                      q_ids=np.array(Q[1], np.int32), q_probs=np.array(Q[2], np.float32), sent_at=2.5)
    got = codec.decode_frame(codec.encode(r))
    assert got.tokens.tolist() == TOKENS and got.parents.tolist() == PARENTS and got.q_rows.tolist() == Q[0]
    assert got.q_ids.tolist() == Q[1] and got.sent_at == 2.5
    v = M.TreeVerdict(session_id=3, epoch=1, start_pos=5, path=np.array([1], np.int32), token=42, rejected=False,
                      verified_len=7)
    assert codec.decode_frame(codec.encode(v)).path.tolist() == [1]
    n = codec.MAX_TREE_NODES + 1
    big = M.TreeRequest(session_id=3, epoch=0, first_pos=0, tokens=np.zeros(n, np.int32),
                        parents=np.arange(-1, n - 1, dtype=np.int32))
    with pytest.raises(ValueError, match="n 65"):
        codec.encode(big)  # the encoder refuses it
    frame = bytearray(codec.encode(M.TreeRequest(session_id=3, epoch=0, first_pos=0, tokens=np.zeros(1, np.int32),
                                                 parents=np.array([-1], np.int32))))
    frame[codec.FRAME_OVERHEAD + 21: codec.FRAME_OVERHEAD + 25] = n.to_bytes(4, "little")  # a forged count
    with pytest.raises(codec.ProtocolError) as e:
        codec.decode_frame(bytes(frame))
    assert e.value.code == M.E_LIMIT


def test_the_cloud_answers_a_malformed_tree_with_an_error(pair):
    with running_server(pair[1]) as (srv, url):
        host, port = url.rsplit(":", 1)
        c = conn.EdgeConnection.connect(host, int(port), tls=False)
        c.send(M.OpenSession(session_id=1, prompt_ids=np.array([1, 2], np.int32), max_new_tokens=8))
        assert isinstance(c.recv(30), M.SessionOpened)
        c.send(M.TreeRequest(session_id=1, epoch=0, first_pos=0, tokens=np.array([3, 4], np.int32),
                             parents=np.array([-1, 1], np.int32)))
        err = c.recv(30)
        assert isinstance(err, M.Error) and err.code == M.E_BAD_FIELD and "parents" in err.message
        c.close()


def test_the_cli_refuses_a_bad_tree_width(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--method", "tree-sd", "--tree-width", "9", "x"])
    assert e.value.code == 2 and "--tree-width" in capsys.readouterr().err


def test_the_cli_sets_the_tree_shape():
    args = cli.build_parser().parse_args(["generate", "hi", "--cloud", "127.0.0.1:1", "--method", "tree-sd",
                                          "--tree-width", "3", "--tree-confidence", "0.9", "--k", "5"])
    cfg = cli._generate_config(args)
    assert (cfg.method, cfg.tree_width, cfg.tree_confidence, cfg.k, cfg.pipeline) == ("tree-sd", 3, 0.9, 5, False)


def test_wire_q_full_is_refused_for_trees():
    with pytest.raises(ValueError, match="tree-sd"):
        EdgeConfig.for_method("tree-sd", wire_q="full")


# --------------------------------------------------------------------------- greedy, two edges
@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


@pytest.fixture(scope="module")
def refs(pair):
    return {tuple(p): reference_greedy(pair[2], p, N_NEW) for p in PROMPTS}


def test_greedy_is_the_targets_with_two_edges_at_once(pair, refs):
    with running_server(pair[1]) as (srv, url):
        cfg = EdgeConfig.for_method("tree-sd", **WIDE)
        out = _two_edges(url, [cfg, cfg], [PROMPTS, PROMPTS[::-1]], N_NEW)
    hits = 0
    for e, prompts in ((0, PROMPTS), (1, PROMPTS[::-1])):
        for g, p in zip(out[e], prompts):
            assert g.token_ids == refs[tuple(p)], f"tree-sd diverged from the target's greedy output on {p}"
            hits += g.stats.tree_sibling_hits
    assert hits > 0, "no accepted path went through a sibling: the sibling path was not exercised"


def _sessions(srv):
    for _ in range(3):
        try:
            return [s for c in list(srv._clients) for s in list(c.sessions.values())]
        except RuntimeError:  # a dict changed size under us (the server's loop owns it): look again
            continue
    return []


def _until(cond, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cond(), "timed out waiting for the server"


def test_two_waiting_trees_and_a_chain_share_one_launch_and_stay_exact(pair, refs):
    """A first edge's job holds the (gated) verifier; meanwhile two edges' trees and a third's
    chain queue up, so the next launch verifies all three at once. Every output is the target's."""
    with running_server(pair[1]) as (srv, url):
        gate = threading.Event()
        srv._executor.submit(gate.wait, 60)  # the verifier thread waits for the gate
        out: dict = {}
        methods = ["vanilla-sd", "tree-sd", "tree-sd", "vanilla-sd"]

        def work(e):
            with EdgeClient(url, tiny_pair()[0], EdgeConfig.for_method(methods[e], **WIDE)) as c:
                out[e] = c.generate(PROMPTS[e], N_NEW)

        ts = [threading.Thread(target=work, args=(e,)) for e in range(4)]
        ts[0].start()
        _until(lambda: any(s.proto.busy for s in _sessions(srv)))  # its job is taken, behind the gate
        for t in ts[1:]:
            t.start()
        _until(lambda: sum(s.proto.ready for s in _sessions(srv)) == 3)
        gate.set()
        for t in ts:
            t.join(120)
        assert max(srv.stats.batch_size_counts) >= 3, "the waiting trees and chain were not verified together"
    for e in range(4):
        assert out[e].token_ids == refs[tuple(PROMPTS[e])]


# --------------------------------------------------------------------------- sampling
def _tree_draft():
    """spair's draft with a full-support q on the wire (top-k = V): after a rejected spine token
    the residual lies in the q's support, so siblings are accepted in about 30% of rounds."""
    return tiny_pair(vocab=V, noise=0.6, wire_topk=V)[0]


SAMPLED_WIDE = dict(tree_width=4, tree_confidence=1.0)


def _wide_and_recorded(stats: list):
    def setup(c):
        c.config = c.config.replace(**SAMPLED_WIDE)
        gen = c.generate

        def recorded(*a, **k):
            g = gen(*a, **k)
            stats.append(g.stats)
            return g
        c.generate = recorded
    return setup


def test_sampling_follows_the_targets_distribution(spair, exact):
    stats: list = []
    counts = _sampled_counts(spair, "tree-sd", setup=_wide_and_recorded(stats), draft=_tree_draft)
    for d in range(DEPTH):
        _stats.check(torch.tensor(counts[d]), torch.tensor(exact[d]), f"tree-sd, position {d}")
    hits, rounds = sum(s.tree_sibling_hits for s in stats), sum(s.verifications for s in stats)
    assert hits > 0.1 * rounds, f"only {hits} of {rounds} sampled paths went through a sibling"


def _uniform_siblings(st, greedy: bool, n: int, gen: torch.Generator) -> list:
    ids = np.asarray(st.q_ids)[np.asarray(st.q_probs) > 0]
    return [int(ids[i]) for i in torch.randint(0, len(ids), (n,), generator=gen).tolist()]


def test_the_sampling_check_catches_siblings_not_drawn_from_the_q_sent(spair, exact, monkeypatch):
    """Planted: the siblings are drawn uniformly over the q's support while the q on the wire is
    the draft's own (the rule's premise, children drawn from the parent's q, is broken)."""
    monkeypatch.setattr(tree_mod, "_siblings", _uniform_siblings)
    # 3x the usual planted draws: the bias shows only in rounds that accept a sibling (about 30%),
    # and which rounds those are varies from run to run with the two edges' launch timing; at
    # 1000 draws the position-0 p-value ranged 1e-4 to below 1e-15 over runs, and a CI run missed.
    counts = _sampled_counts(spair, "tree-sd", n=3 * N_PLANTED, setup=_wide_and_recorded([]), draft=_tree_draft)
    assert any(_stats.fails(torch.tensor(counts[d]), torch.tensor(exact[d])) for d in range(DEPTH))

