"""Chat serving: what the prefix cache saves, and many users against llama.cpp's OpenAI server.

  python bench/bench_serve.py prefix   # TTFT with a 200-token shared system prompt, prefix cache off / on
  python bench/bench_serve.py users    # tokens/s and TTFT p50/p99 at 1, 4, 8 concurrent users:
                                       # `edgejit daemon` vs `python -m llama_cpp.server`, same GGUF
  python bench/bench_serve.py all      # both; writes bench/results/serve.md

Both use the bundled SmolLM2-135M-Instruct Q4_1 (compiled here for this machine) and real text
(Debian fortunes). The users part drives both servers with the same client (raw HTTP, streamed
chat completions, greedy), interleaved (edgejit, llama.cpp, edgejit, ... at each concurrency).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "serve.md"
CONTEXT = 1024
SYSTEM_TOKENS = 200


def _texts(n: int, seed: int, lo: int = 40, hi: int = 300) -> list[str]:
    from deploy.tools.corpus import sentences

    texts = [t for t in sentences() if lo <= len(t) <= hi]
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.choice(len(texts), n, replace=False)]


def _models(work: Path) -> tuple[Path, Path]:
    from bench.common import compile_as_cli
    from deploy.tools.examples import write_smollm2

    gguf = write_smollm2(work / "gguf", log=lambda *a: None)
    return gguf, compile_as_cli(gguf, work / "smollm2", CONTEXT)


# -- prefix cache: TTFT saved ---------------------------------------------------------------------
def bench_prefix(art: Path, reps: int) -> str:
    from edge.generate import SamplingParams
    from edge.generate.engine import Engine
    from edge.generate.loader import load_decoder

    loaded = load_decoder(art, context=CONTEXT, max_batch=1, extra_kv_tokens=2048)
    tok = loaded.tokenizer
    system = tok.decode(tok.encode(" ".join(_texts(12, seed=7)))[:SYSTEM_TOKENS])
    questions = _texts(reps + 1, seed=8, hi=160)

    def prompt(q):
        return tok.encode(loaded.template.render([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                                 add_generation_prompt=True))

    def ttft(engine, ids):
        h = engine.submit(ids, SamplingParams(max_tokens=1, ignore_eos=True))
        for _ in h:
            pass
        return h.stats.ttft_s, h.stats.cached_tokens

    off, on = Engine(loaded, prefix_cache_tokens=0), Engine(loaded, prefix_cache_tokens=2048)
    try:
        ttft(off, prompt(questions[0]))  # warm-up; fills the cache with the system prompt's sequence
        ttft(on, prompt(questions[0]))
        rows, t_off, t_on, lens, cached = [], [], [], [], []
        for q in questions[1:]:  # interleaved: off, on, off, on, ...
            ids = prompt(q)
            a, _ = ttft(off, ids)
            b, c = ttft(on, ids)
            t_off.append(a), t_on.append(b), lens.append(len(ids)), cached.append(c)
    finally:
        off.close()
        on.close()
    sys_len = len(tok.encode(loaded.template.render([{"role": "system", "content": system}], add_generation_prompt=False)))
    m_off, m_on = np.median(t_off) * 1000, np.median(t_on) * 1000
    return (
        "## Prefix cache: time to first token with a shared system prompt\n\n"
        f"A {SYSTEM_TOKENS}-token system prompt (real text; {sys_len} tokens with its chat-template lines) and "
        f"{len(t_off)} different user questions (real text), prompts of {min(lens)}-{max(lens)} tokens "
        f"(median {int(np.median(lens))}); one engine without the prefix cache and one with it "
        f"(warmed by one earlier question), the same prompts interleaved, one sequence at a time, "
        f"`max_tokens=1`, TTFT from `GenerationStats.ttft_s` (submit -> first token).\n\n"
        "| | TTFT median | TTFT min-max | prompt tokens computed (median) |\n|---|---:|---:|---:|\n"
        f"| prefix cache off | {m_off:.0f} ms | {min(t_off) * 1000:.0f}-{max(t_off) * 1000:.0f} ms | {int(np.median(lens))} |\n"
        f"| prefix cache on | {m_on:.0f} ms | {min(t_on) * 1000:.0f}-{max(t_on) * 1000:.0f} ms | "
        f"{int(np.median(np.array(lens) - np.array(cached)))} (reused {int(np.median(cached))}) |\n\n"
        f"TTFT saved: {m_off - m_on:.0f} ms per request ({m_off / m_on:.1f}x faster to the first token).\n"
    )


# -- many users: edgejit daemon vs llama.cpp's server ---------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jit_compiles(port: int) -> tuple[int, int]:
    """(compiles started, compiles ended) from the daemon's /metrics."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    count = {"compile_started": 0, "compile_finished": 0, "compile_failed": 0}
    for line in text.splitlines():
        if line.startswith("edgejit_jit_events_total{"):
            for event in count:
                if f'event="{event}"' in line:
                    count[event] += int(float(line.rsplit(" ", 1)[1]))
    return count["compile_started"], count["compile_finished"] + count["compile_failed"]


def _settle_jit(port: int, model: str, users: int, requests: list, max_tokens: int, max_rounds: int = 30) -> int:
    """Warm-up rounds (one request per user) until the daemon's JIT is idle and the last two rounds
    started no compile; returns the rounds sent."""
    quiet = 0
    for rounds in range(1, max_rounds + 1):
        started_before = _jit_compiles(port)[0]
        _load(port, model, users, requests, max_tokens)
        while True:
            started, ended = _jit_compiles(port)
            if started == ended:
                break
            time.sleep(0.5)
        quiet = quiet + 1 if started == started_before else 0
        if quiet == 2:
            return rounds
    return max_rounds


class Server:
    def __init__(self, name: str, argv: list[str], port: int, log: Path, ready_path: str):
        self.name, self.port = name, port
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{name} exited: {log.read_text(errors='replace')[-2000:]}"
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", ready_path)
                r = c.getresponse()
                body = r.read()
                if r.status == 200 and json.loads(body).get("status", "ok") == "ok":  # edgejit: every model loaded
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{name} not ready")

    def stop(self) -> None:
        import signal

        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def _stream(port: int, model: str, messages: list, max_tokens: int) -> tuple[float, int, float]:
    """One streamed chat completion: (TTFT s, content chunks, total s)."""
    body = json.dumps({"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()[:500]
    first, chunks = None, 0
    for line in r:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        doc = json.loads(line[6:])
        if doc.get("choices") and doc["choices"][0].get("delta", {}).get("content"):
            chunks += 1
            if first is None:
                first = time.perf_counter() - t0
    c.close()
    return first or 0.0, chunks, time.perf_counter() - t0


def _load(port: int, model: str, users: int, requests: list, max_tokens: int) -> dict:
    """`users` clients, each sending its share of `requests` one after another."""
    ttfts, tokens, empty = [], [0], [0]
    lock = threading.Lock()

    def client(mine):
        for messages in mine:
            ttft, n, _ = _stream(port, model, messages, max_tokens)
            with lock:
                if n:
                    ttfts.append(ttft)
                else:  # a reply without text (counted, reported)
                    empty[0] += 1
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(requests[u::users],)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"tok_s": tokens[0] / wall, "p50": np.percentile(ttfts, 50) * 1000, "p99": np.percentile(ttfts, 99) * 1000,
            "n": len(ttfts), "empty": empty[0], "tokens": tokens[0], "wall": wall}


def bench_users(gguf: Path, art: Path, work: Path, per_user: int, max_tokens: int) -> str:
    import llama_cpp

    threads = os.cpu_count() or 2
    p1, p2 = _free_port(), _free_port()
    cfg = work / "daemon.toml"
    cfg.write_text(f'[[models]]\nname = "smol"\nartifact = "{art}"\n[server]\nport = {p1}\n'
                   f'[generation]\nmax_seqs = 8\nmax_queue = 64\ncontext = {CONTEXT}\n[jit]\npolicy = "default"\n'
                   f'[paths]\ncache_dir = "{work / "jit-cache"}"\nstate_dir = "{work / "jit-state"}"\n'
                   f'[runtime]\nallow_unsigned = true\n[log]\nlevel = "warning"\n')
    ours_argv = [sys.executable, "-m", "edge.cli", "daemon", "--config", str(cfg)]
    theirs_argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(p2),
                   "--n_ctx", str(CONTEXT), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                   "--interrupt_requests", "False"]  # its default cuts a running reply short when another request arrives
    ours = Server("edgejit", ours_argv, p1, work / "edgejit.log", "/health")
    theirs = Server("llama.cpp", theirs_argv, p2, work / "llama_cpp.log", "/v1/models")
    texts = _texts(8 * per_user, seed=9)
    requests = [[{"role": "user", "content": t}] for t in texts]
    rows = []
    warmups = {}
    try:
        for users in (1, 4, 8):
            reqs = requests[: users * per_user]
            for server, model in ((ours, "smol"), (theirs, str(gguf))):
                _load(server.port, model, users, requests[-users:], max_tokens)  # warm: one request per user, not counted
                if server is ours:
                    warmups[users] = _settle_jit(server.port, model, users, requests[-users:], max_tokens)
                r = _load(server.port, model, users, reqs, max_tokens)
                rows.append((users, server.name, r))
                print(users, server.name, r, flush=True)
    finally:
        ours.stop()
        theirs.stop()
    table = ("| users | server | replies (empty) | tokens | wall | tokens/s (all users) | TTFT p50 | TTFT p99 |\n"
             "|---:|---|---:|---:|---:|---:|---:|---:|\n")
    for users, name, r in rows:
        table += (f"| {users} | {name} | {r['n']} ({r['empty']}) | {r['tokens']} | {r['wall']:.1f} s | {r['tok_s']:.1f} | "
                  f"{r['p50']:.0f} ms | {r['p99']:.0f} ms |\n")
    ratio = "\n".join(
        f"- {u} users: edgejit / llama.cpp throughput {a['tok_s'] / b['tok_s']:.2f}x, TTFT p99 {a['p99']:.0f} vs {b['p99']:.0f} ms"
        for (u, _, a), (_, _, b) in zip(rows[::2], rows[1::2]))
    return (
        "## Many users: edgejit daemon vs llama.cpp's OpenAI server\n\n"
        f"Same GGUF, same client (raw HTTP, streamed `/v1/chat/completions`, `temperature 0`, "
        f"`max_tokens {max_tokens}`), {per_user} requests per user sent one after another, prompts of real text "
        f"(one Debian fortune each), interleaved edgejit / llama.cpp at each concurrency, each after uncounted warm-up "
        f"requests: one per user for llama.cpp; for edgejit rounds of one per user until its JIT has nothing left to "
        f"compile (no compile running and none started by the last round; steady state, as a daemon serving for a while "
        f"is: rounds per concurrency {', '.join(f'{u} users {n}' for u, n in warmups.items())}; before that a variant "
        f"compiling in the background takes one of the 2 cores); tokens/s counts streamed "
        f"content chunks (one per token for both) over the wall time of the whole run.\n\n"
        f"- edgejit: `{' '.join(ours_argv[1:])}` (max_seqs 8, context {CONTEXT}, JIT on, prefix cache default)\n"
        f"- llama.cpp: llama-cpp-python {llama_cpp.__version__}, `{' '.join(theirs_argv[1:]).replace(str(gguf), 'GGUF')}` "
        f"(it serves one request at a time)\n\n{table}\n{ratio}\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("prefix", "users", "all"))
    ap.add_argument("--reps", type=int, default=8, help="questions measured in the prefix part")
    ap.add_argument("--per-user", type=int, default=3, help="requests per user in the users part")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        work = Path(tmp)
        gguf, art = _models(work)
        parts = []
        if args.part in ("prefix", "all"):
            parts.append(bench_prefix(art, args.reps))
        if args.part in ("users", "all"):
            parts.append(bench_users(gguf, art, work, args.per_user, args.max_tokens))
    note = (f"Load average (1 min) at the end of the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} vCPUs. The machine "
            "is shared with other jobs: absolute numbers are noisy; compare the ratios from the same run.\n\n")
    write_results(RESULTS, "Chat serving (bench/bench_serve.py)", note + "\n".join(parts))


if __name__ == "__main__":
    main()
