"""The edge's own hardening (issue 16, minor items): TLS settings given explicitly (and kept
for reconnections), the edge server's API key and ``--tls-ca``, a write timeout on sends to a
cloud that stopped reading, and ``pipesd generate`` checking its arguments before it loads
the draft."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi import FastAPI

from pipesd import zoo
from pipesd.cloud import CloudConfig, CloudServer
from pipesd.edge import EdgeClient, EdgeConfig
from pipesd.serving import start_in_thread
from pipesd.serving.openai_api import BearerAuth
from pipesd.serving.text import encode_text
from pipesd.transport import codec
from pipesd.transport import conn
from pipesd.transport import messages as M
from runtime_helpers import reference_greedy, running_server, tiny_pair, wait_until

torch.set_num_threads(1)

TOKEN = "tok"
TLS_ENV = ("PIPESD_TLS_CA", "PIPESD_TLS", "PIPESD_TLS_INSECURE")




@pytest.fixture
def no_tls_env(monkeypatch):
    for k in TLS_ENV:
        monkeypatch.delenv(k, raising=False)


# ---------------------------------------------------------------------------- TLS, explicitly
def test_edge_client_takes_tls_explicitly_and_keeps_it_for_reconnections(cert, no_tls_env):
    draft, target, target_m = tiny_pair()
    srv = CloudServer(target, CloudConfig(port=0, auth_token=TOKEN, tls_cert=cert[0], tls_key=cert[1]))
    host, port = srv.start_in_thread()
    url, srv2 = f"{host}:{port}", None
    cfg = EdgeConfig(offline_policy="wait", offline_wait_s=10.0, reconnect_initial_s=0.05, reconnect_max_s=0.2)
    try:
        with pytest.raises(conn.HandshakeError, match="TLS"):  # no environment, no tls=: plain TCP
            EdgeClient(url, draft, auth_token=TOKEN, connect_timeout_s=5)
        with EdgeClient(url, draft, cfg, auth_token=TOKEN, tls_ca=cert[0]) as c:
            assert c.conn.sock.version() in ("TLSv1.2", "TLSv1.3")
            assert c.generate([1, 2, 3], 10).token_ids == reference_greedy(target_m, [1, 2, 3], 10)
            srv.stop()
            srv = None
            assert wait_until(lambda: c.conn.closed)
            srv2 = CloudServer(target, CloudConfig(port=port, auth_token=TOKEN, tls_cert=cert[0], tls_key=cert[1]))
            srv2.start_in_thread()
            gen = c.generate([4, 5], 10)  # reconnects: with the same CA, else the TLS cloud refuses it
            assert gen.stats.reconnects == 1
            assert gen.token_ids == reference_greedy(target_m, [4, 5], 10)
            assert c.conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    finally:
        for s in (srv, srv2):
            if s is not None:
                s.stop()




# ---------------------------------------------------------------------------- the edge server's API key
@pytest.fixture(scope="module")
def keyed():
    """A minimal app behind BearerAuth, on a real socket."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": []}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    app.add_middleware(BearerAuth, key="sk-edge")
    with start_in_thread(app, timeout_s=30) as st:
        yield st.url


def test_api_key_is_checked_as_openai_does(keyed):
    missing = httpx.get(keyed + "/v1/models", timeout=10)
    assert missing.status_code == 401
    err = missing.json()["error"]
    assert "didn't provide an API key" in err["message"] and err["type"] == "invalid_request_error"
    assert err["code"] is None and err["param"] is None
    for header in ("Bearer sk-wrong", "Basic sk-edge", "Bearer sk-edge-longer", "Bearer", "sk-edge"):
        r = httpx.get(keyed + "/v1/models", headers={"Authorization": header}, timeout=10)
        assert r.status_code == 401, header
        assert r.json()["error"]["code"] in ("invalid_api_key", None)
    assert httpx.get(keyed + "/v1/models", headers={"Authorization": "Bearer sk-wrong"},
                     timeout=10).json()["error"]["code"] == "invalid_api_key"
    # a body is not even read before the key is checked: broken JSON is still a 401
    assert httpx.post(keyed + "/v1/completions", content=b"{not json", timeout=10).status_code == 401
    ok = httpx.get(keyed + "/v1/models", headers={"Authorization": "Bearer sk-edge"}, timeout=10)
    assert ok.status_code == 200 and ok.json()["object"] == "list"
    assert httpx.get(keyed + "/health", timeout=10).status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=keyed + "/v1", api_key="sk-edge", max_retries=0).models.list().data == []


def test_cli_edge_server_with_tls_to_the_cloud_and_an_api_key(cert):
    """`pipesd edge-server --tls-ca --api-key` against a TLS cloud, with no PIPESD_TLS* in
    its environment: the flags alone carry TLS; clients need the key."""
    pair = zoo.load_pair(threads=1)
    with running_server(pair.target, auth_token=TOKEN, tls_cert=cert[0], tls_key=cert[1]) as (_, url):
        port_file = Path(tempfile.mkdtemp(prefix="pipesd-edge-")) / "port"
        cmd = [sys.executable, "-m", "pipesd", "edge-server", "--cloud", url, "--port", "0", "--threads", "1",
               "--port-file", str(port_file), "--default-temperature", "0", "--tls-ca", cert[0],
               "--api-key", "sk-edge", "--auth-token", TOKEN]
        env = {k: v for k, v in os.environ.items() if k not in TLS_ENV + ("PIPESD_EDGE_API_KEY",)}
        env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_until(lambda: port_file.exists() and port_file.read_text().strip() or proc.poll() is not None,
                          120), "edge-server did not start within 120 s"
            assert proc.poll() is None, f"edge-server exited early:\n{proc.stderr.read()}"
            base = f"http://127.0.0.1:{int(port_file.read_text())}"
            body = {"model": MODEL, "prompt": "def read_config(path):\n", "max_tokens": 8}
            r = httpx.post(base + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"
            r = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": "Bearer sk-edge"},
                           timeout=60)
            assert r.status_code == 200, r.text
            tok = pair.draft.tokenizer
            want = reference_greedy(pair.target.model, encode_text(tok, body["prompt"]), 8)
            assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate(timeout=10)


MODEL = "stdlib-code"


# ---------------------------------------------------------------------------- write timeout
def test_send_to_a_cloud_that_stops_reading_fails_at_the_write_timeout():
    """The cloud completes the handshake, then never reads: once the socket buffers are full a
    send waits at most ``write_timeout_s`` and raises, naming it, instead of blocking forever."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    release = threading.Event()

    def silent_cloud() -> None:
        s, _ = lsock.accept()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        (n,) = codec.HEADER.unpack(_recv_exact(s, codec.HEADER.size))
        assert isinstance(codec.decode_payload(_recv_exact(s, n)), M.Hello)
        s.sendall(codec.encode(M.HelloAck(version=M.PROTOCOL_VERSION, server_name="silent", vocab_size=48,
                                          tokenizer_fingerprint="", max_sessions=1, max_prompt_tokens=64,
                                          max_draft_in_flight=1 << 20)))
        release.wait(120)  # and never reads again
        s.close()

    threading.Thread(target=silent_cloud, daemon=True).start()
    c = conn.EdgeConnection.connect("127.0.0.1", port, tls=False, write_timeout_s=0.5)
    big = M.DraftBatch(session_id=1, epoch=0, first_pos=0, tokens=np.zeros(100_000, np.int32),
                       probs=np.zeros(100_000, np.float32), verify=False)
    outcome: dict = {}

    def flood() -> None:
        try:
            for _ in range(500):  # 800 KB a frame: far more than the socket buffers hold
                c.send(big)
            outcome["sent"] = True
        except Exception as e:  # the assertion below says which
            outcome["error"] = e

    th = threading.Thread(target=flood, daemon=True)
    th.start()
    th.join(60)
    try:
        assert not th.is_alive(), "send blocked past its write timeout"
        err = outcome.get("error")
        assert isinstance(err, conn.ConnectionClosed) and "write_timeout_s=0.5" in str(err), outcome
        assert c.closed
        with pytest.raises(conn.ConnectionClosed):
            c.recv(5)  # the reader saw the connection end too
    finally:
        release.set()
        c.close()
        lsock.close()
    with pytest.raises(ValueError, match="write_timeout_s"):
        conn.EdgeConnection.connect("127.0.0.1", port, write_timeout_s=0)


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


# ---------------------------------------------------------------------------- generate's arguments
def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipesd", "generate", "x", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_generate_names_the_cloud_flag_when_it_is_not_host_port():
    for bad in ("localhost", "host:", ":7070", "host:99999"):
        r = _generate("--cloud", bad)
        assert r.returncode == 2 and "argument --cloud" in r.stderr and "HOST:PORT" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, says", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["--k", "0"], "argument --k"),
    (["--draft-ms", "-1"], "argument --draft-ms"),
    (["--verdict-timeout", "0"], "argument --verdict-timeout"),
    (["--temperature", "-1"], "temperature must be"),
    (["--up-mbps", "-1"], "must be > 0"),
    (["--tau-seq", "2"], "tau_seq"),
    (["--tls-ca", "/no/such/ca.pem"], "--tls-ca"),
    (["--method", "vanilla-sd", "--tuner", "bayes"], "--tuner tunes"),
])
def test_generate_checks_its_arguments_before_loading_the_draft(args, says):
    """The draft named here does not exist: an error about it would mean it was loaded first."""
    r = _generate("--cloud", "127.0.0.1:1", "--draft", "/no/such/draft", *args)
    assert r.returncode == 2, r.stderr
    assert says in r.stderr and "/no/such/draft" not in r.stderr and "Traceback" not in r.stderr, r.stderr
