"""What the command line (``pipesd.cli``) and the benchmarks (``bench/``) both need to set up a run.

- :func:`make_link`: a :class:`~pipesd.transport.link.LinkEmulator` from a link spec (a preset,
  ``UP/DELAY`` or ``none``) and explicit figures; :func:`link_help` describes the specs for
  ``--help`` from the preset table, so the two cannot drift apart.
- :func:`load_draft`, :func:`load_target`: one model from a spec (a local model directory,
  ``bundled``, a bundled pair name, a local pair directory; a draft also as ``self-noisy:SCALE``
  or a GGUF file; either as ``replay:FILE``, a recorded pair, :mod:`pipesd.models.replay`);
  :func:`load_pair`: both halves of a pair from one spec.
- :data:`PROMPTS`: the code prompts the demo and the benchmarks generate from.
- :func:`serve_until_stopped`: run a :class:`~pipesd.cloud.CloudServer` in this process until
  SIGINT/SIGTERM; :func:`start_server_subprocess` / :func:`stop_process`: ``pipesd serve`` in
  its own process.

Bad input raises :class:`ValueError` with a message that names the valid choices. Nothing
heavy (torch, transformers) is imported until a function needs it.
"""
from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["BUNDLED", "PROMPTS", "link_help", "make_link", "load_draft", "load_target", "load_pair",
           "serve_until_stopped", "start_server_subprocess", "stop_process"]

#: Spec of the default bundled pair (``pipesd.zoo.DEFAULT_PAIR``); ``None`` and ``""`` mean the same.
BUNDLED = "bundled"
_NOISY = "self-noisy:"
#: Spec prefix of a recorded pair (``replay:FILE``, :mod:`pipesd.models.replay`), draft or target.
REPLAY = "replay:"

#: Code prompts of the bundled pair's domain. Benchmarks take the first N; their recorded
#: results depend on this order, so append rather than reorder.
PROMPTS = [
    "def read_config(path):\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n",
    "    def __repr__(self):\n        return",
    "for key, value in sorted(items.items()):\n",
    "try:\n    import threading\nexcept ImportError:\n",
]


# ---------------------------------------------------------------------------- links
def link_help() -> str:
    """What ``--link`` accepts, from the preset table (``pipesd.transport.link.PRESETS``)."""
    from pipesd.transport.link import preset_names

    return (f"link emulation: a preset ({', '.join(preset_names())}), UP/DELAY (UP Mbit/s uplink, 10x that "
            "downlink, DELAY ms one way, e.g. 10/25), or none")


def _link_spec(spec: str):
    """``(uplink, downlink)`` profiles of a preset name or ``UP/DELAY``."""
    from pipesd.transport.link import PRESETS, LinkProfile, link_preset

    if spec in PRESETS:
        return link_preset(spec)
    if "/" in spec:
        try:
            mbps, delay_ms = (float(x) for x in spec.split("/"))
        except ValueError:
            mbps = delay_ms = math.nan
        if math.isfinite(mbps) and math.isfinite(delay_ms) and mbps > 0 and delay_ms >= 0:
            return (LinkProfile(mbps * 1e6, delay_ms / 1e3, 0.0005), LinkProfile(mbps * 10e6, delay_ms / 1e3))
    raise ValueError(f"unknown link {spec!r}; {link_help()}")


def make_link(spec: Optional[str] = None, *, up_mbps: Optional[float] = None, down_mbps: Optional[float] = None,
              delay_ms: Optional[float] = None, msg_overhead_ms: Optional[float] = None, trace=None,
              up_scale: float = 1.0):
    """A :class:`~pipesd.transport.link.LinkEmulator`, or ``None`` when nothing asks for emulation.

    ``spec``: ``None``/``"none"``, a preset name, or ``"UP/DELAY"`` (see :func:`link_help`;
    0.5 ms per uplink message). Each explicit figure replaces that figure of the spec; with no
    spec they start from 10 Mbit/s up, no delay, no per-message cost, and the downlink is 10x
    the uplink unless ``down_mbps`` says otherwise. ``delay_ms`` is one way, both directions;
    ``msg_overhead_ms`` is the uplink's per-message cost. ``trace``: uplink bandwidth trace
    (a CSV path ``time_s,bandwidth_bps`` or a ``BandwidthTrace``). ``up_scale`` multiplies the
    uplink's bandwidth, trace included (``bench/e2e --paper-wire``).
    """
    from dataclasses import replace

    from pipesd.transport.link import BandwidthTrace, LinkEmulator, LinkProfile

    for name, v in (("up_mbps", up_mbps), ("down_mbps", down_mbps), ("up_scale", up_scale)):
        if v is not None and not v > 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    for name, v in (("delay_ms", delay_ms), ("msg_overhead_ms", msg_overhead_ms)):
        if v is not None and not v >= 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    explicit = any(v is not None for v in (up_mbps, down_mbps, delay_ms, msg_overhead_ms, trace))
    if spec in (None, "", "none"):
        if not explicit:
            return None
        up, down = LinkProfile(10e6), None  # downlink: 10x the uplink, below
    else:
        up, down = _link_spec(spec)
    if up_mbps is not None:
        up = replace(up, bandwidth_bps=up_mbps * 1e6)
    if msg_overhead_ms is not None:
        up = replace(up, per_message_s=msg_overhead_ms / 1e3)
    if trace is not None:
        up = replace(up, trace=trace if isinstance(trace, BandwidthTrace) else BandwidthTrace.from_csv(trace))
    if down_mbps is not None or down is None:
        down = LinkProfile(down_mbps * 1e6 if down_mbps is not None else 10 * up.bandwidth_bps, up.delay_s)
    if delay_ms is not None:
        up, down = replace(up, delay_s=delay_ms / 1e3), replace(down, delay_s=delay_ms / 1e3)
    if up_scale != 1.0:
        t = up.trace
        if t is not None:
            t = BandwidthTrace([(s, b * up_scale) for s, b in zip(t.times, t.bws)], t.period)
        up = replace(up, bandwidth_bps=up.bandwidth_bps * up_scale, trace=t)
    return LinkEmulator(up, down)


# ---------------------------------------------------------------------------- models
def _model_dir(spec: Optional[str], role: str) -> Path:
    """The ``role`` (``draft``/``target``) model directory of ``spec``: ``None``/``bundled``
    (the default pair), a bundled or fetched (:mod:`pipesd.pairs`) pair name or ``NAME:role``,
    a local model directory, or a local pair directory (``draft/`` and ``target/`` inside, as
    ``pipesd.zoo.train`` writes)."""
    from pipesd import zoo

    name = zoo.DEFAULT_PAIR if spec in (None, "", BUNDLED) else spec
    p = Path(name)
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        if (p / role / "config.json").is_file():
            return p / role
        raise ValueError(f"{role} {spec}: a directory with no config.json (nor {role}/config.json): not a "
                         "transformers model directory or a pair directory")
    pair, _, sub = name.partition(":")
    if pair in zoo.available() and sub in ("", role):
        return zoo.pair_path(pair) / role
    from pipesd import pairs

    if sub in ("", role) and (pair in pairs.REGISTRY or pairs.is_fetched(pair)):
        return getattr(pairs.resolve(pair), role)  # a fetched pair; an unfetched one: "run pipesd pair fetch"
    if os.sep in name or name.startswith("."):
        raise ValueError(f"{role} {spec}: no such directory (models load from local paths only)")
    noisy = f", {_NOISY}SCALE" if role == "draft" else ""
    raise ValueError(f"{role} {spec!r} is neither a directory nor a bundled pair; choose a model or pair directory, "
                     f"{BUNDLED!r}{noisy}, or a bundled pair: {', '.join(zoo.available()) or 'none'} "
                     f"(also as NAME:{role}), or a fetched pair (`pipesd pair list`)")


def load_target(spec: Optional[str] = None, threads: Optional[int] = None, gguf: Optional[str] = None):
    """A :class:`~pipesd.models.TargetModel` from ``spec`` (see :func:`_model_dir`), or with
    ``gguf`` (a GGUF file; wins over ``spec``) a :class:`~pipesd.models.llamacpp.LlamaCppTarget`
    run by llama.cpp (``threads`` None: all cores)."""
    if gguf:
        return _load_gguf_target(gguf, threads)
    if spec and spec.startswith(REPLAY):
        from pipesd.models.replay import ReplayTarget

        return ReplayTarget.from_file(spec[len(REPLAY):])
    from pipesd.models import TargetModel

    return TargetModel.from_pretrained(_model_dir(spec, "target"), threads=threads)


def _sibling_tokenizer(path, role: str) -> Optional[Path]:
    """None (the GGUF's own tokenizer) or, for a GGUF without one (another converter, e.g. a
    fetched pair's upstream file), the tokenizer of the pair directory's ``role/`` next to it
    (the layout ``pipesd pair fetch`` writes)."""
    p = Path(path)
    if p.is_file() and (p.parent / role / "tokenizer.json").is_file():
        from pipesd.zoo.gguf_export import load_gguf_tokenizer

        if load_gguf_tokenizer(p) is None:
            return p.parent / role
    return None


def _load_gguf_target(path: str, threads: Optional[int]):
    """A llama.cpp target; its tokenizer as :func:`_sibling_tokenizer` finds it."""
    try:
        from pipesd.models.llamacpp import LlamaCppTarget

        return LlamaCppTarget(path, tokenizer=_sibling_tokenizer(path, "target"), threads=threads)
    except ImportError as e:  # not bad input: a missing optional dependency
        raise RuntimeError(f"target GGUF {path}: {e}") from e
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"target GGUF {path}: {e}") from e


def load_draft(spec: Optional[str] = None, threads: Optional[int] = None, gguf: Optional[str] = None):
    """A draft runner. ``gguf`` (wins over ``spec``): a GGUF file run by llama.cpp, or a bundled
    pair name (its shipped ``draft.gguf``). Otherwise ``spec`` as for :func:`load_target`, or
    ``self-noisy:SCALE``: the bundled *target* with Gaussian weight noise (SCALE x each tensor's
    std, seed 0) as the draft, a controlled pair whose acceptance is near the paper's while the
    edge's speed comes from the compute profile."""
    from pipesd.models import DraftModel

    if gguf:
        return _load_gguf_draft(gguf, threads)
    if spec and spec.startswith(_NOISY):
        return _noisy_draft(load_target(None, threads), spec, threads)
    if spec and spec.startswith(REPLAY):
        from pipesd.models.replay import ReplayDraft

        return ReplayDraft.from_file(spec[len(REPLAY):])
    return DraftModel.from_pretrained(_model_dir(spec, "draft"), threads=threads)


def _load_gguf_draft(spec: str, threads: Optional[int]):
    from pipesd import zoo
    from pipesd.zoo.gguf_export import bundled_gguf

    try:
        path = bundled_gguf(spec) if spec in zoo.available() else Path(spec)
        from pipesd.models.llamacpp import LlamaCppDraft

        return LlamaCppDraft(path, tokenizer=_sibling_tokenizer(path, "draft"), threads=threads or 1)
    except ImportError as e:  # not bad input: a missing optional dependency
        raise RuntimeError(f"draft GGUF {spec}: {e}") from e
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"draft GGUF {spec}: {e} (give a .gguf file or a bundled pair: "
                         f"{', '.join(zoo.available()) or 'none'})") from e


def _noisy_draft(target, spec: str, threads: Optional[int]):
    import copy

    import torch

    from pipesd.models import DraftModel

    try:
        scale = float(spec[len(_NOISY):])
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"draft {spec!r}: {_NOISY}SCALE needs a number >= 0 (e.g. {_NOISY}0.03)")
    m = copy.deepcopy(target.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-6))
    return DraftModel(m, target.tokenizer, threads=threads, wire_topk=8)


def load_pair(spec: Optional[str] = None, threads: Optional[int] = None):
    """A :class:`pipesd.zoo.Pair`: ``None``/``bundled``, a bundled pair name, a local pair
    directory (``draft/`` and ``target/`` inside), or ``self-noisy:SCALE`` (the bundled target
    and its noisy copy, see :func:`load_draft`). Vocabularies are checked."""
    from pipesd import zoo
    from pipesd.models import check_same_vocab

    if spec and spec.startswith(_NOISY):
        target = load_target(None, threads)
        draft = _noisy_draft(target, spec, threads)
        return zoo.Pair(spec, None, draft, target, target.tokenizer)
    if spec and Path(spec).is_dir() and (Path(spec) / "config.json").is_file():
        raise ValueError(f"pair {spec}: a model directory, not a pair directory (draft/ and target/ inside)")
    target = load_target(spec, threads)
    draft = load_draft(spec, threads)
    check_same_vocab(draft, target)
    name = zoo.DEFAULT_PAIR if spec in (None, "", BUNDLED) else spec
    return zoo.Pair(Path(name).name, _model_dir(spec, "target").parent, draft, target, target.tokenizer)


# ---------------------------------------------------------------------------- serving
def serve_until_stopped(server, *, on_started: Optional[Callable[[object], None]] = None,
                        on_tick: Optional[Callable[[object], None]] = None, tick_s: float = 1.0) -> None:
    """Run ``server.serve()`` (a :class:`~pipesd.cloud.CloudServer`) on a new event loop until
    ``server.stop()``, which SIGINT and SIGTERM call. ``on_started(server)`` once it listens
    (``server.address`` is set); ``on_tick(server)`` every ``tick_s`` seconds while it serves
    and once after it stopped. If the server fails before listening (the port is taken, a bad
    TLS file), its exception is raised here at once."""

    async def run() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(server.serve())
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, server.stop)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
                pass
        while not server._started.is_set() and not task.done():
            await asyncio.sleep(0.01)
        if task.done():  # failed (or stopped) before it started listening
            await task
            return
        if getattr(server, "_start_error", None) is not None:
            raise server._start_error
        if on_started is not None:
            on_started(server)
        while not task.done():
            if on_tick is not None:
                on_tick(server)
            await asyncio.wait({task}, timeout=tick_s)
        if on_tick is not None:
            on_tick(server)
        await task

    asyncio.run(run())


def start_server_subprocess(model: Optional[str], *, threads: int = 1, verify_pad_ms: float = 0.0,
                            auth_token: str = "", timeout_s: float = 120.0,
                            extra: tuple = (), target_gguf: Optional[str] = None) -> tuple[subprocess.Popen, int]:
    """Start ``pipesd serve`` on a free port in its own process; returns (process, port).
    ``target_gguf``: serve that GGUF file with llama.cpp (``--target-gguf``) instead of ``model``.
    Stop it with :func:`stop_process`."""
    import tempfile

    port_file = Path(tempfile.mkdtemp(prefix="pipesd-")) / "port"
    cmd = [sys.executable, "-m", "pipesd", "serve", "--port", "0", "--threads", str(threads),
           "--verify-pad-ms", str(verify_pad_ms), "--port-file", str(port_file), *extra]
    if target_gguf:
        cmd += ["--target-gguf", str(target_gguf)]
    elif model:
        cmd += ["--model", model]
    env = dict(os.environ, PIPESD_AUTH_TOKEN=auth_token)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"the cloud server exited early:\n{proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the cloud server did not start within {timeout_s} s")


def stop_process(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL if it has not exited within ``timeout_s``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
