"""OpenAI-compatible HTTP API on the edge, backed by an :class:`pipesd.edge.EdgeClient`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent
events with ``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health`` and, when a metrics holder is given, ``GET /metrics`` (Prometheus).

Extension: a request may carry ``"pipesd": {"method": "vanilla-sd"}`` (any of
:data:`pipesd.edge.METHODS`); responses carry ``"pipesd": {...}`` with the run's stats
(TPT, acceptance, verifications, rollbacks). Text is streamed only once verified by the
cloud, so streaming and non-streaming return the same text. Generations run one at a time
(see :mod:`pipesd.serving.backend`); one whose request stops reading (a stop string, a client
that hung up) is cancelled, so the next starts at once.

With ``api_key`` every route but ``/health`` wants ``Authorization: Bearer KEY`` (401 in
OpenAI's shape otherwise), for a server that listens beyond loopback.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipesd.edge.config import METHODS, EdgeConfig, canonical_method
from pipesd.sampling import SamplingParams
from pipesd.serving.backend import EdgeBackend, Job
from pipesd.serving.schemas import APIError, ChatRequest, CompletionRequest, error_body
from pipesd.serving.text import FALLBACK_STOP, StopCutter, encode_text, render_chat, tokens_for_chars

log = logging.getLogger("pipesd.serving")

__all__ = ["create_app", "generation_stats"]

_MAX_STOPS = 4  # as OpenAI
_MAX_SEED = 2**63 - 1


@dataclass
class _Plan:
    """A validated request, ready to run."""

    prompt_ids: list
    max_tokens: int
    sampling: SamplingParams
    config: EdgeConfig
    stops: list
    stream: bool
    include_usage: bool


def generation_stats(gen) -> dict:
    """The ``pipesd`` extension of a response: how the edge and the cloud produced it."""
    st = gen.stats
    return {
        "method": st.method,
        "new_tokens": st.new_tokens,
        "tpt_ms": st.tpt_s * 1e3,
        "tokens_per_s": st.new_tokens / st.wall_s if st.wall_s > 0 else 0.0,
        "wall_s": st.wall_s,
        "acceptance_rate": st.acceptance_rate,
        "mean_accepted": st.mean_accepted,
        "verifications": st.verifications,
        "rollbacks": st.rollbacks,
        "drafted": st.drafted,
        "bytes_sent": st.bytes_sent,
        "bytes_received": st.bytes_received,
    }


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class BearerAuth:
    """ASGI middleware: OpenAI-style API key check (``Authorization: Bearer KEY``) before any
    route runs (before the body is read), except ``open_paths``. A missing or wrong key gets
    401 with OpenAI's error body. Pure ASGI, so streamed responses pass through untouched."""

    def __init__(self, app, key: str, open_paths: tuple = ("/health",)) -> None:
        if not key:
            raise ValueError("api_key must not be empty")
        self.app = app
        self._digest = hashlib.sha256(key.encode("utf-8")).digest()
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        auth = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        scheme, _, given = (auth or b"").decode("latin-1").partition(" ")
        if auth is None or scheme.lower() != "bearer" or not given.strip():
            body = error_body("You didn't provide an API key. You need to provide your API key in an Authorization "
                              "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        elif hmac.compare_digest(hashlib.sha256(given.strip().encode("utf-8")).digest(), self._digest):
            return await self.app(scope, receive, send)
        else:
            body = error_body("Incorrect API key provided.", code="invalid_api_key")
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client of a non-streaming request hangs up (the body is read
    already, so the next ASGI message is the disconnect)."""
    while True:
        msg = await request.receive()
        if msg.get("type") == "http.disconnect":
            job.cancel("client gone")
            return


def create_app(client, *, model_name: str = "pipesd", tokenizer=None, default_method: str = "pipesd",
               metrics=None, config: Optional[EdgeConfig] = None, connect: Optional[Callable[[], Any]] = None,
               default_max_tokens: int = 16, max_tokens_limit: int = 1024, default_temperature: float = 1.0,
               chat_template: Optional[str] = None, max_waiting: int = 32,
               context_length: Optional[int] = None, api_key: Optional[str] = None) -> FastAPI:
    """The FastAPI app serving ``model_name`` through ``client``.

    - ``tokenizer``: the draft's (default ``client.tokenizer``); its chat template renders
      chat requests (``chat_template`` overrides it; without either, the fallback of
      :func:`pipesd.serving.text.render_chat`).
    - ``config``: the edge settings of ``default_method`` (other methods use their preset with
      the same ``draft_step_s`` and ``verdict_timeout_s``).
    - ``connect``: builds a fresh EdgeClient after the connection to the cloud was lost.
    - ``default_max_tokens``: completions without ``max_tokens`` (16, as OpenAI); chat
      requests without it may use the rest of the context, up to ``max_tokens_limit``, the
      largest ``max_tokens`` accepted (larger asks are a 400).
    - ``default_temperature``: when a request gives none (1.0, as OpenAI; 0 = greedy).
    - ``metrics``: an object with ``observe_generation(gen)`` and a prometheus ``registry``
      (``pipesd.metrics.EdgeMetrics``); serves it at ``/metrics``.
    - ``api_key``: when set, requests need ``Authorization: Bearer <api_key>`` (:class:`BearerAuth`).
    """
    default_method = canonical_method(default_method)  # ValueError for an unknown one; an alias maps
    if not (isinstance(max_tokens_limit, int) and max_tokens_limit >= 1):
        raise ValueError(f"max_tokens_limit must be an int >= 1, got {max_tokens_limit!r}")
    if not (1 <= default_max_tokens <= max_tokens_limit):
        raise ValueError(f"default_max_tokens must be in [1, max_tokens_limit={max_tokens_limit}]")
    if not (isinstance(default_temperature, (int, float)) and math.isfinite(default_temperature)
            and default_temperature >= 0):
        raise ValueError(f"default_temperature must be a finite number >= 0, got {default_temperature!r}")
    tok = tokenizer if tokenizer is not None else getattr(client, "tokenizer", None)
    if tok is None:
        raise ValueError("the OpenAI endpoint needs a tokenizer (the draft model has none)")
    base = config if config is not None else (getattr(client, "config", None) or EdgeConfig())
    if base.method != default_method:
        base = EdgeConfig.for_method(default_method, draft_step_s=base.draft_step_s,
                                     verdict_timeout_s=base.verdict_timeout_s)
    # An OpenAI response cannot mark text as unverified: when the cloud is lost the request
    # fails (503) instead of returning draft-only text as if it were the target's.
    base = dataclasses.replace(base, offline_policy="fail")
    if context_length is None:
        mcfg = getattr(getattr(getattr(client, "draft", None), "model", None), "config", None)
        context_length = getattr(mcfg, "max_position_embeddings", None)
    backend = EdgeBackend(client, connect=connect, metrics=metrics, max_waiting=max_waiting)
    created = int(time.time())

    app = FastAPI(title="PipeSD edge (OpenAI-compatible)", version="1",
                  description="Speculative decoding: drafts here, verification in the cloud.")
    app.state.backend = backend
    app.state.model_name = model_name
    if api_key is not None:
        app.add_middleware(BearerAuth, key=api_key)

    # -------------------------------------------------------------- errors in OpenAI's shape
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":  # OpenAI's words; the parse position is no parameter
            return JSONResponse(error_body("We could not parse the JSON body of your request. (HINT: This likely "
                                           "means you aren't using your HTTP library correctly. The OpenAI API "
                                           "expects a JSON payload.)", param=None), status_code=400)
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request")
        return JSONResponse(error_body(f"invalid request: {loc}: {msg}" if loc else f"invalid request: {msg}",
                                       param=loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type=kind), status_code=e.status_code)

    # -------------------------------------------------------------- validation
    def check_model(name: Optional[str]) -> None:
        if name is None:  # as OpenAI answers
            raise APIError(400, "you must provide a model parameter", param="model")
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def refuse(cond: bool, param: str, what: str) -> None:
        if cond:
            raise APIError(400, f"{param}: {what} is not supported by this server", param=param)

    def plan(req, prompt_ids: list, max_tokens: Optional[int], default_tokens: Optional[int],
             extra_stops: tuple = ()) -> _Plan:
        refuse(req.n not in (None, 1), "n", "n > 1 (one choice per request)")
        refuse(bool(req.presence_penalty) or bool(req.frequency_penalty), "presence_penalty",
               "a non-zero presence or frequency penalty (it would change the target's distribution)")
        refuse(bool(req.logit_bias), "logit_bias", "logit_bias")
        method = (req.pipesd.method if req.pipesd is not None else None) or default_method
        try:
            method = canonical_method(method)  # a deprecated alias maps to its method
        except ValueError:
            raise APIError(400, f"pipesd.method must be one of {', '.join(METHODS)}; got {method!r}",
                           param="pipesd.method") from None
        cfg = base if method == base.method else EdgeConfig.for_method(
            method, draft_step_s=base.draft_step_s, verdict_timeout_s=base.verdict_timeout_s, offline_policy="fail")
        # Lengths.
        n_prompt = len(prompt_ids)
        limit_prompt = getattr(getattr(getattr(backend.client, "conn", None), "hello_ack", None),
                               "max_prompt_tokens", 0)
        if limit_prompt and n_prompt > limit_prompt:
            raise APIError(400, f"the prompt has {n_prompt} tokens; the cloud accepts at most {limit_prompt}",
                           param="prompt", code="context_length_exceeded")
        room = (context_length - n_prompt) if context_length else max_tokens_limit
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {context_length} tokens and the prompt "
                                f"has {n_prompt}: no room to generate", param="prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_tokens or max_tokens_limit, max_tokens_limit, room)
        elif isinstance(max_tokens, bool) or max_tokens < 1:
            raise APIError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", param="max_tokens")
        elif max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {max_tokens_limit}",
                           param="max_tokens")
        elif max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {context_length} tokens; the prompt has "
                                f"{n_prompt} and max_tokens asks for {max_tokens}", param="max_tokens",
                           code="context_length_exceeded")
        # Sampling.
        temp = default_temperature if req.temperature is None else req.temperature
        if not (math.isfinite(temp) and temp >= 0):
            raise APIError(400, f"temperature must be a finite number >= 0, got {temp!r}", param="temperature")
        top_p = 1.0 if req.top_p is None else req.top_p
        if not (0.0 < top_p <= 1.0):
            raise APIError(400, f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
        top_k = 0 if req.top_k in (None, -1) else req.top_k
        if top_k < 0:
            raise APIError(400, f"top_k must be >= 0 (or -1 = off), got {top_k}", param="top_k")
        min_p = 0.0 if req.min_p is None else req.min_p
        if not (0.0 <= min_p < 1.0):
            raise APIError(400, f"min_p must be in [0, 1), got {min_p!r}", param="min_p")
        seed = req.seed
        if seed is not None and not (0 <= seed <= _MAX_SEED):
            raise APIError(400, f"seed must be in [0, 2**63 - 1], got {seed}", param="seed")
        if seed is None and temp > 0:
            seed = secrets.randbelow(2**31)  # unseeded requests differ from each other, as OpenAI's do
        sampling = SamplingParams(float(temp), int(top_k), float(top_p), float(min_p), seed)
        # Stops and streaming.
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > _MAX_STOPS:
            raise APIError(400, f"stop: at most {_MAX_STOPS} stop strings, got {len(stops)}", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: stop strings must not be empty", param="stop")
        opts = req.stream_options or {}
        if opts and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        include_usage = bool(opts.get("include_usage", False))
        return _Plan(prompt_ids, int(max_tokens), sampling, cfg, stops + list(extra_stops), bool(req.stream),
                     include_usage)

    # -------------------------------------------------------------- running
    async def events(job: Job, cutter: StopCutter) -> AsyncIterator[tuple[str, Any]]:
        """``("text", delta)`` pieces, then one ``("finish", (reason, gen_or_None))``.

        After a stop string the finish comes at once (``gen`` None: the generation still runs
        to its end in the background); ``finish_usage`` gets the token count later.
        """
        emitted = ""
        while True:
            kind, value = await job.next()
            if kind == "piece":
                emitted += value
                out = cutter.feed(value)
                if out:
                    yield "text", out
                if cutter.stopped:
                    yield "finish", ("stop", None)
                    return
            elif kind == "error":
                raise value
            else:
                gen = value
                if gen.text.startswith(emitted) and len(gen.text) > len(emitted):
                    out = cutter.feed(gen.text[len(emitted):])  # a tail the stream held back
                    if out:
                        yield "text", out
                    if cutter.stopped:
                        yield "finish", ("stop", gen)
                        return
                out = cutter.flush()
                if out:
                    yield "text", out
                yield "finish", ("stop" if gen.finish_reason == "eos" else "length", gen)
                return

    def usage(p: _Plan, gen, cutter: StopCutter) -> dict:
        n = len(gen.token_ids)
        if cutter.stopped:
            n = tokens_for_chars(tok, gen.token_ids, cutter.cut_end)
        return {"prompt_tokens": len(p.prompt_ids), "completion_tokens": n,
                "total_tokens": len(p.prompt_ids) + n}

    async def run_plain(p: _Plan, make_body: Callable[[str, str], dict], request: Request,
                        prefix: str = "") -> dict:
        job = await backend.start(p.prompt_ids, p.max_tokens, p.sampling, p.config)
        watch = asyncio.ensure_future(_cancel_on_disconnect(request, job))
        try:
            cutter = StopCutter(p.stops)
            parts = [prefix]
            reason, gen = "length", None
            async for kind, value in events(job, cutter):
                if kind == "text":
                    parts.append(value)
                else:
                    reason, gen = value
            if gen is None:  # a stop string ended it: the rest would be cut anyway
                job.cancel("stop string")
                gen = await job.result()
        finally:
            watch.cancel()
        body = make_body("".join(parts), reason)
        body["usage"] = usage(p, gen, cutter)
        body["pipesd"] = generation_stats(gen)
        return body

    async def run_stream(p: _Plan, chunk: Callable[[Optional[str], Optional[str]], dict],
                         first: Optional[dict] = None) -> StreamingResponse:
        job = await backend.start(p.prompt_ids, p.max_tokens, p.sampling, p.config)
        cutter = StopCutter(p.stops)
        it = events(job, cutter).__aiter__()
        try:  # surface early failures (cloud gone, refused) as a proper HTTP status
            head = await it.__anext__()
        except APIError:
            raise
        except StopAsyncIteration:  # pragma: no cover - events always ends with a finish
            head = None
        except BaseException:
            job.cancel("request cancelled")
            raise

        async def body() -> AsyncIterator[str]:
            # Leaving early (a stop string, or the client hung up: Starlette cancels this
            # generator at its await) cancels the generation; after its end it is a no-op.
            try:
                if first is not None:
                    yield _sse(first)
                ev = head
                while ev is not None:
                    kind, value = ev
                    if kind == "text":
                        yield _sse(chunk(value, None))
                    else:
                        reason, gen = value
                        last = chunk(None, reason)
                        if gen is not None:
                            last["pipesd"] = generation_stats(gen)
                        if gen is None:  # a stop string ended it: the rest would be cut anyway
                            job.cancel("stop string")
                        yield _sse(last)
                        if p.include_usage:
                            if gen is None:
                                gen = await job.result()
                            u = chunk(None, None)
                            u["choices"] = []
                            u["usage"] = usage(p, gen, cutter)
                            u["pipesd"] = generation_stats(gen)
                            yield _sse(u)
                        break
                    ev = await it.__anext__()
            except APIError as e:  # after the 200: OpenAI clients read an error event
                yield _sse(e.body())
            finally:
                job.cancel("client gone")
            yield "data: [DONE]\n\n"

        # The background task runs once the response ends, also when the client hung up before
        # this generator started (then nothing else would cancel the generation).
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(job.cancel, "client gone"))

    # -------------------------------------------------------------- routes
    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "pipesd"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        check_model(model_id)
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = await backend.try_reconnect()
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "cloud_connected": ok,
                "busy": backend.busy, "waiting": backend.waiting, "generations": backend.generations,
                "cancelled": backend.cancelled}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        refuse(req.logprobs not in (None, 0), "logprobs", "logprobs")
        refuse(bool(req.suffix), "suffix", "suffix")
        refuse(req.best_of not in (None, 1), "best_of", "best_of > 1")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids, prompt_text = encode_text(tok, prompt), prompt
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                ids = encode_text(tok, "")
            vocab = getattr(getattr(backend.client, "draft", None), "vocab_size", None)
            if vocab and (min(ids) < 0 or max(ids) >= vocab):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            prompt_text = tok.decode(ids, skip_special_tokens=True)
        p = plan(req, ids, req.max_tokens, default_max_tokens)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = prompt_text if req.echo else ""

        def body(text: Optional[str], reason: Optional[str]) -> dict:
            return {"id": cid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]}

        if p.stream:
            return await run_stream(p, body, first=body(echo, None) if echo else None)
        return await run_plain(p, body, request, prefix=echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        refuse(bool(req.logprobs), "logprobs", "logprobs")
        refuse(bool(req.tools), "tools", "tool calling")
        fmt = (req.response_format or {}).get("type", "text")
        refuse(fmt != "text", "response_format", f"response_format {fmt!r}")
        text, fallback = render_chat(tok, req.messages, chat_template)
        ids = encode_text(tok, text, template_rendered=not fallback, param="messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        p = plan(req, ids, max_tokens, None, extra_stops=(FALLBACK_STOP,) if fallback else ())
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def body(text: str, reason: str) -> dict:
            return {"id": cid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": None, "finish_reason": reason}]}

        def chunk(text: Optional[str], reason: Optional[str]) -> dict:
            delta = {} if text is None else {"content": text}
            return {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if p.stream:
            first = chunk("", None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return await run_stream(p, chunk, first=first)
        return await run_plain(p, body, request)

    # -------------------------------------------------------------- metrics
    if metrics is not None:  # a route, not a mount: /metrics answers without a redirect
        from prometheus_client.exposition import choose_encoder

        @app.get("/metrics")
        async def prometheus(request: Request) -> Response:
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(encoder(metrics.registry), media_type=content_type)

    return app
