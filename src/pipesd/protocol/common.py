"""What both sides of the protocol share: the settled codes and the violation error."""
from __future__ import annotations

SETTLED_NONE = 0  # the edge's draft at the bonus position had not reached the cloud (or a rejection)
SETTLED_KEPT = 1  # it had, and it equals the bonus: it and the drafts after it stand
SETTLED_VOID = 2  # it had, and it differs: drafts past the bonus are void, the epoch bumps


class ProtocolViolation(Exception):
    """A message the protocol cannot take (a gap, an epoch from the future, a limit).

    ``kind`` is ``"field"`` (a malformed position or epoch) or ``"limit"``; the cloud turns it
    into an Error frame for that session.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
