"""Batched verification on the verifier thread: pack, score, verify, judge, commit, account.

One launch verifies the jobs of several sessions: one batched target forward over their
drafts (on top of each session's KV cache), one ``verify_chain`` launch, then each session's
protocol clips its result (max_new_tokens, EOS). Caches are committed only once every verdict
of the launch is known, so a failed launch can be retried session by session from fresh caches.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipesd.protocol import Job, Judged
from pipesd.verify import verify_chain

log = logging.getLogger("pipesd.cloud")

__all__ = ["Verifier", "Scored"]


@dataclass
class Scored:
    """One session's result of a launch: the judged job and the target forwards it is billed."""

    judged: Judged
    forwards: int
    verify_s: float = 0.0


class Verifier:
    """Runs launches for the server (``config``: its CloudConfig, read at each launch;
    ``stats``: its CloudStats; ``energy``: its EnergyMeter)."""

    def __init__(self, target, config, stats, energy) -> None:
        self.target, self.config, self.stats, self.energy = target, config, stats, energy
        self.vocab_size = int(target.vocab_size)

    def run(self, work: list) -> list[Scored]:
        """``work``: ``(session, job)`` pairs. Verifier thread only."""
        with self.energy.measure():
            t0 = time.perf_counter()
            sessions = [s for s, _ in work]
            jobs = [j for _, j in work]
            f0 = self.target.forwards
            logits = self._score(sessions, jobs)
            forwards = self.target.forwards - f0
            t_fwd = time.perf_counter()
            v, t_kern0 = self._verify(sessions, jobs, logits)
            kernel_s = time.perf_counter() - t_kern0
            out = self._judge(sessions, jobs, v, forwards)
            for s, sc in zip(sessions, out):  # only now that every verdict of the launch is known
                s.tsession.commit(sc.judged.new)
            self._account(out, forwards, t_fwd - t0, kernel_s, t0)
            return out

    def _score(self, sessions, jobs) -> torch.Tensor:
        """One target forward of every job's drafts: logits ``[B, K + 1, V]`` (zero-padded)."""
        drafts = [j.drafts for j in jobs]
        if len(jobs) == 1:
            rows = [sessions[0].tsession.score(drafts[0])]
        else:
            rows = self.target.score_batch([s.tsession for s in sessions], drafts)
        K = max(len(d) for d in drafts)
        logits = torch.zeros(len(jobs), K + 1, rows[0].shape[-1], dtype=rows[0].dtype)
        for i, lg in enumerate(rows):
            logits[i, : lg.shape[0]] = lg
        return logits

    def _verify(self, sessions, jobs, logits: torch.Tensor):
        """One verify_chain launch; returns the verdict and when the kernel started. Every full acceptance carries the target's next token (the
        continuation rule's bonus: its logits are computed anyway)."""
        B, K = len(jobs), logits.shape[1] - 1
        draft_t = torch.zeros(B, max(K, 1), dtype=torch.int64)[:, :K]
        for i, j in enumerate(jobs):
            if j.drafts:
                draft_t[i, : len(j.drafts)] = torch.tensor(j.drafts)
        num = torch.tensor([len(j.drafts) for j in jobs], dtype=torch.int64)
        bonus = torch.ones(B, dtype=torch.bool)
        t_kern0 = time.perf_counter()
        if all(s.params.greedy for s in sessions):
            v = verify_chain(logits, draft_t, num, mode="greedy", bonus=bonus)
        else:
            q_ids, q_probs = self._pack_q(jobs, K)
            p = [s.params for s in sessions]
            # One seed per session, drawn from the session's own generator: a session's draws do
            # not depend on which other sessions share the launch.
            seeds = torch.tensor([int(torch.randint(0, 2**62, (1,), generator=s.generator)) for s in sessions],
                                 dtype=torch.int64)
            t_kern0 = time.perf_counter()
            v = verify_chain(logits, draft_t, num, mode="sample", draft_topk_ids=q_ids, draft_topk_probs=q_probs,
                             temperature=torch.tensor([x.temperature for x in p], dtype=torch.float32),
                             top_k=torch.tensor([x.top_k for x in p]),
                             top_p=torch.tensor([x.top_p for x in p], dtype=torch.float32),
                             min_p=torch.tensor([x.min_p for x in p], dtype=torch.float32),
                             seed=seeds, bonus=bonus)
        _ = v.accepted.tolist()  # make sure the launch has finished (CUDA)
        return v, t_kern0

    @staticmethod
    def _pack_q(jobs, K: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafts' q rows as ``[B, K, k]`` ids and probs (zero past each row's length)."""
        kq = max((len(q) for j in jobs for q in j.q_ids if q is not None), default=1)
        q_ids = torch.zeros(len(jobs), K, kq, dtype=torch.int64)
        q_probs = torch.zeros(len(jobs), K, kq, dtype=torch.float32)
        for i, j in enumerate(jobs):
            for t, (qi, qp) in enumerate(zip(j.q_ids, j.q_probs)):
                q_ids[i, t, : len(qi)] = torch.as_tensor(np.array(qi, dtype=np.int64))
                q_probs[i, t, : len(qp)] = torch.as_tensor(np.array(qp, dtype=np.float32))
        return q_ids, q_probs

    def _judge(self, sessions, jobs: list[Job], v, forwards: int) -> list[Scored]:
        out = []
        for i, (s, j) in enumerate(zip(sessions, jobs)):
            ntok = int(v.num_tokens[i])
            judged = s.proto.judge(j, int(v.accepted[i]), v.tokens[i, :ntok].tolist())
            new = judged.new
            if new and not (min(new) >= 0 and max(new) < self.vocab_size):
                raise ValueError(f"session {s.sid}: the verifier returned token ids outside [0, {self.vocab_size})")
            out.append(Scored(judged, forwards if len(jobs) == 1 else len(j.drafts) + 1))
        return out

    def _account(self, out: list[Scored], forwards: int, forward_s: float, kernel_s: float, t0: float) -> None:
        st = self.stats
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
