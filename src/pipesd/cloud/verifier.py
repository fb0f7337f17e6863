"""Batched verification on the verifier thread: pack, score, verify, judge, commit, account.

One launch verifies the jobs of several sessions: one batched target forward over their
drafts (on top of each session's KV cache), one ``verify_chain`` call per sampling mode in the
launch (greedy sessions, sampling sessions); a draft tree (a TreeRequest's job) gets a
tree-masked forward of its own and ``verify_tree``, in the same launch; then each session's protocol clips its result
(max_new_tokens, EOS). Everything is packed on the device of the target's logits, so a CUDA
target is verified by the Triton kernels; ``CloudStats.verify_backends`` counts the path taken. Caches are committed only once every verdict
of the launch is known, so a failed launch can be retried session by session from fresh caches.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipesd.protocol import Job, Judged
from pipesd.verify import verify_chain, verify_tree

log = logging.getLogger("pipesd.cloud")

__all__ = ["Verifier", "Scored"]


@dataclass
class Scored:
    """One session's result of a launch: the judged job and the target forwards it is billed."""

    judged: Judged
    forwards: int
    verify_s: float = 0.0


@dataclass
class _Verdicts:
    """A launch's verdicts on the host, in the launch's order (one copy per verify_chain call)."""

    accepted: list  # per session: drafts accepted
    tokens: list  # per session: the accepted drafts then the correction or bonus token
    backends: list  # per verify_chain call: the path it took ("triton" or "torch", the reference)
    kernel_s: float
    paths: list = None  # trees: per session, the accepted nodes (0-based tree nodes)


def _host(v) -> tuple[list, list, str]:
    """A ChainVerdict as host lists: waits for the launch (CUDA) once, not per session."""
    n = v.num_tokens.tolist()
    tokens = v.tokens.tolist()
    return v.accepted.tolist(), [row[:k] for row, k in zip(tokens, n)], v.backend


class Verifier:
    """Runs launches for the server (``config``: its CloudConfig, read at each launch;
    ``stats``: its CloudStats; ``energy``: its EnergyMeter)."""

    def __init__(self, target, config, stats, energy) -> None:
        self.target, self.config, self.stats, self.energy = target, config, stats, energy
        self.vocab_size = int(target.vocab_size)

    def run(self, work: list) -> list[Scored]:
        """``work``: ``(session, job)`` pairs; a ``Scored`` per pair, in order. Verifier thread only."""
        # Chains before trees, greedy sessions first within each: each mode's rows are then one
        # contiguous slice, verified by a verify_chain (verify_tree) call of its own mode, after
        # one target forward for all chains (one tree-masked forward per tree).
        order = sorted(range(len(work)), key=lambda i: (work[i][1].tree, not work[i][0].params.greedy))
        nc = sum(1 for w in work if not w[1].tree)
        with self.energy.measure():
            t0 = time.perf_counter()
            sessions = [work[i][0] for i in order]
            jobs = [work[i][1] for i in order]
            f0 = self.target.forwards
            logits = self._score(sessions[:nc], jobs[:nc]) if nc else None
            tree_rows = [s.tsession.score_tree(j.drafts, j.parents) for s, j in zip(sessions[nc:], jobs[nc:])]
            forwards = self.target.forwards - f0
            t_fwd = time.perf_counter()
            v = self._verify(sessions[:nc], jobs[:nc], logits) if nc else _Verdicts([], [], [], 0.0)
            scored = self._judge(sessions[:nc], jobs[:nc], v, forwards, len(jobs))
            if nc < len(jobs):
                tv = self._verify_trees(sessions[nc:], jobs[nc:], tree_rows)
                v.backends.extend(tv.backends)
                v.kernel_s += tv.kernel_s
                scored += self._judge_trees(sessions[nc:], jobs[nc:], tv, forwards, len(jobs))
            for s, sc in zip(sessions, scored):  # only now that every verdict of the launch is known
                s.tsession.commit(sc.judged.new)
            self._account(scored, forwards, t_fwd - t0, v, t0)
        out: list = [None] * len(work)
        for k, i in enumerate(order):
            out[i] = scored[k]
        return out

    def _score(self, sessions, jobs) -> torch.Tensor:
        """One target forward of every job's drafts: logits ``[B, K + 1, V]`` (zero-padded), on
        the device the target's logits are on (one on-device pad, never a round trip to the host)."""
        drafts = [j.drafts for j in jobs]
        if len(jobs) == 1:
            return sessions[0].tsession.score(drafts[0])[None]
        rows = self.target.score_batch([s.tsession for s in sessions], drafts)
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)

    def _verify(self, sessions, jobs, logits: torch.Tensor) -> "_Verdicts":
        """verify_chain on the logits' device: one call for the greedy sessions (the first ``g``),
        one for the sampling ones, each on its slice of the batch. Every full acceptance carries
        the target's next token (the continuation rule's bonus: its logits are computed anyway)."""
        B, K, dev = len(jobs), logits.shape[1] - 1, logits.device
        drafts = np.zeros((B, K), dtype=np.int64)
        for i, j in enumerate(jobs):
            drafts[i, : len(j.drafts)] = j.drafts
        draft_t = torch.from_numpy(drafts).to(dev)
        num = torch.tensor([len(j.drafts) for j in jobs], dtype=torch.int64, device=dev)
        bonus = torch.ones(B, dtype=torch.bool, device=dev)
        g = sum(1 for s in sessions if s.params.greedy)
        calls, kernel_s = [], 0.0
        if g:
            t = time.perf_counter()
            calls.append(_host(verify_chain(logits[:g], draft_t[:g], num[:g], mode="greedy", bonus=bonus[:g])))
            kernel_s += time.perf_counter() - t
        if g < B:
            q_ids, q_probs = self._pack_q(jobs[g:], K, dev)
            kw = self._sampling(sessions[g:], dev)
            t = time.perf_counter()
            calls.append(_host(verify_chain(logits[g:], draft_t[g:], num[g:], mode="sample", draft_topk_ids=q_ids,
                                            draft_topk_probs=q_probs, bonus=bonus[g:], **kw)))
            kernel_s += time.perf_counter() - t
        return _Verdicts([a for c in calls for a in c[0]], [t for c in calls for t in c[1]],
                         [c[2] for c in calls], kernel_s)

    @staticmethod
    def _pack_q(jobs, K: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafts' q rows as ``[B, K, k]`` ids and probs (zero past each row's length),
        filled on the host and copied to ``device`` once each."""
        kq = max((len(q) for j in jobs for q in j.q_ids if q is not None), default=1)
        q_ids = np.zeros((len(jobs), K, kq), dtype=np.int64)
        q_probs = np.zeros((len(jobs), K, kq), dtype=np.float32)
        for i, j in enumerate(jobs):
            for t, (qi, qp) in enumerate(zip(j.q_ids, j.q_probs)):
                if qi is None:
                    continue  # a tree node without children (or a hint): no q
                q_ids[i, t, : len(qi)] = qi
                q_probs[i, t, : len(qp)] = qp
        return torch.from_numpy(q_ids).to(device), torch.from_numpy(q_probs).to(device)

    @staticmethod
    def _sampling(sessions, dev) -> dict:
        """The sampling sessions' knobs as ``[B]`` tensors, and one seed per session drawn from
        the session's own generator: a session's draws do not depend on which other sessions
        share the launch."""
        p = [s.params for s in sessions]
        return dict(temperature=torch.tensor([x.temperature for x in p], dtype=torch.float32, device=dev),
                    top_k=torch.tensor([x.top_k for x in p], dtype=torch.int64, device=dev),
                    top_p=torch.tensor([x.top_p for x in p], dtype=torch.float32, device=dev),
                    min_p=torch.tensor([x.min_p for x in p], dtype=torch.float32, device=dev),
                    seed=torch.tensor([int(torch.randint(0, 2**62, (1,), generator=s.generator)) for s in sessions],
                                      dtype=torch.int64, device=dev))

    def _verify_trees(self, sessions, jobs, rows: list) -> "_Verdicts":
        """verify_tree over the tree jobs (node 0 the root, node ``i + 1`` the tree's node ``i``):
        one call for the greedy sessions, one for the sampling ones (SpecInfer multi-candidate
        rejection against each parent's q); every accepted leaf carries the target's bonus."""
        B, N, dev = len(jobs), max(r.shape[0] for r in rows), rows[0].device
        logits = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        tok = np.zeros((B, N), dtype=np.int64)
        par = np.full((B, N), -1, dtype=np.int64)
        for b, j in enumerate(jobs):
            n = len(j.drafts)
            tok[b, 1:n + 1] = j.drafts
            par[b, 1:n + 1] = [p + 1 for p in j.parents]
        tok_t, par_t = torch.from_numpy(tok).to(dev), torch.from_numpy(par).to(dev)
        num = torch.tensor([len(j.drafts) + 1 for j in jobs], dtype=torch.int64, device=dev)
        bonus = torch.ones(B, dtype=torch.bool, device=dev)
        g = sum(1 for s in sessions if s.params.greedy)
        acc, paths, toks, backends, kernel_s = [], [], [], [], 0.0

        def collect(tv) -> None:
            nt = tv.num_tokens.tolist()
            acc.extend(tv.accepted.tolist())
            paths.extend([[x - 1 for x in row[1:a + 1]] for row, a in zip(tv.path.tolist(), tv.accepted.tolist())])
            toks.extend([row[:k] for row, k in zip(tv.tokens.tolist(), nt)])
            backends.append(tv.backend)

        if g:
            t = time.perf_counter()
            collect(verify_tree(logits[:g], tok_t[:g], par_t[:g], num[:g], mode="greedy", bonus=bonus[:g]))
            kernel_s += time.perf_counter() - t
        if g < B:
            q_ids, q_probs = self._pack_q(jobs[g:], N, dev)
            kw = self._sampling(sessions[g:], dev)
            t = time.perf_counter()
            collect(verify_tree(logits[g:], tok_t[g:], par_t[g:], num[g:], mode="sample", draft_topk_ids=q_ids,
                                draft_topk_probs=q_probs, bonus=bonus[g:], **kw))
            kernel_s += time.perf_counter() - t
        return _Verdicts(acc, toks, backends, kernel_s, paths)

    def _checked(self, s, judged: Judged) -> Judged:
        new = judged.new
        if new and not (min(new) >= 0 and max(new) < self.vocab_size):
            raise ValueError(f"session {s.sid}: the verifier returned token ids outside [0, {self.vocab_size})")
        return judged

    def _judge(self, sessions, jobs: list[Job], v: "_Verdicts", forwards: int, launch: int) -> list[Scored]:
        return [Scored(self._checked(s, s.proto.judge(j, v.accepted[i], v.tokens[i])),
                       forwards if launch == 1 else len(j.drafts) + 1)
                for i, (s, j) in enumerate(zip(sessions, jobs))]

    def _judge_trees(self, sessions, jobs: list[Job], v: "_Verdicts", forwards: int, launch: int) -> list[Scored]:
        return [Scored(self._checked(s, s.proto.judge_tree(j, v.paths[i], v.tokens[i])),
                       forwards if launch == 1 else len(j.drafts) + 1)
                for i, (s, j) in enumerate(zip(sessions, jobs))]

    def _account(self, out: list[Scored], forwards: int, forward_s: float, v: "_Verdicts", t0: float) -> None:
        st, kernel_s = self.stats, v.kernel_s
        for b in v.backends:
            st.verify_backends[b] = st.verify_backends.get(b, 0) + 1
        busy = time.perf_counter() - t0
        st.forward_s += forward_s
        st.kernel_s += kernel_s
        st.overhead_s += busy - forward_s - kernel_s
        pad = self.config.verify_pad_s  # emulated cloud compute (CloudConfig.verify_pad_s)
        if pad > busy:
            time.sleep(pad - busy)
            busy = pad
        wasted = sum(sc.judged.wasted for sc in out)
        for sc in out:
            sc.verify_s = busy
        self.energy.add_forwards(useful=max(0, forwards - wasted), wasted=min(wasted, forwards))
        B = len(out)
        st.wasted_forwards += wasted
        st.verifications += B
        st.batched_launches += 1
        st.max_batch = max(st.max_batch, B)
        st.batch_size_counts[B] = st.batch_size_counts.get(B, 0) + 1
        st.target_forwards += forwards
        st.busy_s += busy
        log.debug("verified %d session(s), %d target forwards, %.1f ms", B, forwards, busy * 1e3)
