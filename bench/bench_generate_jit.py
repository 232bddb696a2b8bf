"""Benchmark: what JIT specialization buys for generation.

Compiles the bundled SmolLM2-135M-Instruct (GGUF, weights kept quantized) for this machine, then builds,
with the device JIT's own pipeline, static-shape variants of the module: decode with the batch
(number of sequences decoded together) fixed at 1, 2 and 4, and prefill with the prompt chunk fixed
at 32 and 128 tokens (one sequence). Each is timed against the generic module on the same KV cache,
interleaved (generic, variant, generic, ...) at 1 and 2 threads.

    python bench/bench_generate_jit.py            # writes bench/results/generate-jit.md
    python bench/bench_generate_jit.py --quick
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate-jit.md"))
    args = ap.parse_args()
    reps = 15 if args.quick else 41

    import tvm
    import tvm_ffi

    from deploy.compiler.decoder import compile_decoder
    from deploy.tools.examples import write_smollm2
    from edge.generate.loader import load_decoder
    from edge.runtime import pipeline
    from edge.runtime.module import set_threads

    work = Path(tempfile.mkdtemp(prefix="bench-gen-jit-"))
    gguf = write_smollm2(work, log=lambda *a: None)
    art = compile_decoder(gguf, "host", work / "smollm2", context=1024, log=lambda *a: None)
    loaded = load_decoder(art, context=1024, max_batch=4)
    dec = loaded.decoder
    mod = tvm.ir.load_json((art / "module.json").read_text())
    target = loaded.artifact.target

    variants = {}
    build_s = {}
    for name, bind in [("decode B=1", {"num_seqs": 1}), ("decode B=2", {"num_seqs": 2}), ("decode B=4", {"num_seqs": 4}),
                       ("prefill 32", {"num_tokens": 32, "num_seqs": 1}), ("prefill 128", {"num_tokens": 128, "num_seqs": 1})]:
        t = time.perf_counter()
        ex = pipeline.build(mod, target, bind=bind)
        build_s[name] = time.perf_counter() - t
        variants[name] = tvm.relax.VirtualMachine(ex, tvm.cpu())  # noqa: the executable stays alive through the VM

    S = tvm_ffi.Shape
    begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
    end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
    popn = tvm.get_global_func("vm.builtin.kv_state_popn")
    rng = np.random.default_rng(0)
    for s in range(4):
        dec.add_sequence(s)
        dec.prefill([s], [rng.integers(100, 40000, 64).tolist()])  # 64 tokens of context each

    def decode_step(vm, batch):
        ids = tvm.runtime.tensor(np.full(batch, 504, np.int32))
        begin(dec.kv, S(list(range(batch))), S([1] * batch))
        _, dec.kv = vm["decode"](ids, dec.kv, dec.params)
        end(dec.kv)
        for s in range(batch):
            popn(dec.kv, s, 1)  # keep the context length fixed

    def prefill_step(vm, n):
        ids = tvm.runtime.tensor(rng.integers(100, 40000, n).astype(np.int32))
        begin(dec.kv, S([0]), S([n]))
        _, dec.kv = vm["prefill"](ids, tvm.runtime.tensor(np.array([n - 1], np.int32)), dec.kv, dec.params)
        end(dec.kv)
        popn(dec.kv, 0, n)

    rows = []
    for threads in (1, 2):
        set_threads(threads)
        generic = tvm.relax.VirtualMachine(tvm.runtime.load_module(str(art / "generic.so")), tvm.cpu())
        for name, vm in variants.items():
            kind, size = name.split(" ")
            size = int(size.split("=")[-1])
            step = (lambda v: decode_step(v, size)) if kind == "decode" else (lambda v: prefill_step(v, size))
            for _ in range(3):
                step(generic), step(vm)
            g, v = [], []
            for _ in range(reps):  # interleaved: the machine's noise hits both alike
                t = time.perf_counter(); step(generic); g.append(time.perf_counter() - t)
                t = time.perf_counter(); step(vm); v.append(time.perf_counter() - t)
            gm, vm_ = float(np.median(g)) * 1000, float(np.median(v)) * 1000
            tokens = size
            rows.append((threads, name, gm, vm_, tokens))
            print(f"threads {threads} {name}: generic {gm:.1f} ms, variant {vm_:.1f} ms ({gm / vm_:.2f}x)", flush=True)

    lines = ["| threads | shape | generic ms | variant ms | speed-up | variant tok/s | variant build s |",
             "|---|---|---|---|---|---|---|"]
    for threads, name, gm, vm_, tokens in rows:
        lines.append(f"| {threads} | {name} | {gm:.1f} | {vm_:.1f} | {gm / vm_:.2f}x | {tokens / vm_ * 1000:.0f} | {build_s[name]:.1f} |")
    body = (
        f"SmolLM2-135M-Instruct as the GGUF holds it ({loaded.artifact.manifest.precision}: weight-only kernels), context 64 tokens per sequence, medians of "
        f"{reps} interleaved runs (generic, variant, generic, ...). decode B=n: one decode step for n sequences; "
        "prefill n: a prompt chunk of n tokens for one sequence. Variants are built by the device JIT's "
        "pipeline (edge/runtime/pipeline.py) from the artifact's module.json with the shape bound.\n\n"
        + "\n".join(lines)
        + "\n\nWhat this means for the JIT (docs/jit.md): decode batch sizes repeat every step of every reply, so "
        "they are what the generation JIT specializes (edgejit chat / generate --jit, the daemon); prompt lengths "
        "rarely repeat exactly and a prefill chunk cannot be padded without writing the padding into the KV cache, "
        "so prefill stays on the generic module.\n"
    )
    write_results(Path(args.out), "Generation: JIT specialization (decode batch, prefill length)", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
