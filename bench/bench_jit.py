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
    ap.add_argument("--rate", type=float, default=10.0, help="requests per second in the replayed stream (Poisson arrivals)")
    ap.add_argument("--policies", nargs="+", default=["exact", "step8", "pow2"],
                    help="bucket policies to compare: exact, pow2, step8 (multiples of 8), or a comma list of lengths")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "jit.md"))
    args = ap.parse_args()
    if args.quick:
        args.requests = min(args.requests, 120)

    import onnxruntime as ort

    import edge
    from deploy.compiler.driver import compile_model
    from deploy.tools.corpus import request_stream

    work = Path(tempfile.mkdtemp(prefix="bench-jit-"))
    if args.model:
        model, tokenizer = Path(args.model), Path(args.tokenizer)
    else:
        from deploy.tools import examples

        model = examples.write_minilm(work / "example", log=lambda *a: None)
        tokenizer = model.parent / examples.TOKENIZER_FILE
    t = time.perf_counter()
    art = compile_model(model, "host", work / "art", log=lambda *a: None)
    host_compile_s = time.perf_counter() - t

    stream = request_stream(tokenizer, args.requests, seed=1)
    generic = edge.Runtime(art, threads=args.threads)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in generic.inputs}

    def feed(ids):
        x = np.asarray([ids], dtype=np.int64)
        full = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
        return {k: v for k, v in full.items() if k in names}

    lines = [
        f"Model: `{model.name}`; {args.requests} requests with lengths from real text (Debian fortunes through the model's tokenizer; "
        f"median length {int(np.median([len(s) for s in stream]))}, 90th percentile {int(np.percentile([len(s) for s in stream], 90))}, "
        f"max {max(len(s) for s in stream)}); {args.threads} thread(s); batch 1. Host compile of the generic artifact: {host_compile_s:.1f} s.",
        "",
        "Per bucket B: *specialization* compares the variant with the generic module at the same length B; *net* compares, for the "
        "median request length L that the bucket serves, the variant (padded from L to B) with the generic module at L. "
        "Times are medians of repeated calls after the stream, ORT measured alongside.",
    ]
    for name in args.policies:
        lines += ["", *run_policy(name, art, work, args, stream, generic, sess, feed, rt_max=generic.artifact.max_seq)]
    lines += ["", interference(art, work, args, feed)]
    write_results(Path(args.out), "JIT specialization benchmark", "\n".join(lines))
    return 0


def interference(art, work, args, feed, length=64, n=40):
    """A/B: the same paced requests on the generic module, without and then with a variant compile
    running in the worker process."""
    import edge
    from edge.jit import JitPolicy

    rt = edge.Runtime(art, threads=args.threads, jit=JitPolicy.load(mode="on", min_hits=10**9, max_variants=64),
                      cache_dir=work / "cache-ab", state_dir=work / "state-ab")
    x = feed(list(range(1000, 1000 + length)))

    def paced():
        out = []
        for _ in range(n):
            t = time.perf_counter()
            rt.run(x)
            out.append((time.perf_counter() - t) * 1000)
            time.sleep(1.0 / args.rate)
        return out

    paced()  # warm-up
    quiet = paced()
    during, compiles, targets = [], 0, iter(range(200, 513, 8))
    while len(during) < n:
        states = [v["state"] for v in rt.specializer.stats()["variants"].values()]
        if "compiling" not in states and "queued" not in states:
            rt.specializer.prespecialize([next(targets)])  # keep a compile running the whole time
            compiles += 1
            continue
        t = time.perf_counter()
        rt.run(x)
        ms = (time.perf_counter() - t) * 1000
        if any(v["state"] == "compiling" for v in rt.specializer.stats()["variants"].values()):
            during.append(ms)
        time.sleep(1.0 / args.rate)
    rt.specializer.wait_idle(600)
    rt.close()
    q, d = float(np.median(quiet)), float(np.median(during))
    return (f"Interference A/B (length {length}, {n} requests paced at {args.rate:g}/s on the generic module): "
            f"median {q:.2f} ms with no compile running, {d:.2f} ms while {compiles} variant compiles ran in the worker "
            f"process ({d / q:.2f}x).")


def buckets_of(name: str):
    if name in ("exact", "pow2"):
        return name
    if name == "step8":
        return list(range(8, 513, 8))
    return [int(b) for b in name.split(",")]


def run_policy(name, art, work, args, stream, generic, sess, feed, rt_max):
    import edge
    from edge.jit import JitPolicy

    policy = JitPolicy.load(buckets=buckets_of(name), min_hits=3, max_variants=8)
    rec = Recorder()
    rt = edge.Runtime(art, threads=args.threads, jit=policy, cache_dir=work / f"cache-{name}", state_dir=work / f"state-{name}", listeners=[rec])
    bucket = lambda s: policy.target_length(s, rt_max, rt.specializer.padding_safe)  # noqa: E731

    # the stream, cold cache: requests arrive at --rate while variants compile in the worker
    gaps = np.random.default_rng(2).exponential(1.0 / args.rate, len(stream))
    rec.t0 = time.perf_counter()
    due = 0.0
    for ids, gap in zip(stream, gaps):
        due += gap
        time.sleep(max(0.0, due - (time.perf_counter() - rec.t0)))
        rt.run(feed(ids))
    stream_s = time.perf_counter() - rec.t0
    stream_requests = list(rec.requests)
    rt.specializer.wait_idle(1800)
    stats = rt.specializer.stats()

    first_seen, swapped, starts, compiling = {}, {}, {}, []
    for tt, seq, kind, lat in rec.requests:
        first_seen.setdefault(bucket(seq), tt)
    for tt, e in rec.events:
        if e["event"] == "swapped_in":
            swapped[e["bucket"]] = tt
        elif e["event"] == "compile_started":
            starts[e["bucket"]] = tt
        elif e["event"] in ("compile_finished", "compile_failed") and e["bucket"] in starts:
            compiling.append((starts.pop(e["bucket"]), tt))
    reps = 3 if args.quick else 7
    rows, worst = [], 0.0
    for b in sorted(stats["variants"]):
        v = stats["variants"][b]
        if v["state"] != "ready":
            continue
        lengths = sorted(s for _, s, _, _ in rec.requests if bucket(s) == b)
        L = lengths[len(lengths) // 2]
        xb, xl = feed(list(range(1000, 1000 + b))), feed(list(range(1000, 1000 + L)))
        g_b, v_b, o_b = (median_ms(lambda f=f: f(xb), reps) for f in (generic.run, rt.run, lambda x: sess.run(None, x)))
        g_l, v_l = (median_ms(lambda f=f: f(xl), reps) for f in (generic.run, rt.run))
        for x in (xb, xl):
            ref, got = sess.run(None, x), rt.run(x)
            worst = max(worst, max(float(np.abs(r - g).max()) / max(1.0, float(np.abs(r).max())) for r, g in zip(ref, got)))
        wait = swapped.get(b, float("nan")) - first_seen.get(b, float("nan"))
        rows.append(f"| {b} | {v['hits']} | {v['compile_s']:.2f} | {wait:.2f} | {g_b:.2f} | {v_b:.2f} | {g_b / v_b:.2f}x | {v_b / o_b:.2f}x "
                    f"| {L} | {g_l:.2f} | {v_l:.2f} | {g_l / v_l:.2f}x |")
    during = [(s, lat * 1000) for tt, s, kind, lat in stream_requests if kind == "generic" and any(a <= tt <= e for a, e in compiling)]
    # the same lengths on the generic module with no compile running: does a compile slow serving down?
    alone = {n: median_ms(lambda n=n: generic.run(feed(list(range(1000, 1000 + n)))), 3) for n in sorted({n for n, _ in during})[:40]}
    slowdown = [ms / alone[n] for n, ms in during if n in alone]
    served = dict(sorted(__import__("collections").Counter(k for _, _, k, _ in stream_requests).items()))
    stream_ms = {k: np.median([lat * 1000 for _, _, kk, lat in stream_requests if kk == k]) for k in served}
    total_generic = sum(median_ms(lambda ids=ids: generic.run(feed(ids)), 1, warmup=0) for ids in stream[:100])
    total_jit = sum(median_ms(lambda ids=ids: rt.run(feed(ids)), 1, warmup=0) for ids in stream[:100])
    rt.close()
    return [
        f"### Policy `{name}` (buckets={policy.buckets if not isinstance(policy.buckets, tuple) or len(policy.buckets) < 10 else 'multiples of 8'}, "
        f"min_hits={policy.min_hits}, max_variants={policy.max_variants}, compiles in a worker process)",
        "",
        f"Cold stream at {args.rate:g} requests/s: {stream_s:.1f} s for {len(stream)} requests; served by {served} "
        f"(median latency each: {', '.join(f'{k} {v:.2f} ms' for k, v in stream_ms.items())}). "
        f"Requests that ran on the generic module while a compile was running: {len(during)}, median {np.median([ms for _, ms in during]) if during else float('nan'):.2f} ms, "
        f"{np.median(slowdown) if slowdown else float('nan'):.2f}x the generic module's latency at the same length with no compile running (median). "
        f"Replaying the first 100 requests once warm: generic module {total_generic:.0f} ms in all, JIT runtime {total_jit:.0f} ms "
        f"({total_generic / total_jit:.2f}x). Max relative error vs ONNX Runtime: {worst:.1e}.",
        "",
        "| bucket B | hits | compile s | first request → variant serving, s | generic ms @B | variant ms @B | specialization | variant / ORT @B | median L | generic ms @L | variant ms @L | net |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


if __name__ == "__main__":
    sys.exit(main())
