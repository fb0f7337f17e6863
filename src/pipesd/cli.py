"""Command line: ``pipesd serve | generate | edge-server | demo | timeline | check-pair``.

- ``serve``: the cloud verification server (target model).
- ``generate``: an edge client that streams one generation to the terminal.
- ``edge-server``: an OpenAI-compatible HTTP API on the edge (docs/edge-server.md).
- ``demo``: cloud + edge on this machine with the bundled pair, and a comparison table.
- ``timeline``: draw the timeline plot of a run saved by ``generate --save-run``.
- ``check-pair``: check a draft/target pair (tokenizer, agreement, costs, thresholds).
- ``pair``: ``pair fetch NAME`` downloads and converts a real pair (opt-in, :mod:`pipesd.pairs`),
  ``pair list`` shows the known and the fetched ones; a fetched NAME then works as a model spec.

Models, links, prompts and serving come from :mod:`pipesd.launch` (shared with ``bench/``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from pipesd.launch import (PROMPTS, link_help, load_draft, load_target, make_link, serve_until_stopped,
                           start_server_subprocess, stop_process)

__all__ = ["main"]


def _set_threads(n: Optional[int]) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _make_link(args):
    """The link of ``--link`` / ``--up-mbps`` / ``--down-mbps`` / ``--delay-ms`` / ``--msg-overhead-ms`` /
    ``--trace`` (:func:`pipesd.launch.make_link`); None: no emulation."""
    return make_link(args.link, up_mbps=args.up_mbps, down_mbps=args.down_mbps, delay_ms=args.delay_ms,
                     msg_overhead_ms=args.msg_overhead_ms, trace=args.trace)


def _add_link_args(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    p.add_argument("--link", default=default, help=f"{link_help()} (default: {default or 'none'})")
    p.add_argument("--up-mbps", type=float, default=None,
                   help="uplink bandwidth in Mbit/s (each of these figures overrides the --link one; without "
                        "--link: 10 Mbit/s up, 10x down, no delay)")
    p.add_argument("--down-mbps", type=float, default=None, help="downlink bandwidth in Mbit/s")
    p.add_argument("--delay-ms", type=float, default=None, help="one-way delay in ms, both directions")
    p.add_argument("--msg-overhead-ms", type=float, default=None, help="per-message startup cost in ms (uplink)")
    p.add_argument("--trace", default=None, help="uplink bandwidth trace CSV (time_s,bandwidth_bps)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=_seed, default=None,
                   help="sampling seed, 0 .. 2**63-1 (default: a fresh random seed, printed with the stats so "
                        "the run can be replayed)")


def _seed(text: str) -> int:
    """``--seed``: a whole number the wire's signed 64-bit field can carry (argparse names the flag)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= v <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"{v} is outside 0 .. 2**63-1")
    return v


def _sampling(args):
    from pipesd.sampling import SamplingParams

    return SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)


# ---------------------------------------------------------------------------- serve
def cmd_serve(args) -> int:
    from pipesd.cloud import CloudConfig, CloudServer
    from pipesd.fingerprint import tokenizer_fingerprint

    _set_threads(args.threads)
    if args.target_gguf and args.model:
        raise ValueError("give --model (a torch target) or --target-gguf (a llama.cpp target), not both")
    token = args.auth_token if args.auth_token is not None else os.environ.get("PIPESD_AUTH_TOKEN", "")
    identities = _serve_identities(args, token)  # a bad tokens file fails before the model loads
    cfg = CloudConfig(host=args.host, port=args.port, auth_token=token, max_sessions=args.max_sessions,
                      max_prompt_tokens=args.max_prompt_tokens, max_draft_in_flight=args.max_draft_in_flight,
                      verify_pad_s=args.verify_pad_ms / 1e3, max_batch_sessions=args.max_batch_sessions)
    _apply_security_args(cfg, args)
    cfg.identities = identities
    if args.replicas > 1 or args.ray_address:
        return _serve_fleet(args, cfg)
    target = load_target(args.model, args.threads, gguf=args.target_gguf)
    server = CloudServer(target, cfg, tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer))
    if args.metrics_port is not None:
        from pipesd.metrics import cloud_registry, start_metrics_server

        mhost, mport = start_metrics_server(cloud_registry(server), args.metrics_port, args.metrics_host)
        print(f"pipesd: metrics on http://{mhost}:{mport}/metrics", flush=True)

    def started(server) -> None:
        print(f"pipesd: cloud serving on {server.address[0]}:{server.address[1]}", flush=True)
        if args.port_file:
            Path(args.port_file).write_text(str(server.address[1]))

    serve_until_stopped(server, on_started=started)
    print("pipesd: cloud stopped", flush=True)
    return 0


def _serve_fleet(args, cfg) -> int:
    """``serve --replicas N``: N replicas of this server on Ray behind one address (docs/fleet.md)."""
    from dataclasses import asdict

    from pipesd.fleet import Fleet, FleetConfig, import_ray, start_ray

    import_ray()  # no Ray: RuntimeError naming pip install 'pipesd[fleet]', before anything starts
    cloud = {k: v for k, v in asdict(cfg).items() if k not in ("host", "port")}
    cloud["identities"] = cfg.identities  # as given (asdict would flatten them)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)
    fcfg = FleetConfig(replicas=args.replicas, host=args.host, port=args.port, cloud=cloud, model=args.model,
                       target_gguf=args.target_gguf, threads=threads, drain_grace_s=args.drain_grace_s,
                       hello_grace_s=args.hello_grace_s)
    owns = start_ray(args.ray_address, args.replicas)
    try:
        fleet = Fleet(fcfg, owns_ray=owns)
    except BaseException:
        if owns:
            import ray

            ray.shutdown()
        raise
    if args.metrics_port is not None:
        from pipesd.fleet.observe import start_fleet_http

        mhost, mport = start_fleet_http(fleet, args.metrics_port, args.metrics_host, cfg.auth_token)
        print(f"pipesd: metrics on http://{mhost}:{mport}/metrics, fleet status on http://{mhost}:{mport}/fleet",
              flush=True)

    def started(fleet) -> None:
        print(f"pipesd: fleet of {args.replicas} replicas serving on {fleet.address[0]}:{fleet.address[1]}",
              flush=True)
        if args.port_file:
            Path(args.port_file).write_text(str(fleet.address[1]))

    serve_until_stopped(fleet, on_started=started)
    print("pipesd: fleet stopped", flush=True)
    return 0


# ---------------------------------------------------------------------------- generate
def _apply_security_args(cfg, args) -> None:
    """TLS and per-client limits of ``pipesd serve`` (docs/security.md)."""
    cfg.tls_cert, cfg.tls_key = args.tls_cert, args.tls_key
    cfg.max_clients = args.max_clients
    cfg.max_sessions_per_client = args.max_sessions_per_client
    cfg.max_tokens_per_s, cfg.tokens_burst = args.max_tokens_per_s, args.tokens_burst
    cfg.max_send_buffer_bytes = int(args.max_send_buffer_mb * (1 << 20))
    cfg.max_inflight_bytes_per_client = int(args.max_inflight_mb * (1 << 20))
    cfg.max_frame_bytes = int(args.max_frame_mb * (1 << 20))
    cfg.idle_timeout_s, cfg.handshake_timeout_s = args.idle_timeout_s, args.handshake_timeout_s
    cfg.max_pending_handshakes, cfg.max_pending_per_peer = args.max_pending_handshakes, args.max_pending_per_peer
    cfg.hello_grace_s = args.hello_grace_s


def _serve_identities(args, token: str) -> tuple:
    """``--auth-tokens FILE``: its identities, checked against the single token (ValueError)."""
    if not args.auth_tokens:
        return ()
    from pipesd.cloud.identities import IdentityTable, load_identities

    identities = tuple(load_identities(args.auth_tokens))
    IdentityTable(token, identities)  # a clash with --auth-token / $PIPESD_AUTH_TOKEN
    return identities


def _number(kind, low: float, inclusive: bool = True):
    """An argparse type: a finite ``kind`` >= ``low`` (> when not ``inclusive``); argparse names the flag."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'a whole number' if kind is int else 'a number'}: {text!r}") from None
        if not (v >= low if inclusive else v > low) or v != v or v == float("inf"):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
        return v
    return parse


def _bounded(kind, low: float, high: float):
    """An argparse type: a ``kind`` in ``[low, high]``; argparse names the flag."""
    base = _number(kind, low)

    def parse(text: str):
        v = base(text)
        if v > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return v
    return parse


def _add_security_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--auth-tokens", default=None, metavar="FILE",
                   help="identities, one 'NAME TOKEN [key=value ...]' per line (keys: connections, sessions, "
                        "inflight_mb, tokens_per_s, tokens_burst); beside --auth-token, which is identity 'default'")
    s.add_argument("--idle-timeout-s", type=_number(float, 0), default=300.0,
                   help="close sessions and connections idle this long, freeing their KV caches (default 300; 0: never)")
    s.add_argument("--handshake-timeout-s", type=_number(float, 0, inclusive=False), default=5.0,
                   help="a connection must authenticate within this (default 5)")
    s.add_argument("--max-pending-handshakes", type=_number(int, 1), default=64,
                   help="connections in the handshake at once; over it the oldest pending one is closed")
    s.add_argument("--max-pending-per-peer", type=_number(int, 1), default=8,
                   help="the same, per peer address (default 8), for connections silent --hello-grace-s")
    s.add_argument("--hello-grace-s", type=_number(float, 0), default=1.0,
                   help="the per-peer cap closes only a connection silent this long: a burst from one address "
                        "(a NAT) gets in (default 1; 0: at once)")
    s.add_argument("--tls-cert", default=None, help="serve TLS with this PEM certificate (chain) file")
    s.add_argument("--tls-key", default=None, help="PEM private key (default: in --tls-cert)")
    s.add_argument("--max-clients", type=int, default=256, help="authenticated connections at once; more are refused")
    s.add_argument("--max-sessions-per-client", type=int, default=8)
    s.add_argument("--max-tokens-per-s", type=float, default=0.0,
                   help="per-client token bucket over prompt + draft tokens; over it the client is slowed "
                        "(throttled), not refused (default 0: off)")
    s.add_argument("--tokens-burst", type=int, default=8192, help="token bucket size")
    s.add_argument("--max-send-buffer-mb", type=float, default=4.0,
                   help="unread replies per client before it is dropped")
    s.add_argument("--max-inflight-mb", type=float, default=64.0,
                   help="draft bytes per client awaiting verification")
    s.add_argument("--max-frame-mb", type=float, default=8.0, help="largest frame accepted")


def _edge_tls(args) -> dict:
    """``--tls-ca`` / ``--tls-insecure`` as ``EdgeClient`` keyword arguments (used for every
    reconnection too); neither given: ``EdgeConnection.connect`` reads ``PIPESD_TLS*``."""
    if args.tls_insecure:
        print("pipesd: WARNING: --tls-insecure: the cloud's certificate is NOT checked; anyone on the path can "
              "impersonate it (testing with a self-signed certificate only)", file=sys.stderr)
    if args.tls_ca is not None and not Path(args.tls_ca).is_file():
        raise ValueError(f"--tls-ca: no such file: {args.tls_ca}")
    return dict(tls_ca=args.tls_ca, tls_insecure=args.tls_insecure)


def _host_port(text: str) -> str:
    """``--cloud``: HOST:PORT (argparse names the flag when it is not)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"must look like HOST:PORT (port 1-65535), got {text!r}")
    return text


def _add_edge_tls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", default=None, help="connect with TLS; trust the cloud certificate signed by this "
                                                  "PEM CA file (or the certificate itself, if self-signed)")
    p.add_argument("--tls-insecure", action="store_true",
                   help="INSECURE, testing only: TLS without checking the cloud's certificate")


class _BadPrompt(ValueError):
    """A prompt that cannot be read or decoded (exit status 2)."""


def _read_prompt(args) -> str:
    """The prompt of `pipesd generate`: the positional argument (its bytes as the shell passed
    them: argv is decoded with surrogateescape) or ``--prompt-file`` (exact bytes; ``-``: stdin),
    decoded as strict UTF-8, so a bad byte is an error rather than a replacement character."""
    if args.prompt_file is None:
        raw = os.fsencode(args.prompt)
    elif args.prompt_file == "-":
        raw = sys.stdin.buffer.read()
    else:
        try:
            raw = Path(args.prompt_file).read_bytes()
        except OSError as e:
            raise _BadPrompt(f"prompt file {args.prompt_file}: {e.strerror or e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadPrompt(f"prompt is not valid UTF-8 at byte {e.start}") from e


def cmd_generate(args) -> int:
    from pipesd.edge import EdgeClient, EdgeConfig

    try:
        prompt = _read_prompt(args)
    except _BadPrompt as e:
        print(f"pipesd: error: {e}", file=sys.stderr)
        return 2
    # Every argument is checked before the draft loads (seconds): a typo fails at once.
    try:
        cfg = _generate_config(args)
        cfg = cfg.replace(offline_policy=args.offline_policy, verdict_timeout_s=args.verdict_timeout)
        sampling = _sampling(args)
        link = _make_link(args)
        tls = _edge_tls(args)
    except ValueError as e:
        print(f"pipesd: error: {e}", file=sys.stderr)
        return 2
    if args.tuner and cfg.method not in ("pipesd", "fixed-batch"):
        print(f"pipesd: error: --tuner tunes the dual-threshold methods (pipesd, fixed-batch), not {args.method}",
              file=sys.stderr)
        return 2
    _set_threads(args.threads)
    draft = load_draft(args.draft, args.threads, args.draft_gguf)
    token = args.auth_token if args.auth_token is not None else os.environ.get("PIPESD_AUTH_TOKEN", "")
    tty = sys.stdout.isatty()
    with EdgeClient(args.cloud, draft, cfg, auth_token=token, link=link, tuner=args.tuner, **tls) as client:
        events = client.stream_events(prompt, args.max_new_tokens, sampling)
        _print_events(_tuner_progress(events, client.tuner) if client.tuner is not None else events, tty)
        gen = client.last_generation
        st = gen.stats
        if args.save_run:
            from pipesd.timeline import save_run

            settings = {k: v for k, v in vars(args).items() if k not in ("fn", "prompt", "auth_token", "save_run")}
            save_run(args.save_run, client.last_generation, settings, prompt=prompt)
            print(f"pipesd: run saved to {args.save_run} (draw it: pipesd timeline {args.save_run})", file=sys.stderr)
    sys.stdout.write("\n")
    if args.show_ids:  # stderr, so stdout stays the text alone
        print(f"pipesd: token ids: {json.dumps(list(gen.token_ids))}", file=sys.stderr)
    print(f"[{args.method}] {st.new_tokens} tokens, TPT {st.tpt_s * 1e3:.1f} ms, mean accepted "
          f"{st.mean_accepted:.2f}, {st.verifications} verifications, {st.rollbacks} rollbacks", file=sys.stderr)
    if st.seed is not None:
        print(f"[sampling] seed {st.seed} (replay: --seed {st.seed})", file=sys.stderr)
    if st.schedule:
        print(f"[schedule] {st.schedule_reason}", file=sys.stderr)
    if cfg.method == "tree-sd":
        print(f"[tree] {st.drafted} nodes in {st.verifications} trees, {st.tree_sibling_hits} paths through a "
              f"sibling; {st.draft_steps} draft forwards", file=sys.stderr)
    if cfg.lookup == "ngram" or st.lookup_proposals:
        print(f"[lookup] {st.lookup_hits} hits, {st.lookup_proposals} proposals ({st.draft_forwards_saved} draft "
              f"forwards saved), {st.lookup_accepted} accepted; {st.draft_steps} draft forwards", file=sys.stderr)
    if st.lookup_shadow_checked:
        print(f"[lookup] measured, not used: lookup would have proposed {st.lookup_shadow} of {st.drafted} drafts, "
              f"{st.lookup_shadow_right} of {st.lookup_shadow_checked} verified ones right", file=sys.stderr)
    if st.offline_episodes:
        print(f"[offline] cloud lost {st.offline_episodes} time(s), {st.reconnects} reconnect(s), "
              f"{st.offline_tokens} tokens drafted alone, {st.offline_s:.1f} s offline", file=sys.stderr)
    if gen.unverified_from is not None:
        n = len(gen.token_ids) - gen.unverified_from
        print(f"pipesd: the cloud was unreachable at the end: the last {n} tokens are the draft's alone, unverified "
              f"({'dimmed above' if tty else 'written to stderr, not stdout'}); exit status 3", file=sys.stderr)
        return 3
    return 0


def _tuner_progress(events, tuner):
    """Pass ``events`` through, printing each tuner evaluation on stderr as it is told (the
    thresholds tried and the window's measured TPT), then the thresholds it ends with."""
    shown = 0
    version = tuner.version

    def show() -> None:
        nonlocal shown
        st = tuner.stats()
        for r in st["history"][shown:]:
            shown += 1
            print(f"pipesd: tuner: evaluation {shown}: tau_seq {r['tau_seq']:.4f}, tau_tok {r['tau_tok']:.4f} -> "
                  f"{r['tokens']} tokens in {r['wall_s'] * 1e3:.0f} ms, TPT {r['tpt_s'] * 1e3:.2f} ms, cloud "
                  f"{r.get('cloud_ms_per_token', 0.0):.2f} ms/token", file=sys.stderr, flush=True)

    for ev in events:
        yield ev
        if tuner.version != version:  # a publication follows every evaluation
            version = tuner.version
            show()
    tuner.sync()
    show()
    st = tuner.stats()
    state = (f"converged after {st['evaluations']} evaluations" if st["converged"] else
             f"still tuning: {st['evaluations']} of {getattr(tuner.tuner, 'max_evals', '?')} evaluations, "
             f"{st['window_tokens']}-token windows; the tuner keeps its state only within one process")
    budget = st.get("cloud_budget_ms_per_token")
    best = st.get("best") or {}
    if budget is not None:
        state += f"; cloud budget {budget:g} ms/token"
        if best.get("within_budget") is not None:
            state += f": {'met' if best['within_budget'] else 'NOT met'} ({best['cloud_ms_per_token']:.2f} ms/token)"
    print(f"pipesd: tuner: final thresholds tau_seq {st['tau_seq']:.4f}, tau_tok {st['tau_tok']:.4f} ({state})",
          file=sys.stderr, flush=True)


def _print_events(events, tty: bool) -> None:
    """`pipesd generate` output. Verified text goes to stdout as it comes (never changed).
    Unverified text (drafted while the cloud is unreachable): on a terminal, dimmed in place and
    erased again when retracted (cursor save/restore); elsewhere kept off stdout, so a pipe gets
    only the target's text, and written to stderr at the end if it is still unverified then."""
    dim, reset, save, restore_clear = "\x1b[2m", "\x1b[0m", "\x1b7", "\x1b8\x1b[J"
    out, err = sys.stdout, sys.stderr
    shown = ""  # the unverified tail
    for ev in events:
        if ev.kind == "verified":
            out.write(ev.text)
        elif ev.kind == "unverified":
            if not shown:
                if tty:
                    out.write(save)
                else:
                    print("\n[pipesd] cloud unreachable: drafting alone; unverified text is held back", file=err)
            shown += ev.text
            if tty:
                out.write(dim + ev.text + reset)
        else:  # retract: the cloud is back and verifies the tail
            if tty and shown:
                out.write(restore_clear)
            elif shown:
                print("[pipesd] cloud back: the held-back text is being verified", file=err)
            shown = ""
        out.flush()
    if shown and not tty:
        print("[pipesd] unverified (draft-only) suffix:", file=err)
        err.write(shown + "\n")


# ---------------------------------------------------------------------------- edge-server
def cmd_edge_server(args) -> int:
    """OpenAI-compatible HTTP API on the edge (see docs/edge-server.md)."""
    try:
        from pipesd.serving import create_app, serve
    except ImportError as e:
        raise SystemExit(f"pipesd: edge-server needs the serve extra (pip install 'pipesd[serve]'): {e}")
    from pipesd.edge import EdgeClient, EdgeConfig

    cfg = EdgeConfig.for_method(args.method, draft_step_s=args.draft_ms / 1e3)
    tls = _edge_tls(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("PIPESD_EDGE_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise ValueError("--api-key must not be empty")
    if api_key is None and args.host not in ("127.0.0.1", "::1", "localhost"):
        print(f"pipesd: WARNING: listening on {args.host} without --api-key (or $PIPESD_EDGE_API_KEY): anyone who "
              "can reach the port can use this server and its cloud", file=sys.stderr)
    _set_threads(args.threads)
    draft = load_draft(args.draft, args.threads, args.draft_gguf)
    token = args.auth_token if args.auth_token is not None else os.environ.get("PIPESD_AUTH_TOKEN", "")

    def connect():  # also used to reconnect after the cloud went away
        return EdgeClient(args.cloud, draft, cfg, auth_token=token, link=_make_link(args), **tls)

    client = connect()  # fail fast on a wrong --cloud or token
    metrics = None
    try:
        from pipesd.metrics import EdgeMetrics

        metrics = EdgeMetrics()
    except ImportError:
        pass
    chat_template = Path(args.chat_template).read_text() if args.chat_template else None
    name = args.model_name or (Path(args.draft).name if args.draft and Path(args.draft).is_dir() else None)
    if not name:
        from pipesd import zoo

        name = args.draft or zoo.DEFAULT_PAIR
    app = create_app(client, model_name=name, tokenizer=draft.tokenizer, default_method=args.method, config=cfg,
                     metrics=metrics, connect=connect, default_max_tokens=min(args.default_max_tokens,
                                                                             args.max_tokens_limit),
                     max_tokens_limit=args.max_tokens_limit, default_temperature=args.default_temperature,
                     chat_template=chat_template, api_key=api_key)

    def ready(url: str) -> None:
        print(f"pipesd: edge server (OpenAI API) at {url}/v1 - model {name!r}, cloud {args.cloud}, "
              f"method {args.method}", flush=True)
        if args.port_file:
            Path(args.port_file).write_text(url.rsplit(":", 1)[1])

    try:
        serve(app, args.host, args.port, log_level=args.log_level, on_ready=ready)
    finally:
        client_now = app.state.backend.client
        if client_now is not None:
            client_now.close()
    print("pipesd: edge server stopped", flush=True)
    return 0


# ---------------------------------------------------------------------------- demo
DEMO_PROMPTS = [PROMPTS[i] for i in (0, 1, 4)]  # the demo's three, as it has always shown them


def cmd_demo(args) -> int:
    import secrets

    import numpy as np

    from pipesd.edge import EdgeClient, EdgeConfig
    from pipesd.edge.config import canonical_method

    _set_threads(1)
    print("pipesd demo: bundled pair, edge and cloud on this machine", flush=True)
    token = secrets.token_hex(8)
    t0 = time.perf_counter()
    proc, port = start_server_subprocess(args.model, threads=1, verify_pad_ms=args.verify_pad_ms, auth_token=token)
    print(f"  cloud up on 127.0.0.1:{port} ({time.perf_counter() - t0:.1f} s); loading the draft...", flush=True)
    results = {}
    try:
        draft = load_draft(args.draft, 1, args.draft_gguf)
        link = _make_link(args)
        link_desc = args.link or "none"
        print(f"  link: {link_desc}; edge draft step padded to {args.draft_ms:.0f} ms; cloud verify padded to "
              f"{args.verify_pad_ms:.0f} ms; {len(DEMO_PROMPTS[: args.prompts])} prompts x {args.max_new_tokens} tokens",
              flush=True)
        methods = [canonical_method(m) for m in args.methods.split(",")]
        with EdgeClient(f"127.0.0.1:{port}", draft, auth_token=token, link=link) as client:
            for method in methods:
                cfg = EdgeConfig.for_method(method, draft_step_s=args.draft_ms / 1e3, k=args.k)
                rows = []
                for i, prompt in enumerate(DEMO_PROMPTS[: args.prompts]):
                    if method == "pipesd" and i == 0 and not args.quiet:
                        print(f"\n--- {method}, prompt {i + 1} (streamed as verified) ---", flush=True)
                        sys.stdout.write(prompt)
                        for piece in client.stream(prompt, args.max_new_tokens, config=cfg):
                            sys.stdout.write(piece)
                            sys.stdout.flush()
                        g = client.last_generation
                        print("\n---", flush=True)
                    else:
                        g = client.generate(prompt, args.max_new_tokens, config=cfg)
                    rows.append(g)
                    print(f"  {method:18s} prompt {i + 1}: {g.stats.new_tokens} tokens, TPT {g.stats.tpt_s * 1e3:6.1f} ms",
                          flush=True)
                results[method] = rows
    finally:
        stop_process(proc)
    _print_demo_table(results, args)
    if args.json:
        out = {m: [g.stats.to_dict() for g in rows] for m, rows in results.items()}
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    # Lossless check the user can see: PipeSD's tokens equal the target's own (decoding alone).
    ref = next((m for m in ("target-per-token", "cloud-stream") if m in results), None)
    if ref is not None and "pipesd" in results:
        same = all(a.token_ids == b.token_ids for a, b in zip(results["pipesd"], results[ref]))
        print(f"PipeSD output identical to {ref} greedy output: {'yes' if same else 'NO'}")
        if not same:
            return 1
    return 0


def _print_demo_table(results: dict, args) -> None:
    import numpy as np

    def tpt(m):
        rows = results.get(m)
        return float(np.median([g.stats.tpt_s for g in rows])) if rows else float("nan")

    base_v, base_t = tpt("vanilla-sd"), tpt("target-per-token")
    print()
    print(f"| method | TPT (ms, median) | mean accepted | verifications / 100 tok | speedup vs vanilla SD | speedup vs target-per-token |")
    print("|---|---|---|---|---|---|")
    for m, rows in results.items():
        t = tpt(m)
        acc = np.mean([g.stats.mean_accepted for g in rows])
        ver = 100 * sum(g.stats.verifications for g in rows) / max(1, sum(g.stats.new_tokens for g in rows))
        print(f"| {m} | {t * 1e3:.1f} | {acc:.2f} | {ver:.1f} | {base_v / t:.2f}x | {base_t / t:.2f}x |")
    print()


def _cloud_budget(text: str):
    """``--cloud-budget``: milliseconds >= 0, ``vanilla`` (None) or ``none`` / ``inf`` (no limit)."""
    t = text.strip().lower()
    if t == "vanilla":
        return None
    if t in ("none", "inf"):
        return math.inf
    try:
        v = float(t)
    except ValueError:
        v = -1.0
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected milliseconds >= 0, 'vanilla' or 'none', got {text!r}")
    return v


def _generate_config(args):
    """EdgeConfig of `pipesd generate`: the method's preset, --k, --tau-seq/--tau-tok, and a
    recorded timeline when the run is saved."""
    from pipesd.edge import EdgeConfig

    kw = dict(draft_step_s=args.draft_ms / 1e3, k=args.k, record_timeline=bool(args.save_run))
    if getattr(args, "lookup", None) is not None:
        kw["lookup"] = args.lookup
    if getattr(args, "cloud_budget", None) is not None:
        kw["cloud_budget_ms_per_token"] = args.cloud_budget
    if getattr(args, "tree_width", None) is not None:
        kw["tree_width"] = args.tree_width
    if getattr(args, "tree_confidence", None) is not None:
        kw["tree_confidence"] = args.tree_confidence
    # A threshold not given keeps the method's own default (hsl: tau_tok 0.99).
    return EdgeConfig.for_method(args.method, tau_seq=args.tau_seq, tau_tok=args.tau_tok, **kw)


# ---------------------------------------------------------------------------- timeline
def cmd_timeline(args) -> int:
    from pipesd.timeline import render_run

    out = render_run(args.run, args.output)
    print(f"pipesd: timeline written to {out}", flush=True)
    return 0


# ---------------------------------------------------------------------------- check-pair
def cmd_check_pair(args) -> int:
    from pipesd.checkpair import PairMismatch, check_pair, format_report, load_prompts

    _set_threads(args.threads)
    prompts = load_prompts(args.prompts) if args.prompts else None
    try:
        report = check_pair(args.draft, args.target, prompts=prompts, tokens=args.tokens, link=args.link,
                            draft_ms=args.draft_ms, verify_ms=args.verify_ms, sampling=args.sampling)
    except PairMismatch as e:
        print(f"pipesd: check-pair: incompatible pair: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(trace=args.trace), indent=1, default=float))
    else:
        print(format_report(report))
    return 0


# ---------------------------------------------------------------------------- pair
def cmd_pair_fetch(args) -> int:
    """Download, check and convert a known pair (:func:`pipesd.pairs.fetch`); its paths on stdout."""
    from pipesd import pairs

    try:
        paths = pairs.fetch(args.name, force=args.force)
    except ValueError as e:  # an unknown or malformed name
        print(f"pipesd: error: {e}", file=sys.stderr)
        return 2
    for key in ("draft", "target", "draft_gguf", "target_gguf"):
        print(f"{key:12s} {getattr(paths, key)}")
    return 0


def cmd_pair_list(args) -> int:
    """The known and the fetched pairs, one per line."""
    from pipesd import pairs

    rows = pairs.list_pairs()
    w = max([len(r.name) for r in rows] + [4])
    print(f"{'NAME':{w}s}  {'STATUS':11s}  {'SIZE':>16s}  PATH")
    for r in rows:
        size = (f"{r.disk_bytes / 1e9:.2f} GB on disk" if r.fetched
                else f"{r.download_bytes / 1e9:.2f} GB to get" if r.download_bytes else "-")
        print(f"{r.name:{w}s}  {'fetched' if r.fetched else 'not fetched':11s}  {size:>16s}  {r.path}")
    if not any(r.fetched for r in rows):
        print("(nothing fetched yet: pipesd pair fetch NAME)")
    return 0


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from pipesd.edge.config import ALIASES, METHODS

    method_names = METHODS + tuple(ALIASES)  # deprecated aliases are accepted, and map to their method
    from pipesd.transport.link import preset_names

    p = argparse.ArgumentParser(prog="pipesd", description="Cloud-edge pipelined speculative decoding")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one JSON object per line")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the cloud verification server")
    s.add_argument("--model", default=None, help="target model directory or bundled pair name (default: bundled)")
    s.add_argument("--target", dest="model", default=argparse.SUPPRESS, help="alias of --model")
    s.add_argument("--target-gguf", default=None, metavar="FILE",
                   help="target as a GGUF file run by llama.cpp (needs llama-cpp-python: pip install 'pipesd[llama]')")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7070, help="0 picks a free port")
    s.add_argument("--auth-token", default=None, help="shared secret (default: $PIPESD_AUTH_TOKEN or none)")
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    s.add_argument("--max-sessions", type=int, default=64)
    s.add_argument("--max-prompt-tokens", type=int, default=4096)
    s.add_argument("--max-draft-in-flight", type=int, default=256)
    s.add_argument("--verify-pad-ms", type=float, default=0.0, help="emulate a slower cloud: pad each verification")
    s.add_argument("--max-batch-sessions", type=_number(int, 1), default=32,
                   help="most sessions verified in one batched launch (1: no cross-session batching)")
    _add_security_args(s)
    s.add_argument("--port-file", default=None, help=argparse.SUPPRESS)
    s.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port (0: any)")
    s.add_argument("--metrics-host", default="127.0.0.1", help="metrics address (default: loopback only)")
    s.add_argument("--replicas", type=_number(int, 1), default=1,
                   help="verifier replicas on Ray behind this one address (default 1: a single server, no Ray; "
                        "needs pip install 'pipesd[fleet]'; docs/fleet.md)")
    s.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. HEAD:6379, after `ray start --head`); default: start a local one")
    s.add_argument("--drain-grace-s", type=_number(float, 0), default=0.0,
                   help="fleet: on SIGTERM let open sessions finish this long before stopping (default 0)")
    s.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="generate text with an edge client (streams to the terminal)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("prompt", nargs="?", help="the prompt (or --prompt-file)")
    src.add_argument("--prompt-file", default=None, metavar="FILE",
                     help="read the prompt from FILE, exact bytes (UTF-8; no newline stripped); - reads stdin")
    g.add_argument("--show-ids", action="store_true",
                   help="after the text, print the generated token ids on stderr (pipesd: token ids: [...])")
    g.add_argument("--cloud", required=True, type=_host_port, help="HOST:PORT of `pipesd serve`")
    g.add_argument("--draft", default=None, help="draft model directory or bundled pair name (default: bundled)")
    g.add_argument("--draft-gguf", default=None, metavar="PATH",
                   help="draft as a GGUF file run by llama.cpp (needs llama-cpp-python; a bundled pair name: its draft.gguf)")
    g.add_argument("--method", default="pipesd", choices=method_names, metavar="METHOD",
                   help=f"one of {', '.join(METHODS)} (docs/runtime.md, Methods)")
    g.add_argument("--max-new-tokens", type=_number(int, 1), default=128)
    g.add_argument("--auth-token", default=None)
    _add_edge_tls_args(g)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--draft-ms", type=_number(float, 0), default=0.0, help="emulate a slower edge: pad each draft step")
    _add_link_args(g)
    _add_sampling_args(g)
    g.add_argument("--k", type=_number(int, 1), default=4, help="draft length of vanilla-sd / pipe-fixed-k")
    g.add_argument("--tau-seq", type=float, default=None, help="sequence-confidence threshold (default 0.35)")
    g.add_argument("--tau-tok", type=float, default=None, help="token-confidence threshold (default 0.5; hsl 0.99)")
    g.add_argument("--tuner", default=None, choices=["bayes", "fixed"],
                   help="tune (tau_seq, tau_tok) online from the given thresholds (bayes: GP over 64-token windows; "
                        "fixed: measure windows, never move); each evaluation and the final thresholds go to stderr")
    g.add_argument("--cloud-budget", type=_cloud_budget, default=None, metavar="MS|vanilla|none",
                   help="the most cloud busy ms per generated token the adaptive schedule (--method "
                        "pipesd-adaptive) and the tuner may spend; vanilla (default for pipesd-adaptive): what vanilla "
                        "SD at its best K spends; none: no limit (cloud streaming allowed)")
    g.add_argument("--lookup", default=None, choices=["off", "ngram", "shadow", "auto"],
                   help="ngram: prompt-lookup proposals (the token after the last earlier occurrence of the last "
                        "3-4 tokens) drafted without a draft forward; lossless (docs/runtime.md). shadow: measure "
                        "what lookup would propose, without using it. auto (the default for --method "
                        "pipesd-adaptive; off for the others): the adaptive schedule decides")
    g.add_argument("--tree-width", type=_bounded(int, 1, 8), default=None, metavar="W",
                   help="tree-sd: candidates per unsure position (the draft's token and W-1 siblings; default 2)")
    g.add_argument("--tree-confidence", type=_bounded(float, 0, 1), default=None, metavar="P",
                   help="tree-sd: a position whose draft probability is below P gets siblings (default 0.8)")
    g.add_argument("--save-run", default=None, metavar="RUN.json",
                   help="write the run (tokens, stats, timeline, settings) for `pipesd timeline`")
    g.add_argument("--offline-policy", default="draft", choices=["draft", "wait", "fail"],
                   help="when the cloud is unreachable: draft alone, flagged unverified, and reconcile when it "
                        "returns (default); wait for it (up to 60 s); fail at once. See docs/reliability.md")
    g.add_argument("--verdict-timeout", type=_number(float, 0, inclusive=False), default=60.0, metavar="S",
                   help="no verdict for this long counts as losing the cloud (default 60)")
    g.set_defaults(fn=cmd_generate)

    e = sub.add_parser("edge-server", help="OpenAI-compatible HTTP API on the edge (/v1/completions, "
                                           "/v1/chat/completions, /v1/models, /health)")
    e.add_argument("--cloud", required=True, type=_host_port, help="HOST:PORT of `pipesd serve`")
    e.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; beyond "
                                                       "it, set --api-key)")
    e.add_argument("--api-key", default=None,
                   help="clients must send 'Authorization: Bearer KEY', as to OpenAI; 401 otherwise (default: "
                        "$PIPESD_EDGE_API_KEY, else no check)")
    e.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    e.add_argument("--draft", default=None, help="draft model directory or bundled pair name (default: bundled)")
    e.add_argument("--draft-gguf", default=None, metavar="PATH",
                   help="draft as a GGUF file run by llama.cpp (needs llama-cpp-python; a bundled pair name: its draft.gguf)")
    e.add_argument("--model-name", default=None, help="model id clients ask for (default: the pair or directory name)")
    e.add_argument("--method", default="pipesd", choices=method_names, metavar="METHOD",
                   help=f"default decoding method: one of {', '.join(METHODS)}")
    e.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask for")
    e.add_argument("--default-max-tokens", type=int, default=16, help="completions without max_tokens (as OpenAI)")
    e.add_argument("--default-temperature", type=float, default=1.0,
                   help="when a request gives none (1.0 as OpenAI; 0 = greedy)")
    e.add_argument("--chat-template", default=None, help="Jinja chat template file (default: the tokenizer's, "
                                                         "else a plain 'User:/Assistant:' fallback)")
    e.add_argument("--auth-token", default=None, help="the cloud's shared secret (default: $PIPESD_AUTH_TOKEN)")
    _add_edge_tls_args(e)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--draft-ms", type=float, default=0.0, help="emulate a slower edge: pad each draft step")
    e.add_argument("--port-file", default=None, help=argparse.SUPPRESS)
    _add_link_args(e)
    e.set_defaults(fn=cmd_edge_server)

    d = sub.add_parser("demo", help="cloud + edge on this machine with the bundled pair; prints a comparison")
    d.add_argument("--model", default=None, help="target (default: bundled)")
    d.add_argument("--draft", default=None, help="draft (default: bundled)")
    d.add_argument("--draft-gguf", default=None, metavar="PATH",
                   help="draft as a GGUF file run by llama.cpp (needs llama-cpp-python; a bundled pair name: its draft.gguf)")
    d.add_argument("--prompts", type=int, default=3)
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--methods", default="target-per-token,vanilla-sd,pipesd")
    d.add_argument("--k", type=int, default=4, help="draft length of vanilla SD")
    d.add_argument("--draft-ms", type=float, default=30.0, help="edge compute profile: ms per draft token")
    d.add_argument("--verify-pad-ms", type=float, default=30.0, help="cloud compute profile: ms per verification")
    d.add_argument("--json", default=None, help="write the per-run stats here")
    d.add_argument("--quiet", action="store_true", help="do not stream the first generation")
    _add_link_args(d, default="4g")
    d.set_defaults(fn=cmd_demo)
    t = sub.add_parser("timeline", help="draw the timeline plot of a run saved by `generate --save-run`")
    t.add_argument("run", help="RUN.json")
    t.add_argument("-o", "--output", default=None, help="image file (default: RUN.png)")
    t.set_defaults(fn=cmd_timeline)

    c = sub.add_parser("check-pair", help="check a draft/target pair: tokenizer, agreement, costs, thresholds")
    c.add_argument("draft", help="draft model directory, bundled pair name, or NAME:draft")
    c.add_argument("target", help="target model directory, bundled pair name, or NAME:target")
    c.add_argument("--prompts", default=None, help="prompts file (.json list, .jsonl, or one per line)")
    c.add_argument("--tokens", type=int, default=32, help="target-greedy tokens measured per prompt")
    c.add_argument("--link", default="paper",
                   help=f"link preset the suggestion models: {', '.join(preset_names())} or none (default: paper)")
    c.add_argument("--draft-ms", type=float, default=None, help="model this draft step time instead of the measured one")
    c.add_argument("--verify-ms", type=float, default=None, help="model this verification time instead of the measured one")
    c.add_argument("--sampling", action="store_true", help="model the sampling wire (top-k q per token)")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.add_argument("--trace", action="store_true", help="with --json: include the per-position trace")
    c.set_defaults(fn=cmd_check_pair)

    pp = sub.add_parser("pair", help="real model pairs: fetch one (opt-in download), list known and fetched")
    psub = pp.add_subparsers(dest="pair_cmd", required=True)
    pf = psub.add_parser("fetch", help="download, check (size, sha256) and convert a known pair into the cache")
    pf.add_argument("name", help="a known pair (pipesd pair list)")
    pf.add_argument("--force", action="store_true", help="fetch it again even if it is already fetched")
    pf.set_defaults(fn=cmd_pair_fetch)
    pl = psub.add_parser("list", help="known and fetched pairs, sizes and cache paths")
    pl.set_defaults(fn=cmd_pair_list)

    for sp in sub.choices.values():  # also accepted after the subcommand
        sp.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"], help=argparse.SUPPRESS)
    return p


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    from pipesd.metrics import configure_logging

    try:
        configure_logging(args.log_level, args.log_format)
    except ValueError as e:
        print(f"pipesd: error: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: whatever ran was cancelled and closed on the way out (docs/reliability.md)
        print("\npipesd: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, TimeoutError, ConnectionError, OSError) as e:
        print(f"pipesd: error: {e}", file=sys.stderr)
        return 1
