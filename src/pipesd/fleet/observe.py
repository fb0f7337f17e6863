"""The fleet's metrics port: ``/metrics`` (every per-server metric with a ``replica`` label, and the
router's own), ``GET /fleet`` (the replicas with their sessions and load, JSON) and
``POST /fleet/drain?replica=I&grace_s=S`` (scale-down; the auth token as ``Authorization: Bearer``).
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

log = logging.getLogger("pipesd.fleet")

__all__ = ["FleetCollector", "fleet_registry", "start_fleet_http"]


class FleetCollector:
    """At scrape time: each live replica's :class:`~pipesd.metrics.CloudCollector` families (read
    over Ray, one call per replica), merged by name with a ``replica`` label; plus the router's
    ``pipesd_fleet_*`` gauges and counters."""

    def __init__(self, fleet: Any, timeout_s: float = 5.0) -> None:
        self.fleet, self.timeout_s = fleet, timeout_s

    def describe(self):
        return []

    def collect(self):
        import ray

        live = [r for r in self.fleet.replicas if r.live]
        refs = [r.actor.metrics.remote() for r in live]
        merged: dict = {}
        for r, ref in zip(live, refs):
            try:
                families = ray.get(ref, timeout=self.timeout_s)
            except Exception as e:  # died since the last poll: its metrics are absent this scrape
                log.info("metrics of replica %d unavailable: %s", r.index, e)
                continue
            for fam in families:
                out = merged.get(fam.name)
                if out is None:
                    out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    out.add_sample(s.name, dict(s.labels, replica=str(r.index)), s.value, s.timestamp, s.exemplar)
        yield from merged.values()
        ns = "pipesd_fleet"
        gauges = {k: GaugeMetricFamily(f"{ns}_{k}", doc, labels=["replica"]) for k, doc in (
            ("replica_live", "1 while the replica answers and takes connections' bytes"),
            ("replica_draining", "1 while the replica takes no new sessions"),
            ("connections", "Edge connections spliced to the replica now"))}
        counters = {k: CounterMetricFamily(f"{ns}_{k}", doc, labels=["replica"]) for k, doc in (
            ("replica_restarts", "Times Ray restarted the replica"),
            ("connections_routed", "Edge connections routed to the replica"))}
        for r in self.fleet.replicas:
            lab = [str(r.index)]
            gauges["replica_live"].add_metric(lab, int(r.live))
            gauges["replica_draining"].add_metric(lab, int(r.draining))
            gauges["connections"].add_metric(lab, len(r.conns))
            counters["replica_restarts"].add_metric(lab, r.restarts)
            counters["connections_routed"].add_metric(lab, r.connections_routed)
        yield from gauges.values()
        yield from counters.values()
        yield CounterMetricFamily(f"{ns}_handshakes_evicted", "Pending handshakes closed by the router's per-peer cap",
                                  value=self.fleet.handshakes_evicted)


def fleet_registry(fleet: Any) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(FleetCollector(fleet))
    return reg


def start_fleet_http(fleet: Any, port: int, host: str = "127.0.0.1", auth_token: str = "") -> tuple[str, int]:
    """Serve ``/metrics``, ``/fleet`` and ``/fleet/drain`` from a daemon thread; returns the bound address."""
    if not (0 <= int(port) <= 65535):
        raise ValueError(f"metrics port must be in [0, 65535], got {port}")
    registry = fleet_registry(fleet)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj) -> None:
            self._send(code, (json.dumps(obj, indent=1) + "\n").encode())

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = urlparse(self.path).path
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/fleet":
                self._json(200, fleet.status())
            else:
                self._json(404, {"error": "not found: try /metrics or /fleet"})

        def do_POST(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            if url.path != "/fleet/drain":
                self._json(404, {"error": "not found: POST /fleet/drain?replica=I&grace_s=S"})
                return
            given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if auth_token and not hmac.compare_digest(given.encode(), auth_token.encode()):
                self._json(401, {"error": "wrong auth token (Authorization: Bearer TOKEN)"})
                return
            q = parse_qs(url.query)
            try:
                index = int(q.get("replica", [""])[0])
                grace = float(q.get("grace_s", ["30"])[0])
                if not grace >= 0:
                    raise ValueError(f"grace_s must be >= 0, got {grace}")
                self._json(200, fleet.drain(index, grace))
            except ValueError as e:
                self._json(400, {"error": str(e)})

        def log_message(self, *args) -> None:  # quiet: requests are not news
            pass

    httpd = ThreadingHTTPServer((host, int(port)), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, name="pipesd-fleet-http", daemon=True).start()
    return str(httpd.server_address[0]), int(httpd.server_address[1])
