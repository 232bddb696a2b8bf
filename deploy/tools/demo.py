"""The whole system on this machine, as real processes (`edgejit demo`, deploy/cli/demo.py).

The chat demo (default): compiles the bundled SmolLM2-135M-Instruct for this host, starts a broker
(Mosquitto), a coordinator and the daemon, and has several simulated users chat with it at once
through the OpenAI API (streamed /v1/chat/completions, the official `openai` client), with prompts
made of real text (fortunes); the daemon's continuous batching serves them together, its JIT
specializes the decode batch sizes, and the fleet report at the end shows time to first token and
tokens/s. `--model minilm` runs the encoder demo instead: a stream of real-text requests to the
bundled MiniLM, the JIT specializing the hot lengths and the latency dropping. Everything shuts
down at the end (each child in its own process group; nothing is left behind, even on Ctrl-C or
an error).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from deploy.tools import progress
from deploy.tools.processes import stop_process
from edge.errors import EdgeJitError

ROOT = Path(__file__).resolve().parents[2]
DEVICE = "demo-device"
FLEET = "demo"


class Children:
    """Child processes, each in its own session; stop() terminates them all, then kills stragglers."""

    def __init__(self):
        self.procs: list[tuple[str, subprocess.Popen, object]] = []

    def start(self, name: str, argv: list[str], log_path: Path) -> subprocess.Popen:
        log = open(log_path, "wb")
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 60.0) -> int:
        return stop_process(proc, timeout, group=True)

    def stop_all(self) -> list[str]:
        """Stop every child still running; returns the names of those that had to be killed."""
        killed = []
        for name, proc, log in reversed(self.procs):
            if proc.poll() is None:
                if self.stop(proc, 20.0) == -signal.SIGKILL:
                    killed.append(name)
            try:
                os.killpg(proc.pid, 0)  # anything left in its process group?
                os.killpg(proc.pid, signal.SIGKILL)
                killed.append(f"{name} (children)")
            except (ProcessLookupError, PermissionError):
                pass
            log.close()
        return killed


def say(msg: str = "") -> None:
    progress.write(msg)  # a line on stdout, above the traffic's progress bar if one is shown


# -- inputs -----------------------------------------------------------------------------------
def example_model(work: Path) -> tuple[Path, Path | None]:
    """The bundled example (MiniLM-L6 + tokenizer.json), written by `edgejit example`."""
    from edge.cli import COMMANDS

    if "example" not in COMMANDS:
        raise EdgeJitError("this checkout has no bundled example model (`edgejit example`): pass --model and --tokenizer")
    out = work / "example"
    if not any(out.glob("*.onnx")):
        r = subprocess.run([sys.executable, "-m", "edge.cli", "example", "-o", str(out)], capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise EdgeJitError(f"edgejit example failed: {(r.stderr or r.stdout).strip().splitlines()[-1:] or ['?']}")
    models = sorted(out.rglob("*.onnx"))
    tokenizers = sorted(out.rglob("tokenizer.json"))
    if not models:
        raise EdgeJitError(f"edgejit example wrote no .onnx file to {out}")
    return models[0], tokenizers[0] if tokenizers else None


def request_lengths(tokenizer: Path | None, n: int, max_len: int, seed: int = 0) -> list[list[int]]:
    """n token-id sequences from real text (fortunes), each at most max_len tokens long. Without
    a tokenizer: word counts give the lengths and every id is 1 (any vocabulary has it)."""
    from deploy.tools.corpus import sentences

    texts = sentences()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    if tokenizer is not None:
        from deploy.tools.corpus import tokenize

        pool = tokenize(tokenizer, [texts[i] for i in order[: n * 4]], max_len=100_000)
    else:
        pool = [[1] * (len(texts[i].split()) + 2) for i in order[: n * 4]]
    picked = [ids for ids in pool if 2 <= len(ids) <= max_len][:n]
    if len(picked) < n:
        raise EdgeJitError(f"only {len(picked)} texts of at most {max_len} tokens; lower --requests or raise --max-len")
    return picked


# -- the run ----------------------------------------------------------------------------------
def write_daemon_config(path: Path, *, artifact: Path, port: int, broker, password_file: Path, work: Path) -> None:
    path.write_text(f"""# written by edgejit demo
[[models]]
name = "example"
artifact = "{artifact}"

[server]
port = {port}
workers = 2

[runtime]
allow_unsigned = true   # the demo compiles its own artifact unsigned; real devices set trusted_keys

[paths]
cache_dir = "{work / 'cache'}"
state_dir = "{work / 'state'}"

[jit]
policy = "on"
buckets = 8
min_hits = 3

[telemetry]
enabled = true
host = "{broker.host}"
port = {broker.port}
username = "{DEVICE}"
password_file = "{password_file}"
fleet = "{FLEET}"
device_id = "{DEVICE}"
window_s = 2.0
spool_path = "{work / 'state' / 'telemetry-spool.sqlite'}"
""")


def wait_healthy(port: int, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EdgeJitError(f"the daemon exited ({proc.returncode}); its log: {log_path}\n{tail(log_path)}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            doc = json.loads(c.getresponse().read())
            c.close()
            if doc["status"] == "ok":
                return
            if doc["status"] == "failed":
                raise EdgeJitError(f"the daemon could not load the model; its log: {log_path}\n{tail(log_path)}")
        except (OSError, ValueError):
            pass
        time.sleep(0.3)
    raise EdgeJitError(f"the daemon was not ready after {timeout:.0f}s; its log: {log_path}")


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class LogFollower(threading.Thread):
    """Echo the daemon's JIT progress lines (compiling, compiled, now served by a variant)."""

    PATTERN = re.compile(r"edgejit\.daemon\.jit: (.*)|(WARNING|ERROR)\s+(\S+): (.*)")

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.stop_event, self.pos = path, threading.Event(), 0

    def run(self) -> None:
        while not self.stop_event.wait(0.3):
            self.poll()
        self.poll()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self.pos += end
        for line in data[:end].decode(errors="replace").splitlines():
            m = self.PATTERN.search(line)
            if m and "UNSIGNED" not in line:
                say(f"    daemon | {m.group(1) or m.group(2).lower() + ': ' + m.group(4)}")


def drive(port: int, sequences: list[list[int]], input_names: list[str], *, rate: float, clients: int = 2) -> list[dict]:
    """Send every sequence once from `clients` threads, at most `rate` requests per second (a
    device sees a stream over time, not a flood); returns one record per request, in order."""
    records: list[dict | None] = [None] * len(sequences)
    next_index = iter(range(len(sequences)))
    lock = threading.Lock()
    every = max(10, len(sequences) // 10)
    done = [0]
    start = time.monotonic()
    bar = progress.Progress(len(sequences), "  requests", unit="req", plain_file=sys.stdout)

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                break
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ids = sequences[i]
            inputs = {"input_ids": [ids]}
            if "token_type_ids" in input_names:
                inputs["token_type_ids"] = [[0] * len(ids)]
            t0 = time.perf_counter()
            conn.request("POST", "/v1/models/example/infer", json.dumps({"inputs": inputs}),
                         {"Content-Type": "application/json", "Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            wall = time.perf_counter() - t0
            if resp.status != 200:
                raise EdgeJitError(f"request {i} (length {len(ids)}) failed: {resp.status} {body[:200].decode(errors='replace')}")
            records[i] = {"len": len(ids), "kind": resp.getheader("X-Edgejit-Module"),
                          "ms": float(resp.getheader("X-Edgejit-Inference-Ms")), "wall_ms": wall * 1e3}
            with lock:
                done[0] += 1
                report = done[0] % every == 0 or done[0] == len(sequences)
                if report or bar.tty:  # the bar moves on every request, the plain line every 10%
                    window = [r for r in records[max(0, i - every): i + 1] if r]
                    kinds = defaultdict(int)
                    for r in window:
                        kinds[r["kind"]] += 1
                    share = ", ".join(f"{k} {100 * v / len(window):.0f}%" for k, v in sorted(kinds.items()))
                    p50 = np.median([r["ms"] for r in window])
                    bar.update(1, f"recent p50 {p50:.2f} ms, served by: {share}",
                               f"  {done[0]:>5}/{len(sequences)} requests  {time.monotonic() - start:6.1f}s  "
                               f"recent p50 {p50:8.2f} ms  served by: {share}" if report else None)
        conn.close()

    errors = []

    def guarded():
        try:
            client()
        except Exception as e:  # report the first failure after all threads stop
            errors.append(e)

    threads = [threading.Thread(target=guarded, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if errors:
        raise errors[0] if isinstance(errors[0], EdgeJitError) else EdgeJitError(f"request failed: {errors[0]}")
    return records


def settle_jit(port: int, timeout: float) -> bool:
    """Wait while variants are queued or compiling; True if any was compiled or loaded meanwhile."""
    deadline, waited, announced = time.monotonic() + timeout, False, False
    while time.monotonic() < deadline:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/v1/models/example")
        doc = json.loads(c.getresponse().read())
        c.close()
        states = {v.get("state") for v in doc.get("jit", {}).get("variants", {}).values()}
        if not states & {"queued", "compiling"}:
            return waited
        if not announced:
            say("  waiting for the JIT to finish compiling (serving goes on meanwhile) ...")
            announced = True
        waited = True
        time.sleep(0.5)
    return waited


def summarize(records: list[dict]) -> list[str]:
    from deploy.fleet.coordinator.report import bucket, bucket_label

    by_bucket = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_bucket[bucket(r["len"])][r["kind"]].append(r["ms"])
    lines = [f"  {'LENGTH':<8} {'REQUESTS':>8} {'generic p50':>12} {'specialized p50':>16} {'speed-up':>9}"]
    for b in sorted(by_bucket):
        kinds = by_bucket[b]
        gen = kinds.get("generic", [])
        spec = kinds.get("variant", []) + kinds.get("padded", [])
        g, s = (np.median(gen) if gen else None), (np.median(spec) if spec else None)
        fmt = lambda v: "-" if v is None else f"{v:.2f} ms"  # noqa: E731
        speed = f"x{g / s:.1f}" if g and s else "-"
        lines.append(f"  {bucket_label(b):<8} {sum(map(len, kinds.values())):>8} {fmt(g):>12} {fmt(s):>16} {speed:>9}")
    n = len(records)
    first = [r["ms"] for r in records[: max(1, n // 10)]]
    last = [r["ms"] for r in records[-max(1, n // 4):]]
    lines.append(f"  latency p50: first {len(first)} requests {np.median(first):.2f} ms -> last {len(last)} requests {np.median(last):.2f} ms")
    return lines


def start_fleet(work: Path, children: Children):
    """Mosquitto (password auth, per-device ACL) and a coordinator process: (broker, coordinator, db)."""
    from deploy.fleet.broker import Broker

    pw_dev, pw_coord = secrets.token_hex(12), secrets.token_hex(12)
    broker = Broker(work / "broker", users={"coordinator": pw_coord, DEVICE: pw_dev}, coordinators=["coordinator"])
    (work / "device.pw").write_text(pw_dev)
    (work / "coordinator.pw").write_text(pw_coord)
    for f in ("device.pw", "coordinator.pw"):
        (work / f).chmod(0o600)
    say(f"  mosquitto on {broker.host}:{broker.port} (password auth, per-device ACL)")
    db = work / "fleet.sqlite"
    coord_cfg = work / "coordinator.json"
    coord_cfg.write_text(json.dumps({"host": broker.host, "port": broker.port, "username": "coordinator",
                                     "password_file": str(work / "coordinator.pw"), "fleet": FLEET, "db": str(db),
                                     "hot_interval_s": 2.0}))
    coord = children.start("coordinator", [sys.executable, "-m", "edge.cli", "coordinator", "--config", str(coord_cfg)],
                           work / "coordinator.log")
    say(f"  coordinator (pid {coord.pid}) -> {db}")
    return broker, coord, db


def finish(args, work: Path, children: Children, daemon, daemon_log: Path, follower, coord, broker, db: Path) -> None:
    """Stop the daemon (clean shutdown, telemetry death), the coordinator and the broker; print the fleet report."""
    rc = children.stop(daemon)
    follower.stop_event.set()
    follower.join()
    say(f"  daemon stopped (exit {rc}): in-flight finished, JIT profile saved, telemetry death sent")
    if rc != 0:
        raise EdgeJitError(f"the daemon exited with {rc}; its log: {daemon_log}")
    _wait_stored(db, DEVICE)  # the coordinator stores the last windows and the death
    children.stop(coord)
    say("  coordinator stopped")
    broker.stop()
    say("  broker stopped\n")
    report_json = Path(args.report_json) if args.report_json else work / "fleet-report.json"
    r = subprocess.run([sys.executable, "-m", "edge.cli", "fleet", "--db", str(db), "--json", str(report_json),
                        "--svg", str(work / "fleet-report.svg")], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise EdgeJitError(f"edgejit fleet failed: {r.stderr.strip()}")
    say(r.stdout.rstrip())
    say(f"  (plots: {work / 'fleet-report.svg'})")


# -- the chat demo ------------------------------------------------------------------------------
SYSTEM = "You are a concise, friendly assistant. Answer in one or two sentences."
TASKS = ("Explain this in plain words: ", "What is the point of this saying? ", "Reply to this with a short joke: ",
         "Is this good advice? Why? ", "Summarize this in one sentence: ", "Who might say this, and when? ")
FOLLOW_UPS = ("Now say it in five words.", "Give one example.", "Why does that matter?", "Say it more kindly.")


def conversations(users: int, seed: int = 0) -> list[str]:
    """One opening message per user: a task and a short real text (a fortune)."""
    from deploy.tools.corpus import sentences

    texts = [t for t in sentences() if 30 <= len(t) <= 200]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(texts), users, replace=False)
    return [TASKS[k % len(TASKS)] + texts[i] for k, i in enumerate(picks)]


def write_chat_config(path: Path, *, artifact: Path, port: int, broker, password_file: Path, work: Path, max_seqs: int) -> None:
    path.write_text(f"""# written by edgejit demo
[[models]]
name = "smollm2"
artifact = "{artifact}"

[server]
port = {port}

[generation]
max_seqs = {max_seqs}       # sequences decoded together (continuous batching)
max_queue = 32
request_timeout_s = 900.0

[runtime]
allow_unsigned = true   # the demo compiles its own artifact unsigned; real devices set trusted_keys

[paths]
cache_dir = "{work / 'cache'}"
state_dir = "{work / 'state'}"

[jit]
policy = "on"           # decode steps specialized by batch size
min_hits = 3

[telemetry]
enabled = true
host = "{broker.host}"
port = {broker.port}
username = "{DEVICE}"
password_file = "{password_file}"
fleet = "{FLEET}"
device_id = "{DEVICE}"
window_s = 2.0
sample_s = 0.5
spool_path = "{work / 'state' / 'telemetry-spool.sqlite'}"
""")


def chat_round(client, histories: list[list[dict]], messages: list[str], *, max_tokens: int, stagger_s: float) -> list[dict]:
    """Every user sends its next message at once (staggered by stagger_s), streamed; returns one
    record per user: time to first token, tokens, decode tokens/s, the reply."""
    records: list[dict | None] = [None] * len(histories)
    errors = []

    def user(k: int) -> None:
        try:
            time.sleep(k * stagger_s)
            histories[k].append({"role": "user", "content": messages[k]})
            t0 = time.perf_counter()
            stamps, pieces, usage = [], [], None
            stream = client.chat.completions.create(model="smollm2", messages=histories[k], max_tokens=max_tokens,
                                                    temperature=0.7, seed=k, stream=True,
                                                    stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    stamps.append(time.perf_counter())
                    pieces.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
            reply = "".join(pieces)
            histories[k].append({"role": "assistant", "content": reply})
            n = usage.completion_tokens if usage else len(pieces)
            span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
            records[k] = {"user": k + 1, "ttft_ms": (stamps[0] - t0) * 1e3 if stamps else None, "tokens": n,
                          "prompt_tokens": usage.prompt_tokens if usage else 0,
                          "tok_s": (n - 1) / span if span > 0 and n > 1 else None, "reply": reply}
            r = records[k]
            say(f"    user {k + 1}: TTFT {r['ttft_ms']:.0f} ms, {n} tokens" + (f", {r['tok_s']:.1f} tok/s" if r["tok_s"] else "")
                + f" | {' '.join(reply.split())[:70]!r}")
        except Exception as e:  # reported after every user's thread ends
            errors.append(e)

    threads = [threading.Thread(target=user, args=(k,), daemon=True) for k in range(len(histories))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise EdgeJitError(f"a chat request failed: {type(errors[0]).__name__}: {errors[0]}")
    return records


def jit_compiling(port: int) -> bool:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/health")
    doc = json.loads(c.getresponse().read())
    c.close()
    return any(w["task"].startswith("JIT compile") for w in doc.get("work", []))


def settle_generation_jit(port: int, timeout: float) -> bool:
    """Wait while the JIT compiles decode variants; True if it did."""
    deadline, waited = time.monotonic() + timeout, False
    while time.monotonic() < deadline and jit_compiling(port):
        if not waited:
            say("  waiting for the JIT to finish compiling decode variants (serving goes on meanwhile) ...")
            waited = True
        time.sleep(0.5)
    return waited


def chat_summary(records: list[dict], wall_s: float) -> list[str]:
    ttft = sorted(r["ttft_ms"] for r in records if r["ttft_ms"] is not None)
    rates = sorted(r["tok_s"] for r in records if r["tok_s"])
    q = lambda v, x: float(np.quantile(v, x, method="lower")) if v else float("nan")  # noqa: E731
    tokens = sum(r["tokens"] for r in records)
    return [f"  {len(records)} replies, {tokens} tokens generated in {wall_s:.1f}s ({tokens / wall_s:.1f} tokens/s for all users together)",
            f"  measured by the clients: time to first token p50 {q(ttft, 0.5):.0f} ms, p99 {q(ttft, 0.99):.0f} ms; "
            f"decode p50 {q(rates, 0.5):.1f} tok/s, p99 {q(rates, 0.99):.1f} tok/s per reply"]


def run_chat(args) -> int:
    """The chat demo: SmolLM2, simulated users through the OpenAI API, the fleet report."""
    try:
        import openai
    except ModuleNotFoundError:
        raise EdgeJitError("the chat demo talks to the daemon with the official client: pip install openai "
                           "(or 'edgejit[dev]'); `edgejit demo --model minilm` needs no client") from None
    quick = args.quick
    users = args.users or (3 if quick else 6)
    turns = args.turns or (2 if quick else 3)
    max_tokens = args.max_tokens or (24 if quick else 80)
    t_start = time.monotonic()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edgejit-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    children = Children()
    broker = None
    signal.signal(signal.SIGTERM, _interrupt)  # stopped from outside: still clean up the children
    try:
        say(f"edgejit demo: everything runs on this machine; files in {work}")
        say("\n[1/6] chat model: SmolLM2-135M-Instruct (Q4_1 GGUF), compiled for this host")
        if args.artifact:
            artifact = Path(args.artifact)
            say(f"  using the compiled artifact {artifact}")
        else:
            artifact = work / "artifacts" / "smollm2"
            if not (artifact / "manifest.json").exists():
                from deploy.tools.examples import write_smollm2

                gguf = write_smollm2(work / "models", log=lambda m: say(f"  {m}"))
                say("  compiling (about a minute) ...")
                r = subprocess.run([sys.executable, "-m", "edge.cli", "compile", str(gguf), "--target", "host", "-o", str(artifact),
                                    "--context", "1024", "--force"], capture_output=True, text=True, cwd=ROOT)
                for line in r.stdout.splitlines()[-3:]:
                    say(f"  {line}")
                if r.returncode != 0:
                    raise EdgeJitError(f"edgejit compile failed:\n{r.stderr.strip()[-2000:]}")
            else:
                say(f"  reusing {artifact}")
        openers = conversations(users)
        say(f"  {users} users, {turns} turns each, up to {max_tokens} tokens per reply; openers from real text (fortunes)")

        say("\n[2/6] broker and coordinator")
        from deploy.tools.processes import free_port

        broker, coord, db = start_fleet(work, children)

        say("\n[3/6] daemon")
        port = free_port()
        daemon_cfg = work / "daemon.toml"
        write_chat_config(daemon_cfg, artifact=artifact, port=port, broker=broker, password_file=work / "device.pw",
                          work=work, max_seqs=min(users, 4))
        daemon_log = work / "daemon.log"
        daemon = children.start("daemon", [sys.executable, "-m", "edge.cli", "daemon", "--config", str(daemon_cfg)], daemon_log)
        follower = LogFollower(daemon_log)
        follower.start()
        wait_healthy(port, daemon, daemon_log, timeout=600)
        say(f"  http://127.0.0.1:{port}/v1 (pid {daemon.pid}); OpenAI API, continuous batching of up to {min(users, 4)} sequences")

        say(f"\n[4/6] {users} users chat at once (streamed /v1/chat/completions, the openai client)")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
        histories = [[{"role": "system", "content": SYSTEM}] for _ in range(users)]
        records, t_traffic = [], time.monotonic()
        for turn in range(turns):
            msgs = openers if turn == 0 else [FOLLOW_UPS[(k + turn) % len(FOLLOW_UPS)] for k in range(users)]
            say(f"  turn {turn + 1}:")
            for k, m in enumerate(msgs):
                say(f"    user {k + 1} > {m[:90]}{'...' if len(m) > 90 else ''}")
            # users a few tens of ms apart: a 24-token reply (--quick) takes ~0.25 s here, and with
            # 0.3 s between users each one finished before the next arrived (nothing decoded together)
            records += chat_round(client, histories, msgs, max_tokens=max_tokens, stagger_s=0.05)
            if turn == 0 and settle_generation_jit(port, timeout=600):
                say("  JIT settled: the next turns decode on specialized variants")
        wall = time.monotonic() - t_traffic

        say("\n[5/6] what the users saw")
        for line in chat_summary(records, wall):
            say(line)

        say("\n[6/6] shutdown and fleet report")
        finish(args, work, children, daemon, daemon_log, follower, coord, broker, db)
        say(f"\ndemo finished in {time.monotonic() - t_start:.0f}s; no process left running.")
        return 0
    finally:
        killed = children.stop_all()
        if broker is not None:
            broker.close()
        if killed:
            say(f"(had to kill: {', '.join(killed)})")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args) -> int:
    """The demo, for `edgejit demo` (deploy/cli/demo.py: the options): chat unless --model names an encoder."""
    if args.model in (None, "smollm2"):
        return run_chat(args)
    return run_encoder(args)


def run_encoder(args) -> int:
    """The encoder demo: MiniLM (or an ONNX file), a stream of real-text requests, the JIT's lengths."""
    quick = args.quick
    n_requests = args.requests or (100 if quick else 400)
    max_len = args.max_len or (32 if quick else 128)
    rate = args.rate or (5.0 if quick else 10.0)
    t_start = time.monotonic()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="edgejit-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    children = Children()
    broker = None
    signal.signal(signal.SIGTERM, _interrupt)  # stopped from outside: still clean up the children
    try:
        say(f"edgejit demo: everything runs on this machine; files in {work}")
        say("\n[1/6] example model")
        if args.model != "minilm":
            model, tokenizer = Path(args.model), Path(args.tokenizer) if args.tokenizer else None
        else:
            model, tokenizer = example_model(work)
        say(f"  {model} (tokenizer: {tokenizer or 'none: lengths from word counts'})")
        sequences = request_lengths(tokenizer, n_requests, max_len)
        lengths = [len(s) for s in sequences]
        say(f"  {n_requests} requests from real text (fortunes): lengths {min(lengths)}-{max(lengths)} tokens, median {int(np.median(lengths))}")

        say("\n[2/6] compile for this host")
        from edge.artifact.targets import host_preset

        artifact = work / "artifacts" / "example" / "v1"
        if not (artifact / "manifest.json").exists():
            r = subprocess.run([sys.executable, "-m", "edge.cli", "compile", str(model), "-o", str(artifact), "--name", "example",
                                "--max-seq", str(max(max_len, 16)), "--force"], capture_output=True, text=True, cwd=ROOT)
            for line in r.stdout.splitlines():
                say(f"  {line}")
            if r.returncode != 0:  # TVM's own warnings go to stderr: shown only when it failed
                raise EdgeJitError(f"edgejit compile failed:\n{r.stderr.strip()[-2000:]}")
        else:
            say(f"  reusing {artifact}")
        say(f"  target preset: {host_preset().name}")

        say("\n[3/6] broker and coordinator")
        from deploy.tools.processes import free_port

        broker, coord, db = start_fleet(work, children)

        say("\n[4/6] daemon")
        port = free_port()
        daemon_cfg = work / "daemon.toml"
        write_daemon_config(daemon_cfg, artifact=artifact, port=port, broker=broker,
                            password_file=work / "device.pw", work=work)
        daemon_log = work / "daemon.log"
        daemon = children.start("daemon", [sys.executable, "-m", "edge.cli", "daemon", "--config", str(daemon_cfg)], daemon_log)
        follower = LogFollower(daemon_log)
        follower.start()
        wait_healthy(port, daemon, daemon_log, timeout=300)
        say(f"  http://127.0.0.1:{port} (pid {daemon.pid}); config {daemon_cfg}")
        input_names = [s["name"] for s in json.loads((artifact / "manifest.json").read_text())["inputs"]]

        say(f"\n[5/6] traffic: {n_requests} requests at up to {rate:g}/s from 2 clients; the JIT specializes the hot lengths")
        records = drive(port, sequences, input_names, rate=rate)
        if settle_jit(port, timeout=300):
            replay = sequences[-max(10, n_requests // 5):]
            say(f"  JIT settled; the last {len(replay)} requests once more:")
            records += drive(port, replay, input_names, rate=rate)
        say("")
        for line in summarize(records):
            say(line)

        say("\n[6/6] shutdown and fleet report")
        finish(args, work, children, daemon, daemon_log, follower, coord, broker, db)
        say(f"\ndemo finished in {time.monotonic() - t_start:.0f}s; no process left running.")
        return 0
    finally:
        killed = children.stop_all()
        if broker is not None:
            broker.close()
        if killed:
            say(f"(had to kill: {', '.join(killed)})")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _wait_stored(db: Path, device: str, timeout: float = 15.0) -> bool:
    """Until the coordinator has stored the device's death and every window of that session
    (no sequence gap), or `timeout` s: the broker still holds for it whatever is not stored yet."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as con:
                death = con.execute("SELECT MAX(session) FROM deaths WHERE device = ?", (device,)).fetchone()[0]
                if death is not None:
                    n, top = con.execute("SELECT COUNT(*), MAX(seq) FROM messages WHERE device = ? AND session = ?",
                                         (device, death)).fetchone()
                    if top is not None and n == top + 1:
                        return True
        except sqlite3.Error:
            pass
        time.sleep(0.2)
    return False
