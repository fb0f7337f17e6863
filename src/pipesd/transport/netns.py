"""Real-link mode: two network namespaces joined by a veth pair shaped with ``tc tbf``.

Instead of emulating the link inside the edge's connection, put the edge and the cloud in
two network namespaces and let the kernel shape the traffic between them (token-bucket
rate limit each way). Needs root (``CAP_NET_ADMIN``) and the ``ip``/``tc`` tools (iproute2).
``tbf`` shapes rate and queueing only: delay emulation needs ``netem``, which our machines
lack, so combine it with :class:`~pipesd.transport.link.LinkEmulator` delay if needed.

::

    with NetnsLink(rate_bps=8e6) as nl:
        server = nl.popen(nl.cloud_ns, ["pipesd", "serve", "--host", nl.cloud_ip, ...])
        with nl.enter(nl.edge_ns):           # this thread now lives in the edge namespace
            conn = EdgeConnection.connect(nl.cloud_ip, port, auth_token=...)
        # sockets keep their namespace after the thread leaves it

Network namespaces are per thread on Linux, so one process can run the cloud in one thread
and the edge in another (:meth:`NetnsLink.enter`, :meth:`NetnsLink.call`).
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import subprocess
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

__all__ = ["NetnsLink", "NetnsUnavailable", "netns_available"]

CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_libc = None


class NetnsUnavailable(RuntimeError):
    """Namespaces or traffic shaping cannot be set up here (not root, no iproute2, sandbox)."""


def _run(argv: Sequence[str]) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {(r.stderr or r.stdout).strip() or r.returncode}")


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_available() -> tuple[bool, str]:
    """``(True, "")`` when a namespace can be created and deleted here, else ``(False, reason)``."""
    if os.name != "posix" or not os.path.exists("/proc/self/ns/net"):
        return False, "network namespaces need Linux"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    name = f"psdprobe{os.getpid()}x{next(_counter)}"
    try:
        _run(["ip", "netns", "add", name])
    except NetnsUnavailable as e:
        return False, f"`ip netns add` is not permitted here ({e})"
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"`ip netns add` could not run ({e})"
    try:
        _run(["ip", "netns", "del", name])
    except (NetnsUnavailable, OSError, subprocess.SubprocessError):
        pass
    return True, ""


class NetnsLink:
    """Two namespaces (``edge_ns``, ``cloud_ns``) joined by a veth pair, shaped by ``tc tbf``.

    ``rate_bps``: uplink rate (edge -> cloud), ``None`` for no shaping; ``down_rate_bps``:
    downlink rate (default: the same as ``rate_bps``); ``burst``: token-bucket size in bytes
    (at least one MTU-sized packet); ``latency``: the most time a packet may wait in the
    shaper's queue, seconds (tbf's ``latency``; packets beyond it are dropped, and TCP backs
    off). Addresses: ``edge_ip``/``cloud_ip`` on a /30. Use as a context manager; everything
    is deleted on exit.
    """

    def __init__(self, rate_bps: Optional[float] = 8e6, burst: int = 32 * 1024, latency: float = 0.05, *,
                 down_rate_bps: Optional[float] = None, edge_ip: str = "10.213.0.1",
                 cloud_ip: str = "10.213.0.2") -> None:
        for name, v in (("rate_bps", rate_bps), ("down_rate_bps", down_rate_bps)):
            if v is not None and not (v > 0 and v < float("inf")):
                raise ValueError(f"{name} must be a finite number > 0 or None, got {v!r}")
        if burst < 1600:
            raise ValueError(f"burst must be at least one packet (>= 1600 bytes), got {burst}")
        if not (latency > 0):
            raise ValueError(f"latency must be > 0, got {latency!r}")
        self.rate_bps = rate_bps
        self.down_rate_bps = rate_bps if down_rate_bps is None else down_rate_bps
        self.burst = int(burst)
        self.latency = float(latency)
        tag = f"psd{os.getpid() % 100000}x{next(_counter)}"
        self.edge_ns, self.cloud_ns = f"{tag}e", f"{tag}c"
        self._edge_if, self._cloud_if = f"{tag}ve", f"{tag}vc"  # <= 15 characters
        self.edge_ip, self.cloud_ip = edge_ip, cloud_ip
        self._up = False

    def __repr__(self) -> str:
        return (f"NetnsLink(edge={self.edge_ns} {self.edge_ip}, cloud={self.cloud_ns} {self.cloud_ip}, "
                f"up={self.rate_bps} bit/s, down={self.down_rate_bps} bit/s)")

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "NetnsLink":
        try:
            self._create()
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._delete()

    def _shape(self, ns: str, dev: str, rate: Optional[float]) -> None:
        if rate is None:
            return
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{int(rate)}bit",
              "burst", str(self.burst), "latency", f"{self.latency * 1000:g}ms"])

    def _create(self) -> None:
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise NetnsUnavailable("`ip`/`tc` (iproute2) are not installed")
        _run(["ip", "netns", "add", self.edge_ns])
        self._up = True
        _run(["ip", "netns", "add", self.cloud_ns])
        _run(["ip", "link", "add", self._edge_if, "type", "veth", "peer", "name", self._cloud_if])
        for ns, dev, ip in ((self.edge_ns, self._edge_if, self.edge_ip), (self.cloud_ns, self._cloud_if, self.cloud_ip)):
            _run(["ip", "link", "set", dev, "netns", ns])
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # egress of each end: the edge's veth shapes the uplink, the cloud's the downlink
        self._shape(self.edge_ns, self._edge_if, self.rate_bps)
        self._shape(self.cloud_ns, self._cloud_if, self.down_rate_bps)

    def _delete(self) -> None:
        if not self._up:
            return
        for ns in (self.edge_ns, self.cloud_ns):  # deleting a namespace deletes its veth end (and the pair)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self._edge_if], capture_output=True, timeout=30)  # if never moved
        self._up = False

    # -- running things inside ------------------------------------------------------------
    def command(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *argv]

    def run(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` of ``argv`` inside ``ns``."""
        return subprocess.run(self.command(ns, argv), **kw)

    def popen(self, ns: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """``subprocess.Popen`` of ``argv`` inside ``ns``."""
        return subprocess.Popen(self.command(ns, argv), **kw)

    @contextlib.contextmanager
    def enter(self, ns: str) -> Iterator[None]:
        """Move the calling thread into ``ns`` for the block (sockets made inside stay there)."""
        with open("/proc/thread-self/ns/net", "rb") as home, open(f"/var/run/netns/{ns}", "rb") as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(home.fileno())

    def call(self, ns: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """Run ``fn(*args, **kw)`` in a fresh thread inside ``ns``; return its result (or raise)."""
        out: dict = {}

        def target() -> None:
            try:
                with self.enter(ns):
                    out["value"] = fn(*args, **kw)
            except BaseException as e:  # handed to the caller
                out["error"] = e

        t = threading.Thread(target=target, name=f"netns-{ns}")
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out.get("value")

    def thread(self, ns: str, fn: Callable[..., Any], *args: Any, daemon: bool = True, **kw: Any) -> threading.Thread:
        """Start ``fn(*args, **kw)`` in a background thread inside ``ns`` (e.g. a server loop)."""
        def target() -> None:
            with self.enter(ns):
                fn(*args, **kw)

        t = threading.Thread(target=target, name=f"netns-{ns}", daemon=daemon)
        t.start()
        return t
