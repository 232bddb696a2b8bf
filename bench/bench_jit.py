"""Benchmark: does JIT specialization pay on a realistic request stream?

Compiles a model for this machine, replays a stream of requests whose lengths come from real
text (Debian fortunes through the model's tokenizer) against a runtime with the JIT on and an
empty cache, and reports per length: generic vs variant latency (and ONNX Runtime's, measured in
the same run), compile time per variant, the time from the first request at a new length until a
variant serves it, and the latency of requests that arrive while a compile runs.

    python bench/bench_jit.py                     # the bundled MiniLM-L6 example, 300 requests
    python bench/bench_jit.py --quick             # 120 requests, fewer repetitions
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import median_ms, write_results  # noqa: E402


class Recorder:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.events = []
        self.requests = []
        self.lock = threading.Lock()

    def on_request(self, model, seq, kind, latency):
        with self.lock:
            self.requests.append((time.perf_counter() - self.t0, seq, kind, latency))

    def on_jit(self, model, event):
        with self.lock:
            self.events.append((time.perf_counter() - self.t0, event))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="ONNX model (default: the bundled MiniLM-L6 example)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the example's)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--buckets", default="pow2", help="'pow2', 'exact' or a comma list")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "jit.md"))
    args = ap.parse_args()
    if args.quick:
        args.requests = min(args.requests, 120)

    import onnxruntime as ort

    import edge
    from deploy.compile import compile_model
    from deploy.corpus import request_stream
    from edge.jit import JitPolicy

    work = Path(tempfile.mkdtemp(prefix="bench-jit-"))
    if args.model:
        model, tokenizer = Path(args.model), Path(args.tokenizer)
    else:
        from deploy import examples

        model = examples.write_minilm(work / "example", log=lambda *a: None)
        tokenizer = model.parent / examples.TOKENIZER_FILE
    t = time.perf_counter()
    art = compile_model(model, "host", work / "art", log=lambda *a: None)
    host_compile_s = time.perf_counter() - t

    stream = request_stream(tokenizer, args.requests, seed=1)
    buckets = args.buckets if args.buckets in ("pow2", "exact") else [int(b) for b in args.buckets.split(",")]
    policy = JitPolicy.load(buckets=buckets, min_hits=3, max_variants=8)
    rec = Recorder()
    rt = edge.Runtime(art, threads=args.threads, jit=policy, cache_dir=work / "cache", state_dir=work / "state", listeners=[rec])
    generic = edge.Runtime(art, threads=args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])

    def feed(ids):
        x = np.asarray([ids], dtype=np.int64)
        return {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}

    names = {i.name for i in rt.inputs}

    # 1. the stream, empty cache: requests arrive back to back while variants compile
    rec.t0 = time.perf_counter()
    for ids in stream:
        rt.run({k: v for k, v in feed(ids).items() if k in names})
    rt.specializer.wait_idle(1800)
    stream_s = time.perf_counter() - rec.t0
    stats = rt.specializer.stats()

    # 2. steady state per bucket: generic vs variant vs ORT, and correctness
    rows = []
    first_seen = {}
    for tt, seq, kind, lat in rec.requests:
        b = policy.target_length(seq, rt.artifact.max_seq, rt.specializer.padding_safe)
        first_seen.setdefault(b, tt)
    swapped = {e["bucket"]: tt for tt, e in rec.events if e["event"] == "swapped_in"}
    compiling = []  # (start, end) of every compile
    starts = {}
    for tt, e in rec.events:
        if e["event"] == "compile_started":
            starts[e["bucket"]] = tt
        elif e["event"] in ("compile_finished", "compile_failed") and e["bucket"] in starts:
            compiling.append((starts.pop(e["bucket"]), tt))
    reps = 3 if args.quick else 7
    worst_err = 0.0
    for b in sorted(stats["variants"]):
        v = stats["variants"][b]
        lengths = sorted({s for _, s, _, _ in rec.requests if policy.target_length(s, rt.artifact.max_seq, rt.specializer.padding_safe) == b})
        seq = lengths[len(lengths) // 2] if lengths else b
        x = {k: a for k, a in feed(list(range(1000, 1000 + seq))).items() if k in names}
        g_ms = median_ms(lambda: generic.run(x), reps)
        v_ms = median_ms(lambda: rt.run(x), reps) if v["state"] == "ready" else float("nan")
        o_ms = median_ms(lambda: sess.run(None, x), reps)
        ref = sess.run(None, x)
        got = rt.run(x)
        worst_err = max(worst_err, max(float(np.abs(r - g).max()) / max(1.0, float(np.abs(r).max())) for r, g in zip(ref, got)))
        wait = swapped.get(b, float("nan")) - first_seen.get(b, float("nan"))
        rows.append((b, seq, v["hits"], v["state"], v["compile_s"], wait, g_ms, v_ms, o_ms))

    during = [lat * 1000 for tt, s, kind, lat in rec.requests if kind == "generic" and any(a <= tt <= e for a, e in compiling)]
    outside = [lat * 1000 for tt, s, kind, lat in rec.requests if kind == "generic" and not any(a <= tt <= e for a, e in compiling)]

    lines = [
        f"Model: `{model.name}`; {args.requests} requests with lengths from real text (Debian fortunes through the model's tokenizer; "
        f"median length {int(np.median([len(s) for s in stream]))}, max {max(len(s) for s in stream)}); "
        f"{args.threads} thread(s); policy buckets={policy.buckets}, min_hits={policy.min_hits}, compiles in a worker process={policy.isolate}.",
        f"Host compile of the generic artifact: {host_compile_s:.1f} s. Whole stream (cold cache, compiles running alongside): {stream_s:.1f} s.",
        "",
        "| bucket | example len | hits | state | compile s | first request → variant serving, s | generic ms | variant ms | ORT ms | generic / variant | variant / ORT |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, seq, hits, state, cs, wait, g, v, o in rows:
        lines.append(f"| {b} | {seq} | {hits} | {state} | {cs if cs is not None else float('nan'):.2f} | {wait:.2f} | {g:.2f} | {v:.2f} | {o:.2f} | {g / v:.2f}x | {v / o:.2f}x |")
    lines += [
        "",
        f"Requests served by the generic module while a compile was running: {len(during)}, median {np.median(during) if during else float('nan'):.2f} ms; "
        f"by the generic module with no compile running: {len(outside)}, median {np.median(outside) if outside else float('nan'):.2f} ms "
        "(these mix lengths, so compare like with like in the table above).",
        f"Served by: {dict(sorted(__import__('collections').Counter(k for _, _, k, _ in rec.requests).items()))}.",
        f"Max relative error of the JIT runtime vs ONNX Runtime on the same file: {worst_err:.2e}.",
    ]
    rt.close()
    write_results(Path(args.out), "JIT specialization benchmark", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
