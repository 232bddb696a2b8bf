"""The daemon under faults and hostile clients (issue 20): every refusal a JSON error from the real
daemon process, no tracebacks in its log, and the daemon keeps serving others correctly."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import zipfile

import numpy as np
import pytest

import edge
from tests.edge.serve.daemon_helpers import DaemonProcess, free_port, write_config
from tests.fixtures import handmade

READ_TIMEOUT = 2.0
MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def reference(tiny_artifact):
    with edge.Runtime(tiny_artifact) as rt:
        yield rt


@pytest.fixture(scope="module")
def daemon(tiny_artifact, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    port = free_port()
    cfg = write_config(
        tmp / "daemon.toml", {"tiny": tiny_artifact},
        server={"port": port, "max_body_mb": 1.0, "read_timeout_s": READ_TIMEOUT, "idle_timeout_s": 5.0,
                "max_connections": MAX_CONNECTIONS},
        paths={"cache_dir": str(tmp / "cache"), "state_dir": str(tmp / "state")}, log="debug",
    )
    d = DaemonProcess(cfg, port, tmp / "daemon.log").start()
    yield d
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log(), d.log()


def serves_correctly(daemon, reference) -> None:
    inputs = handmade.inputs(2, 7, seed=3)
    status, got, _ = daemon.infer("tiny", inputs)
    assert status == 200, got
    for spec, want in zip(reference.outputs, reference.run(inputs)):
        np.testing.assert_allclose(got[spec.name], want, rtol=1e-5, atol=1e-5)


def raw_exchange(daemon, data: bytes, *, timeout: float = 15.0, then_wait: bool = True) -> tuple[int, dict, dict, float]:
    """Send raw bytes, read the reply to EOF: (status, headers, JSON body, seconds until the reply)."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    elapsed = time.monotonic() - start
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, json.loads(body) if body else {}, elapsed


def assert_json_error(status: int, doc: dict, want_status: int, text: str) -> None:
    assert status == want_status, doc
    assert set(doc) == {"error", "status"} and doc["status"] == want_status, doc
    assert text in doc["error"] and "\n" not in doc["error"], doc


# -- case 3: a body shorter than its Content-Length -------------------------------------------------
def test_short_body_gets_408_json_and_connection_close(daemon, reference):
    request = (b"POST /v1/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: 1000\r\n\r\n" + b'{"inputs"')
    status, headers, doc, elapsed = raw_exchange(daemon, request)
    assert_json_error(status, doc, 408, "not received in time")
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert elapsed < READ_TIMEOUT + 3
    serves_correctly(daemon, reference)


def test_body_cut_short_by_the_client_gets_400(daemon, reference):
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as s:
        s.sendall(b"POST /v1/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b'{"inputs"')
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head
    assert_json_error(400, json.loads(body), 400, "shorter than its Content-Length")
    serves_correctly(daemon, reference)


# -- case 4: an .npz whose header claims a huge shape -----------------------------------------------
def _npz_claiming(shape, descr="<i8") -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("input_ids.npy", header.getvalue() + b"\0" * 64)
    return buf.getvalue()


def test_npz_header_claiming_a_huge_shape_is_413_before_allocating(daemon, reference):
    for shape in [(1, 2**40), (2**31, 2**31)]:
        status, _, data = daemon.request("POST", "/v1/models/tiny/infer", _npz_claiming(shape),
                                         {"Content-Type": "application/x-npz"})
        assert_json_error(status, json.loads(data), 413, "more than the limit")
    # a header that disagrees with the bytes after it is a 400, not a numpy error
    status, _, data = daemon.request("POST", "/v1/models/tiny/infer", _npz_claiming((1, 3)),
                                     {"Content-Type": "application/x-npz"})
    assert_json_error(status, json.loads(data), 400, "malformed npz body")
    assert "MemoryError" not in daemon.log() and "Unable to allocate" not in daemon.log()
    serves_correctly(daemon, reference)


# -- case 5: clients that hang up before their reply ------------------------------------------------
def test_clients_hanging_up_leave_no_tracebacks(daemon, reference):
    body = json.dumps({"inputs": {k: v.tolist() for k, v in handmade.inputs(4, 120).items()}}).encode()
    head = (b"POST /v1/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))

    def hang_up(i: int) -> None:
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with a reset
            if i % 3 == 0:
                s.sendall(head + body[: len(body) // 2])  # mid-body
            else:
                s.sendall(head + body)  # before the reply
            if i % 3 == 2:
                time.sleep(0.05)

    for _ in range(3):
        threads = [threading.Thread(target=hang_up, args=(i,)) for i in range(MAX_CONNECTIONS - 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    time.sleep(1.0)
    serves_correctly(daemon, reference)
    log = daemon.log()
    assert "Traceback" not in log and "BrokenPipe" not in log.replace("DEBUG", ""), log[-3000:]
    assert "internal error" not in log, log[-3000:]


# -- case 7: wrong methods ------------------------------------------------------------------------
def test_wrong_methods_get_405_json_with_allow_and_head_works(daemon, reference):
    status, headers, data = daemon.request("HEAD", "/health")
    assert status == 200 and data == b"" and headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) > 0
    for method, path, allow in [
        ("PATCH", "/health", "GET, HEAD"),
        ("OPTIONS", "/v1/models/tiny/infer", "POST"),
        ("DELETE", "/health", "GET, HEAD"),
        ("GET", "/v1/models/tiny/infer", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("BREW", "/v1/models", "GET, HEAD"),
    ]:
        status, headers, data = daemon.request(method, path)
        assert status == 405, (method, path, status, data)
        assert headers["Allow"] == allow and headers["Content-Type"] == "application/json", (method, headers)
        doc = json.loads(data)
        if path.startswith("/v1/chat"):  # OpenAI's error shape there
            assert doc["error"]["message"] and doc["error"]["type"] == "invalid_request_error", doc
        else:
            assert_json_error(status, doc, 405, "use")
    serves_correctly(daemon, reference)


def test_malformed_request_line_gets_json_400(daemon, reference):
    status, headers, doc, _ = raw_exchange(daemon, b"GARBAGE\r\n\r\n")
    assert_json_error(status, doc, 400, "")
    assert headers["connection"] == "close"
    serves_correctly(daemon, reference)


# -- case 2: slow clients cannot hold the connection slots ------------------------------------------
def test_trickling_clients_are_cut_off_at_the_read_deadline(daemon, reference):
    """More trickling clients than connection slots, each sending a header byte every 0.3 s (never
    idle for long): each is cut off with a 408 once read_timeout_s has passed since its first byte,
    and ordinary requests are served again right after."""
    results: list = []
    stop = threading.Event()

    def trickle() -> None:
        try:
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=15) as s:
                start = time.monotonic()
                for b in b"POST /v1/models/tiny/infer HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 1000:
                    if stop.is_set():
                        break
                    try:
                        s.send(bytes([b]))
                    except OSError:
                        break
                    s.settimeout(0.3)
                    try:
                        reply = s.recv(65536)
                    except TimeoutError:
                        continue
                    results.append((time.monotonic() - start, reply))
                    return
        except OSError as e:
            results.append((None, repr(e).encode()))

    threads = [threading.Thread(target=trickle) for _ in range(MAX_CONNECTIONS + 4)]
    for t in threads:
        t.start()
    time.sleep(READ_TIMEOUT + 1.5)
    try:
        serves_correctly(daemon, reference)
    finally:
        stop.set()
        for t in threads:
            t.join()
    cut = [(t, r) for t, r in results if r.startswith(b"HTTP/1.1 408")]
    assert len(cut) >= MAX_CONNECTIONS - 1, results
    for elapsed, reply in cut:
        assert elapsed < READ_TIMEOUT + 2, (elapsed, reply)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"Connection: close" in head
        assert_json_error(408, json.loads(body), 408, "read_timeout_s")
    serves_correctly(daemon, reference)


# -- case 9: JIT work directories left by a killed process --------------------------------------------
def test_leftover_jit_work_dirs_of_dead_processes_are_removed_at_start(tmp_path, tiny_artifact, reference, monkeypatch):
    import os
    import subprocess
    import sys

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp / f"edgejit-jit-{dead.pid}-abc123"
    live = tmp / f"edgejit-jit-{os.getpid()}-def456"  # this test process: still running
    other = tmp / "edgejit-jit-q1w2e3"  # no pid in the name: not ours to judge
    for d in (stale, live, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x.so").write_bytes(b"\0" * 1000)
    monkeypatch.setenv("TMPDIR", str(tmp))
    port = free_port()
    cfg = write_config(tmp_path / "daemon.toml", {"tiny": tiny_artifact}, server={"port": port},
                       jit={"policy": "on", "isolate": False},
                       paths={"cache_dir": str(tmp_path / "cache"), "state_dir": str(tmp_path / "state")})
    d = DaemonProcess(cfg, port, tmp_path / "daemon.log").start()
    try:
        assert not stale.exists() and live.exists() and other.exists()
        mine = [p.name for p in tmp.iterdir() if p.name.startswith(f"edgejit-jit-{d.proc.pid}-")]
        assert len(mine) == 1, list(tmp.iterdir())  # the daemon's own, named by its pid
        serves_correctly(d, reference)
    finally:
        assert d.stop() == 0, d.log()
    assert "removed 1 JIT work directory" in d.log()


# -- case 8: admin endpoints ------------------------------------------------------------------------
def _run_daemon_cli(args: list[str], timeout: float = 60.0):
    import os
    import subprocess
    import sys

    from tests.edge.serve.daemon_helpers import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "edge.cli", "daemon", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_listening_beyond_loopback_without_a_token_is_refused_at_start(tiny_artifact, tmp_path):
    """Checked before anything listens (the test never binds beyond loopback): a config file's
    host and the command line's --listen alike."""
    port = free_port()
    cfg = write_config(tmp_path / "daemon.toml", {"tiny": tiny_artifact}, server={"host": "0.0.0.0", "port": port})
    for args in (["--config", str(cfg)], ["--model", f"tiny={tiny_artifact}", "--allow-unsigned", "--listen", f"0.0.0.0:{port}"]):
        r = _run_daemon_cli(args)
        assert r.returncode == 1, (r.returncode, r.stderr)
        err = r.stderr.strip().splitlines()[-1]
        assert err.startswith("edgejit daemon: error: ") and "host '0.0.0.0' listens beyond this machine" in err, r.stderr
        assert "admin_token" in err and "--allow-remote-without-token" in err, err
        assert "Traceback" not in r.stderr and "listening on" not in r.stderr, r.stderr


def test_exposure_rules():
    from edge.serve.config import ConfigError, ServerConfig, check_exposure

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert check_exposure(ServerConfig(host=host)) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.20"):
        with pytest.raises(ConfigError, match="listens beyond this machine"):
            check_exposure(ServerConfig(host=host))
        assert check_exposure(ServerConfig(host=host, admin_token="s3cret")) is None
        assert "allowed by allow_remote_without_token" in check_exposure(ServerConfig(host=host, allow_remote_without_token=True))


def test_reload_needs_the_admin_token_when_one_is_set(tiny_artifact, reference, tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "daemon.toml", {"tiny": tiny_artifact}, server={"port": port, "admin_token": "s3cret-token"})
    with DaemonProcess(cfg, port, tmp_path / "daemon.log") as d:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Bearer s3cret-token-and-more"}):
            for model in ("tiny", "no-such-model"):  # 401 before anything is looked up
                status, got_headers, data = d.request("POST", f"/v1/models/{model}/reload", b"", headers)
                assert_json_error(status, json.loads(data), 401, "Authorization: Bearer")
                assert got_headers["WWW-Authenticate"].startswith("Bearer"), got_headers
        status, _, data = d.request("POST", "/v1/models/tiny/reload", b"", {"Authorization": "Bearer s3cret-token"})
        assert status == 200 and json.loads(data)["result"] == "unchanged", data
        serves_correctly(d, reference)  # inference needs no token
        assert 'edgejit_rejected_total{reason="unauthorized"} 8.0' in d.get("/metrics")[1]
    assert "Traceback" not in d.log()


# -- case 2: slots for real work that slow clients cannot take ----------------------------------------
def _reply(sock, timeout: float) -> bytes:
    """What the daemon sent on this socket until it closed it ('' if it sent nothing in `timeout`)."""
    sock.settimeout(timeout)
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except TimeoutError:
        pass
    return reply


def test_slow_and_idle_connections_make_room_for_real_requests(tiny_artifact, reference, tmp_path):
    """Every connection slot held by clients that trickle their requests in (well within a long
    read deadline): a new client's request is still served at once, by closing the connection that
    has waited longest without a whole request, which is told so (503 JSON); an idle keep-alive
    connection goes before any slow one (closed without a reply)."""
    slots = 4
    port = free_port()
    cfg = write_config(tmp_path / "daemon.toml", {"tiny": tiny_artifact},
                       server={"port": port, "max_connections": slots, "read_timeout_s": 120.0, "idle_timeout_s": 120.0})
    with DaemonProcess(cfg, port, tmp_path / "daemon.log") as d:
        slow = []
        for _ in range(slots):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"POST /v1/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inp")
            slow.append(s)
            time.sleep(0.1)
        time.sleep(0.3)
        start = time.monotonic()
        serves_correctly(d, reference)  # all slots held by slow clients: the oldest one makes room
        assert time.monotonic() - start < 5
        head, _, body = _reply(slow[0], 5).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Connection: close" in head and b"Retry-After: 1" in head, head
        assert_json_error(503, json.loads(body), 503, "closed to make room")
        idle = d.conn()  # a keep-alive connection, idle after its request: full again
        idle.request("GET", "/health")
        assert idle.getresponse().read()  # waiting again from before its reply's last bytes: no pause needed
        serves_correctly(d, reference)  # the idle connection goes first, though the slow ones are older
        assert _reply(idle.sock, 5) == b""
        assert all(_reply(s, 0.5) == b"" for s in slow[1:])  # still open, still waiting
        for s in slow:
            s.close()
        idle.close()
        rejected = {k: v for k, v in d.metrics().items() if k.startswith("edgejit_rejected_total")}
        assert rejected['edgejit_rejected_total{reason="evicted_slow"}'] >= 1, rejected
        assert rejected['edgejit_rejected_total{reason="evicted_idle"}'] >= 1, rejected  # (connections closing meanwhile may count too)
    assert "Traceback" not in d.log()
