"""Observability: edge and cloud Prometheus metrics against the run's own stats, the text
exposition, JSON logs, the saved run and its timeline plot, and the CLI end to end
(`pipesd serve --target DIR --metrics-port`, `generate --draft DIR --save-run`, `timeline`)."""
import io
import json
import logging
import signal
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pipesd.edge import EdgeClient, EdgeConfig
from pipesd.metrics import CloudCollector, EdgeMetrics, JsonFormatter, cloud_registry, configure_logging
from pipesd.timeline import load_run, render_run, save_run
from pipesd.transport import messages as M
from runtime_helpers import running_server, tiny_pair

torch.set_num_threads(1)
PNG = b"\x89PNG\r\n\x1a\n"


def _wait(cond, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _parse(registry) -> dict:
    """Every sample of the text exposition (parsed back) by (name, sorted labels)."""
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture(scope="module")
def run():
    """Two pipelined generations (one with a timeline) through a live server with a noisy pair."""
    draft, target, _ = tiny_pair(noise=0.8)
    with running_server(target) as (server, url):
        with EdgeClient(url, draft) as client:
            gens = [client.generate([1, 2, 3, 4], 40, config=EdgeConfig.for_method("pipesd", record_timeline=True)),
                    client.generate([5, 6, 7], 30)]
        assert _wait(lambda: server.stats.sessions_open == 0)
        yield server, gens


def test_edge_metrics_match_the_generations(run):
    _, gens = run
    m = EdgeMetrics()
    for g in gens:
        m.observe_generation(g)
    v = _parse(m.registry)
    st = [g.stats for g in gens]
    lab = (("method", "pipesd"),)

    def val(name, labels=lab):
        return v[(name, tuple(sorted(labels)))]

    assert sum(s.rollbacks for s in st) > 0, "the noisy pair should roll back"
    assert val("pipesd_edge_generations_total") == 2
    assert val("pipesd_edge_tokens_total") == sum(s.new_tokens for s in st) == sum(len(g.token_ids) for g in gens)
    for name, field in (("drafted_tokens", "drafted"), ("verifications", "verifications"),
                        ("rollbacks", "rollbacks"), ("verified_drafts", "verified_drafts"),
                        ("accepted_drafts", "accepted_drafts"), ("bytes_sent", "bytes_sent"),
                        ("bytes_received", "bytes_received"), ("messages_sent", "messages_sent"),
                        ("wasted_forwards", "wasted_forwards")):
        assert val(f"pipesd_edge_{name}_total") == sum(getattr(s, field) for s in st), name
    assert val("pipesd_edge_cloud_busy_seconds_total") == pytest.approx(sum(s.cloud_busy_s for s in st))
    acc = [a for s in st for a in s.accepted_lengths]
    assert val("pipesd_edge_accepted_length_count") == len(acc) == sum(s.verifications for s in st)
    assert val("pipesd_edge_accepted_length_sum") == sum(acc)
    assert val("pipesd_edge_accepted_length_bucket", lab + (("le", "0.0"),)) == sum(a == 0 for a in acc)
    batches = [b for s in st for b in s.batch_sizes]
    assert val("pipesd_edge_batch_size_tokens_count") == len(batches)
    assert val("pipesd_edge_batch_size_tokens_sum") == sum(batches)
    for reason in set(r for s in st for r in s.trigger_reasons):
        assert v[("pipesd_edge_triggers_total", (("method", "pipesd"), ("reason", reason)))] == \
            sum(s.trigger_reasons.get(reason, 0) for s in st)
    assert val("pipesd_edge_tpt_seconds_count") == 2
    assert val("pipesd_edge_tpt_seconds_sum") == pytest.approx(sum(s.tpt_s for s in st))
    assert val("pipesd_edge_last_tokens_per_second") == pytest.approx(st[-1].new_tokens / st[-1].wall_s)
    assert v[("pipesd_edge_link_estimate_seconds", (("cost", "gen"),))] == pytest.approx(st[-1].cost_g_s)
    assert v[("pipesd_edge_threshold", lab + (("threshold", "tau_tok"),))] == st[-1].tau_tok


def test_edge_metrics_registries_are_separate():
    a, b = EdgeMetrics(), EdgeMetrics()  # two clients in one process: no duplicate-name error
    assert a.registry is not b.registry
    shared = CollectorRegistry()
    assert EdgeMetrics(shared).registry is shared


def test_cloud_collector_reads_the_server(run):
    server, gens = run
    v = _parse(cloud_registry(server, process=False))
    s = server.stats
    assert v[("pipesd_cloud_sessions_opened_total", ())] == 2
    assert v[("pipesd_cloud_sessions_open", ())] == 0
    # Every verdict the edges applied was one cloud verification; the cloud may have verified
    # more (batches in flight when a generation reached its length are answered, then ignored).
    assert v[("pipesd_cloud_verifications_total", ())] == s.verifications >= sum(g.stats.verifications for g in gens)
    assert v[("pipesd_cloud_batched_launches_total", ())] == s.batched_launches
    assert v[("pipesd_cloud_batch_sessions_count", ())] == s.batched_launches
    assert v[("pipesd_cloud_batch_sessions_sum", ())] == s.verifications  # one session per verification here
    assert v[("pipesd_cloud_target_forwards_total", ())] == s.target_forwards > 0
    assert v[("pipesd_cloud_busy_seconds_total", ())] == pytest.approx(s.busy_s)
    assert v[("pipesd_cloud_energy_joules_total", (("source", server.energy.source),))] > 0


def test_cloud_sessions_open_while_a_session_is_open():
    draft, target, _ = tiny_pair()
    with running_server(target) as (server, url):
        reg = CollectorRegistry()
        reg.register(CloudCollector(server))
        with EdgeClient(url, draft) as client:
            client.conn.send(M.OpenSession(session_id=7, prompt_ids=np.asarray([1, 2, 3], dtype=np.int32)))
            msg = client.conn.recv(10.0)
            assert isinstance(msg, M.SessionOpened) and msg.session_id == 7
            assert reg.get_sample_value("pipesd_cloud_sessions_open") == 1
            assert reg.get_sample_value("pipesd_cloud_clients_connected") == 1
            client.conn.send(M.CloseSession(session_id=7))
            assert _wait(lambda: reg.get_sample_value("pipesd_cloud_sessions_open") == 0)
        assert reg.get_sample_value("pipesd_cloud_sessions_opened_total") == 1


def test_saved_run_renders_a_timeline_png(run, tmp_path):
    _, gens = run
    g = gens[0]
    assert g.stats.timeline, "record_timeline=True records the lanes"
    path = save_run(tmp_path / "run.json", g, {"method": "pipesd"}, prompt="ids")
    d = load_run(path)
    assert d["token_ids"] == g.token_ids and d["stats"]["new_tokens"] == g.stats.new_tokens
    assert {e[0] for e in d["timeline"]} >= {"draft", "send", "verify", "verdict"}
    png = render_run(path)
    assert png == tmp_path / "run.png" and png.read_bytes()[:8] == PNG
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not a PipeSD run"):
        render_run(tmp_path / "other.json")
    empty = dict(d, timeline=[])
    with pytest.raises(ValueError, match="empty timeline"):
        render_run(empty, tmp_path / "x.png")


def test_json_log_lines():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf, old = io.StringIO(), io.StringIO()
    try:
        configure_logging("INFO", "text", stream=old)
        configure_logging("INFO", "json", stream=buf)
        logging.getLogger("pipesd.test").info("hello %s", "world", extra={"session": 3})
        logging.getLogger("pipesd.test").debug("not shown")
        with pytest.raises(ValueError, match="log level"):
            configure_logging("LOUD")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and old.getvalue() == ""  # the second call replaced the first's handler
    rec = json.loads(lines[0])
    assert rec["level"] == "INFO" and rec["logger"] == "pipesd.test" and rec["msg"] == "hello world"
    assert rec["session"] == 3 and rec["ts"].endswith("Z")
    try:
        raise KeyError("x")
    except KeyError:
        r = logging.LogRecord("a", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info())
    assert "KeyError" in json.loads(JsonFormatter().format(r))["exc"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_local_dirs_metrics_json_logs_and_timeline(tmp_path, capsys):
    """Any local model directory works: the bundled pair saved with save_pretrained, served with
    `serve --target DIR --metrics-port`, generated from with `generate --draft DIR --save-run`."""
    from pipesd import cli, zoo

    pair = zoo.load_pair()
    ddir, tdir = tmp_path / "my-draft", tmp_path / "my-target"
    for runner, d in ((pair.draft, ddir), (pair.target, tdir)):
        runner.model.save_pretrained(d)
        pair.tokenizer.save_pretrained(d)
    mport = _free_port()
    proc, port = cli.start_server_subprocess(None, auth_token="tok", extra=(
        "--target", str(tdir), "--metrics-port", str(mport), "--log-level", "INFO", "--log-format", "json"))
    try:
        rc = cli.main(["generate", "def read_config(path):\n", "--cloud", f"127.0.0.1:{port}", "--draft", str(ddir),
                       "--max-new-tokens", "12", "--auth-token", "tok", "--threads", "1",
                       "--save-run", str(tmp_path / "run.json")])
        assert rc == 0
        assert "12 tokens" in capsys.readouterr().err
        deadline = time.monotonic() + 10
        while True:  # the CloseSession frame may still be on its way
            text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
            fams = {f.name: f for f in text_string_to_metric_families(text)}
            if fams["pipesd_cloud_sessions_open"].samples[0].value == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert fams["pipesd_cloud_sessions_opened"].samples[0].value == 1
        assert fams["pipesd_cloud_sessions_open"].samples[0].value == 0
        assert fams["pipesd_cloud_verifications"].samples[0].value >= 1
        assert "process_resident_memory_bytes" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(r["logger"] == "pipesd.cloud" and "session 1 opened" in r["msg"] and r["session"] == 1 for r in logs)
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in logs)
    run = load_run(tmp_path / "run.json")
    assert len(run["token_ids"]) == 12 and run["settings"]["draft"] == str(ddir) and "auth_token" not in run["settings"]
    assert cli.main(["timeline", str(tmp_path / "run.json"), "-o", str(tmp_path / "t.png")]) == 0
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG
