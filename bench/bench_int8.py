"""Benchmark: int8 modules vs this project's fp32 and ONNX Runtime fp32 / dynamic int8.

Model: the bundled example, all-MiniLM-L6-v2 with its real weights (BERT, 6 layers, hidden 384)
exported by the torch.onnx TorchScript exporter (deploy/tools/examples.py; random weights of the same
shape, loudly, if the weights cannot be fetched). For each sequence length and for 1 thread and
all cores, batch-1 median latency of:

  ours fp32 generic / specialized   (edgejit compile --precision fp32; specialized = seq bound)
  ours int8 generic / specialized   (edgejit compile --precision int8, dynamic per-token)
  ORT fp32, ORT int8                (onnxruntime.quantization.quantize_dynamic, QInt8 weights)

and the accuracy of each against the spec-level fp32 reference (onnx.reference) on real texts
(Debian fortunes through the MiniLM tokenizer): cosine similarity of the mean-pooled sentence
embeddings, and the max abs error.

    python bench/bench_int8.py                  # lengths 16..256, ~6-8 min on 2 cores
    python bench/bench_int8.py --quick          # lengths 16,128, fewer repetitions
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_results  # noqa: E402

def texts(n: int) -> list[str]:
    out, cur = [], []
    try:
        lines = Path("/usr/share/games/fortunes/fortunes").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.strip() == "%":
            if cur:
                out.append(" ".join(cur))
            cur = []
        else:
            cur.append(line.strip())
    if not out:
        out = [f"sentence number {i} about edge devices, quantization and latency" * (1 + i % 5) for i in range(n)]
    step = max(1, len(out) // n)
    return out[::step][:n]


def feeds_for(ids: list[int]) -> dict:
    n = len(ids)
    return {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "token_type_ids": np.zeros((1, n), np.int64),
    }


def pooled(out, feeds):
    m = feeds["attention_mask"].astype(np.float64)
    return (np.asarray(out, np.float64) * m[..., None]).sum(1) / m.sum(1, keepdims=True)


def interleaved_ms(engines: dict, reps: int) -> dict:
    """Median latency of each engine, run round-robin so that load from other processes on the
    machine hits all of them alike."""
    for f in engines.values():
        f()
        f()
    times = {k: [] for k in engines}
    for _ in range(reps):
        for k, f in engines.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1000) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="16,32,64,128,256")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--texts", type=int, default=24, help="real texts for the accuracy columns")
    ap.add_argument("--random-weights", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8.md"))
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.reps, args.texts = "16,128", 7, 8
    lengths = [int(x) for x in args.lengths.split(",")]

    import onnx
    import onnxruntime as ort
    import tvm
    from onnx.reference import ReferenceEvaluator
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from tokenizers import Tokenizer

    from deploy.tools import examples
    from deploy.compiler.driver import compile_model
    from edge.runtime import pipeline as edge_build
    from edge import machine
    from edge.artifact.reader import Artifact
    from edge.runtime.module import CompiledModule, set_threads
    import os

    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_int8."))
    model_path = examples.write_minilm(work, random_weights=args.random_weights, log=lambda *_: None)
    tokenizer = work / "tokenizer.json"
    what = ("all-MiniLM-L6-v2, real weights" if tokenizer.exists() else "MiniLM-L6 shape, RANDOM weights") + \
        ", torch.onnx TorchScript export"
    print(f"model: {what} -> {model_path}")

    t0 = time.perf_counter()
    arts = {p: compile_model(model_path, "host", work / p, precision=p, log=lambda *_: None) for p in ("fp32", "int8")}
    host_preset = Artifact.open(arts["int8"]).manifest.target.preset
    if host_preset != "x86-64-avx2" and "avx2" in machine.cpu_features():
        # the kernels CI machines (AVX2, no VNNI) get, measured on this CPU
        for p in ("fp32", "int8"):
            arts[f"{p} avx2"] = compile_model(model_path, "x86-64-avx2", work / f"{p}-avx2", precision=p, log=lambda *_: None)
    compile_s = time.perf_counter() - t0
    # ORT int8 on the same ops as ours (MatMul); its default also quantizes the embedding Gather,
    # which is measured for accuracy only.
    ort_int8, ort_int8_default = work / "minilm.int8.onnx", work / "minilm.int8-default.onnx"
    quantize_dynamic(str(model_path), str(ort_int8), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    quantize_dynamic(str(model_path), str(ort_int8_default), weight_type=QuantType.QInt8)

    cores = machine.cores()
    thread_counts = sorted({1, cores})

    def ours(precision, bind, threads):
        art = Artifact.open(arts[precision])
        params = [tvm.runtime.tensor(p) for p in art.load_params()]
        if bind is None:
            lib = tvm.runtime.load_module(str(art.file("generic.so")))
        else:
            mod = tvm.ir.load_json(art.file("module.json").read_text())
            lib = edge_build.build(mod, art.target, bind=bind)
        return CompiledModule(lib, params, kind="bench", threads=threads)

    def ort_session(path, threads):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    names = ["input_ids", "attention_mask", "token_type_ids"]
    generic = {p: ours(p, None, None) for p in arts}
    rows = []
    rng = np.random.default_rng(0)
    for length in lengths:
        feeds = feeds_for(list(rng.integers(1000, 30000, length)))
        arrays = [feeds[n] for n in names]
        tb = time.perf_counter()
        special = {p: ours(p, {"seq": length}, None) for p in arts}
        build_s = (time.perf_counter() - tb) / len(arts)
        for threads in thread_counts:
            set_threads(threads)
            engines = {
                "ours fp32 generic": lambda: generic["fp32"](arrays),
                "ours fp32 specialized": lambda: special["fp32"](arrays),
                "ours int8 generic": lambda: generic["int8"](arrays),
                "ours int8 specialized": lambda: special["int8"](arrays),
                **({"ours fp32 specialized, avx2 preset": lambda: special["fp32 avx2"](arrays),
                    "ours int8 specialized, avx2 preset": lambda: special["int8 avx2"](arrays)} if "int8 avx2" in arts else {}),
            }
            s32, s8 = ort_session(model_path, threads), ort_session(ort_int8, threads)
            engines["ORT fp32"] = lambda: s32.run(None, feeds)
            engines["ORT int8 (quantize_dynamic)"] = lambda: s8.run(None, feeds)
            ms = interleaved_ms(engines, args.reps)
            rows.append((length, threads, ms, build_s))
            print(length, threads, {k: round(v, 2) for k, v in ms.items()}, flush=True)

    # Accuracy on real texts against the spec reference.
    tok = Tokenizer.from_file(str(tokenizer)) if tokenizer.exists() else None
    if tok is not None:
        tok.no_padding()
        tok.no_truncation()
    samples = []
    for t in texts(args.texts):
        ids = tok.encode(t).ids[:256] if tok else list(rng.integers(1000, 30000, 8 + len(t) % 60))
        samples.append(feeds_for(ids))
    ref_eval = ReferenceEvaluator(onnx.load(str(model_path)))
    set_threads(cores)
    s32, s8 = ort_session(model_path, cores), ort_session(ort_int8, cores)
    s8d = ort_session(ort_int8_default, cores)
    runners = {
        "ours fp32": lambda f: generic["fp32"]([f[n] for n in names])[0],
        "ours int8": lambda f: generic["int8"]([f[n] for n in names])[0],
        "ORT fp32": lambda f: s32.run(None, f)[0],
        "ORT int8 (quantize_dynamic)": lambda f: s8.run(None, f)[0],
        "ORT int8 (quantize_dynamic defaults: + embedding Gather)": lambda f: s8d.run(None, f)[0],
    }
    acc = {k: [] for k in runners}
    for f in samples:
        ref = pooled(ref_eval.run(None, f)[0], f)[0]
        for k, run in runners.items():
            got = pooled(run(f), f)[0]
            acc[k].append((float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref)), float(np.abs(got - ref).max())))

    # Tables.
    cols = ["ours fp32 generic", "ours fp32 specialized", "ours int8 generic", "ours int8 specialized"]
    avx2 = "int8 avx2" in arts
    cols += ["ours fp32 specialized, avx2 preset", "ours int8 specialized, avx2 preset"] if avx2 else []
    cols += ["ORT fp32", "ORT int8 (quantize_dynamic)"]
    lines = [f"Model: {what}; batch 1; median of {args.reps} runs (ms), engines run round-robin. ORT int8 = `quantize_dynamic(weight_type=QInt8, "
             f"op_types_to_quantize=['MatMul'])`, the same ops ours quantizes. Ratios: ours int8 specialized / ORT int8 "
             f"and / ours fp32 specialized (< 1 = ours faster). fp32 and int8 compiled for the `{host_preset}` preset "
             f"(all artifacts compiled in {compile_s:.0f} s); \"avx2 preset\" = artifacts compiled for `x86-64-avx2` (what CI machines "
             f"without VNNI run: AVX2 int8 kernels, 256-bit fp32), measured on this CPU. A specialized variant builds in the listed seconds (mean).", "",
             "| len | threads | " + " | ".join(cols) + " | int8 spec / ORT int8 | int8 spec / our fp32 spec"
             + (" | avx2: int8 / fp32" if avx2 else "") + " | variant build s |",
             "|---|---|" + "---|" * len(cols) + "---|---|" + ("---|" if avx2 else "") + "---|"]
    for length, threads, ms, build_s in rows:
        lines.append(f"| {length} | {threads} | " + " | ".join(f"{ms[c]:.2f}" for c in cols)
                     + f" | {ms['ours int8 specialized'] / ms['ORT int8 (quantize_dynamic)']:.2f}"
                     + f" | {ms['ours int8 specialized'] / ms['ours fp32 specialized']:.2f}"
                     + (f" | {ms['ours int8 specialized, avx2 preset'] / ms['ours fp32 specialized, avx2 preset']:.2f}" if avx2 else "")
                     + f" | {build_s:.1f} |")
    lines += ["", f"Accuracy against the fp32 spec reference (onnx.reference), {len(samples)} real texts "
              f"({'fortunes' if Path('/usr/share/games/fortunes/fortunes').exists() else 'synthetic'}, lengths "
              f"{min(s['input_ids'].shape[1] for s in samples)}-{max(s['input_ids'].shape[1] for s in samples)} tokens), "
              "mean-pooled sentence embeddings:", "",
              "| engine | mean cosine | min cosine | max abs err |", "|---|---|---|---|"]
    for k, v in acc.items():
        c = np.array(v)
        lines.append(f"| {k} | {c[:, 0].mean():.5f} | {c[:, 0].min():.5f} | {c[:, 1].max():.4f} |")
    load_end = os.getloadavg()[0]
    lines += ["", f"Machine load (1-min average) {load_start:.1f} at the start, {load_end:.1f} at the end: the machine "
              f"is shared, so rows with more threads than idle cores measure contention more than scaling."]
    int8_manifest = Artifact.open(arts["int8"]).manifest.to_json()
    lines += ["", f"int8 artifact: {int8_manifest['quantization']['quantized']} matmuls quantized with the "
              f"`{int8_manifest['quantization']['isa']}` kernels; compile-time report (synthetic samples): "
              f"{int8_manifest['accuracy']['metric']} = {int8_manifest['accuracy']['value']:.5f}."]
    write_results(Path(args.out), "int8 vs fp32 vs ONNX Runtime (CPU)", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
