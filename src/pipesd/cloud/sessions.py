"""The cloud's sessions: opening (validated), draft batches into the protocol, closing.

A :class:`Session` pairs the protocol state (:class:`pipesd.protocol.CloudSession`: positions,
epoch, pending drafts, hints, the continuation rule) with what the model needs (the target's
KV-cache session, sampling parameters, the session's RNG). The :class:`SessionStore` checks
every field the protocol does not (token ids, q shapes, limits) and owns the counts.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from pipesd.protocol import CloudSession, ProtocolViolation
from pipesd.sampling import SamplingParams
from pipesd.transport import codec
from pipesd.transport import messages as M

log = logging.getLogger("pipesd.cloud")

__all__ = ["MIN_TEMPERATURE", "Session", "SessionStore"]

MIN_TEMPERATURE = 1e-6
"""Smallest non-zero sampling temperature a session may ask for: logits / 1e-38 overflow float32
to inf and NaN probabilities. Use 0 for greedy."""

_VIOLATION_CODE = {"field": M.E_BAD_FIELD, "limit": M.E_LIMIT}


@dataclass(eq=False)
class Session:
    sid: int
    client: object  # cloud.connection.ClientConn
    tsession: object  # pipesd.models.TargetSession
    params: SamplingParams
    generator: torch.Generator
    proto: CloudSession
    queued: bool = False  # in the verifier's ready queue (at most once)
    closed: bool = False
    last_active: float = field(default_factory=time.monotonic)  # last frame for it or verdict from it

    @property
    def idle(self) -> bool:
        """Nothing to do for the server: not being verified, not queued, not ready."""
        return not (self.busy or self.queued or self.proto.ready)

    @property
    def busy(self) -> bool:
        """A verification of this session is out (the protocol's job flag)."""
        return self.proto.busy


class SessionStore:
    """Open sessions across clients, and the per-session checks of every frame."""

    def __init__(self, target, config, stats, fingerprint: str, eos_id: Optional[int],
                 release: Callable[[Session], None]) -> None:
        self.target, self.config, self.stats = target, config, stats
        self.fingerprint, self.eos_id = fingerprint, eos_id
        self.vocab_size = int(target.vocab_size)
        self.release = release  # frees a session's KV cache on the verifier thread
        self.count = 0

    def open(self, client, msg: M.OpenSession) -> Optional[Session]:
        """A new session, or None when over the limits (the client gets E_LIMIT) or when ``sid``
        is open already (E_BAD_FIELD; the open session goes on untouched)."""
        cfg, sid = self.config, msg.session_id
        if sid in client.sessions:  # answered here: a raised error would close the session of that id
            self.stats.protocol_errors += 1
            client.send(M.Error(code=M.E_BAD_FIELD, message=f"session {sid} is already open on this connection",
                                session_id=sid))
            return None
        over = self._over_session_limits(client)
        if over:
            client.send(M.Error(code=M.E_LIMIT, message=f"too many sessions: {over}", session_id=sid))
            return None
        prompt = np.asarray(msg.prompt_ids)
        if len(prompt) == 0 or len(prompt) > cfg.max_prompt_tokens:
            raise codec.ProtocolError(M.E_LIMIT, f"prompt length {len(prompt)} outside [1, {cfg.max_prompt_tokens}]")
        codec.check_token_ids(prompt, self.vocab_size, "prompt token ids")
        if msg.tokenizer_fingerprint and self.fingerprint and msg.tokenizer_fingerprint != self.fingerprint:
            raise codec.ProtocolError(M.E_TOKENIZER, "tokenizer fingerprint differs from the cloud's: "
                                      f"edge {msg.tokenizer_fingerprint}, cloud {self.fingerprint}")
        params = self._params(msg)
        if not params.greedy and getattr(self.target, "greedy_only", False):
            raise codec.ProtocolError(M.E_BAD_FIELD, f"this cloud's target ({type(self.target).__name__}) serves "
                                                     "greedy sessions only (temperature 0)")
        if not (1 <= msg.max_new_tokens <= cfg.max_new_tokens):
            raise codec.ProtocolError(M.E_LIMIT, f"max_new_tokens {msg.max_new_tokens} outside [1, {cfg.max_new_tokens}]")
        gen = torch.Generator()
        gen.manual_seed(int(msg.seed))
        proto = CloudSession(int(msg.max_new_tokens), self.eos_id, cfg.max_draft_in_flight)
        s = Session(sid, client, self.target.new_session([int(t) for t in prompt]), params, gen, proto)
        client.sessions[sid] = s
        client.expired.pop(sid, None)
        self.count += 1
        ident = client.identity
        if ident is not None:
            ident.sessions += 1
            ident.sessions_opened += 1
        self.stats.sessions_opened += 1
        self.stats.sessions_open = self.count
        log.info("session %d opened by %s: %d prompt tokens, up to %d new", sid, client.peer, len(prompt),
                 msg.max_new_tokens, extra={"session": sid, "peer": client.peer})
        return s

    def _over_session_limits(self, client) -> str:
        """Which session limit a new open would break ('' if none), named for the Error."""
        cfg, ident = self.config, client.identity
        if ident is not None and ident.quota.max_sessions and ident.sessions >= ident.quota.max_sessions:
            ident.refuse("sessions")
            return (f"identity {ident.name!r} has {ident.sessions} open (its quota sessions="
                    f"{ident.quota.max_sessions})")
        if len(client.sessions) >= cfg.max_sessions_per_client:
            if ident is not None:
                ident.refuse("max_sessions_per_client")
            return f"{len(client.sessions)} open on this connection (max_sessions_per_client {cfg.max_sessions_per_client})"
        if self.count >= cfg.max_sessions:
            if ident is not None:
                ident.refuse("max_sessions")
            return f"the cloud has {self.count} open (max_sessions {cfg.max_sessions})"
        return ""

    @staticmethod
    def _params(msg: M.OpenSession) -> SamplingParams:
        try:
            params = SamplingParams(float(msg.temperature), int(msg.top_k), float(msg.top_p), float(msg.min_p),
                                    int(msg.seed))
        except ValueError as e:
            raise codec.ProtocolError(M.E_BAD_FIELD, str(e)) from None
        if 0.0 < params.temperature < MIN_TEMPERATURE:
            raise codec.ProtocolError(M.E_BAD_FIELD, f"temperature {params.temperature} is below {MIN_TEMPERATURE} "
                                                     "(use 0 for greedy)")
        return params

    def close(self, s: Session) -> None:
        if s.closed:
            return
        s.closed = True
        log.info("session %d closed: %d tokens verified", s.sid, len(s.proto.generated), extra={"session": s.sid})
        s.client.sessions.pop(s.sid, None)
        self._hold(s, -s.proto.pending.total_bytes)
        s.proto.close()  # nothing pending, no more jobs (a stream stops); a job in flight holds its own copy
        self.count -= 1
        s.client.last_active = time.monotonic()  # a connection's idle clock starts when its sessions end
        if s.client.identity is not None:
            s.client.identity.sessions -= 1
        self.stats.sessions_open = self.count
        if not s.busy:
            self.release(s)

    def expire(self, s: Session, reason: str) -> None:
        """Close a session the server gave up on (idle timeout): its owner gets an Error naming
        ``reason`` now, and again if it later sends to the session."""
        client = s.client
        client.expired[s.sid] = reason
        while len(client.expired) > 64:  # remember the recent ones only
            client.expired.pop(next(iter(client.expired)))
        log.warning("session %d of %s closed: %s", s.sid, client.peer, reason,
                    extra={"session": s.sid, "peer": client.peer})
        self.stats.idle_sessions_closed += 1
        if client.identity is not None:
            client.identity.idle_closed["session"] = client.identity.idle_closed.get("session", 0) + 1
        self.close(s)  # freed before the owner hears of it
        client.send(M.Error(code=M.E_LIMIT, message=f"session {s.sid} closed by the cloud: {reason}",
                            session_id=s.sid))

    def apply(self, s: Session, judged) -> int:
        """Apply a verdict to the session's protocol state (its held bytes follow); returns the
        positions it settled."""
        held = s.proto.pending.total_bytes
        settled = s.proto.apply(judged)
        self._hold(s, s.proto.pending.total_bytes - held)
        s.last_active = time.monotonic()
        ident = s.client.identity
        if ident is not None:
            ident.verifications += 1
            ident.tokens_verified += len(judged.new)
        return settled

    @staticmethod
    def _hold(s: Session, delta: int) -> None:
        """Draft bytes awaiting verification change by ``delta`` (connection and identity)."""
        s.client.inflight_bytes += delta
        if s.client.identity is not None:
            s.client.identity.inflight_bytes += delta

    def _session(self, client, sid: int) -> Session:
        s = client.sessions.get(sid)
        if s is None:
            why = client.expired.get(sid)
            raise codec.ProtocolError(M.E_UNKNOWN_SESSION, f"unknown session {sid}" + (
                f" (the cloud closed it: {why})" if why else ""))
        s.last_active = time.monotonic()
        return s

    def on_draft(self, client, b: M.DraftBatch) -> Optional[Session]:
        """Check a batch and hand it to the protocol; returns the session when it asks to verify."""
        s = self._session(client, b.session_id)
        n = len(b.tokens)
        per_token = self._check_draft(s, b) if n else 8
        limit = self.config.max_inflight_bytes_per_client
        if client.inflight_bytes + n * per_token > limit:
            raise codec.ProtocolError(M.E_LIMIT, f"more than {limit} bytes of drafts awaiting verification "
                                                 "on this connection (max_inflight_bytes_per_client)")
        ident = client.identity
        quota = ident.quota.max_inflight_bytes if ident is not None else 0
        if quota and ident.inflight_bytes + n * per_token > quota:
            ident.refuse("inflight_mb")
            raise codec.ProtocolError(M.E_LIMIT, f"identity {ident.name!r} has more than {quota} bytes of drafts "
                                                 f"awaiting verification (its quota inflight_mb={quota / (1 << 20):g})")
        held = s.proto.pending.total_bytes
        qi, qp = (b.q_ids, b.q_probs) if not s.params.greedy else (None, None)
        try:
            res = s.proto.on_batch(b.epoch, b.first_pos, b.tokens, qi, qp, verify=b.verify, hint=b.hint,
                                   sent_at=b.sent_at, nbytes=per_token)
        except ProtocolViolation as e:
            raise codec.ProtocolError(_VIOLATION_CODE[e.kind], str(e)) from None
        self._hold(s, s.proto.pending.total_bytes - held)
        if res in ("stale", "settled"):
            self.stats.stale_batches += 1
        elif res == "duplicate":
            self.stats.duplicate_batches += 1
        return s if res == "taken" and b.verify else None

    def on_stream(self, client, r: M.StreamRequest) -> Optional[Session]:
        """Hand a stream request to the protocol; returns the session when it was taken."""
        s = self._session(client, r.session_id)
        try:
            res = s.proto.on_stream(r.epoch, r.first_pos, r.budget, sent_at=r.sent_at)
        except ProtocolViolation as e:
            raise codec.ProtocolError(_VIOLATION_CODE[e.kind], str(e)) from None
        if res == "stale":
            self.stats.stale_batches += 1
        elif res == "duplicate":
            self.stats.duplicate_batches += 1
        return s if res == "taken" else None

    def on_tree(self, client, r: M.TreeRequest) -> Optional[Session]:
        """Check a tree request and hand it to the protocol; returns the session when it was taken."""
        s = self._session(client, r.session_id)
        codec.check_token_ids(r.tokens, self.vocab_size, "tree token ids")
        q = (None, None, None)
        if not s.params.greedy:
            if r.q_ids is None:
                raise codec.ProtocolError(M.E_BAD_FIELD, "sampling mode needs the draft's q for every node with children")
            codec.check_token_ids(r.q_ids, self.vocab_size, "q ids")
            q = (r.q_rows, r.q_ids, r.q_probs)
        try:
            res = s.proto.on_tree(r.epoch, r.first_pos, r.tokens, r.parents, *q, sent_at=r.sent_at)
        except ProtocolViolation as e:
            raise codec.ProtocolError(_VIOLATION_CODE[e.kind], str(e)) from None
        if res == "stale":
            self.stats.stale_batches += 1
        elif res == "duplicate":
            self.stats.duplicate_batches += 1
        return s if res == "taken" else None

    def _check_draft(self, s: Session, b: M.DraftBatch) -> int:
        """Token ids and (sampling) q rows; returns the wire bytes each draft holds."""
        codec.check_token_ids(b.tokens, self.vocab_size, "draft token ids")
        if s.params.greedy:
            return 8  # token + prob
        rows = len(b.tokens) - (1 if b.hint else 0)  # a hint carries no q
        if rows and (b.q_ids is None or b.q_probs is None):
            raise codec.ProtocolError(M.E_BAD_FIELD, "sampling mode needs the draft's q (q_ids, q_probs)")
        if b.q_ids is None:
            return 8
        codec.check_token_ids(b.q_ids, self.vocab_size, "q ids")
        return 8 + 8 * int(np.asarray(b.q_ids).shape[1])
