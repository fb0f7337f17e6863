"""The messages edge and cloud exchange. The codec (``pipesd.transport.codec``) turns them
into length-prefixed binary frames and back, validating every field on receipt.

Positions are absolute indices in the *generated* sequence (prompt excluded): position 0 is
the first token after the prompt. Epochs count rollbacks of a session: both sides start at 0
and bump by one each time the edge's drafts past a verified position are void (a correction
after a rejection, or a bonus token that differs from the edge's draft), so a batch stamped
with an older epoch is stale and dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

PROTOCOL_VERSION = 2  # 2: the continuation rule (a bonus on every full acceptance)

# Message type tags (one byte on the wire).
T_HELLO = 1
T_HELLO_ACK = 2
T_OPEN = 3
T_OPENED = 4
T_DRAFT = 5
T_VERDICT = 6
T_CLOSE = 7
T_ERROR = 8


@dataclass
class Hello:
    """Edge -> cloud, first frame on a connection: version and auth token."""

    version: int
    auth_token: str
    client_name: str = ""


@dataclass
class HelloAck:
    """Cloud -> edge: accepted; what the cloud serves."""

    version: int
    server_name: str
    vocab_size: int
    tokenizer_fingerprint: str
    max_sessions: int
    max_prompt_tokens: int
    max_draft_in_flight: int


@dataclass
class OpenSession:
    """Edge -> cloud: start a generation stream. ``mode`` is ``"greedy"`` or ``"sample"``."""

    session_id: int
    prompt_ids: np.ndarray  # int32 [n]
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    tokenizer_fingerprint: str = ""
    max_new_tokens: int = 256


@dataclass
class SessionOpened:
    session_id: int


@dataclass
class DraftBatch:
    """Edge -> cloud: draft tokens ``[first_pos, first_pos + n)`` of one session.

    ``verify`` asks the cloud to verify everything pending up to the end of this batch now
    (the trigger fired). ``bonus`` says the edge has not drafted past this batch (vanilla SD,
    lookahead cap, target-only with ``n == 0``); informational since protocol 2, where every
    full acceptance carries a bonus token (the continuation rule, ``pipesd.cloud.server``). ``q_ids``/``q_probs`` carry the draft's top-k truncated distribution per
    token (sampling mode; ``q_count`` = k used), or the full-vocabulary q when ``k == V``.
    """

    session_id: int
    epoch: int
    first_pos: int
    tokens: np.ndarray  # int32 [n]
    probs: np.ndarray  # float32 [n], draft confidence of each token
    verify: bool = False
    bonus: bool = False
    q_ids: Optional[np.ndarray] = None  # int32 [n, k] ([n - 1, k] with ``hint``)
    q_probs: Optional[np.ndarray] = None  # float32 [n, k] ([n - 1, k] with ``hint``)
    sent_at: float = 0.0  # edge clock, echoed back for RTT estimates
    # ``tokens[0]`` is the edge's draft at the bonus position of its last verify request, sent
    # without q: it is never verified, only compared with that bonus (the continuation rule;
    # the cloud verifies up to a hint, never across it), so its q need not cross the wire.
    hint: bool = False


@dataclass
class Verdict:
    """Cloud -> edge: outcome of verifying the pending segment ``[start_pos, end_pos)``.

    ``accepted`` drafts were accepted (positions ``start_pos .. start_pos+accepted-1``).
    ``correction`` >= 0 is the target's token at ``start_pos + accepted`` (a correction after
    a rejection, or a bonus after full acceptance); -1 means none. A correction after a
    rejection bumps the session epoch to ``epoch + 1`` on both sides: drafts past it are void.
    A bonus bumps it only when the edge's draft at ``end_pos`` differs from it (the
    continuation rule). ``rejected`` says whether a draft was rejected.
    ``verified_len`` is the session's verified length after applying this verdict.
    """

    session_id: int
    epoch: int
    start_pos: int
    end_pos: int
    accepted: int
    correction: int
    rejected: bool
    verified_len: int
    finished: bool = False  # EOS verified or max_new_tokens reached
    target_forwards: int = 0  # target token-forwards spent on this verification
    verify_s: float = 0.0  # cloud time spent (forward + kernel)
    echo_sent_at: float = 0.0


@dataclass
class CloseSession:
    session_id: int


@dataclass
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

Message = Hello | HelloAck | OpenSession | SessionOpened | DraftBatch | Verdict | CloseSession | Error
