"""The methods that are not the draft pipeline: ``cloud-stream`` (the cloud decodes alone and
streams, one request), ``target-per-token`` (the cloud decodes, one round trip per token) and
``edge-only`` (the draft alone: a speed reference, not the target's output).

Each loop ends early once ``run.cancel`` is set, keeping what was verified; the client then
closes the cloud session, which stops a cloud stream at once."""
from __future__ import annotations

import time

import numpy as np
import torch

from pipesd.edge.pipeline import _pad
from pipesd.edge.session import Run, apply_verdict, wait_verdict
from pipesd.transport import messages as M

__all__ = ["cloud_stream", "edge_only", "target_per_token"]

_EMPTY_I = np.zeros(0, dtype=np.int32)
_EMPTY_F = np.zeros(0, dtype=np.float32)


def cloud_stream(edge, run: Run) -> None:
    """What a user of a plain cloud LLM gets: one stream request for everything left of the
    run; the cloud decodes alone (a job of no drafts per verification round, batched with
    other sessions') and sends a verdict per token, applied here until the run is complete."""
    while not run.complete and not run.cancel.is_set():
        if not run.proto.stream_left:  # once per session (the budget is what is left of the run)
            first = run.proto.request_stream(run.max_new - run.committed)
            edge.conn.send(M.StreamRequest(session_id=run.sid, epoch=run.proto.epoch, first_pos=first,
                                           budget=run.proto.stream_left, sent_at=time.perf_counter()))
        apply_verdict(run, None, wait_verdict(edge.conn, run))
    run.stats.wall_s = time.perf_counter() - run.t0
    run.wire_stats(edge.conn)


def target_per_token(edge, run: Run) -> None:
    """Ask for one token per round trip: an empty verify request; the verdict's bonus is the
    target's next token (nothing drafted there, so the epoch stays)."""
    while not run.complete and not run.cancel.is_set():
        edge.conn.send(M.DraftBatch(session_id=run.sid, epoch=run.proto.epoch,
                                    first_pos=run.proto.wire_pos(run.committed), tokens=_EMPTY_I, probs=_EMPTY_F,
                                    verify=True, sent_at=time.perf_counter()))
        apply_verdict(run, None, wait_verdict(edge.conn, run))
    run.stats.wall_s = time.perf_counter() - run.t0
    run.wire_stats(edge.conn)


def edge_only(edge, run: Run) -> None:
    """The draft alone, no cloud."""
    d = edge.draft
    d.reset(run.prompt)
    gen = torch.Generator()
    gen.manual_seed(run.params.seed or 0)
    p = run.proto
    t0 = time.perf_counter()
    while p.committed < run.max_new and not run.cancel.is_set():
        ts = time.perf_counter()
        st = d.step(run.params, gen)
        _pad(ts, run.cfg.draft_step_s)
        p.seq.append(st.token)
        p.committed += 1
        run.emit("verified", [st.token])
        if st.token == run.eos_id:
            run.finish_reason = "eos"
            break
    run.stats.drafted = p.committed
    run.stats.wall_s = time.perf_counter() - t0
