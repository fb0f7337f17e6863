"""Observability: Prometheus metrics for the edge and the cloud, and structured logs.

- :class:`EdgeMetrics` turns each finished :class:`pipesd.edge.Generation` into counters,
  histograms and gauges (``observe_generation``); the OpenAI endpoint mounts
  ``prometheus_client.make_asgi_app(metrics.registry)`` at ``/metrics``.
- :class:`CloudCollector` reads :class:`pipesd.cloud.CloudServer`'s stats at scrape time, so
  the verifier's hot path never touches a metric; ``pipesd serve --metrics-port`` serves it.
- :func:`configure_logging` sets up ``--log-level`` / ``--log-format text|json`` once per
  process; :class:`JsonFormatter` writes one JSON object per line (``ts``, ``level``,
  ``logger``, ``msg`` and any ``extra=`` fields).

Metric names and meanings: ``docs/observability.md``.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

__all__ = ["EdgeMetrics", "CloudCollector", "cloud_registry", "start_metrics_server", "configure_logging",
           "JsonFormatter", "ACCEPTED_BUCKETS", "BATCH_BUCKETS", "TPT_BUCKETS"]

#: Accepted drafts per verification (0 = the first draft was rejected).
ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48)
#: Tokens per draft message (edge) and sessions per batched launch (cloud).
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
#: Seconds per generated token: 1 ms (a fast LAN) to 1 s (a stalled link).
TPT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000)


# ---------------------------------------------------------------------------------- edge
class EdgeMetrics:
    """Edge-side metrics, updated once per finished generation (labelled by ``method``).

    ``registry``: where the metrics live (default: a fresh :class:`CollectorRegistry`, so two
    clients in one process, or a test, never collide in the global one).
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None, namespace: str = "pipesd_edge") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns, m = self.registry, namespace, ["method"]
        self.generations = Counter(f"{ns}_generations", "Finished generations", m, registry=r)
        self.tokens = Counter(f"{ns}_tokens", "Generated (verified) tokens", m, registry=r)
        self.drafted = Counter(f"{ns}_drafted_tokens", "Tokens drafted by the edge model", m, registry=r)
        self.verifications = Counter(f"{ns}_verifications", "Verdicts received", m, registry=r)
        self.rollbacks = Counter(f"{ns}_rollbacks", "Verdicts that rejected a draft (rollbacks)", m, registry=r)
        self.verified_drafts = Counter(f"{ns}_verified_drafts", "Draft tokens the cloud verified", m, registry=r)
        self.accepted_drafts = Counter(f"{ns}_accepted_drafts", "Draft tokens the cloud accepted", m, registry=r)
        self.cloud_forwards = Counter(f"{ns}_cloud_forwards", "Target token-forwards reported by the cloud", m,
                                      registry=r)
        self.wasted_forwards = Counter(f"{ns}_wasted_forwards", "Scored drafts that were rejected", m, registry=r)
        self.cloud_busy = Counter(f"{ns}_cloud_busy_seconds", "Cloud verification time reported in verdicts", m,
                                  registry=r)
        self.bytes_sent = Counter(f"{ns}_bytes_sent", "Bytes sent to the cloud (uplink)", m, registry=r)
        self.bytes_received = Counter(f"{ns}_bytes_received", "Bytes received from the cloud (downlink)", m,
                                      registry=r)
        self.messages_sent = Counter(f"{ns}_messages_sent", "Frames sent to the cloud", m, registry=r)
        self.generation_seconds = Counter(f"{ns}_generation_seconds", "Wall time of generations", m, registry=r)
        self.triggers = Counter(f"{ns}_triggers", "Verification triggers by reason", ["method", "reason"],
                                registry=r)
        self.finished = Counter(f"{ns}_finished", "Generations by finish reason", ["method", "reason"], registry=r)
        self.schedules = Counter(f"{ns}_schedule_generations", "Generations by the schedule pipesd-adaptive chose",
                                 ["method", "schedule"], registry=r)
        self.tpt = Histogram(f"{ns}_tpt_seconds", "Time per generated token, per generation", m,
                             buckets=TPT_BUCKETS, registry=r)
        self.tps = Histogram(f"{ns}_tokens_per_second", "Generated tokens per second, per generation", m,
                             buckets=_TPS_BUCKETS, registry=r)
        self.accepted_length = Histogram(f"{ns}_accepted_length", "Drafts accepted per verification", m,
                                         buckets=ACCEPTED_BUCKETS, registry=r)
        self.batch_size = Histogram(f"{ns}_batch_size_tokens", "Draft tokens per message to the cloud", m,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.last_tps = Gauge(f"{ns}_last_tokens_per_second", "Tokens per second of the last generation", m,
                              registry=r)
        self.last_tpt = Gauge(f"{ns}_last_tpt_seconds", "Time per token of the last generation", m, registry=r)
        self.link = Gauge(f"{ns}_link_estimate_seconds",
                          "Online cost model: draft step (gen), per-message startup, per-token wire time",
                          ["cost"], registry=r)
        self.threshold = Gauge(f"{ns}_threshold", "Trigger thresholds in force at the end of the last generation",
                               ["method", "threshold"], registry=r)

    def observe_generation(self, gen: Any) -> None:
        """Fold one finished generation (a :class:`pipesd.edge.Generation`) into the metrics."""
        st = gen.stats
        m = st.method or "unknown"
        self.generations.labels(m).inc()
        self.finished.labels(m, getattr(gen, "finish_reason", "length") or "length").inc()
        for counter, value in ((self.tokens, st.new_tokens), (self.drafted, st.drafted),
                               (self.verifications, st.verifications), (self.rollbacks, st.rollbacks),
                               (self.verified_drafts, st.verified_drafts), (self.accepted_drafts, st.accepted_drafts),
                               (self.cloud_forwards, st.cloud_forwards), (self.wasted_forwards, st.wasted_forwards),
                               (self.cloud_busy, st.cloud_busy_s), (self.bytes_sent, st.bytes_sent),
                               (self.bytes_received, st.bytes_received), (self.messages_sent, st.messages_sent),
                               (self.generation_seconds, st.wall_s)):
            if value and value > 0:
                counter.labels(m).inc(value)
        if getattr(st, "schedule", ""):
            self.schedules.labels(m, st.schedule).inc()
        for reason, n in (st.trigger_reasons or {}).items():
            self.triggers.labels(m, str(reason)).inc(n)
        acc, batch = self.accepted_length.labels(m), self.batch_size.labels(m)
        for a in st.accepted_lengths:
            acc.observe(a)
        for b in st.batch_sizes:
            batch.observe(b)
        if st.new_tokens > 0 and st.wall_s > 0:
            self.tpt.labels(m).observe(st.tpt_s)
            tps = st.new_tokens / st.wall_s
            self.tps.labels(m).observe(tps)
            self.last_tps.labels(m).set(tps)
            self.last_tpt.labels(m).set(st.tpt_s)
        for name, value in (("gen", st.cost_g_s), ("startup", st.cost_s_s), ("per_token", st.cost_c_s)):
            if value and math.isfinite(value) and value > 0:
                self.link.labels(name).set(value)
        self.threshold.labels(m, "tau_seq").set(st.tau_seq)
        self.threshold.labels(m, "tau_tok").set(st.tau_tok)


# ---------------------------------------------------------------------------------- cloud
def _histogram(name: str, doc: str, counts: dict, buckets: Iterable[float]) -> HistogramMetricFamily:
    """A histogram family from ``{value: count}`` (cumulative buckets, +Inf, sum)."""
    items = sorted((float(k), int(v)) for k, v in counts.items())
    cum = []
    for le in buckets:
        cum.append((_le(le), sum(c for k, c in items if k <= le)))
    total = sum(c for _, c in items)
    cum.append(("+Inf", total))
    return HistogramMetricFamily(name, doc, buckets=cum, sum_value=sum(k * c for k, c in items))


def _le(x: float) -> str:
    return str(float(x))


class CloudCollector:
    """Reads a :class:`pipesd.cloud.CloudServer`'s ``stats``, connections and energy meter at
    scrape time (no cost on the verification path). Register it on a registry:
    ``registry.register(CloudCollector(server))``."""

    def __init__(self, server: Any, namespace: str = "pipesd_cloud") -> None:
        self.server = server
        self.ns = namespace

    def describe(self):  # no samples at registration time: the server may not run yet
        return []

    def collect(self):
        s, ns = self.server.stats, self.ns
        yield GaugeMetricFamily(f"{ns}_sessions_open", "Sessions open now", value=s.sessions_open)
        yield GaugeMetricFamily(f"{ns}_clients_connected", "Edge connections open now",
                                value=len(getattr(self.server, "_clients", ())))
        for name, doc, value in (
                ("sessions_opened", "Sessions opened", s.sessions_opened),
                ("verifications", "Session verifications (verdicts sent)", s.verifications),
                ("batched_launches", "Verifier launches (one batched target forward each)", s.batched_launches),
                ("target_forwards", "Target token-forwards for verification", s.target_forwards),
                ("wasted_forwards", "Scored draft tokens that were rejected", s.wasted_forwards),
                ("stale_batches", "Draft batches of an old epoch (dropped)", s.stale_batches),
                ("duplicate_batches", "Draft batches already seen (dropped)", s.duplicate_batches),
                ("protocol_errors", "Frames refused as malformed or out of protocol", s.protocol_errors),
                ("failed_launches", "Verifier launches that raised (their sessions re-verified one by one)",
                 s.failed_launches),
                ("busy_seconds", "Verifier busy time (including --verify-pad-ms padding)", s.busy_s),
                ("forward_seconds", "Time in target forwards", s.forward_s),
                ("kernel_seconds", "Time in verification launches", s.kernel_s),
                ("overhead_seconds", "Verifier time outside forwards and launches", s.overhead_s)):
            yield CounterMetricFamily(f"{ns}_{name}", doc, value=value)
        calls = CounterMetricFamily(f"{ns}_verify_calls", "verify_chain calls by the path taken (triton: the "
                                    "kernels; torch: the PyTorch reference)", labels=["backend"])
        for name, n in sorted(s.verify_backends.items()):
            calls.add_metric([name], n)
        yield calls
        yield GaugeMetricFamily(f"{ns}_batch_sessions_max", "Largest batched launch so far (sessions)",
                                value=s.max_batch)
        counts = dict(getattr(s, "batch_size_counts", None) or {})
        if counts:
            yield _histogram(f"{ns}_batch_sessions", "Sessions per batched verifier launch", counts, BATCH_BUCKETS)
        yield from self._limits(s, ns)
        energy = getattr(self.server, "energy", None)
        if energy is not None:
            rep = energy.report(1)
            c = CounterMetricFamily(f"{ns}_energy_joules", "Cloud energy (nvml: measured; model: busy time x power)",
                                    labels=["source"])
            c.add_metric([rep.source], rep.joules)
            yield c

    def _limits(self, s: Any, ns: str):
        """Admission and idle-timeout counts, and what each identity holds and was refused."""
        gate = getattr(self.server, "_gate", None)
        if gate is not None:
            yield GaugeMetricFamily(f"{ns}_handshakes_pending", "Connections still in the handshake",
                                    value=gate.pending())
        for name, doc in (("clients_refused", "Authenticated connections refused (max_clients, identity quota)"),
                          ("handshakes_evicted", "Pending handshakes closed to make room for new connections"),
                          ("idle_sessions_closed", "Sessions closed by the idle timeout"),
                          ("idle_connections_closed", "Connections closed by the idle timeout")):
            yield CounterMetricFamily(f"{ns}_{name}", doc, value=getattr(s, name, 0))
        identities = list(getattr(self.server, "identities", None) or ())
        if not identities:
            return
        gauges = {k: GaugeMetricFamily(f"{ns}_identity_{k}", doc, labels=["identity"]) for k, doc in (
            ("connections", "Authenticated connections open now, per identity"),
            ("sessions", "Sessions open now, per identity"),
            ("inflight_bytes", "Draft bytes awaiting verification now, per identity"))}
        counters = {k: CounterMetricFamily(f"{ns}_identity_{k}", doc, labels=["identity"]) for k, doc in (
            ("sessions_opened", "Sessions opened, per identity"),
            ("verifications", "Verdicts sent, per identity"),
            ("tokens_verified", "Tokens verified (committed), per identity"),
            ("throttled_seconds", "Time the identity's connections were paused by a token bucket"))}
        refused = CounterMetricFamily(f"{ns}_identity_refused", "Refusals per identity and quota or limit",
                                      labels=["identity", "limit"])
        idle = CounterMetricFamily(f"{ns}_identity_idle_closed", "Closed by the idle timeout, per identity",
                                   labels=["identity", "kind"])
        for ident in identities:
            for k, fam in gauges.items():
                fam.add_metric([ident.name], getattr(ident, k))
            for k, fam in counters.items():
                fam.add_metric([ident.name], getattr(ident, "throttled_s" if k == "throttled_seconds" else k))
            for limit, n in sorted(ident.refused.items()):
                refused.add_metric([ident.name, limit], n)
            for kind, n in sorted(ident.idle_closed.items()):
                idle.add_metric([ident.name, kind], n)
        yield from gauges.values()
        yield from counters.values()
        yield refused
        yield idle


def cloud_registry(server: Any, *, process: bool = True) -> CollectorRegistry:
    """A registry with a :class:`CloudCollector` (and the process collector: RSS, CPU, fds)."""
    from prometheus_client import ProcessCollector

    reg = CollectorRegistry()
    reg.register(CloudCollector(server))
    if process:
        ProcessCollector(registry=reg)
    return reg


def start_metrics_server(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> tuple[str, int]:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread; returns the bound
    address (``port=0`` picks a free one). Loopback by default: metrics describe the workload."""
    from prometheus_client import start_http_server

    if not (0 <= int(port) <= 65535):
        raise ValueError(f"metrics port must be in [0, 65535], got {port}")
    out = start_http_server(int(port), addr=host, registry=registry)
    httpd = out[0] if isinstance(out, tuple) else None
    if httpd is not None:
        return str(httpd.server_address[0]), int(httpd.server_address[1])
    return host, int(port)


# ---------------------------------------------------------------------------------- logs
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC ISO 8601, ms), ``level``, ``logger``, ``msg``, the
    record's ``extra=`` fields, and ``exc`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_") and k not in out:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


LOG_FORMATS = ("text", "json")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (not the one at set-up, which a test
    harness or a daemonising caller may have closed since)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(level: str = "WARNING", fmt: str = "text", stream=None) -> None:
    """Configure the root logger (``pipesd`` CLI ``main``): one stderr handler in the chosen format.
    Calling it again replaces the handler it installed (never anyone else's, e.g. pytest's), so
    the level or format switches instead of lines being duplicated."""
    lvl = logging.getLevelName(str(level).upper())
    if not isinstance(lvl, int):
        raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler._pipesd = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_pipesd", False):
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
