"""A real `edgejit daemon` process for the daemon tests, and a small HTTP client for it."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from deploy.tools.processes import free_port, stop_process  # noqa: F401  (free_port: for the tests)

ROOT = Path(__file__).resolve().parents[3]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_config(path: Path, models: dict, *, server=None, jit=None, paths=None, telemetry=None, log="info",
                 runtime=None, generation=None) -> Path:
    lines = []
    for name, art in models.items():
        lines += ["[[models]]", f"name = {toml_value(name)}", f"artifact = {toml_value(art)}", ""]
    runtime = {"allow_unsigned": True} if runtime is None else runtime  # test artifacts are unsigned
    for section, values in (("server", server), ("generation", generation), ("jit", jit), ("paths", paths), ("telemetry", telemetry), ("runtime", runtime)):
        if values is not None:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
            lines.append("")
    lines += ["[log]", f"level = {toml_value(log)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    """`edgejit daemon --config CONFIG` as a child process (its own session), stderr to a file."""

    def __init__(self, config: Path, port: int, log_path: Path):
        self.config, self.port, self.log_path = config, port, log_path
        self.proc = None

    def start(self, wait_ready: float = 120.0) -> "DaemonProcess":
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "daemon", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=ROOT,
        )
        deadline = time.monotonic() + wait_ready
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, doc = self.get("/health")
                if status == 200 and doc["status"] == "ok":
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready after {wait_ready}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def conn(self, timeout: float = 60.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None, conn=None):
        own = conn is None
        conn = conn or self.conn()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, dict(resp.getheaders()), data
        finally:
            if own:
                conn.close()

    def get(self, path: str):
        status, _, data = self.request("GET", path)
        return status, json.loads(data) if data.startswith(b"{") else data.decode()

    def infer(self, model: str, inputs: dict, conn=None, npz: bool = False):
        """Returns (status, {output name: array} or the error document, headers)."""
        if npz:
            buf = io.BytesIO()
            np.savez(buf, **inputs)
            body, ctype = buf.getvalue(), "application/x-npz"
        else:
            body, ctype = json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}).encode(), "application/json"
        status, headers, data = self.request("POST", f"/v1/models/{model}/infer", body, {"Content-Type": ctype}, conn)
        if status != 200:
            return status, json.loads(data), headers
        if npz:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return status, {k: z[k] for k in z.files}, headers
        doc = json.loads(data)
        return status, {k: np.asarray(v, dtype=np.float32) for k, v in doc["outputs"].items()}, headers

    def metrics(self) -> dict[str, float]:
        """Samples by 'name{labels}' (labels as written)."""
        _, text = self.get("/metrics")
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def signal(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        stop_process(self.proc, timeout, group=True)
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def sum_samples(metrics: dict, name: str, **labels) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items() if k.split("{")[0] == name and all(w in k for w in want))
