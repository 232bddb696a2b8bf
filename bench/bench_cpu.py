"""Benchmark: compiled CPU kernels vs ONNX Runtime, same ONNX files, same process, same run.

For the MiniLM-L6 encoder (real all-MiniLM-L6-v2 weights when they can be fetched, random
otherwise) and a GPT-2-style decoder (deploy.tools.examples.GPT2_SMALLISH, random weights), at each
sequence length (batch 1) and thread count: latency of ONNX Runtime (CPU provider), of this
project's generic module (symbolic sequence length) and of a variant specialized to that length,
as ratios to ORT; achieved GFLOP/s of the variant (matmul FLOPs) against the machine's nominal
peak; max abs error of both vs ORT; and the compile time of each specialized variant. With
--tune TRIALS, each length is also tuned with MetaSchedule (deploy/compiler/tuner.py, exactly what
`edgejit compile --tune` does) and the tuned variant (batch 1 and the length bound, as the device
JIT builds it) is timed beside the untuned one bound the same way.

    python bench/bench_cpu.py                      # 16, 64, 128, 256 x {1 thread, all cores}
    python bench/bench_cpu.py --quick              # 16 and 128 only, fewer repetitions
    python bench/bench_cpu.py --tune 64            # + tuned variants (search state kept: resumable)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402


def matmul_flops(mod, seq: int) -> float:
    """2*M*N*K summed over every matmul of the module with the sequence length bound."""
    from tvm import relax

    mod = relax.transform.BindSymbolicVars({"seq": seq, "batch": 1})(mod)
    total = 0.0

    def visit(expr):
        nonlocal total
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.matmul":
            a = [int(d) for d in expr.args[0].ty.shape.values]
            out = [int(d) for d in expr.ty.shape.values]
            total += 2.0 * float(np.prod(out)) * a[-1]

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return total


def nominal_peak_gflops(cores: int) -> tuple[float, str]:
    """cores x fp32 lanes x 2 (FMA) x 2 FMA pipes x nominal clock (cpu MHz in /proc/cpuinfo)."""
    from edge.kernels.target import vector_bits
    from edge.artifact.targets import get_preset

    mhz = 0.0
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("cpu mhz"):
                mhz = float(line.split(":")[1])
                break
    except OSError:
        pass
    lanes = vector_bits(get_preset("host").tvm_target()) // 32
    per_core = lanes * 2 * 2 * mhz / 1000
    how = (f"{lanes} fp32 lanes x 2 (FMA) x 2 FMA pipes x {mhz:.0f} MHz = {per_core:.0f} GFLOP/s per core; the clock is the "
           "nominal one /proc/cpuinfo reports (under a hypervisor it does not show boost), so the real peak is higher and "
           "% peak is an upper bound")
    return per_core * cores, how


def timed(fn, min_s: float, max_reps: int) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_s or len(times) < 3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def feeds_for(sess, seq: int, rng) -> dict:
    from edge.runtime.samples import token_inputs

    return token_inputs([i.name for i in sess.get_inputs()], seq, vocab=1000, seed=rng)


def bench_model(name, path, lengths, thread_counts, args, peak_per_core, log):
    import onnxruntime as ort
    import tvm

    from deploy.frontends.onnx import importer as onnx_import
    from deploy.compiler import prepare as optimize
    from edge.runtime import pipeline as edge_build
    from edge.runtime.module import CompiledModule, set_threads
    from edge.artifact.targets import get_preset

    preset = get_preset("host")
    model = onnx_import.load(path)
    mod, params = onnx_import.to_relax(model)
    mod, params = optimize.prepare(mod, params, preset.tvm_target())
    tparams = [tvm.runtime.tensor(p) for p in params]
    records = None
    if args.tune:
        from deploy.compiler import tuner as tune
        from deploy.compiler.driver import signature
        from edge.runtime.tuning_records import TuningRecords

        inputs, _ = signature(mod, [i.name for i in model.graph.input])
        doc = tune.tune(mod, params, preset, dims=["batch", "seq"], seq_dim="seq", lengths=lengths, trials=args.tune,
                        work_dir=args.tune_dir / name, inputs=inputs, log=log)
        records = TuningRecords(doc)
    t0 = time.perf_counter()
    generic = CompiledModule(edge_build.build(mod, preset.target), tparams, kind="generic")
    generic_s = time.perf_counter() - t0
    log(f"{name}: generic module built in {generic_s:.1f}s")
    rng = np.random.default_rng(0)
    rows = []
    for seq in lengths:
        t0 = time.perf_counter()
        variant = CompiledModule(edge_build.build(mod, preset.target, bind={"seq": seq}), tparams, kind="variant")
        compile_s = time.perf_counter() - t0
        static = tuned = None
        if records is not None:
            static = CompiledModule(edge_build.build(mod, preset.target, bind=records.bind(seq)), tparams, kind="variant")
            tuned = CompiledModule(edge_build.build(mod, preset.target, bind=records.bind(seq), tuning=records), tparams, kind="variant")
        flops = matmul_flops(mod, seq)
        for threads in thread_counts:
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            feeds = feeds_for(sess, seq, rng)
            arrays = list(feeds.values())
            ref = sess.run(None, feeds)[0]
            set_threads(threads)
            err_g = float(np.abs(generic(arrays)[0] - ref).max())
            err_v = float(np.abs(variant(arrays)[0] - ref).max())
            err_t = float(np.abs(tuned(arrays)[0] - ref).max()) if tuned else None
            # interleave them so that load from other processes hits them alike
            t_ort, t_gen, t_var, t_sta, t_tun = [], [], [], [], []
            for _ in range(args.rounds):
                t_ort.append(timed(lambda: sess.run(None, feeds), args.min_s, args.reps))
                t_gen.append(timed(lambda: generic(arrays), args.min_s, args.reps))
                t_var.append(timed(lambda: variant(arrays), args.min_s, args.reps))
                if tuned:
                    t_sta.append(timed(lambda: static(arrays), args.min_s, args.reps))
                    t_tun.append(timed(lambda: tuned(arrays), args.min_s, args.reps))
            ms_ort, ms_gen, ms_var = (float(np.min(t)) for t in (t_ort, t_gen, t_var))
            ms_sta, ms_tun = (float(np.min(t)) if t else None for t in (t_sta, t_tun))
            gflops = flops / (ms_var / 1000) / 1e9
            peak = peak_per_core * threads
            row = (name, seq, threads, ms_ort, ms_gen, ms_gen / ms_ort, ms_var, ms_var / ms_ort,
                   gflops, 100 * gflops / peak, flops / 1e9, err_g, err_v, compile_s, ms_sta, ms_tun, err_t)
            rows.append(row)
            if tuned:
                log(f"{name} seq {seq} threads {threads}: batch-1 static untuned {ms_sta:.2f} ms ({ms_sta / ms_ort:.2f}x), "
                    f"tuned {ms_tun:.2f} ms ({ms_tun / ms_ort:.2f}x), err {err_t:.1e}")
            log(f"{name} seq {seq} threads {threads}: ORT {ms_ort:.2f} ms, generic {ms_gen:.2f} ms ({ms_gen / ms_ort:.2f}x), "
                f"variant {ms_var:.2f} ms ({ms_var / ms_ort:.2f}x), {gflops:.0f} GFLOP/s, err {err_g:.1e}/{err_v:.1e}, compile {compile_s:.1f}s")
    return rows, generic_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="lengths 16 and 128, fewer repetitions")
    p.add_argument("--models", default="minilm,gpt2", help="comma list of minilm, gpt2")
    p.add_argument("--lengths", help="comma list of sequence lengths (default 16,64,128,256)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu.md"))
    p.add_argument("--random-weights", action="store_true", help="MiniLM with random weights (no download)")
    p.add_argument("--tune", type=int, default=0, metavar="TRIALS", help="also tune each length with TRIALS MetaSchedule trials")
    p.add_argument("--tune-dir", type=Path, help="search state (default: the example cache's bench-cpu/tune)")
    args = p.parse_args(argv)
    from deploy.tools import examples
    from edge import machine

    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else ([16, 128] if args.quick else [16, 64, 128, 256])
    args.rounds, args.min_s, args.reps = (2, 0.2, 10) if args.quick else (3, 0.3, 30)
    cores = machine.cores()
    thread_counts = sorted({1, cores})
    work = examples.cache_dir() / "bench-cpu"
    args.tune_dir = args.tune_dir or work / "tune"
    models = {}
    weights_note = ""
    for name in args.models.split(","):
        if name == "minilm":
            models["MiniLM-L6"] = examples.write_minilm(work / "minilm", random_weights=args.random_weights, log=lambda *a: None)
            weights_note = "real all-MiniLM-L6-v2 weights" if (work / "minilm" / "tokenizer.json").exists() else "RANDOM weights"
        elif name == "gpt2":
            path = work / "gpt2" / "model.onnx"
            if not path.exists():
                examples.write_gpt2(path)
            models["GPT-2-style"] = path
        else:
            p.error(f"unknown model {name}")
    peak_per_core, peak_how = nominal_peak_gflops(1)
    rows, generic_times = [], {}
    for name, path in models.items():
        r, g = bench_model(name, path, lengths, thread_counts, args, peak_per_core, print)
        rows += r
        generic_times[name] = g

    lines = [
        "| model | seq | threads | ORT ms | generic ms | generic / ORT | variant ms | variant / ORT | variant GFLOP/s | % peak | GFLOP | max abs err generic / variant | variant compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tuned_lines = [
        "| model | seq | threads | ORT ms | variant / ORT | batch-1 static untuned ms | / ORT | tuned ms | tuned / ORT | tuned / untuned | max abs err tuned |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, seq, th, mo, mg, rg, mv, rv, gf, pk, fl, eg, ev, cs, ms_sta, ms_tun, et) in rows:
        lines.append(f"| {name} | {seq} | {th} | {mo:.2f} | {mg:.2f} | {rg:.2f}x | {mv:.2f} | {rv:.2f}x | {gf:.0f} | {pk:.0f}% | {fl:.2f} | {eg:.1e} / {ev:.1e} | {cs:.1f} |")
        if ms_tun is not None:
            tuned_lines.append(f"| {name} | {seq} | {th} | {mo:.2f} | {rv:.2f}x | {ms_sta:.2f} | {ms_sta / mo:.2f}x | {ms_tun:.2f} | "
                               f"{ms_tun / mo:.2f}x | {ms_tun / ms_sta:.2f}x | {et:.1e} |")
    if args.tune:
        tuned_text = [
            f"Tuned variants: MetaSchedule, {args.tune} trials per length and model (deploy/compiler/tuner.py, as `edgejit compile --tune "
            f"{args.tune}` runs it: functions under 2% of the time and the dense kernel are not tuned; a tuned schedule is kept only "
            "when it measures faster than the default one). Tuned variants bind batch = 1 as well as the length (the records "
            "match only that shape), so the untuned variant bound the same way is shown beside them.",
            "",
            *tuned_lines,
        ]
    else:
        tuned_text = ["Tuned variants: not measured in this run (`--tune TRIALS`)."]
    body = "\n".join([
        f"Models: MiniLM-L6 encoder ({weights_note}; hidden 384, 12 heads, 6 layers, FFN 1536) and a GPT-2-style "
        f"decoder (deploy.tools.examples.GPT2_SMALLISH: 6 layers x 384, vocab 8192, random weights), batch 1, fp32, untuned "
        "default schedules (edge/kernels). ONNX Runtime: CPU provider, same ONNX file, `intra_op_num_threads` = threads.",
        "",
        "Latency: median per call through `edge.runtime.module.CompiledModule` (numpy in, numpy out) and `InferenceSession.run`; "
        f"the three are interleaved, {args.rounds} rounds, best round kept. GFLOP counts matmul FLOPs only (2*M*N*K). "
        f"Peak: nominal, {peak_how} (x threads).",
        "",
        "Generic module compile time: " + ", ".join(f"{k} {v:.1f} s" for k, v in generic_times.items()) + ".",
        "",
        *lines,
        "",
        *tuned_text,
        "",
        "The machine is shared with other jobs: a row whose 2-thread time is not below its 1-thread time (for ORT too) "
        "ran while another process held the second core; compare ratios within a row.",
    ])
    write_results(Path(args.out), "CPU kernels vs ONNX Runtime", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
