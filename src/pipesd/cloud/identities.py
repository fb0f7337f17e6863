"""Who is calling the cloud, and what each caller may hold.

An *identity* is a name bound to an auth token (``pipesd serve --auth-tokens FILE``, or the
single ``--auth-token`` / ``$PIPESD_AUTH_TOKEN``, which is the identity ``default``). Every
connection is bound to the identity that authenticated it, and the identity's :class:`Quota`
bounds what all its connections hold together, so one token holder cannot take the whole
server. This module also holds the two admission structures that keep callers apart:
:class:`HandshakeGate` (connections that have not authenticated yet) and :class:`FairQueue`
(which ready sessions go into the next verifier launch). Threat model: docs/security.md.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

__all__ = ["Quota", "Identity", "IdentityTable", "HandshakeGate", "FairQueue", "DEFAULT_QUOTA", "NO_QUOTA",
           "DEFAULT_IDENTITY", "QUOTA_KEYS", "parse_identities", "load_identities"]

DEFAULT_IDENTITY = "default"
"""Name of the identity of ``--auth-token`` / ``$PIPESD_AUTH_TOKEN`` (and of every client when
the server has no token at all)."""

_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


@dataclass(frozen=True)
class Quota:
    """What one identity may hold across all its connections; 0 means no limit of its own (the
    server-wide limits still apply). Over ``max_connections`` a new connection is refused, over
    ``max_sessions`` an open is refused, over ``max_inflight_bytes`` a draft batch is refused
    (``E_LIMIT``, naming the quota); over ``max_tokens_per_s`` its connections are throttled
    (no longer read until the bucket refills), never refused."""

    max_connections: int = 0
    max_sessions: int = 0
    max_inflight_bytes: int = 0
    max_tokens_per_s: float = 0.0
    tokens_burst: int = 8192


DEFAULT_QUOTA = Quota(max_connections=32, max_sessions=16, max_inflight_bytes=64 << 20)
"""Quota of an identity from a tokens file that sets none: at most a quarter of the default
server-wide sessions (64), an eighth of its connections (256); tokens/s unlimited."""

NO_QUOTA = Quota()
"""Quota of the single-token identity: with one token there is nobody to share with."""

#: Quota options of a tokens-file line: key -> (Quota field, parser, scale).
QUOTA_KEYS = {
    "connections": ("max_connections", int, 1),
    "sessions": ("max_sessions", int, 1),
    "inflight_mb": ("max_inflight_bytes", float, 1 << 20),
    "tokens_per_s": ("max_tokens_per_s", float, 1),
    "tokens_burst": ("tokens_burst", int, 1),
}


def token_digest(token: str) -> bytes:
    """SHA-256 of a token: what the server keeps and compares (fixed length, so comparing
    digests in constant time leaks neither the content nor the length)."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(eq=False)
class Identity:
    """A named caller: its token's digest, its quota, and what it holds now (event loop only)."""

    name: str
    digest: bytes = field(repr=False)
    quota: Quota = DEFAULT_QUOTA
    connections: int = 0  # authenticated connections open now
    sessions: int = 0  # sessions open now
    inflight_bytes: int = 0  # draft bytes awaiting verification now
    sessions_opened: int = 0
    verifications: int = 0
    tokens_verified: int = 0
    throttled_s: float = 0.0
    refused: dict = field(default_factory=dict)  # quota or limit name -> refusals
    idle_closed: dict = field(default_factory=dict)  # "session" / "connection" -> closed for idleness
    bucket: object = field(default=None, repr=False)  # connection.TokenBucket shared by its connections

    def refuse(self, what: str) -> None:
        self.refused[what] = self.refused.get(what, 0) + 1


def parse_identities(text: str, source: str = "<tokens>") -> list[Identity]:
    """Identities from tokens-file text: one ``NAME TOKEN [key=value ...]`` per line, ``#``
    starts a comment (a whole line, or from a field that begins with ``#``). Keys:
    ``connections``, ``sessions``, ``inflight_mb``, ``tokens_per_s``, ``tokens_burst``; the
    ones a line leaves out are :data:`DEFAULT_QUOTA`'s. Raises ValueError naming the line."""
    out: list[Identity] = []
    names: dict[str, int] = {}
    digests: dict[bytes, int] = {}
    for no, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        for i, f in enumerate(fields):
            if f.startswith("#"):
                fields = fields[:i]
                break
        if not fields:
            continue
        where = f"{source}:{no}"
        if len(fields) < 2:
            raise ValueError(f"{where}: expected NAME TOKEN [key=value ...], got {len(fields)} field(s)")
        name, token, opts = fields[0], fields[1], fields[2:]
        if not _NAME.fullmatch(name):
            raise ValueError(f"{where}: identity name {name!r} must be 1-64 of A-Z a-z 0-9 _ . @ -")
        if "=" in token:
            raise ValueError(f"{where}: the second field must be the token, got an option ({token.split('=')[0]}=)")
        if name in names:
            raise ValueError(f"{where}: identity {name!r} is already defined on line {names[name]}")
        d = token_digest(token)
        if d in digests:
            raise ValueError(f"{where}: identity {name!r} has the same token as line {digests[d]}")
        names[name], digests[d] = no, no
        out.append(Identity(name, d, _parse_quota(opts, where)))
    return out


def _parse_quota(opts: Sequence[str], where: str) -> Quota:
    values = {}
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq or key not in QUOTA_KEYS:
            raise ValueError(f"{where}: unknown quota option {opt!r}; use key=value with key one of "
                             f"{', '.join(QUOTA_KEYS)}")
        attr, kind, scale = QUOTA_KEYS[key]
        try:
            x = kind(value)
        except ValueError:
            raise ValueError(f"{where}: {key}={value!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (x >= 0) or x == float("inf"):
            raise ValueError(f"{where}: {key} must be a finite number >= 0 (0: no limit), got {value}")
        if key == "tokens_burst" and x < 1:
            raise ValueError(f"{where}: tokens_burst must be >= 1, got {value}")
        values[attr] = int(x * scale) if attr == "max_inflight_bytes" else x
    return Quota(**{**DEFAULT_QUOTA.__dict__, **values})


def load_identities(path: str) -> list[Identity]:
    """:func:`parse_identities` of a file (ValueError when it cannot be read, or is empty)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the auth tokens file {path}: {e}") from None
    out = parse_identities(text, str(path))
    if not out:
        raise ValueError(f"the auth tokens file {path} defines no identity (lines: NAME TOKEN [key=value ...])")
    return out


class IdentityTable:
    """The identities a server accepts: those of a tokens file, plus ``default`` for the single
    shared token. With neither, every client is ``default`` (loopback and tests only)."""

    def __init__(self, auth_token: str = "", identities: Iterable[Identity] = ()) -> None:
        self.entries = [Identity(i.name, i.digest, i.quota) for i in identities]  # counts of this server only
        if auth_token:
            if any(i.name == DEFAULT_IDENTITY for i in self.entries):
                raise ValueError(f"identity {DEFAULT_IDENTITY!r} is both the auth token's and the tokens file's; "
                                 "rename it in the file")
            d = token_digest(auth_token)
            if any(hmac.compare_digest(d, i.digest) for i in self.entries):
                raise ValueError("the auth token is also a token of the tokens file")
            self.entries.append(Identity(DEFAULT_IDENTITY, d, NO_QUOTA))
        self.open = not self.entries
        if self.open:
            self.entries.append(Identity(DEFAULT_IDENTITY, b"", NO_QUOTA))

    def authenticate(self, token: str) -> Optional[Identity]:
        """The identity whose token this is, or None. Every entry is compared (constant time,
        no early exit), so the time taken says nothing about which token matched or how close
        a guess came."""
        if self.open:
            return self.entries[0]
        d = token_digest(token)
        found = None
        for ident in self.entries:
            if hmac.compare_digest(d, ident.digest):
                found = ident
        return found

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class HandshakeGate:
    """Connections that have not sent their Hello yet (*pending*): at most ``max_per_peer`` from
    one address once they have been silent ``grace_s``, and never more than ``max_pending`` in
    all. Over a cap the *oldest* pending connection is evicted (the caller closes it) instead of
    the newcomer being refused, so a flood of silent sockets holds only those slots and a real
    edge, which sends its Hello at once, still gets in. None of them count against the
    authenticated connection limit.

    The grace: a burst of connections is accepted before any of them is read, so a young one
    may have its Hello in the socket buffer, unread (64 edges behind one NAT connecting at once
    lost up to 56 to eviction at accept). A peer's young connections may therefore pass its cap,
    up to ``max_pending``; :meth:`expire` cuts it back once they are ``grace_s`` old. Over
    ``max_pending`` the oldest goes at once, taken first from peers over their own cap, so a
    burst from one address never evicts another address's handshake while it has its own to
    give up. ``grace_s = 0``: every cap applies at admission. Times are the caller's clock
    (the event loop's)."""

    def __init__(self, max_pending: int, max_per_peer: int, grace_s: float = 0.0) -> None:
        if max_pending < 1 or max_per_peer < 1:
            raise ValueError(f"max_pending_handshakes and max_pending_per_peer must be >= 1, "
                             f"got {max_pending}, {max_per_peer}")
        if not (isinstance(grace_s, (int, float)) and not isinstance(grace_s, bool) and 0 <= grace_s < float("inf")):
            raise ValueError(f"hello_grace_s must be a finite number >= 0, got {grace_s!r}")
        self.max_pending, self.max_per_peer, self.grace_s = int(max_pending), int(max_per_peer), float(grace_s)
        self._pending: dict = {}  # key -> peer address, oldest first
        self._per_peer: dict[str, OrderedDict] = {}  # peer -> {key: admitted at}, oldest first

    def admit(self, key, peer: str, now: Optional[float] = None) -> list:
        """Register a new pending connection, admitted at ``now`` (default: ``time.monotonic()``);
        returns the keys it evicts (the caller closes them)."""
        now = time.monotonic() if now is None else now
        self._pending[key] = peer
        self._per_peer.setdefault(peer, OrderedDict())[key] = now
        evict = self._expire_peer(peer, now)
        while len(self._pending) > self.max_pending:
            over = [k for k, p in self._pending.items() if len(self._per_peer[p]) > self.max_per_peer]
            evict.append(self._drop(over[0] if over else next(iter(self._pending))))
        return evict

    def expire(self, now: float) -> list:
        """Evict, of every peer over its cap, the oldest connections pending ``grace_s`` or longer
        until it is back under the cap or all it has left are younger; returns their keys."""
        evict = []
        for peer in [p for p, d in self._per_peer.items() if len(d) > self.max_per_peer]:
            evict += self._expire_peer(peer, now)
        return evict

    def next_expiry(self) -> Optional[float]:
        """When :meth:`expire` next has something to do (a peer over its cap: its oldest is then
        ``grace_s`` old), or None."""
        due = [next(iter(d.values())) + self.grace_s for d in self._per_peer.values() if len(d) > self.max_per_peer]
        return min(due, default=None)

    def _expire_peer(self, peer: str, now: float) -> list:
        d, evict = self._per_peer.get(peer), []
        while d and len(d) > self.max_per_peer:
            key, since = next(iter(d.items()))
            if now - since < self.grace_s:
                break
            evict.append(self._drop(key))
        return evict

    def _drop(self, key):
        self.remove(key)
        return key

    def remove(self, key) -> None:
        """The connection is no longer pending (its Hello arrived, or it is gone); a key no
        longer pending is ignored."""
        peer = self._pending.pop(key, None)
        if peer is None:
            return
        d = self._per_peer[peer]
        del d[key]
        if not d:
            del self._per_peer[peer]

    def pending(self, peer: Optional[str] = None) -> int:
        """Connections pending now (from ``peer``, or in all)."""
        return len(self._pending) if peer is None else len(self._per_peer.get(peer, ()))


class FairQueue:
    """Sessions ready for verification, one FIFO per identity, taken round-robin across
    identities: each take serves the identity at the front of the rotation and moves it to
    the back. A launch of ``n`` sessions therefore holds a session of every identity that has
    one ready (up to ``n`` identities), however many the others have queued. The subset of
    ``asyncio.Queue`` the server uses: ``put_nowait``, ``get``, ``get_nowait``, ``empty``."""

    def __init__(self, key=lambda s: s.client.identity.name) -> None:
        self.key = key
        self._queues: OrderedDict = OrderedDict()  # identity -> deque of sessions
        self._n = 0
        self._event = None  # asyncio.Event, made on first wait (inside the loop)

    def put_nowait(self, s) -> None:
        k = self.key(s)
        q = self._queues.get(k)
        if q is None:
            q = self._queues[k] = deque()
        q.append(s)
        self._n += 1
        if self._event is not None:
            self._event.set()

    def get_nowait(self):
        if not self._n:
            raise asyncio.QueueEmpty
        k, q = next(iter(self._queues.items()))
        s = q.popleft()
        self._n -= 1
        if q:
            self._queues.move_to_end(k)
        else:
            del self._queues[k]
        return s

    async def get(self):
        if self._event is None:
            self._event = asyncio.Event()
        while not self._n:
            self._event.clear()
            await self._event.wait()
        return self.get_nowait()

    def empty(self) -> bool:
        return not self._n

    def qsize(self) -> int:
        return self._n

    def by_identity(self) -> dict:
        """Ready sessions per identity now (metrics, tests)."""
        return {k: len(q) for k, q in self._queues.items()}
