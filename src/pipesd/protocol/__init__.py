"""The session protocol as pure code: no sockets, threads, torch or clocks.

Both sides import it and keep no protocol decisions of their own: the edge
(:class:`EdgeSession` for drafts and verdicts, :class:`SendState` for framing) and the cloud
(:class:`CloudSession` for batches, verification jobs and verdicts). ``tests/test_protocol_model.py``
drives them together under random interleavings (``hypothesis.stateful``).

Terms, defined once:

- **position**: an index into the generated sequence of one cloud session, prompt excluded
  (position 0 is the first token after the session's prompt). A session re-opened after a
  loss has the verified output in its prompt, so its positions start again at 0; the edge
  keeps one offset, ``EdgeSession.base``, from run positions to session positions.
- **committed** (verified): the prefix ``[0, v)`` both sides hold as the target's output. It
  only grows, each position is committed once, and every committed token is either an
  accepted draft or the target's own token.
- **draft**: a token the edge proposed at a position ``>= v``; **pending** on the cloud once
  received and not yet verified.
- **verify request**: a batch with ``verify`` set: verify everything pending through its last
  token, now (the trigger fired).
- **accepted**: drafts of the verified segment ``[a, b)`` the target agrees with (greedy: equal
  to its argmax; sampling: kept by the rejection rule against the draft's q).
- **correction**: on the first rejection at ``r``, the target's token replaces the draft at
  ``r``; everything drafted past ``r`` is void.
- **bonus**: after a full acceptance of ``[a, b)``, the target's token at ``b`` (its logits are
  computed anyway). Both correction and bonus travel in ``Verdict.token``.
- **continuation rule**: after a bonus at ``b`` the edge's draft at ``b`` (if it made one)
  stands, with every draft after it, only when it equals the bonus; otherwise they are void as
  after a correction. Lossless in greedy and sampling mode: the committed token at ``b`` is the
  target's own, and a kept draft after it was drafted from that same prefix, so its own
  verification is an ordinary speculative step.
- **settled**: what the cloud knew of the edge's draft at ``b`` when it produced the bonus
  verdict: ``SETTLED_NONE`` (not received: the edge's next batch settles it; see below),
  ``SETTLED_KEPT`` (received, equal), ``SETTLED_VOID`` (received, different).
- **hint**: the edge's draft at the bonus position of the verification in flight, sent without
  q. It is never verified, only compared with the bonus; a verification job stops before a
  pending hint.
- **stream**: a request that the cloud decode alone (``cloud-stream``): from the committed
  length, up to a budget, each verification round a job of no drafts whose bonus is the
  target's next token (one verdict each). The edge drafts nothing meanwhile and the cloud takes
  no drafts; it ends at the budget, EOS, max_new or the session's close.
- **tree**: a draft token tree sent in one request below the committed length (``tree-sd``), a
  serial round: nothing is pending and the edge drafts nothing meanwhile. Node ``i`` has a
  parent before it (``-1``: the last committed token); in sampling mode every node with children
  carries the q its children were all drawn from, independently. Its verdict commits a
  root-to-node **path** of accepted nodes, then the target's token after it (a correction when
  the path's last node has children, a bonus at a leaf); the epoch does not change.
- **epoch**: counts voidings of a session (a correction, or a bonus unequal to the draft
  there); both sides start at 0 and bump together. Every batch and verdict carries it, so a
  message of an older epoch is **stale** and changes nothing.

Why an unsettled bonus stays (``SETTLED_NONE``): the edge cannot know whether its draft at
``b`` reached the cloud before the verdict was computed, and voiding unconditionally would throw
away matching drafts. It costs no round trip: with nothing pending there is nothing to verify,
and the edge's next batch settles it from its own header (same epoch at ``b``: compared; same
epoch past ``b``: no draft there; next epoch at ``b + 1``: the edge saw a mismatch).
"""
from __future__ import annotations

from pipesd.protocol.cloud import CloudSession, Job, Judged, PendingDrafts
from pipesd.protocol.common import (
    SETTLED_KEPT,
    SETTLED_NONE,
    SETTLED_VOID,
    ProtocolViolation,
)
from pipesd.protocol.edge import EdgeSession, SendState, VerdictOutcome

__all__ = [
    "CloudSession", "EdgeSession", "Job", "Judged", "PendingDrafts", "ProtocolViolation", "SendState",
    "VerdictOutcome", "SETTLED_NONE", "SETTLED_KEPT", "SETTLED_VOID",
]
