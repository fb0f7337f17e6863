"""Draft trees over the wire (``tree-sd``): serial rounds, each a small token tree.

A round drafts the **spine** (the draft's own ``k`` tokens, one draft step each, as
``vanilla-sd``), and at every spine position where the draft is unsure (its token's
probability below ``tree_confidence``) adds up to ``tree_width - 1`` **sibling** leaves from the
same q: greedy, the next most likely tokens; sampling, further independent draws from that q
(duplicates kept, as SpecInfer's multi-candidate rule needs). Siblings cost no draft forward:
their q is the one the spine token came from. The tree goes up in one
:class:`~pipesd.transport.messages.TreeRequest`; the cloud scores it in one tree-masked forward
and walks it with ``verify_tree``; the :class:`~pipesd.transport.messages.TreeVerdict` commits
the accepted path and the target's token after it.

What a sibling buys: when the spine is rejected at an unsure position and the target's token
is a sibling there, the round commits that sibling *and* the target's token after it (its
logits came with the tree's forward): one token more than vanilla SD's correction, for the
price of scoring the siblings. Lossless as ``verify_tree`` is: greedy follows the target's
argmax; sampling draws every child of a node from that node's q, so the multi-candidate
rejection rule samples the target's distribution (``tests/test_tree_wire.py``).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from pipesd.edge.pipeline import _pad
from pipesd.edge.session import Run, recv_for
from pipesd.transport import messages as M

__all__ = ["draft_tree", "tree_rounds"]


def draft_tree(draft, run: Run, depth: int) -> tuple[list, list, list, float]:
    """One round's tree: ``(tokens, parents, q_rows, draft_s)``; ``q_rows`` holds
    ``(node, q_ids, q_probs)`` for every node with children (``-1`` the root). The draft's
    sequence ends with the spine (the caller crops it after the verdict)."""
    cfg, params = run.cfg, run.params
    tokens: list = []
    parents: list = []
    q_rows: list = []
    prev, spent = -1, 0.0
    for _ in range(depth):
        t0 = time.perf_counter()
        st = draft.step(params, run.gen)
        spent += time.perf_counter() - t0
        _pad(t0, cfg.draft_step_s)
        q_rows.append((prev, st.q_ids, st.q_probs))
        spine = len(tokens)
        tokens.append(int(st.token))
        parents.append(prev)
        if cfg.tree_width > 1 and st.prob < cfg.tree_confidence:
            for sib in _siblings(st, params.greedy, cfg.tree_width - 1, run.gen):
                tokens.append(sib)
                parents.append(prev)
        prev = spine
        if run.eos_id is not None and st.token == run.eos_id:
            break
    return tokens, parents, q_rows, spent


def _siblings(st, greedy: bool, n: int, gen: torch.Generator) -> list:
    """Greedy: the next ``n`` most likely tokens of the q (not the spine's); sampling: ``n``
    more independent draws from the q the spine token was drawn from."""
    ids, probs = np.asarray(st.q_ids), np.asarray(st.q_probs, dtype=np.float64)
    if greedy:
        order = np.argsort(-probs, kind="stable")
        return [int(ids[i]) for i in order if probs[i] > 0 and int(ids[i]) != st.token][:n]
    w = torch.from_numpy(probs)
    return [int(ids[i]) for i in torch.multinomial(w, n, replacement=True, generator=gen).tolist()]


def tree_rounds(edge, run: Run) -> None:
    """Serial tree rounds until the run is complete (or cancelled): draft a tree, send it,
    wait for its verdict, commit the path, re-draft from the new last token."""
    d, p, cfg = edge.draft, run.proto, run.cfg
    d.reset(run.prompt + run.seq)
    st = run.stats
    while not run.complete and not run.cancel.is_set():
        depth = max(1, min(cfg.k, run.max_new - p.committed))
        tokens, parents, q_rows, spent = draft_tree(d, run, depth)
        st.draft_steps += len(q_rows)  # one draft forward per spine node
        st.draft_s += spent
        st.drafted += len(tokens)
        run.reasons["tree"] += 1
        first = p.request_tree(tokens, parents)
        q = {}
        if not run.params.greedy:
            k = max(len(r[1]) for r in q_rows)
            qi = np.zeros((len(q_rows), k), dtype=np.int32)
            qp = np.zeros((len(q_rows), k), dtype=np.float32)
            for j, (_, a, b) in enumerate(q_rows):
                qi[j, :len(a)], qp[j, :len(b)] = a, b
            q = dict(q_rows=np.array([r[0] for r in q_rows], dtype=np.int32), q_ids=qi, q_probs=qp)
        edge.conn.send(M.TreeRequest(session_id=run.sid, epoch=p.epoch, first_pos=first,
                                     tokens=np.asarray(tokens, dtype=np.int32),
                                     parents=np.asarray(parents, dtype=np.int32), sent_at=time.perf_counter(), **q))
        start = p.committed
        while True:  # a stale verdict (never from an honest cloud) changes nothing: wait for this tree's
            v = recv_for(edge.conn, run.sid, cfg.verdict_timeout_s, M.TreeVerdict)
            if v is None:
                raise TimeoutError(f"no verdict from the cloud within {cfg.verdict_timeout_s} s")
            out = p.on_tree_verdict(epoch=v.epoch, start_pos=v.start_pos, path=v.path.tolist(), token=v.token,
                                    rejected=v.rejected, verified_len=v.verified_len, finished=v.finished)
            if not out.stale:
                break
        run.back_online()
        a = len(v.path)
        st.verifications += 1
        st.verified_drafts += len(tokens)
        st.accepted_drafts += a
        st.accepted_lengths.append(a)
        st.cloud_forwards += v.target_forwards
        st.wasted_forwards += len(tokens) - a
        st.rejections += v.rejected
        st.rollbacks += v.rejected
        st.cloud_busy_s += v.verify_s
        st.bonus_tokens += out.bonus
        st.tree_sibling_hits += any(_is_sibling(parents, n) for n in v.path)
        if cfg.record_timeline:
            t = time.perf_counter() - run.t0
            st.timeline.append(("verdict", t, t, (start, a, v.token)))
            st.timeline.append(("verify", max(0.0, t - v.verify_s), t, v.verify_s))
        d.truncate(len(run.prompt) + start)
        d.extend(out.new)
        run.emit("verified", out.new)
        if out.complete:
            if out.eos:
                run.finish_reason = "eos"
            run.complete = True
            run.done.set()
    st.wall_s = time.perf_counter() - run.t0
    run.wire_stats(edge.conn)


def _is_sibling(parents: list, n: int) -> bool:
    """Node ``n`` is a sibling leaf (not the spine's node at its depth)."""
    return any(parents[i] == parents[n] for i in range(n))
