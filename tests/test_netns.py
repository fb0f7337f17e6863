"""Real-link mode: namespaces + veth + tc tbf. Skipped where namespaces are not permitted."""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import numpy as np
import pytest

from pipesd.transport import conn
from pipesd.transport import messages as M
from pipesd.transport.netns import NetnsLink, netns_available

_OK, _WHY = netns_available()
needs_netns = pytest.mark.skipif(not _OK, reason=f"real-link mode unavailable: {_WHY}")

PAYLOAD = 1_000_000


def _transfer_seconds(nl: NetnsLink) -> float:
    """Edge sends 1 MB to the cloud and waits for a one-byte ack; seconds from first byte to ack."""
    ready = threading.Event()
    port: list[int] = []

    def serve():
        srv = socket.create_server((nl.cloud_ip, 0))
        port.append(srv.getsockname()[1])
        ready.set()
        c, _ = srv.accept()
        got = 0
        while got < PAYLOAD:
            chunk = c.recv(1 << 16)
            if not chunk:
                break
            got += len(chunk)
        c.sendall(b"k")
        c.close()
        srv.close()

    t = nl.thread(nl.cloud_ns, serve)
    assert ready.wait(10)
    with nl.enter(nl.edge_ns):
        s = socket.create_connection((nl.cloud_ip, port[0]), timeout=30)
    t0 = time.monotonic()
    s.sendall(b"x" * PAYLOAD)
    assert s.recv(1) == b"k"
    dt = time.monotonic() - t0
    s.close()
    t.join(10)
    return dt


@needs_netns
def test_shaped_transfer_is_clearly_slower_than_unshaped():
    with NetnsLink(rate_bps=None) as nl:
        free = _transfer_seconds(nl)
    with NetnsLink(rate_bps=8e6, burst=32 * 1024, latency=0.2) as nl:
        shaped = _transfer_seconds(nl)
    # 1 MB at 8 Mbit/s is ~1 s: a lower bound the shaper guarantees (minus one burst), and a loose ratio
    assert shaped > 0.8, (shaped, free)
    assert shaped > 3 * free, (shaped, free)


@needs_netns
def test_thread_returns_to_its_namespace_and_namespaces_are_removed():
    home = os.readlink("/proc/thread-self/ns/net")
    with NetnsLink(rate_bps=1e6) as nl:
        with nl.enter(nl.edge_ns):
            assert os.readlink("/proc/thread-self/ns/net") != home
        assert os.readlink("/proc/thread-self/ns/net") == home
        assert nl.call(nl.cloud_ns, lambda: os.readlink("/proc/thread-self/ns/net")) != home
        assert nl.run(nl.edge_ns, ["ip", "-o", "addr"], capture_output=True, text=True).stdout.count(nl.edge_ip) == 1
        names = (nl.edge_ns, nl.cloud_ns)
    assert not any(os.path.exists(f"/var/run/netns/{n}") for n in names)


@needs_netns
def test_edge_connection_through_the_shaped_link():
    token = "tok"
    info = M.HelloAck(version=M.PROTOCOL_VERSION, server_name="ns-cloud", vocab_size=100, tokenizer_fingerprint="",
                      max_sessions=1, max_prompt_tokens=1, max_draft_in_flight=1)
    with NetnsLink(rate_bps=20e6, down_rate_bps=200e6) as nl:
        ready = threading.Event()
        box: dict = {}

        async def handle(reader, writer):
            try:
                await conn.serve_handshake(reader, writer, expected_token=token, server_info=info, timeout_s=5)
                while True:
                    await conn.write_message(writer, await conn.read_message(reader))
            except Exception:
                writer.close()

        async def main():
            srv = await asyncio.start_server(handle, nl.cloud_ip, 0)
            box["port"] = srv.sockets[0].getsockname()[1]
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await box["stop"].wait()
            srv.close()

        t = nl.thread(nl.cloud_ns, lambda: asyncio.run(main()))
        assert ready.wait(10)
        with nl.enter(nl.edge_ns):
            c = conn.EdgeConnection.connect(nl.cloud_ip, box["port"], auth_token=token)
        try:
            assert c.hello_ack.server_name == "ns-cloud"
            msg = M.DraftBatch(session_id=1, epoch=0, first_pos=0, tokens=np.arange(50, dtype=np.int32),
                               probs=np.full(50, 0.5, np.float32), verify=True)
            c.send(msg)
            back = c.recv(10)
            np.testing.assert_array_equal(back.tokens, msg.tokens)
        finally:
            c.close()
            box["loop"].call_soon_threadsafe(box["stop"].set)
            t.join(10)


def test_parameter_validation():
    with pytest.raises(ValueError, match="rate_bps"):
        NetnsLink(rate_bps=0)
    with pytest.raises(ValueError, match="burst"):
        NetnsLink(burst=100)
    with pytest.raises(ValueError, match="latency"):
        NetnsLink(latency=0)


def test_unavailability_is_reported_with_a_reason(monkeypatch):
    from pipesd.transport import netns

    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    ok, why = netns.netns_available()
    assert not ok and "iproute2" in why
    with pytest.raises(netns.NetnsUnavailable, match="iproute2"):
        with NetnsLink():
            pass
