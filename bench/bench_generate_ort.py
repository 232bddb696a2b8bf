"""Benchmark: text generation against ONNX Runtime GenAI on the same weights, in the same run.

The bundled SmolLM2-135M-Instruct (Q4_1 GGUF as shipped): edgejit compiles the file as
`edgejit compile` does (bench/bench_generate.py); ONNX Runtime GenAI gets the same values through
its own model builder (`python -m onnxruntime_genai.models.builder -p int4 -e cpu`: MatMulNBits,
4-bit blocks of 32, int8 activations on the CPU (accuracy level 4, its CPU default), the LM head
8-bit as in the GGUF file (`algo_config=rtn_last`)) from a Hugging Face directory transformers
writes from the GGUF (dequantized to fp32). At 1 and 2 threads, each engine in its own process,
measured interleaved on the same token ids as bench_generate.py: prefill tok/s (16, 64, 256-token
prompts), time to first token for a ~200-token chat prompt, decode tok/s over 128 greedy tokens,
load time, peak RSS. Writes bench/results/generate-ort.md.

    pip install -e ".[bench,dev]"        # onnxruntime-genai (bench); transformers and torch (dev) write the HF directory
    python bench/bench_generate_ort.py   # 1.3 min on 2 cores, plus the ORT model build (8 s here) once per --work
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_generate import N_CTX, PREFILL_LENS, REPS, log, med, prompts, run_block  # noqa: E402

BUILDER = ["-p", "int4", "-e", "cpu", "--extra_options", "block_size=32", "accuracy_level=4", "algo_config=rtn_last"]


def build_ort_model(gguf: Path, work: Path, log) -> Path:
    """The GGUF's values as a Hugging Face directory (transformers' GGUF loader, fp32), then ONNX
    Runtime GenAI's builder on it; both kept in `work` and reused."""
    out = work / "ort-int4"
    if (out / "genai_config.json").exists():
        return out
    hf = work / "hf-fp32"
    if not (hf / "config.json").exists():
        from tests.fixtures.hf_reference import load_gguf_model, load_gguf_tokenizer, save_gguf_model

        log(f"writing {hf} (transformers' GGUF loader, fp32)")
        save_gguf_model(load_gguf_model(gguf), hf)
        load_gguf_tokenizer(gguf).save_pretrained(hf)
    log(f"building {out}: onnxruntime_genai.models.builder {' '.join(BUILDER)}")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
                        "-c", str(work / "ort-cache"), *BUILDER], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"the ONNX Runtime GenAI builder failed:\n{r.stderr[-3000:]}")
    log(f"  built in {time.perf_counter() - t:.0f} s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 reps, 2 replies of 32 tokens")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--work", help="directory for the model, the ORT model and the artifact (kept; reused when present)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate-ort.md"))
    args = ap.parse_args()
    try:
        import onnxruntime_genai as og
    except ImportError:
        sys.exit("onnxruntime-genai is not installed: pip install onnxruntime-genai (or the bench extra)")
    from bench.common import bench_work_dir, compile_as_cli, write_results
    from deploy.tools.examples import write_smollm2
    from edge.artifact.reader import Artifact

    reps, reply_reps, n_decode, load_reps = REPS[args.quick]
    work = bench_work_dir(args.work, "bench-generate-ort-")
    t_start = time.perf_counter()
    gguf = write_smollm2(work, log=log)
    art = work / "smollm2-q4_1-host"
    if not (art / "manifest.json").exists():
        compile_as_cli(gguf, art, N_CTX, log=log)
    ort = build_ort_model(gguf, work, log)
    first = Artifact.open(art)
    tmpl = first.manifest.decoder.chat_template
    ids, chat = prompts(first.file("tokenizer.json"), first.file(tmpl) if tmpl else None)
    results = {}
    for th in args.threads:
        log(f"{th} thread(s): load {os.getloadavg()[0]:.2f}")
        results[th] = run_block("q4_1", ort, art, th, reps, reply_reps, n_decode, load_reps, ids, chat, log,
                                work / f"jit-cache-{th}", anchor=("ORT GenAI", "ort"))

    MiB = 2**20
    ort_bytes = sum(f.stat().st_size for f in ort.glob("*.onnx*"))
    loads = [la for r in results.values() for la in r["loadavg"]]
    L = [
        "SmolLM2-135M-Instruct, the bundled Q4_1 GGUF. edgejit: the file compiled with `compile_decoder(..., 'host', "
        f"context={N_CTX}, decode_variants=(1,), matmul_activations='int8', kv_cache='fp16')` (as `edgejit compile` does), "
        "`load_decoder(threads=N, jit='default')`, decode on the batch-1 variant. ONNX Runtime GenAI "
        f"{og.__version__}: `onnxruntime_genai.models.builder {' '.join(BUILDER)}` on a Hugging Face directory "
        "transformers wrote from the same GGUF (its values dequantized to fp32, requantized by the builder: 4-bit "
        "symmetric blocks of 32, the LM head 8-bit, int8 activations; its model files "
        f"{ort_bytes / MiB:.0f} MiB against edgejit's {first.manifest.decoder.weight_bytes / MiB:.0f} MiB of weights), "
        "`intra_op_num_threads` N, a Generator fed the prompt and then each greedy token with `append_tokens`, logits "
        "read with `get_logits()`. Both greedy (numpy argmax), EOS ignored, each engine in its own process, "
        f"measurements interleaved. Medians of {reps} (prefill), {reply_reps} (TTFT, decode: {n_decode} steps after the "
        f"first token), {load_reps + 1} (load). Ratios are edgejit / ORT GenAI: above 1 is better for us in tok/s, "
        "worse in s and MiB.",
        "",
        f"Load average (1 min) during the run: {min(la[0] for la in loads):.2f}-{max(la[0] for la in loads):.2f} on "
        f"{os.cpu_count()} cores (other jobs share this machine).",
        "",
        "| thr | metric | edgejit | ORT GenAI | ratio |",
        "|---|---|---|---|---|",
    ]
    for th, r in results.items():
        e, c = r["edgejit"], r["ORT GenAI"]
        for n in PREFILL_LENS:
            a, b = n / med(e["prefill"][n]), n / med(c["prefill"][n])
            L.append(f"| {th} | prefill {n} tok/s | {a:.0f} | {b:.0f} | {a / b:.2f} |")
        a, b = med(e["ttft"]) * 1000, med(c["ttft"]) * 1000
        L.append(f"| {th} | TTFT {len(chat)}-token chat, ms | {a:.0f} | {b:.0f} | {a / b:.2f} |")
        a, b = med(e["decode"]), med(c["decode"])
        L.append(f"| {th} | **decode tok/s** | **{a:.1f}** | **{b:.1f}** | **{a / b:.2f}** |")
        a, b = med(e["load"]), med(c["load"])
        L.append(f"| {th} | load s | {a:.2f} | {b:.2f} | {a / b:.2f} |")
        a, b = e["hwm"] / MiB, c["hwm"] / MiB
        L.append(f"| {th} | peak RSS MiB (process, after the run) | {a:.0f} | {b:.0f} | {a / b:.2f} |")
    L.append("")
    for th, r in results.items():
        L.append(f"- decode tok/s samples, {th} thread(s): edgejit " + ", ".join(f"{x:.1f}" for x in r["edgejit"]["decode"])
                 + "; ORT GenAI " + ", ".join(f"{x:.1f}" for x in r["ORT GenAI"]["decode"]))
        a, b = r["edgejit"]["toks"], r["ORT GenAI"]["toks"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        L.append(f"- greedy tokens, {th} thread(s): the engines agree on the first {same} of {len(a)} (ORT GenAI's weights "
                 "are requantized to symmetric 4-bit: other values than the file's)")
    L.append("")
    L.append(f"Total wall time of the run: {(time.perf_counter() - t_start) / 60:.1f} min.")
    write_results(Path(args.out), "Generation: edgejit vs ONNX Runtime GenAI on the same weights", "\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
