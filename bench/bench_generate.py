"""Benchmark: text generation against llama.cpp on the same GGUF model, in the same run.

For the bundled SmolLM2-135M-Instruct (Q4_1 GGUF as shipped; with --formats also Q8_0 and F16
copies rewritten from it with the gguf package), at 1 and 2 threads, edgejit and llama.cpp
(llama-cpp-python) each run in their own subprocess and are measured interleaved (edgejit,
llama.cpp, llama.cpp, edgejit, ... alternating who goes first), on the same token ids:

- prefill tokens/s for prompts of 16, 64 and 256 tokens (real text: Debian fortunes, tokenized);
- time to first token for a ~200-token ChatML prompt, then decode tokens/s over 128 greedy tokens
  (argmax of the logits, EOS ignored);
- model load time (a fresh process per sample) and peak RSS (VmHWM) of each engine's process;
- the memory-bandwidth bound: read bandwidth (a C sum over a 256 MiB array, 1 and 2 threads)
  divided by the weight bytes each engine reads per decoded token, and each engine's share of it;
- where edgejit's decode time goes (one step: VM call vs the Python around it; TVM's VM profiler).

    python bench/bench_generate.py                          # writes bench/results/generate.md
    python bench/bench_generate.py --quick                  # smoke run: fewer reps, 32 decode tokens
    python bench/bench_generate.py --formats q4_1 q8_0 f16  # also Q8_0 / F16 copies of the file
    python bench/bench_generate.py --target x86-64-avx2 --out bench/results/generate-avx2.md  # another preset

`--target` compiles edgejit for a preset this CPU runs (default `host`, the fastest) to measure what
a smaller CPU's build does here: e.g. `x86-64-avx2`, the AVX2 mini PCs' kernels. Give llama.cpp the
same instruction set by building it for AVX2 alone into a directory of its own and putting that
first on PYTHONPATH (the table header prints what llama.cpp was built with):

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \\
        -DGGML_AVX512_VNNI=OFF -DGGML_AVX_VNNI=OFF" pip install --no-deps --no-cache-dir --target /tmp/llama-avx2 \\
        llama-cpp-python==0.3.36
    PYTHONPATH=/tmp/llama-avx2 python bench/bench_generate.py --target x86-64-avx2 --out bench/results/generate-avx2.md

llama.cpp comes from the `bench` extra (llama-cpp-python, which pip compiles from source: several
minutes). On Intel CPUs with AMX (Sapphire Rapids and later) the default build dies with SIGILL on
the first prompt longer than one token (an upstream AMX tile bug); build it without AMX
(docs/generation.md, "Speed"; harmless on CPUs without AMX). --no-cache-dir: never reuse a wheel
built with other flags.

    CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="$CFLAGS" CMAKE_ARGS="-DLLAVA_BUILD=OFF" \\
        pip install --no-binary llama-cpp-python --no-cache-dir -e ".[bench]"

edgejit keeps Q4_0/Q4_1/Q8_0 weights quantized (weight-only kernels; int8 activations where the target
has int8 dot products: AVX-512 VNNI, AVX2, ARM dotprod) and F16 ones fp16 (widened in the kernels); other types are dequantized to fp32 on the host. It runs as `edgejit chat`/`generate` and the daemon run it:
compiled like `edgejit compile` does (the batch-1 decode step built into the artifact) and with the
JIT on, so decode steps of one sequence run on that variant (`--no-jit` measures the generic module
alone). Prefill always runs on the generic module. The ONNX Runtime GenAI worker
(`OrtGenaiEngine`) is bench/bench_generate_ort.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
TAG = "@@bench "  # protocol lines of the workers (anything else they print is passed through)
PREFILL_LENS = (16, 64, 256)
CHAT_TOKENS = 200
N_CTX = 1024
REPS = {False: (10, 5, 128, 2), True: (3, 2, 32, 1)}  # --quick: prefill reps, replies, decode steps, fresh loads


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# GGUF copies in other tensor types (llama-quantize is not in the pip package)

FORMATS = {"q4_1": None, "q8_0": "Q8_0", "f16": "F16"}
FILE_TYPES = {"Q8_0": 7, "F16": 1}  # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_F16


def requantize(src: Path, dst: Path, qname: str) -> Path:
    """Rewrite `src` with every non-F32 tensor dequantized and quantized again to `qname`
    (norms stay F32), metadata copied. The values are the source's Q4_1 values: this is a
    speed comparison, not a quality one."""
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[qname]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = FILE_TYPES[qname] if field.name == "general.file_type" else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(t.name, np.array(t.data))
            continue
        data = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        q = quants.quantize(data, qtype)
        if qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(t.name, q)
        else:
            writer.add_tensor(t.name, q, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def gguf_summary(path: Path) -> tuple[int, dict]:
    """(bytes of all tensors, {type: count}). The embedding is tied (no output.weight), so the whole
    token_embd table is read per token as the LM head: all tensor bytes are read per token."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    types: dict = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return sum(int(t.n_bytes) for t in reader.tensors), types


# ---------------------------------------------------------------------------------------------
# memory bandwidth

BW_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
typedef struct { const float *p; size_t n; double s; } job;
static void *run(void *a) { job *j = a; float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = 0; i + 4 <= j->n; i += 4) { s0 += j->p[i]; s1 += j->p[i+1]; s2 += j->p[i+2]; s3 += j->p[i+3]; }
  j->s = s0 + s1 + s2 + s3; return 0; }
static void *touch(void *a) { job *j = a; for (size_t i = 0; i < j->n; i++) ((float *)j->p)[i] = (float)(i & 7); return 0; }
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
int main(int argc, char **argv) {
  int nt = atoi(argv[1]); size_t bytes = (size_t)atol(argv[2]) << 20; int reps = atoi(argv[3]);
  size_t n = bytes / sizeof(float); float *buf = aligned_alloc(64, bytes);
  pthread_t th[64]; job jobs[64]; double sink = 0;
  for (int t = 0; t < nt; t++) { jobs[t].p = buf + n / nt * t; jobs[t].n = n / nt; pthread_create(&th[t], 0, touch, &jobs[t]); }
  for (int t = 0; t < nt; t++) pthread_join(th[t], 0);
  for (int r = 0; r < reps; r++) {
    double t0 = now();
    for (int t = 0; t < nt; t++) pthread_create(&th[t], 0, run, &jobs[t]);
    for (int t = 0; t < nt; t++) { pthread_join(th[t], 0); sink += jobs[t].s; }
    printf("%.6f\n", (double)bytes / (now() - t0) / 1e9);
  }
  fprintf(stderr, "%g\n", sink);
  return 0; }
"""


def bandwidth(work: Path, threads: int, mib: int = 256, reps: int = 10) -> list[float]:
    """Read bandwidth in GB/s (10^9 bytes), one value per pass over the array."""
    exe = work / "bw"
    if not exe.exists():
        (work / "bw.c").write_text(BW_C)
        subprocess.run(["gcc", "-O3", "-march=native", "-ffast-math", "-pthread", "-o", str(exe), str(work / "bw.c")], check=True)
    out = subprocess.run([str(exe), str(threads), str(mib), str(reps)], check=True, capture_output=True, text=True).stdout
    return [float(x) for x in out.split()]


# ---------------------------------------------------------------------------------------------
# workers: one engine in one process, driven over stdin/stdout


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(val.split()[0]) * 1024
    return out


def _say(**msg) -> None:
    sys.__stdout__.write(TAG + json.dumps(msg) + "\n")
    sys.__stdout__.flush()


class EdgejitEngine:
    def __init__(self, model: str, threads: int, jit_cache: str | None = None):
        from edge.generate.loader import load_decoder

        jit = dict(jit="default", cache_dir=jit_cache) if jit_cache else {}
        self.dec = load_decoder(model, context=N_CTX, threads=threads, **jit).decoder

    def warm_jit(self, timeout_s: float = 600.0) -> float:
        """Decode steps of one sequence until the JIT serves them from its batch-1 variant (compiled
        into the artifact: at once; else compiled in the background or loaded from the disk cache);
        returns the seconds it took."""
        dec = self.dec
        t = time.perf_counter()
        dec.add_sequence(0)
        try:
            tok = int(np.argmax(dec.prefill([0], [[504] * 16])[0]))
            while dec.specializer.route(1, {"num_seqs": 1}) is None:
                if time.perf_counter() - t > timeout_s:
                    raise RuntimeError("the JIT did not compile the batch-1 decode variant in time")
                tok = int(np.argmax(dec.decode([0], [tok])[0]))
                dec.pop_tokens(0, 1)
                time.sleep(0.05)
        finally:
            dec.remove_sequence(0)
        return time.perf_counter() - t

    def prefill(self, ids):
        self.dec.add_sequence(0)
        try:
            return int(np.argmax(self.dec.prefill([0], [ids])[0]))
        finally:
            self.dec.remove_sequence(0)

    def reply(self, ids, n):
        dec = self.dec
        dec.add_sequence(0)
        try:
            t0 = time.perf_counter()
            tok = int(np.argmax(dec.prefill([0], [ids])[0]))
            ttft = time.perf_counter() - t0
            toks = [tok]
            t1 = time.perf_counter()
            for _ in range(n):
                tok = int(np.argmax(dec.decode([0], [tok])[0]))
                toks.append(tok)
            return ttft, time.perf_counter() - t1, toks
        finally:
            dec.remove_sequence(0)


class LlamaEngine:
    def __init__(self, model: str, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=N_CTX, verbose=False)

    def _next(self) -> int:
        # eval() keeps only the last token's logits (logits_all=False) and no longer copies them
        # into llm.scores: read them from the context, as llama.cpp's own sampler does.
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))))

    def prefill(self, ids):
        self.llm.reset()  # n_tokens = 0: eval() drops the KV cache from there
        self.llm.eval(ids)
        return self._next()

    def reply(self, ids, n):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = self._next()
        ttft = time.perf_counter() - t0
        toks = [tok]
        t1 = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = self._next()
            toks.append(tok)
        return ttft, time.perf_counter() - t1, toks


class OrtGenaiEngine:
    """ONNX Runtime GenAI (onnxruntime-genai) on a model its builder made: append_tokens() of the
    prompt, then of each greedy token, the logits read back with get_logits()."""

    def __init__(self, model: str, threads: int):
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(model)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)

    def _generator(self, length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=min(N_CTX, length), do_sample=False)
        return self.og.Generator(self.model, params)

    @staticmethod
    def _argmax(gen) -> int:
        return int(np.argmax(np.asarray(gen.get_logits()).reshape(-1)))

    def prefill(self, ids):
        gen = self._generator(len(ids) + 1)
        gen.append_tokens(ids)
        return self._argmax(gen)

    def reply(self, ids, n):
        gen = self._generator(len(ids) + n + 2)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        tok = self._argmax(gen)
        ttft = time.perf_counter() - t0
        toks = [tok]
        t1 = time.perf_counter()
        for _ in range(n):
            gen.append_tokens([tok])
            tok = self._argmax(gen)
            toks.append(tok)
        return ttft, time.perf_counter() - t1, toks


ENGINES = {"edgejit": EdgejitEngine, "llama": LlamaEngine, "ort": OrtGenaiEngine}  # worker kinds


def worker(engine: str, model: str, threads: int, load_only: bool, jit_cache: str | None = None) -> int:
    sys.stdout = sys.stderr  # the protocol owns the real stdout
    if engine == "edgejit":
        import edge  # as the device commands do: TVM's runtime library only (compiles run in workers)

        edge.load_tvm()
        import edge.generate.loader  # noqa: F401  (imports are not load time)
    elif engine == "llama":
        import llama_cpp  # noqa: F401
    else:
        import onnxruntime_genai  # noqa: F401
    cls = ENGINES[engine]
    base = _status()
    t = time.perf_counter()
    eng = cls(model, threads, jit_cache) if cls is EdgejitEngine else cls(model, threads)
    load_s = time.perf_counter() - t
    _say(load_s=load_s, base_hwm=base["VmHWM"], **_status())
    if load_only:
        return 0
    if jit_cache and cls is EdgejitEngine:
        print(f"edgejit worker: batch-1 decode variant ready after {eng.warm_jit():.1f} s", file=sys.stderr, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "prefill":
            t = time.perf_counter()
            tok = eng.prefill(req["ids"])
            _say(s=time.perf_counter() - t, tok=tok)
        elif op == "reply":
            ttft, dec_s, toks = eng.reply(req["ids"], req["n"])
            _say(ttft=ttft, decode_s=dec_s, toks=toks)
        elif op == "status":
            _say(**_status())
        elif op == "quit":
            _say(bye=True)
            return 0
    return 0


class Worker:
    def __init__(self, engine: str, model: Path, threads: int, load_only: bool = False, jit_cache: Path | None = None):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--model", str(model), "--threads", str(threads)]
        if load_only:
            cmd.append("--load-only")
        if jit_cache and engine == "edgejit":
            cmd += ["--jit-cache", str(jit_cache)]
        self.engine = engine
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.ready = self.read()

    def read(self) -> dict:
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.engine} worker exited (rc {self.p.wait()})")
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
            sys.stderr.write(line)

    def ask(self, **req) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n")
        self.p.stdin.flush()
        return self.read()

    def close(self) -> None:
        try:
            self.ask(op="quit")
        finally:
            self.p.wait(30)


# ---------------------------------------------------------------------------------------------
# profile of one edgejit decode step


def profile_decode(art: Path, threads: int, steps: int = 30, variant: bool = True) -> str:
    """Markdown: one decode step (context ~200 tokens) split into the VM call and the Python around
    it, and the decode function kernel by kernel (top entries). `variant`: the module the JIT builds
    for one sequence (what serves decode once it is compiled), else the generic module."""
    import tvm
    import tvm_ffi
    from tvm import relax

    from edge.generate.loader import load_decoder
    from edge.runtime import pipeline

    loaded = load_decoder(art, context=N_CTX, threads=threads)
    dec = loaded.decoder
    if variant:  # the JIT's pipeline, in process: the batch-1 decode variant
        mod = tvm.ir.load_json((art / "module.json").read_text())
        dec.vm = relax.VirtualMachine(pipeline.build(mod, loaded.artifact.target, bind={"num_seqs": 1}), tvm.cpu())
    S = tvm_ffi.Shape
    dec.add_sequence(0)
    dec.prefill([0], [list(range(1000, 1200))])
    tok = np.asarray([504], np.int32)
    parts = {"begin_forward (Python + FFI)": [], "VM call: decode": [], "end_forward": [], "logits .numpy()": [],
             "argmax (numpy)": [], "popn (bench only)": []}
    fn = dec.vm["decode"]
    for i in range(steps + 3):
        t0 = time.perf_counter()
        dec._begin(dec.kv, S([0]), S([1]))
        t1 = time.perf_counter()
        logits, dec.kv = fn(tvm.runtime.tensor(tok), dec.kv, dec.params)
        t2 = time.perf_counter()
        dec._end(dec.kv)
        t3 = time.perf_counter()
        arr = logits.numpy()
        t4 = time.perf_counter()
        int(np.argmax(arr[0]))
        t5 = time.perf_counter()
        dec._popn(dec.kv, 0, 1)
        t6 = time.perf_counter()
        if i >= 3:
            for k, a, b in zip(parts, (t0, t1, t2, t3, t4, t5), (t1, t2, t3, t4, t5, t6)):
                parts[k].append(b - a)
    full = []
    for _ in range(steps):
        t = time.perf_counter()
        dec.decode([0], [504])
        full.append(time.perf_counter() - t)
        dec._popn(dec.kv, 0, 1)
        dec.lengths[0] -= 1
    total = float(np.median(full)) * 1000
    lines = [f"One decode step of one sequence at {threads} thread(s), context 200 tokens, on the "
             f"{'JIT batch-1 variant' if variant else 'generic module'}, medians of {steps}: Decoder.decode() "
             f"{total:.1f} ms in all.", "", "| part | ms | share of decode() |", "|---|---|---|"]
    for k, v in parts.items():
        m = float(np.median(v)) * 1000
        lines.append(f"| {k} | {m:.2f} | {m / total:.0%} |")

    # Kernel by kernel: an instrument on the VM timing every call instruction (this TVM's
    # VirtualMachine has no profile=True); calls are grouped by function and argument shapes.
    try:
        vm = dec.vm
        calls: dict = {}
        state = {}

        def instrument(func, name, before, ret, *fargs):
            if before:
                state["t"] = time.perf_counter()
            else:
                dt = time.perf_counter() - state["t"]
                shapes = tuple(tuple(a.shape) for a in fargs if hasattr(a, "shape") and hasattr(a, "dtype"))
                c = calls.setdefault((str(name), shapes), [0.0, 0])
                c[0] += dt
                c[1] += 1
            return 0  # VMInstrumentReturnKind.NO_OP

        vm.set_instrument(instrument)
        n_prof = 5
        for i in range(n_prof + 1):
            if i == 1:
                calls.clear()
            dec._begin(dec.kv, S([0]), S([1]))
            t = time.perf_counter()
            _, dec.kv = vm["decode"](tvm.runtime.tensor(tok), dec.kv, dec.params)
            wall = time.perf_counter() - t
            dec._end(dec.kv)
            dec._popn(dec.kv, 0, 1)
        ktotal = sum(v[0] for v in calls.values()) / n_prof
        by_name: dict = {}
        for (name, shapes), (sec, n) in calls.items():
            c = by_name.setdefault(name, [0.0, 0, set()])
            c[0] += sec / n_prof
            c[1] += n // n_prof
            c[2].add(shapes)
        lines += ["", f"Call by call (a `VirtualMachine.set_instrument` hook timing each call instruction of `decode`, "
                  f"{threads} thread(s), mean of {n_prof} steps): {ktotal * 1000:.1f} ms inside calls, the instrumented step "
                  f"{wall * 1000:.1f} ms (the hook adds Python per call). By function:", "",
                  "| function | calls / step | ms / step | share | argument shapes |", "|---|---|---|---|---|"]
        for name, (sec, n, shapes) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:16]:
            sh = "; ".join(" ".join("x".join(map(str, a)) for a in s_) for s_ in sorted(shapes)[:3]) + (" ..." if len(shapes) > 3 else "")
            lines.append(f"| `{name}` | {n} | {sec * 1000:.2f} | {sec / ktotal:.0%} | {sh} |")
    except Exception as e:  # best-effort: report why it is missing
        lines += ["", f"(the per-call profile failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]

    # The LM head on its own: numpy's fp32 matrix-vector product over the same 49152 x 576 table
    # (the bytes our head reads per token), as a yardstick.
    cfg = loaded.config
    head = np.random.default_rng(0).standard_normal((cfg["vocab_size"], cfg["hidden_size"]), dtype=np.float32)
    x = np.ones(cfg["hidden_size"], np.float32)
    ts = []
    for _ in range(20):
        t = time.perf_counter()
        head @ x
        ts.append(time.perf_counter() - t)
    lines += ["", f"Yardstick: numpy (OpenBLAS, its own threads) fp32 LM head {cfg['vocab_size']} x {cfg['hidden_size']} "
              f"matrix-vector product ({head.nbytes / 1e6:.0f} MB): {float(np.median(ts)) * 1000:.2f} ms."]
    dec.remove_sequence(0)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# driver


def prompts(tokenizer_json: Path, template_file: Path | None, seed: int = 0) -> tuple[dict, list[int]]:
    from tokenizers import Tokenizer

    from deploy.tools.corpus import sentences
    from edge.generate.chat_template import ChatTemplate

    tok = Tokenizer.from_file(str(tokenizer_json))
    texts = sentences()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    out = {}
    for i, n in enumerate(PREFILL_LENS):
        ids: list[int] = []
        j = i * 100
        while len(ids) < n:
            ids += tok.encode(texts[order[j]] + " ").ids
            j += 1
        out[n] = ids[:n]
    template = ChatTemplate(template_file.read_text() if template_file else None)
    content, j = "", 500
    while True:
        msgs = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Summarize these sayings in one sentence each: " + content}]
        ids = tok.encode(template.render(msgs, add_generation_prompt=True)).ids
        if len(ids) >= CHAT_TOKENS - 10:
            return out, ids
        content += texts[order[j]] + " "
        j += 1


def med(xs) -> float:
    return float(np.median(xs))


def run_block(fmt: str, gguf_path: Path, art: Path, threads: int, reps: int, reply_reps: int, n_decode: int,
              load_reps: int, ids: dict, chat: list[int], log, jit_cache: Path | None,
              anchor: tuple[str, str] = ("llama.cpp", "llama")) -> dict:
    """edgejit and the anchor engine (its name in the report, its worker kind; `gguf_path`: its
    model) at `threads` threads, interleaved; returns the raw samples."""
    engines = ("edgejit", anchor[0])
    model = {"edgejit": art, anchor[0]: gguf_path}
    kind = {"edgejit": "edgejit", anchor[0]: anchor[1]}
    res = {e: {"load": [], "load_hwm": [], "prefill": {n: [] for n in ids}, "ttft": [], "decode": [], "toks": None} for e in engines}
    res["loadavg"] = [os.getloadavg()]
    for r in range(load_reps):  # fresh processes: load time and RSS right after loading
        for e in (engines if r % 2 == 0 else engines[::-1]):
            w = Worker(kind[e], model[e], threads, load_only=True)
            res[e]["load"].append(w.ready["load_s"])
            res[e]["load_hwm"].append(w.ready["VmHWM"])
            res[e]["base_hwm"] = w.ready["base_hwm"]
            w.p.wait(60)
    workers = {}
    for e in engines:
        workers[e] = Worker(kind[e], model[e], threads, jit_cache=jit_cache)
        res[e]["load"].append(workers[e].ready["load_s"])
        res[e]["load_hwm"].append(workers[e].ready["VmHWM"])
    try:
        for e in engines:  # warm-up
            for n in ids:
                workers[e].ask(op="prefill", ids=ids[n])
            workers[e].ask(op="reply", ids=chat, n=4)
        for r in range(reps):
            for n in ids:
                for e in (engines if (r + n) % 2 == 0 else engines[::-1]):
                    time.sleep(0.05)  # let the other engine's threads go idle
                    res[e]["prefill"][n].append(workers[e].ask(op="prefill", ids=ids[n])["s"])
        for r in range(reply_reps):
            for e in (engines if r % 2 == 0 else engines[::-1]):
                time.sleep(0.05)
                out = workers[e].ask(op="reply", ids=chat, n=n_decode)
                res[e]["ttft"].append(out["ttft"])
                res[e]["decode"].append(n_decode / out["decode_s"])
                res[e]["toks"] = out["toks"]
            log(f"  {fmt} threads {threads} reply {r + 1}/{reply_reps}: edgejit {res['edgejit']['decode'][-1]:.1f} tok/s, "
                f"{anchor[0]} {res[anchor[0]]['decode'][-1]:.1f} tok/s (load {os.getloadavg()[0]:.2f})")
        for e in engines:
            res[e]["hwm"] = workers[e].ask(op="status")["VmHWM"]
    finally:
        for w in workers.values():
            w.close()
    res["loadavg"].append(os.getloadavg())
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 reps, 2 replies of 32 tokens, 1 thread count's profile")
    ap.add_argument("--formats", nargs="+", default=["q4_1"], choices=sorted(FORMATS))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--target", default="host", help="edgejit's target preset (one this CPU runs; default host)")
    ap.add_argument("--work", help="directory for the GGUF copies and compiled artifacts (kept; reused when present)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate.md"))
    ap.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--no-jit", action="store_true", help="edgejit without its JIT: every decode step on the generic module")
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jit-cache", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.threads[0], args.load_only, args.jit_cache)

    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: see this script's docstring (pip install -e .[bench], no-AMX CFLAGS)")
    from bench.common import bench_work_dir, compile_as_cli, write_results
    from deploy.tools.examples import write_smollm2
    from edge.artifact.reader import Artifact
    from edge.artifact.targets import get_preset

    if not get_preset(args.target).runs_here():
        sys.exit(f"--target {args.target}: this CPU cannot run that preset's code")
    reps, reply_reps, n_decode, load_reps = REPS[args.quick]
    work = bench_work_dir(args.work, "bench-generate-")
    t_start = time.perf_counter()
    src = write_smollm2(work, log=log)
    files, arts, compile_s = {}, {}, {}
    for fmt in args.formats:
        files[fmt] = src if FORMATS[fmt] is None else work / src.name.replace("Q4_1", FORMATS[fmt])
        if not files[fmt].exists():
            log(f"writing {files[fmt].name} (gguf-py: every non-F32 tensor -> {FORMATS[fmt]})")
            requantize(src, files[fmt], FORMATS[fmt])
        arts[fmt] = work / f"smollm2-{fmt}-{args.target}"
        if not (arts[fmt] / "manifest.json").exists():
            t = time.perf_counter()
            compile_as_cli(files[fmt], arts[fmt], N_CTX, log=log, target=args.target)
            compile_s[fmt] = time.perf_counter() - t
    first = Artifact.open(arts[args.formats[0]])
    tmpl = first.manifest.decoder.chat_template
    ids, chat = prompts(first.file("tokenizer.json"), first.file(tmpl) if tmpl else None)

    bw = {}
    for th in args.threads:
        bw[th] = bandwidth(work, th)
    results = {}
    for fmt in args.formats:
        for th in args.threads:
            log(f"{fmt}, {th} thread(s): load {os.getloadavg()[0]:.2f}")
            jit_cache = None if args.no_jit else work / f"jit-cache-{fmt}-{args.target}-{th}"
            results[(fmt, th)] = run_block(fmt, files[fmt], arts[fmt], th, reps, reply_reps, n_decode, load_reps, ids, chat, log, jit_cache)
    for th in args.threads:
        bw[th] += bandwidth(work, th)
    log("profiling one edgejit decode step")
    profiles = [profile_decode(arts[args.formats[0]], th, variant=not args.no_jit) for th in (args.threads[:1] if args.quick else args.threads)]

    # -- report ---------------------------------------------------------------------------------
    ours_bytes = {fmt: Artifact.open(arts[fmt]).manifest.decoder.weight_bytes for fmt in args.formats}
    theirs = {fmt: gguf_summary(files[fmt]) for fmt in args.formats}
    loads = [la for r in results.values() for la in r["loadavg"]]
    MiB = 2**20
    jit_arg = "" if args.no_jit else ", jit='default'"
    preset = get_preset(args.target)
    quant = first.manifest.quantization or {}
    system = llama_cpp.llama_print_system_info().decode().replace("CPU : ", "").split(" | ")  # "AVX2 = 1 | ..."
    llama_isa = [f.split(" = ")[0] for f in system if f.endswith(" = 1") and f.split(" = ")[0] in (
        "AVX", "AVX2", "F16C", "FMA", "AVX_VNNI", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_INT8", "NEON", "DOTPROD")]
    L = []
    L.append(
        f"SmolLM2-135M-Instruct (30 layers, hidden 576, vocab 49152, tied embedding) from the bundled GGUF"
        f"{' and copies rewritten from it with gguf-py' if len(args.formats) > 1 else ''}. edgejit: the file compiled with "
        f"`compile_decoder(..., '{args.target}', context={N_CTX}, decode_variants=(1,), matmul_activations='int8', kv_cache='fp16')` "
        f"(target preset `{preset.name}`: {', '.join(preset.target.get('mattr', []))}; as `edgejit compile` "
        f"does: the batch-1 decode step compiled into the artifact; the products with 4/8-bit weights (prefill, decode, "
        f"LM head) on int8 activations where the target has int8 dot products, edge/kernels/dense_int8act.py, here: "
        f"{quant.get('kernel', 'none')}; an fp16 KV cache, as llama.cpp's default), Q4_0/Q4_1/Q8_0 weights kept quantized and F16 ones fp16 "
        f"(others dequantized on the host), `load_decoder(threads=N{jit_arg})`, the Decoder's prefill/decode"
        f"{' (generic module only: --no-jit)' if args.no_jit else '; decode on the batch-1 variant'}. llama.cpp: llama-cpp-python {llama_cpp.__version__} built from source "
        f"(no-AMX CFLAGS, docs/generation.md \"Speed\"; built for {', '.join(llama_isa) or '?'}), `Llama(path, n_threads=N, n_threads_batch=N, n_ctx={N_CTX})`, "
        "`eval()` of the same token ids. Both greedy (numpy argmax of the fp32 logits), EOS ignored, each engine in its own "
        f"process, measurements interleaved (who goes first alternates). Medians of {reps} (prefill), {reply_reps} "
        f"(TTFT, decode: {n_decode} decode steps after the first token), {load_reps + 1} (load: fresh processes). "
        "Ratios are edgejit / llama.cpp from the same run: above 1 is better for us in tok/s, worse in s and MiB.")
    L.append("")
    L.append(f"Prompts: {', '.join(str(n) for n in PREFILL_LENS)} tokens of Debian fortunes (deploy/tools/corpus.py); "
             f"chat: a system + user ChatML prompt of {len(chat)} tokens. Load average (1 min) during the run: "
             f"{min(la[0] for la in loads):.2f}-{max(la[0] for la in loads):.2f} on {os.cpu_count()} cores "
             "(other jobs share this machine).")
    L.append("")
    L.append("| file | thr | metric | edgejit | llama.cpp | ratio |")
    L.append("|---|---|---|---|---|---|")
    for (fmt, th), r in results.items():
        e, c = r["edgejit"], r["llama.cpp"]
        name = files[fmt].name.replace("SmolLM2-135M-Instruct.", "")
        for n in PREFILL_LENS:
            a, b = n / med(e["prefill"][n]), n / med(c["prefill"][n])
            L.append(f"| {name} | {th} | prefill {n} tok/s | {a:.0f} | {b:.0f} | {a / b:.2f} |")
        a, b = med(e["ttft"]) * 1000, med(c["ttft"]) * 1000
        L.append(f"| {name} | {th} | TTFT {len(chat)}-token chat, ms | {a:.0f} | {b:.0f} | {a / b:.2f} |")
        a, b = med(e["decode"]), med(c["decode"])
        L.append(f"| {name} | {th} | **decode tok/s** | **{a:.1f}** | **{b:.1f}** | **{a / b:.2f}** |")
        a, b = med(e["load"]), med(c["load"])
        L.append(f"| {name} | {th} | load s | {a:.2f} | {b:.2f} | {a / b:.2f} |")
        a, b = e["hwm"] / MiB, c["hwm"] / MiB
        L.append(f"| {name} | {th} | peak RSS MiB (process, after the run) | {a:.0f} | {b:.0f} | {a / b:.2f} |")
        a1, b1 = med(e["load_hwm"]) / MiB, med(c["load_hwm"]) / MiB
        L.append(f"| {name} | {th} | peak RSS MiB right after loading | {a1:.0f} | {b1:.0f} | {a1 / b1:.2f} |")
        a2, b2 = e["base_hwm"] / MiB, c["base_hwm"] / MiB
        L.append(f"| {name} | {th} | RSS MiB of the imports alone (before loading) | {a2:.0f} | {b2:.0f} | |")
        L.append(f"| {name} | {th} | peak RSS MiB minus imports | {a - a2:.0f} | {b - b2:.0f} | {(a - a2) / (b - b2):.2f} |")
    L.append("")
    L.append("Decode tok/s samples (to show the spread):")
    L.append("")
    for (fmt, th), r in results.items():
        L.append(f"- {files[fmt].name}, {th} thread(s): edgejit " + ", ".join(f"{x:.1f}" for x in r["edgejit"]["decode"])
                 + "; llama.cpp " + ", ".join(f"{x:.1f}" for x in r["llama.cpp"]["decode"]))
    for (fmt, th), r in results.items():
        a, b = r["edgejit"]["toks"], r["llama.cpp"]["toks"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        L.append(f"- greedy tokens, {files[fmt].name}, {th} thread(s): the engines agree on the first {same} of {len(a)} "
                 "(different arithmetic: llama.cpp rounds activations to 8 or 16 bits everywhere, edgejit to int8 in every "
                 "4/8-bit matrix product where the target has int8 dot products, fp32 elsewhere: expected to drift)")
    L.append("")
    L.append("## Memory-bandwidth bound")
    L.append("")
    L.append("Read bandwidth: a C sum over a 256 MiB float array (gcc -O3 -march=native, pthreads; larger than the "
             "L3), median of the passes measured before and after the run: "
             + "; ".join(f"{th} thread(s) {med(v):.1f} GB/s (range {min(v):.1f}-{max(v):.1f})" for th, v in bw.items())
             + ". Bytes read per decoded token: edgejit the manifest's `decoder.weight_bytes` (4/8-bit codes with fp16 scales and zeros, or fp16 weights; the packed LM head "
             "is also the embedding table); llama.cpp all tensor bytes of the GGUF (the tied Q8_0/F16 embedding is read "
             "whole as the LM head). The KV cache (200-330 tokens x 22.5 KiB in fp16, both engines) "
             "is left out: 5-7 MB.")
    L.append("")
    L.append("| file | engine | weight MB read / token | thr | bound tok/s | measured tok/s | share of bound |")
    L.append("|---|---|---|---|---|---|---|")
    for (fmt, th), r in results.items():
        for e, nbytes in (("edgejit", ours_bytes[fmt]), ("llama.cpp", theirs[fmt][0])):
            bound = med(bw[th]) * 1e9 / nbytes
            got = med(r[e]["decode"])
            L.append(f"| {files[fmt].name.replace('SmolLM2-135M-Instruct.', '')} | {e} | {nbytes / 1e6:.1f} | {th} | "
                     f"{bound:.0f} | {got:.1f} | {got / bound:.0%} |")
    L.append("")
    L.append("GGUF tensor types: " + "; ".join(f"{files[f].name}: " + ", ".join(f"{n} {t}" for t, n in theirs[f][1].items())
                                              for f in args.formats) + ".")
    if compile_s:
        L.append("edgejit compile time (host, this run): " + ", ".join(f"{f} {s:.0f} s" for f, s in compile_s.items()) + ".")
    L.append("")
    L.append("## Where edgejit's decode time goes")
    L.append("")
    L += [p + "\n" for p in profiles]
    L.append(f"Total wall time of the run: {(time.perf_counter() - t_start) / 60:.1f} min.")
    raw = work / "generate-raw.json"
    raw.write_text(json.dumps({f"{f}/{t}": {k: v for k, v in r.items()} for (f, t), r in results.items()} | {"bandwidth": bw}, indent=1, default=str))
    write_results(Path(args.out), "Generation: edgejit vs llama.cpp on the same GGUF", "\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
