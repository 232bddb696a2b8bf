"""Shared pieces of the benchmark scripts: machine description and result-file writing."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def machine() -> str:
    from edge import machine

    model = machine.cpu_model()
    flags = sorted(f for f in machine.cpu_features() if f in {"avx2", "fma", "avx512f", "avx512_vnni", "avx512vbmi", "avx_vnni", "asimd", "asimddp"})
    try:
        llvm_cpu = __import__("tvm").target.codegen.llvm_get_system_cpu()
    except Exception:
        llvm_cpu = "?"
    return f"{model} (LLVM: {llvm_cpu}), {machine.cores()} cores usable, {', '.join(flags)}; {platform.platform()}; Python {platform.python_version()}"


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def write_results(path: Path, title: str, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (
        f"# {title}\n\n"
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"- machine: {machine()}\n"
        f"- command: `{command()}`\n"
        f"- git: {subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip() or '?'}\n\n"
        f"{body}\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(text)


def compile_as_cli(model: Path, out: Path, context: int, log=lambda *a: None, target: str = "host") -> Path:
    """A decoder artifact for `target` (default: this machine) compiled as `edgejit compile` does by
    default: the batch-1 decode step built in, int8 activations where the target has int8 dot
    products, an fp16 KV cache."""
    from deploy.compiler.decoder import compile_decoder

    return compile_decoder(model, target, out, context=context, decode_variants=(1,), matmul_activations="int8",
                           kv_cache="fp16", force=True, log=log)


def bench_work_dir(given: str | None, prefix: str) -> Path:
    """--work, or a new temporary directory."""
    import tempfile

    work = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work
