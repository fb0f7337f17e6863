"""Interrupts and shutdowns (issue 16: item 2, item 11 and two minor items).

A Ctrl-C is not a lost cloud. SIGINT during ``pipesd generate`` ends the run, closes its cloud
session (the cloud frees it), joins the edge's threads, says nothing about a lost cloud and
exits 130, for every method; ``pipesd edge-server`` stops cleanly (exit 0) on SIGINT and
SIGTERM; a ``KeyboardInterrupt`` in a Python caller of ``EdgeClient`` propagates after a clean
close. The cloud side: ``CloudServer.stop()`` may be called twice and never logs a cancelled
connection task; a connection-level Error closes the connection; a duplicate OpenSession
leaves the open session alone.

The CLI and the Python caller run in subprocesses against a cloud in this process (the bundled
pair's target, each verification padded so a long run lasts well past the interrupt). Real
signals are sent, with the child's default SIGINT handler restored (background jobs ignore
SIGINT). Every wait has a deadline; none is a measurement.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from pipesd import zoo
from pipesd.cloud import CloudConfig, CloudServer
from pipesd.edge import EdgeClient, EdgeConfig
from pipesd.transport import messages as M
from pipesd.transport.conn import ConnectionClosed, EdgeConnection
from runtime_helpers import reference_greedy, running_server, tiny_pair, wait_until

torch.set_num_threads(1)

PROMPT = "def read_config(path):\n"
LONG = 1000  # tokens asked of a run that is interrupted: minutes at the padded cloud's pace
METHODS = ("pipesd", "vanilla-sd", "cloud-stream")
NEVER = ("lost the cloud", "terminate called", "Traceback", "offline policy")




def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def pair():
    return zoo.load_pair()


@pytest.fixture(scope="module")
def cloud(pair):
    with running_server(pair.target, verify_pad_s=0.05) as s:
        yield s


class Child:
    """A subprocess (default SIGINT handler) whose stdout and stderr are collected as they come."""

    def __init__(self, argv: list) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PIPESD_AUTH_TOKEN="", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     preexec_fn=_default_sigint)
        self.out, self.err = bytearray(), bytearray()
        self._readers = [threading.Thread(target=self._read, args=(f, buf), daemon=True)
                         for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(f, buf: bytearray) -> None:
        while chunk := f.read1(4096):
            buf += chunk

    def wait_output(self, timeout_s: float = 120.0) -> None:
        assert wait_until(lambda: self.out or self.proc.poll() is not None, timeout_s), "no output within the deadline"
        assert self.proc.poll() is None, f"exited early ({self.proc.returncode}):\n{self.err.decode()}"

    def finish(self, timeout_s: float = 60.0) -> tuple[int, str]:
        """Wait for the exit (killed past ``timeout_s``); (exit status, stderr)."""
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"did not exit within {timeout_s} s:\n{self.err.decode()}") from None
        for t in self._readers:
            t.join(5)
        return self.proc.returncode, self.err.decode(errors="replace")


def _freed_and_serving(srv, url: str, pair, opened_before: int) -> None:
    """The cloud freed the interrupted session and serves the next generation exactly."""
    assert srv.stats.sessions_opened > opened_before, "the child never opened a session"
    assert wait_until(lambda: srv.stats.sessions_open == 0, 20), "the interrupted session was not freed"
    ids = pair.tokenizer.encode(PROMPT, add_special_tokens=False)
    with EdgeClient(url, pair.draft) as c:
        assert c.generate(PROMPT, 8).token_ids == reference_greedy(pair.target.model, ids, 8)


def _clean(err: str) -> None:
    for bad in NEVER:
        assert bad not in err, f"{bad!r} on stderr:\n{err}"


# ---------------------------------------------------------------------------- pipesd generate
@pytest.mark.parametrize("method", METHODS)
def test_ctrl_c_during_generate_exits_130_and_the_cloud_frees_the_session(pair, cloud, method):
    srv, url = cloud
    opened = srv.stats.sessions_opened
    child = Child([sys.executable, "-m", "pipesd", "generate", PROMPT, "--cloud", url, "--method", method,
                   "--max-new-tokens", str(LONG), "--threads", "1"])
    child.wait_output()  # verified text is on stdout: the generation runs
    child.proc.send_signal(signal.SIGINT)
    rc, err = child.finish()
    assert rc == 130, err
    assert "pipesd: interrupted" in err
    _clean(err)
    assert "tokens, TPT" not in err  # no summary of a finished run
    _freed_and_serving(srv, url, pair, opened)


# ---------------------------------------------------------------------------- EdgeClient from Python
CALLER = """
import sys, threading
from pipesd import zoo
from pipesd.edge import EdgeClient, EdgeConfig
url, how, method, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
draft = zoo.load_pair().draft
try:
    with EdgeClient(url, draft, EdgeConfig.for_method(method)) as c:
        print("connected", flush=True)
        if how == "generate":
            c.generate(%r, n)
        else:
            for piece in c.stream(%r, n):
                print(piece, end="", flush=True)
    print("not interrupted", file=sys.stderr)
except KeyboardInterrupt:
    left = [t.name for t in threading.enumerate() if t.name.startswith("pipesd")]
    print(f"KeyboardInterrupt; pipesd threads left: {left}", file=sys.stderr)
    sys.exit(130)
""" % (PROMPT, PROMPT)


@pytest.mark.parametrize("how", ["generate", "stream"])
@pytest.mark.parametrize("method", ["pipesd", "cloud-stream"])
def test_keyboard_interrupt_in_an_edge_client_caller_propagates_after_a_clean_close(pair, cloud, how, method):
    srv, url = cloud
    opened = srv.stats.sessions_opened
    child = Child([sys.executable, "-c", CALLER, url, how, method, str(LONG)])
    child.wait_output()  # "connected"
    verified = srv.stats.verifications
    assert wait_until(lambda: srv.stats.sessions_open >= 1 and srv.stats.verifications > verified + 2, 60), \
        "the generation did not start"
    child.proc.send_signal(signal.SIGINT)
    rc, err = child.finish()
    assert rc == 130, err
    assert "KeyboardInterrupt; pipesd threads left: []" in err  # stream, ring and reader threads all joined
    _clean(err)
    _freed_and_serving(srv, url, pair, opened)


# ---------------------------------------------------------------------------- pipesd edge-server
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_edge_server_stops_cleanly_on_a_signal_during_a_stream(pair, cloud, sig):
    srv, url = cloud
    opened = srv.stats.sessions_opened
    port_file = Path(tempfile.mkdtemp(prefix="pipesd-sig-")) / "port"
    child = Child([sys.executable, "-m", "pipesd", "edge-server", "--cloud", url, "--port", "0", "--threads", "1",
                   "--port-file", str(port_file), "--default-temperature", "0"])
    try:
        assert wait_until(lambda: (port_file.exists() and port_file.read_text().strip()) or child.proc.poll() is not None,
                      120), "edge-server did not start"
        assert child.proc.poll() is None, child.err.decode()
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        body = {"model": "stdlib-code", "prompt": PROMPT, "max_tokens": LONG, "stream": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: {"))  # the stream runs
            child.proc.send_signal(sig)
            rest = [line for line in lines if line]  # the shutdown cancels the generation: the stream ends
    except BaseException:
        child.proc.kill()
        raise
    rc, err = child.finish()
    assert rest[-1] == "data: [DONE]", rest[-3:]
    (last,) = [json.loads(line[6:]) for line in rest if line.startswith("data: {") and '"pipesd"' in line]
    assert last["pipesd"]["new_tokens"] < LONG  # cut short, not run through to max_tokens
    assert rc == 0, err
    _clean(err)
    _freed_and_serving(srv, url, pair, opened)


# ---------------------------------------------------------------------------- CloudServer.stop
@pytest.fixture(scope="module")
def tiny():
    return tiny_pair()


def test_cloud_stop_twice_is_a_no_op(tiny):
    srv = CloudServer(tiny[1], CloudConfig(port=0))
    srv.start_in_thread()
    srv.stop()
    srv.stop()  # was: RuntimeError("Event loop is closed")
    assert not srv._thread.is_alive()


def test_cloud_stop_with_connections_open_logs_no_cancelled_error(tiny, caplog):
    """Stopped mid-generation, with a second edge idle in an open session and a socket still in
    its handshake: no ``Exception in callback ... CancelledError`` (asyncio's logger), every
    time (the fault was intermittent: a few rounds)."""
    import socket

    caplog.set_level(logging.ERROR, logger="asyncio")
    for _ in range(4):
        srv = CloudServer(tiny[1], CloudConfig(port=0, verify_pad_s=0.01))
        host, port = srv.start_in_thread()
        url = f"{host}:{port}"
        raw = socket.create_connection((host, port))  # never says Hello
        idle = EdgeConnection.connect(host, port)
        idle.send(M.OpenSession(session_id=1, prompt_ids=np.array([3, 1, 4], dtype=np.int32), max_new_tokens=8))
        assert isinstance(idle.recv(10), M.SessionOpened)
        edge = EdgeClient(url, tiny[0], EdgeConfig.for_method("pipesd", offline_policy="fail"))
        done = threading.Event()
        errors: list = []

        def run() -> None:
            try:
                for _ in edge.stream([3, 1, 4, 1, 5], 2000):
                    pass
            except Exception as e:  # the cloud went away: expected
                errors.append(e)
            done.set()

        threading.Thread(target=run, daemon=True).start()
        assert wait_until(lambda: srv.stats.verifications >= 3, 20), "the generation did not start"
        srv.stop()
        assert not srv._thread.is_alive(), "stop() did not finish"
        assert done.wait(30), "the edge did not notice the cloud going"
        edge.close()
        idle.close()
        raw.close()
    bad = [r.getMessage() + str(r.exc_info) for r in caplog.records if r.name == "asyncio"]
    assert not bad, bad


# ---------------------------------------------------------------------------- the wire's minor items
@pytest.fixture(scope="module")
def tiny_cloud(tiny):
    with running_server(tiny[1]) as s:
        yield s


@pytest.mark.parametrize("frame", [
    M.Hello(version=M.PROTOCOL_VERSION, auth_token=""),
    M.HelloAck(version=M.PROTOCOL_VERSION, server_name="x", vocab_size=48, tokenizer_fingerprint="",
               max_sessions=1, max_prompt_tokens=1, max_draft_in_flight=1),
], ids=["Hello", "HelloAck"])
def test_a_connection_level_error_after_the_handshake_closes_the_connection(tiny_cloud, frame):
    srv, url = tiny_cloud
    host, port = url.rsplit(":", 1)
    with EdgeConnection.connect(host, int(port)) as c:
        c.send(frame)
        err = c.recv(10)
        assert isinstance(err, M.Error) and err.session_id == -1 and err.code == M.E_BAD_FRAME
        with pytest.raises(ConnectionClosed):  # docs/wire.md: a -1 Error closes the connection
            c.recv(10)


def test_a_duplicate_open_is_refused_and_the_open_session_verifies_to_the_end(tiny, tiny_cloud):
    srv, url = tiny_cloud
    host, port = url.rsplit(":", 1)
    prompt, n = [3, 1, 4, 1, 5], 12
    open_ = M.OpenSession(session_id=7, prompt_ids=np.array(prompt, dtype=np.int32), max_new_tokens=n)
    with EdgeConnection.connect(host, int(port)) as c:
        c.send(open_)
        assert isinstance(c.recv(10), M.SessionOpened)
        c.send(open_)  # the same id again
        err = c.recv(10)
        assert isinstance(err, M.Error) and (err.code, err.session_id) == (M.E_BAD_FIELD, 7), err
        assert "already open" in err.message
        c.send(M.StreamRequest(session_id=7, epoch=0, first_pos=0, budget=n))
        tokens = []
        while True:
            v = c.recv(30)
            assert isinstance(v, M.Verdict), v  # was: Error "unknown session 7"
            tokens.append(v.token)
            if v.finished:
                break
        c.send(M.CloseSession(session_id=7))
    assert tokens == reference_greedy(tiny[2], prompt, n)
