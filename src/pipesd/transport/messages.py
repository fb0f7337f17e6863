"""The messages edge and cloud exchange. The codec (``pipesd.transport.codec``) turns them
into length-prefixed binary frames and back, validating every field on receipt; its
``SCHEMAS`` give each message's wire layout and rules (rendered in ``docs/wire.md``).

Messages are keyword-only dataclasses: ``Verdict(session_id=3, epoch=0, ...)``.

Positions are absolute indices in the *generated* sequence (prompt excluded): position 0 is
the first token after the prompt. Epochs count rollbacks of a session: both sides start at 0
and bump by one each time the edge's drafts past a verified position are void (a correction
after a rejection, or a bonus token that differs from the edge's draft), so a batch stamped
with an older epoch is stale and dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

PROTOCOL_VERSION = 5  # 2: the continuation rule (a bonus on every full acceptance); 3: Verdict.settled, no bonus flag;
# 4: StreamRequest (the cloud decodes alone: cloud-stream); 5: TreeRequest / TreeVerdict (draft trees, serial rounds)

# Message type tags (one byte on the wire).
T_HELLO = 1
T_HELLO_ACK = 2
T_OPEN = 3
T_OPENED = 4
T_DRAFT = 5
T_VERDICT = 6
T_CLOSE = 7
T_ERROR = 8
T_STREAM = 9
T_TREE = 10
T_TREE_VERDICT = 11

# Verdict.settled: what the cloud knew of the edge's draft at ``end_pos`` (the bonus position).
from pipesd.protocol.common import SETTLED_KEPT, SETTLED_NONE, SETTLED_VOID  # noqa: E402  (defined with the rule)


@dataclass(kw_only=True)
class Hello:
    """Edge -> cloud, first frame on a connection: version and auth token."""

    version: int
    auth_token: str
    client_name: str = ""


@dataclass(kw_only=True)
class HelloAck:
    """Cloud -> edge: accepted; what the cloud serves."""

    version: int
    server_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_sessions: int
    max_prompt_tokens: int
    max_draft_in_flight: int


@dataclass(kw_only=True)
class OpenSession:
    """Edge -> cloud: start a generation stream. ``temperature`` 0 is greedy decoding, above
    0 sampling with ``top_k`` (0 = off), ``top_p``, ``min_p`` and ``seed``."""

    session_id: int
    prompt_ids: np.ndarray  # int32 [n]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    tokenizer_fingerprint: str = ""
    max_new_tokens: int = 256


@dataclass(kw_only=True)
class SessionOpened:
    """Cloud -> edge: the session of an ``OpenSession`` is open; drafts may follow."""

    session_id: int


@dataclass(kw_only=True)
class CloseSession:
    """Edge -> cloud: the session is over (finished or abandoned); the cloud frees it, no answer."""

    session_id: int


@dataclass(kw_only=True)
class DraftBatch:
    """Edge -> cloud: draft tokens ``[first_pos, first_pos + n)`` of one session.

    ``verify`` asks the cloud to verify everything pending up to the end of this batch now
    (the trigger fired); ``n == 0`` with ``verify`` asks for the target's next token alone.
    ``q_ids``/``q_probs`` (sampling mode) carry the draft's distribution per token, truncated
    to its top k (``[n, k]``), or the full-vocabulary q when ``k == V``. With ``hint``,
    ``tokens[0]`` is the edge's draft at the bonus position of its last verify request, sent
    without q (the q arrays have ``n - 1`` rows): it is never verified, only compared with
    that bonus (the continuation rule; the cloud verifies up to a hint, never across it).
    """

    session_id: int
    epoch: int
    first_pos: int
    tokens: np.ndarray  # int32 [n]
    probs: np.ndarray  # float32 [n], draft confidence of each token
    verify: bool = False
    hint: bool = False
    q_ids: Optional[np.ndarray] = None  # int32 [n, k] ([n - 1, k] with ``hint``)
    q_probs: Optional[np.ndarray] = None  # float32 [n, k] ([n - 1, k] with ``hint``)
    sent_at: float = 0.0  # edge clock, echoed back for RTT estimates


@dataclass(kw_only=True)
class StreamRequest:
    """Edge -> cloud: decode up to ``budget`` tokens of the session with the target alone, from
    ``first_pos`` (the verified length; nothing may be pending). The cloud answers one Verdict
    per token (no drafts: ``accepted`` 0, ``token`` the target's) and takes no drafts until the
    stream ends (budget, EOS, max_new_tokens); closing the session stops it."""

    session_id: int
    epoch: int
    first_pos: int
    budget: int
    sent_at: float = 0.0  # edge clock, echoed back in every verdict of the stream


@dataclass(kw_only=True)
class TreeRequest:
    """Edge -> cloud: verify a draft token tree below the verified length ``first_pos``
    (nothing may be pending: a tree is a serial round, the edge drafts nothing meanwhile).

    Node ``i`` holds ``tokens[i]`` below node ``parents[i]`` (``-1``: below the last verified
    token; parents come before children). Sampling mode: ``q_rows[j]`` names the node (``-1``
    the root) whose children were all drawn, independently and with replacement, from the q in
    row ``j`` of ``q_ids``/``q_probs`` (``[m, k]``), one row per node that has children. The
    cloud scores the tree in one forward with a tree mask and answers a :class:`TreeVerdict`.
    """

    session_id: int
    epoch: int
    first_pos: int
    tokens: np.ndarray  # int32 [n]
    parents: np.ndarray  # int32 [n], each in [-1, i)
    q_rows: Optional[np.ndarray] = None  # int32 [m]: the node each q row belongs to (-1 the root)
    q_ids: Optional[np.ndarray] = None  # int32 [m, k]
    q_probs: Optional[np.ndarray] = None  # float32 [m, k]
    sent_at: float = 0.0


@dataclass(kw_only=True)
class TreeVerdict:
    """Cloud -> edge: outcome of a :class:`TreeRequest`. ``path``: the accepted nodes, root to
    leaf (their tokens are committed at ``start_pos ..``); ``token`` >= 0: the target's token
    after the path, a correction (``rejected``: the path's last node has children, none
    accepted) or the bonus at an accepted leaf; -1 none (clipped at EOS / max_new_tokens).
    ``verified_len``: the session's verified length after it. The epoch does not change: no
    chain drafts are pending during a tree round."""

    session_id: int
    epoch: int
    start_pos: int
    path: np.ndarray  # int32 [a]: node indices of the TreeRequest
    token: int
    rejected: bool
    verified_len: int
    finished: bool = False
    target_forwards: int = 0
    verify_s: float = 0.0
    echo_sent_at: float = 0.0


@dataclass(kw_only=True)
class Verdict:
    """Cloud -> edge: outcome of verifying the pending segment ``[start_pos, end_pos)``.

    ``accepted`` drafts were accepted (positions ``start_pos .. start_pos+accepted-1``).
    ``token`` >= 0 is the target's token at ``start_pos + accepted``: a correction after a
    rejection (``rejected``), or the bonus after full acceptance; -1 means none. A correction
    bumps the session epoch to ``epoch + 1`` on both sides: drafts past it are void. A bonus
    bumps it only when the edge's draft at ``end_pos`` differs from it (the continuation
    rule); ``settled`` says what the cloud knew of that draft when it produced this verdict:
    ``SETTLED_NONE`` (0) not received yet, the edge's next batch settles it; ``SETTLED_KEPT``
    (1) received and equal to the bonus, kept, epoch unchanged; ``SETTLED_VOID`` (2) received
    and different, void, the epoch bumps. It is 0 for anything but a full acceptance with a
    bonus. ``verified_len`` is the session's verified length after applying this verdict.
    """

    session_id: int
    epoch: int
    start_pos: int
    end_pos: int
    accepted: int
    token: int
    rejected: bool
    verified_len: int
    finished: bool = False  # EOS verified or max_new_tokens reached
    settled: int = SETTLED_NONE
    target_forwards: int = 0  # target token-forwards spent on this verification
    verify_s: float = 0.0  # cloud time spent (forward + kernel)
    echo_sent_at: float = 0.0


@dataclass(kw_only=True)
class Error:
    """Either way. ``session_id`` -1: connection-level (the connection is closed after it)."""

    code: int
    message: str
    session_id: int = -1


# Error codes.
E_BAD_FRAME = 1
E_AUTH = 2
E_VERSION = 3
E_LIMIT = 4
E_UNKNOWN_SESSION = 5
E_BAD_FIELD = 6
E_TOKENIZER = 7
E_INTERNAL = 8

Message = (Hello | HelloAck | OpenSession | SessionOpened | DraftBatch | StreamRequest | TreeRequest | Verdict
           | TreeVerdict | CloseSession | Error)
