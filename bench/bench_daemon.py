"""Benchmark: what the daemon's HTTP API costs on top of the runtime, same artifact, same run.

The bundled example (MiniLM-L6) compiled for this host; batch 1 at a few sequence lengths:
ONNX Runtime in process (reference), edge.Runtime in process (generic module, JIT off), and the
same through `edgejit daemon` over HTTP with JSON and with npz bodies (one client, keep-alive);
then throughput with several concurrent clients. The daemon runs as its own process with the JIT
off, so every path runs the same generic module.

    python bench/bench_daemon.py              # lengths 16, 64, 128
    python bench/bench_daemon.py --quick      # length 16 and 128, fewer repetitions
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import median_ms, write_results  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "daemon.md"))
    args = ap.parse_args()
    lengths = [16, 128] if args.quick else [16, 64, 128]
    reps = 10 if args.quick else 30

    import onnxruntime as ort

    import edge
    from deploy.tools.processes import free_port
    from tests.edge.serve.daemon_helpers import DaemonProcess, write_config

    work = Path(tempfile.mkdtemp(prefix="edgejit-bench-daemon-"))
    subprocess.run([sys.executable, "-m", "edge.cli", "example", "-o", str(work / "example")], check=True, cwd=ROOT, capture_output=True)
    model = work / "example" / "minilm-l6.onnx"
    art = work / "art"
    subprocess.run([sys.executable, "-m", "edge.cli", "compile", str(model), "-o", str(art), "--max-seq", "128"],
                   check=True, cwd=ROOT, capture_output=True)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rt = edge.Runtime(art, threads=1)  # as each daemon worker
    port = free_port()
    cfg = write_config(work / "daemon.toml", {"minilm": art}, server={"port": port, "workers": 2})
    daemon = DaemonProcess(cfg, port, work / "daemon.log").start()

    rows = []
    try:
        conn = daemon.conn()
        rng = np.random.default_rng(0)
        for n in lengths:
            ids = rng.integers(1000, 20000, size=(1, n)).astype(np.int64)
            inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
            t_ort = median_ms(lambda: sess.run(None, inputs), reps)
            t_rt = median_ms(lambda: rt.run(inputs), reps)
            t_json = median_ms(lambda: daemon.infer("minilm", inputs, conn=conn), reps)
            t_npz = median_ms(lambda: daemon.infer("minilm", inputs, conn=conn, npz=True), reps)
            status, got, _ = daemon.infer("minilm", inputs, conn=conn, npz=True)
            err = max(float(np.abs(g - w).max()) for g, w in zip(got.values(), rt.run(inputs)))
            body = len(json.dumps({"inputs": {k: v.tolist() for k, v in inputs.items()}}))
            buf = io.BytesIO()
            np.savez(buf, **{s.name: o for s, o in zip(rt.outputs, rt.run(inputs))})
            rows.append(f"| {n} | {t_ort:.2f} | {t_rt:.2f} ({t_rt / t_ort:.2f}x) | {t_json:.2f} (+{t_json - t_rt:.2f}) | "
                        f"{t_npz:.2f} (+{t_npz - t_rt:.2f}) | {body:,} B / {len(buf.getvalue()):,} B | {err:.1e} |")
        conn.close()

        n = 16
        ids = rng.integers(1000, 20000, size=(1, n)).astype(np.int64)
        inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
        tput = []
        for clients in (1, 2, 8):
            per_client = 12 if args.quick else 40
            errors = []

            def client():
                c = daemon.conn()
                for _ in range(per_client):
                    if daemon.infer("minilm", inputs, conn=c, npz=True)[0] != 200:
                        errors.append(1)
                c.close()

            threads = [threading.Thread(target=client) for _ in range(clients)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            tput.append(f"| {clients} | {clients * per_client} | {clients * per_client / wall:.1f} | {len(errors)} |")
    finally:
        daemon.stop()
        rt.close()

    body = (
        "Batch 1, MiniLM-L6 (bundled example), generic module (JIT off), daemon with 2 workers x 1 thread; "
        "in-process runtime with 1 thread (as a daemon worker), ORT with its default threads. The machine is shared "
        "with other jobs: differences of a few ms are noise. Milliseconds, median of "
        f"{reps}. HTTP columns: one client, keep-alive connection, whole round trip including "
        "client-side encoding/decoding; (+x) is the cost over the in-process runtime.\n\n"
        "| seq | ORT ms | edge.Runtime ms (vs ORT) | daemon JSON ms | daemon npz ms | request JSON / response npz size | max abs diff daemon vs runtime |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n\n"
        "Throughput at seq 16 (npz, each client sequential on its own connection):\n\n"
        "| clients | requests | requests/s | errors |\n| --- | --- | --- | --- |\n" + "\n".join(tput) + "\n"
    )
    write_results(Path(args.out), "Daemon HTTP overhead", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
