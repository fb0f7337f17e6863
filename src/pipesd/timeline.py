"""A run's timeline: save a generation as JSON (``pipesd generate --save-run RUN.json``) and draw
its timeline plot (``pipesd timeline RUN.json``).

The timeline is what the edge records with ``EdgeConfig(record_timeline=True)``: a list of
``(lane, t0, t1, info)`` in seconds since the session opened, lanes ``draft`` (one draft step,
info = position), ``send`` (one message, info = (first position, tokens, verify flag)),
``verify`` (the cloud's verification as the verdict reports it, info = seconds) and
``verdict`` (arrival, info = (start position, accepted, correction)). Where the edge waits
and where the pipeline overlaps drafting, the wire and the cloud is visible at a glance.

matplotlib is imported only to draw (``pip install matplotlib``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

__all__ = ["LANES", "run_record", "save_run", "load_run", "plot_timeline", "render_run"]

RUN_FORMAT = "pipesd-run/1"
#: lane -> (row, colour, label)
LANES = {
    "draft": (3, "tab:blue", "edge draft"),
    "send": (2, "tab:orange", "edge send"),
    "verify": (1, "tab:green", "cloud verify"),
    "verdict": (0, "tab:red", "verdict"),
}


def run_record(gen: Any, settings: Optional[dict] = None, prompt: Optional[str] = None) -> dict:
    """A JSON-able record of one finished :class:`pipesd.edge.Generation`: tokens, text, stats,
    timeline and the settings it ran with."""
    st = gen.stats
    return {
        "format": RUN_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prompt": prompt,
        "prompt_ids": list(getattr(gen, "prompt_ids", []) or []),
        "text": gen.text,
        "token_ids": list(gen.token_ids),
        "finish_reason": getattr(gen, "finish_reason", None),
        "stats": st.to_dict(),
        "timeline": [list(_jsonable(e)) for e in (st.timeline or [])],
        "settings": dict(settings or {}),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    return x


def save_run(path: Union[str, Path], gen: Any, settings: Optional[dict] = None, prompt: Optional[str] = None) -> Path:
    """Write :func:`run_record` to ``path`` (parent directories are created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(run_record(gen, settings, prompt), indent=1, default=_default))
    return p


def _default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def load_run(path: Union[str, Path]) -> dict:
    """Read a run file; a clear error when it is not one (missing, not JSON, no timeline)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no run file at {p}")
    try:
        d = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{p} is not a saved run (binary data at byte {e.start}); write one with "
                         "`pipesd generate ... --save-run RUN.json`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not JSON: {e}") from None
    if not isinstance(d, dict) or not isinstance(d.get("timeline"), list):
        raise ValueError(f"{p} is not a PipeSD run (no 'timeline' list); write one with "
                         "`pipesd generate ... --save-run RUN.json`")
    return d


def _check_entries(timeline: Sequence) -> list[tuple[str, float, float, Any]]:
    out = []
    for i, e in enumerate(timeline):
        if not isinstance(e, (list, tuple)) or len(e) < 3 or e[0] not in LANES:
            raise ValueError(f"timeline entry {i} is not (lane, t0, t1, info) with lane in {', '.join(LANES)}: {e!r}")
        out.append((str(e[0]), float(e[1]), float(e[2]), e[3] if len(e) > 3 else None))
    return out


def plot_timeline(timeline: Sequence, out: Union[str, Path], title: Optional[str] = None,
                  subtitle: Optional[str] = None, dpi: int = 120) -> Path:
    """Draw the lanes of ``timeline`` (entries ``(lane, t0, t1, info)``) into a PNG (or any
    format matplotlib infers from ``out``'s suffix)."""
    entries = _check_entries(timeline)
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("drawing a timeline needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end_ms = max((t1 for _, _, t1, _ in entries), default=0.0) * 1e3
    fig, ax = plt.subplots(figsize=(min(24, max(8, end_ms / 150)), 2.8))
    for lane in LANES:
        row, colour, _ = LANES[lane]
        if lane == "verdict":
            xs = [t0 * 1e3 for name, t0, _, _ in entries if name == lane]
            if xs:
                ax.plot(xs, [row] * len(xs), "|", color=colour, ms=12)
            continue
        bars = [(t0 * 1e3, max(0.2, (t1 - t0) * 1e3)) for name, t0, t1, _ in entries if name == lane]
        if bars:
            ax.broken_barh(bars, (row - 0.35, 0.7), facecolor=colour, edgecolor="white", linewidth=0.3)
    ax.set_yticks([row for row, _, _ in LANES.values()])
    ax.set_yticklabels([label for _, _, label in LANES.values()])
    ax.set_ylim(-0.7, 3.7)
    ax.set_xlim(0, max(1.0, end_ms * 1.01))
    ax.set_xlabel("ms since session open")
    if title or subtitle:
        ax.set_title("\n".join(x for x in (title, subtitle) if x), fontsize=9)
    fig.tight_layout()
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    return p


def render_run(run: Union[str, Path, dict], out: Optional[Union[str, Path]] = None) -> Path:
    """Draw a saved run's timeline (default output: the run file with ``.png``)."""
    d = run if isinstance(run, dict) else load_run(run)
    if not d["timeline"]:
        raise ValueError("the run has an empty timeline (was it recorded with record_timeline=True? "
                         "`pipesd generate --save-run` records one)")
    if out is None:
        if isinstance(run, dict):
            raise ValueError("out is required when the run is given as a dict")
        out = Path(run).with_suffix(".png")
    st = d.get("stats") or {}
    method = st.get("method") or "?"
    title = f"PipeSD timeline ({method}{': ' + st['schedule'] if st.get('schedule') else ''})"
    sub = None
    if st:
        sub = (f"{st.get('new_tokens', 0)} tokens, TPT {1e3 * float(st.get('tpt_s', 0.0)):.1f} ms, "
               f"{st.get('verifications', 0)} verifications, {st.get('rollbacks', 0)} rollbacks, "
               f"mean accepted {float(st.get('mean_accepted', 0.0)):.2f}")
    return plot_timeline(d["timeline"], out, title, sub)
