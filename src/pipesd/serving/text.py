"""Prompt rendering (chat templates), prompt encoding, stop strings and token counts."""
from __future__ import annotations

from typing import Optional, Sequence

from pipesd.serving.schemas import APIError, ChatMessage

__all__ = ["FALLBACK_STOP", "StopCutter", "encode_text", "render_chat", "tokens_for_chars"]

#: Stop string added to chat requests rendered with the fallback template: without it a
#: plain LM happily writes the user's next turn too.
FALLBACK_STOP = "\nUser:"

_FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def _content_text(m: ChatMessage, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:  # OpenAI content parts: only text ones make sense for a text LM
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{i}]: only text content parts are supported, got type "
                                f"{part.get('type')!r}", param=f"messages[{i}].content")
        parts.append(part["text"])
    return "".join(parts)


def render_chat(tokenizer, messages: Sequence[ChatMessage], chat_template: Optional[str] = None) -> tuple[str, bool]:
    """The prompt text for ``messages``; returns ``(text, used_fallback)``.

    With a chat template (the tokenizer's, or ``chat_template`` when given) the tokenizer's
    ``apply_chat_template`` renders it, with the assistant's generation prompt. Without one,
    the documented fallback is::

        System: <system message>
        User: <user message>
        Assistant: <assistant message>
        User: <user message>
        Assistant:

    (one line per message, joined with newlines; ``developer`` counts as ``system``).
    """
    if not messages:
        raise APIError(400, "messages must contain at least one message", param="messages")
    texts = [_content_text(m, i) for i, m in enumerate(messages)]
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        msgs = [{"role": m.role, "content": t} for m, t in zip(messages, texts)]
        try:
            text = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # a template's own raise_exception(), e.g. roles out of order
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None
        return str(text), False
    lines = []
    for i, (m, t) in enumerate(zip(messages, texts)):
        role = _FALLBACK_ROLES.get(m.role)
        if role is None:
            raise APIError(400, f"messages[{i}]: role {m.role!r} is not supported (system, developer, user, "
                                f"assistant)", param=f"messages[{i}].role")
        lines.append(f"{role}: {t}")
    lines.append("Assistant:")
    return "\n".join(lines), True


def encode_text(tokenizer, text: str, *, template_rendered: bool = False, param: str = "prompt") -> list[int]:
    """Token ids of ``text`` as :class:`pipesd.edge.EdgeClient` encodes a text prompt.

    A BOS token is prepended when the tokenizer asks for one (``add_bos_token``), unless the
    text came from a chat template that already starts with it. Text that is not valid Unicode
    (an unpaired surrogate, which JSON can carry) is a 400 naming ``param``.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800") has no UTF-8 form: the tokenizer would crash
        raise APIError(400, f"{param}: not valid Unicode text (an unpaired surrogate at character {e.start})",
                       param=param) from None
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    bos = getattr(tokenizer, "bos_token_id", None)
    bos_text = getattr(tokenizer, "bos_token", None)
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        if not (template_rendered and bos_text and text.startswith(bos_text)):
            ids = [bos] + ids
    if not ids:  # an empty prompt: start a document, as OpenAI's models do
        start = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
        if start is None:
            raise APIError(400, "the prompt is empty and the tokenizer has no BOS/EOS token to start from",
                           param="prompt")
        ids = [int(start)]
    return ids


class StopCutter:
    """Cuts streamed text at the first stop string, holding back text that may start one.

    The cut is where a stop string *first completes* (smallest end; ties: earliest start),
    so the result does not depend on how the text was split into pieces: streaming and
    non-streaming give the same text. The stop string itself is not returned (OpenAI).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # characters of self.text already returned
        self.stopped = False
        self.cut_end = -1  # end of the stop string in self.text, once stopped

    def feed(self, piece: str) -> str:
        """Add a piece; returns the text that is now safe to emit."""
        if self.stopped:
            return ""
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        best = None  # (end, start)
        for s in self.stops:
            i = self.text.find(s, self.sent)
            if i >= 0 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        if best is not None:
            self.stopped = True
            self.cut_end = best[0]
            out = self.text[self.sent: best[1]]
            self.sent = best[1]
            return out
        hold = 0
        tail_max = len(self.text) - self.sent
        for s in self.stops:
            for k in range(min(len(s) - 1, tail_max), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        end = len(self.text) - hold
        out = self.text[self.sent: end]
        self.sent = end
        return out

    def flush(self) -> str:
        """The held-back rest once the generation ended without a stop."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def tokens_for_chars(tokenizer, ids: Sequence[int], n_chars: int) -> int:
    """The fewest leading tokens of ``ids`` whose text has at least ``n_chars`` characters.

    Used to count completion tokens when a stop string cut the text: the tokens generated up
    to the one that completed the stop string count (as in vLLM).
    """
    lo, hi = 0, len(ids)
    if tokenizer is None:
        return hi
    while lo < hi:  # decoded length grows with the prefix (up to incomplete UTF-8 tails)
        mid = (lo + hi) // 2
        if len(tokenizer.decode(list(ids[:mid]), skip_special_tokens=True)) >= n_chars:
            hi = mid
        else:
            lo = mid + 1
    return lo
