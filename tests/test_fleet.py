"""The verifier fleet (``pipesd serve --replicas N``, docs/fleet.md) on a local Ray cluster:
two CPU replicas of the bundled pair's target behind one router address.

Edges connect to the router only; which replica serves a connection is read from the router's
own splice table (the edge socket's address), and what a replica did from its own counters.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the fleet needs Ray (pip install 'pipesd[fleet]')")

from pipesd import launch, zoo  # noqa: E402
from pipesd.edge import EdgeClient, EdgeConfig  # noqa: E402
from pipesd.fleet import Fleet, FleetConfig  # noqa: E402
from pipesd.fleet.observe import start_fleet_http  # noqa: E402
from pipesd.transport import messages as M  # noqa: E402
from pipesd.transport.conn import EdgeConnection  # noqa: E402

from runtime_helpers import reference_greedy, wait_until  # noqa: E402

PROMPTS = launch.PROMPTS[:4]
N_NEW = 24
# "wait": an edge that lost its replica reconnects (fast, here) before going on, so the run
# cannot end with draft-only text and its output can be compared with target greedy exactly.
CFG = dict(offline_policy="wait", offline_wait_s=60, reconnect_initial_s=0.05, reconnect_max_s=0.3,
           verdict_timeout_s=30.0)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair(threads=1)


@pytest.fixture(scope="module")
def prompts(pair):
    return [pair.tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def refs(pair, prompts):
    return [reference_greedy(pair.target.model, ids, N_NEW) for ids in prompts]


@pytest.fixture(scope="module")
def fleet(local_ray):
    # verify_pad_s: each verification takes >= 20 ms, so a generation lasts long enough to lose its replica
    f = Fleet(FleetConfig(replicas=2, port=0, threads=1, cloud=dict(verify_pad_s=0.02)))
    f.start_in_thread()
    yield f
    f.stop()


def url(fleet) -> str:
    return f"{fleet.address[0]}:{fleet.address[1]}"


def replica_of(fleet, client: EdgeClient) -> int:
    """The replica the router spliced this edge's connection to."""
    me = client.conn.sock.getsockname()[:2]
    for r in fleet.replicas:
        if any(tuple(w.get_extra_info("peername")[:2]) == me for w in list(r.conns)):
            return r.index
    raise AssertionError("the edge's connection is on no replica")


def loads(fleet) -> list:
    return ray.get([r.actor.load.remote() for r in fleet.replicas], timeout=30)


class Gated:
    """A draft model calling ``before(n)`` ahead of its n-th step: faults placed by the edge's progress."""

    def __init__(self, draft, before=None) -> None:
        self._d, self.steps, self.before = draft, 0, before

    def __getattr__(self, name):
        return getattr(self._d, name)

    def step(self, *a, **kw):
        if self.before is not None:
            self.before(self.steps)
        self.steps += 1
        return self._d.step(*a, **kw)


def run_edges(fleet, jobs, barrier: bool = True) -> dict:
    """Run ``jobs`` ({name: (draft, prompt ids)}) as edges at once; returns {name: (generation, replica)}."""
    out: dict = {}
    errors: list = []
    gate = threading.Barrier(len(jobs)) if barrier else None

    def edge(name, draft, ids) -> None:
        try:
            with EdgeClient(url(fleet), draft, EdgeConfig(**CFG)) as c:
                where = replica_of(fleet, c)
                if gate is not None:
                    gate.wait(60)  # every edge connected before any generates: routing sees them all
                out[name] = (c.generate(ids, N_NEW), where)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    ts = [threading.Thread(target=edge, args=(n, d, ids)) for n, (d, ids) in jobs.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    return out


def settled(fleet) -> None:
    """Wait until the router's last poll shows every replica live with no session open (the
    previous test's sessions gone), so where new edges land depends on them alone."""
    assert wait_until(lambda: all(r.live and r.load.get("sessions_open") == 0 for r in fleet.replicas), 90)


def own_draft():
    return launch.load_draft(None, threads=1)  # each edge has its own draft model (its own state)


def test_sessions_spread_over_both_replicas_and_stay_on_one(fleet, prompts, refs):
    settled(fleet)
    before = loads(fleet)
    out = run_edges(fleet, {i: (own_draft(), prompts[i]) for i in range(2)})
    after = loads(fleet)
    assert [out[i][0].token_ids for i in range(2)] == refs[:2]
    assert sorted(where for _, where in out.values()) == [0, 1]  # least loaded: one each
    for r in range(2):
        mine = [g for g, where in out.values() if where == r]
        # Every verdict the replica sent went to its own edge, and every verdict that edge got came
        # from it: all frames of the session were handled by that one replica.
        assert after[r]["verifications"] - before[r]["verifications"] == sum(g.stats.verifications for g in mine)
        assert after[r]["sessions_opened"] - before[r]["sessions_opened"] == len(mine) == 1


@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_a_replica_lost_mid_generation_leaves_every_edge_lossless(fleet, prompts, refs, how):
    restarts = [r.restarts for r in fleet.replicas]
    victim: dict = {}

    def kill_own_replica(n: int, client_box: list) -> None:
        if n == 6 and not victim:
            r = fleet.replicas[replica_of(fleet, client_box[0])]
            victim["index"] = r.index
            if how == "ray.kill":
                ray.kill(r.actor, no_restart=False)
            else:
                os.kill(r.load["pid"], signal.SIGKILL)

    box: list = []
    killer = Gated(own_draft(), lambda n: kill_own_replica(n, box))
    jobs = {i: (own_draft(), prompts[i]) for i in range(1, 4)}
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(run_edges(fleet, jobs, barrier=False)))
    t.start()
    with EdgeClient(url(fleet), killer, EdgeConfig(**CFG)) as c:
        box.append(c)  # the gate finds the killer edge's replica through it
        g0 = c.generate(prompts[0], N_NEW)
    t.join(120)
    assert "index" in victim, "the kill never happened"
    assert g0.stats.reconnects >= 1  # the killer edge lost its replica mid-generation and came back
    assert [g0.token_ids] + [out[i][0].token_ids for i in range(1, 4)] == refs
    assert all(g.verified for g, _ in out.values()) and g0.verified
    k = victim["index"]
    assert wait_until(lambda: fleet.replicas[k].restarts > restarts[k] and fleet.replicas[k].live, 90), \
        "Ray did not restart the replica"


def test_the_fleet_serves_new_sessions_on_both_replicas_after_a_restart(fleet, prompts, refs):
    settled(fleet)
    out = run_edges(fleet, {i: (own_draft(), prompts[i]) for i in range(2)})
    assert [out[i][0].token_ids for i in range(2)] == refs[:2]
    assert sorted(where for _, where in out.values()) == [0, 1]


def test_metrics_carry_a_replica_label_and_fleet_status_lists_the_replicas(fleet):
    host, port = start_fleet_http(fleet, 0)
    text = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30).read().decode()
    for r in ("0", "1"):
        for name in ("pipesd_cloud_sessions_open", "pipesd_cloud_verifications_total",
                     "pipesd_cloud_busy_seconds_total", "pipesd_cloud_batch_sessions_count", "pipesd_fleet_replica_live"):
            assert f'{name}{{replica="{r}"}}' in text, (name, r)
    status = json.loads(urllib.request.urlopen(f"http://{host}:{port}/fleet", timeout=30).read())
    assert [s["replica"] for s in status["replicas"]] == [0, 1] and status["live"] == 2
    assert all(s["verifications"] > 0 and "sessions_open" in s and "queued_tokens" in s for s in status["replicas"])
    req = urllib.request.Request(f"http://{host}:{port}/fleet/drain?replica=7", method="POST")
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=30)
    assert ei.value.code == 400 and b"replica must be in [0, 1]" in ei.value.read()


def test_the_router_caps_pending_handshakes_per_real_peer(fleet, prompts, refs):
    """The replicas see only the router, so the per-peer cap is the router's: one connection over
    max_pending_per_peer from one address evicts that address's oldest pending one."""
    before = fleet.handshakes_evicted
    socks = [socket.create_connection(fleet.address, timeout=10) for _ in range(fleet.max_pending_per_peer + 1)]
    try:
        assert wait_until(lambda: fleet.handshakes_evicted == before + 1, 10)
        try:
            assert socks[0].recv(1) == b""  # the oldest was closed
        except ConnectionResetError:
            pass
    finally:
        for s in socks:
            s.close()
    out = run_edges(fleet, {0: (own_draft(), prompts[0])})  # real edges still get through
    assert out[0][0].token_ids == refs[0]


def test_a_burst_of_edges_behind_one_address_all_get_in_while_silent_sockets_stay_capped(fleet, prompts):
    """64 edges from one address (a NAT, a load test) connecting at the same instant: the router
    accepts them all before reading any Hello, so evicting at accept closed 56 of them. Only a
    connection still silent after the grace is evicted now, and silent sockets still are."""
    settled(fleet)
    n, cap, before = 64, fleet.max_pending_per_peer, fleet.handshakes_evicted
    silent = [socket.create_connection(fleet.address, timeout=10) for _ in range(2 * cap)]
    go, opened, errors, conns = threading.Barrier(n), [], [], []
    ids = np.array(prompts[0], np.int32)

    def edge() -> None:
        try:
            go.wait(30)
            c = EdgeConnection.connect(*fleet.address, tls=False, timeout_s=30)
            conns.append(c)
            c.send(M.OpenSession(session_id=1, prompt_ids=ids, max_new_tokens=4))
            opened.append(c.recv(30))
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    ts = [threading.Thread(target=edge) for _ in range(n)]
    try:
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not errors, errors[:3]
        assert len(opened) == n and all(isinstance(m, M.SessionOpened) for m in opened)
        # the silent ones, once past the grace, are cut back to the cap (every edge got in, above)
        assert wait_until(lambda: fleet.handshakes_evicted - before >= len(silent) - cap, 10)
    finally:
        for c in conns:
            c.close()
        for s in silent:
            s.close()


def test_a_draining_replica_takes_no_new_sessions(fleet, prompts, refs):
    settled(fleet)
    # An edge already connected to replica 1 before the drain: its next session is handed back
    # (its connection closed at OpenSession), and it re-opens on replica 0 through the router.
    early = EdgeClient(url(fleet), own_draft(), EdgeConfig(**CFG))
    other = EdgeClient(url(fleet), own_draft(), EdgeConfig(**CFG))
    try:
        on1 = early if replica_of(fleet, early) == 1 else other
        assert replica_of(fleet, on1) == 1
        before = loads(fleet)
        assert fleet.drain(1, grace_s=0.0)["sessions_at_start"] == 0
        g = on1.generate(prompts[2], N_NEW)
        out = run_edges(fleet, {i: (own_draft(), prompts[i]) for i in range(2)})
        after = loads(fleet)
    finally:
        early.close()
        other.close()
        fleet.undrain(1)
    assert g.token_ids == refs[2] and g.stats.reconnects >= 1
    assert [out[i][0].token_ids for i in range(2)] == refs[:2]
    assert all(where == 0 for _, where in out.values())
    assert after[1]["sessions_opened"] == before[1]["sessions_opened"] and after[1]["draining"]


def _pipesd(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "pipesd", *args], capture_output=True, timeout=timeout, env=env)


def test_replicas_without_ray_say_how_to_install(tmp_path):
    stub = tmp_path / "ray"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('No module named ray (a test stub)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    r = _pipesd("serve", "--replicas", "2", "--port", "0", env=env)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert b"pip install 'pipesd[fleet]'" in r.stderr


def test_a_ray_address_with_nothing_there_fails_fast_and_clearly():
    with socket.socket() as s:  # a free port: no Ray head listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _pipesd("serve", "--replicas", "2", "--ray-address", f"127.0.0.1:{port}", "--port", "0", timeout=60)
    assert r.returncode == 1 and b"Traceback" not in r.stderr
    assert f"--ray-address 127.0.0.1:{port}: no Ray head answers there".encode() in r.stderr


@pytest.mark.parametrize("value", ["0", "two"])
def test_bad_replicas_is_an_argparse_error(value):
    r = _pipesd("serve", "--replicas", value)
    assert r.returncode == 2 and b"--replicas" in r.stderr and b"Traceback" not in r.stderr


def test_cli_serve_replicas_serves_a_generate_and_drains_then_stops_on_sigterm(monkeypatch, pair, prompts, refs):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # its own local Ray, not this module's
    proc, port = launch.start_server_subprocess(None, threads=1, extra=("--replicas", "2", "--drain-grace-s", "5"),
                                               timeout_s=120)
    try:
        r = _pipesd("generate", "--cloud", f"127.0.0.1:{port}", "--max-new-tokens", str(N_NEW), "--threads", "1",
                    "--show-ids", PROMPTS[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    assert r.returncode == 0, r.stderr.decode()
    (line,) = [ln for ln in r.stderr.decode().splitlines() if ln.startswith("pipesd: token ids: ")]
    assert json.loads(line.split(": ", 2)[2]) == refs[0]
    assert rc == 0, proc.stderr.read()
