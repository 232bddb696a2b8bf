"""Device-side JIT compiles in a separate, limited process.

A crash, hang or out-of-memory in the TVM compiler must not take serving down, so each variant
is compiled by `python -m edge.jit.worker` in its own session (process group), and the serving
process only waits for it:

    result = compile_in_worker(artifact, {"seq": 128}, out_path, timeout_s=600, memory_mb=4096)
    if not result.ok: log(result.error)       # never raises for worker failures

The request goes to the worker as JSON on stdin (never pickle). The worker limits itself before
it imports the compiler (address space, CPU time, niceness; it dies with its parent), loads the
artifact's module.json (checked against the manifest's sha256), runs edge.runtime.pipeline.build with the
binding and edge.runtime.pipeline.export, and renames the library onto `out_path`. The parent enforces the
wall-clock timeout by killing the worker's whole process group (the linker included).

The limits are applied by the worker itself rather than in a `preexec_fn`: the serving process is
multi-threaded, and preexec_fn is documented as unsafe (it can deadlock) in threaded programs.

Test hook (tests only): the environment variable EDGEJIT_WORKER_TEST_FAULT, read by the worker's
main and nothing else, makes the worker misbehave: `sigkill` (SIGKILL itself from inside the
compiler, mid-build), `hang` (start a `sleep` child, then hang), `oom` (allocate until memory runs
out).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edge.artifact.manifest import MANIFEST, Manifest
from edge.errors import ArtifactError
from edge.runtime.tuning_records import FILE as TUNING_FILE
from edge.runtime.tvm_library import RUNTIME_LIB_ENV

TEST_FAULT_ENV = "EDGEJIT_WORKER_TEST_FAULT"
ERROR_PREFIX = "edgejit-worker: error: "
EXIT_ERROR, EXIT_BAD_REQUEST, EXIT_MEMORY = 1, 2, 3
TAIL_LINES = 12
_MEMORY_MARKERS = ("MemoryError", "bad_alloc", "out of memory", "Cannot allocate memory")


@dataclass(frozen=True)
class WorkerResult:
    ok: bool
    duration_s: float
    error: str | None = None  # one-line summary, then the worker's last output lines
    killed_by: str | None = None  # None, "timeout", "signal N" or "memory"
    returncode: int | None = None

    @property
    def reason(self) -> str | None:
        """The one-line summary of `error`."""
        return self.error.splitlines()[0] if self.error else None


# -- parent side -----------------------------------------------------------------------------
def compile_in_worker(
    artifact,
    bind: dict[str, int],
    out_path: Path,
    *,
    tuned: bool = False,
    timeout_s: float,
    memory_mb: int | None,
    nice: int = 10,
    running: set | None = None,
) -> WorkerResult:
    """Compile the artifact's module with `bind` into the shared library `out_path`, in a worker.

    `artifact` is an edge.artifact.Artifact (preferred: its manifest was verified when opened) or
    an artifact directory. `tuned`: apply the artifact's tuning records (`bind` is then one of
    their shapes). `running`: a set the worker's Popen is kept in while it runs (so its owner can
    kill it: `abandon(running)`). Returns a WorkerResult; worker failures (error, crash, timeout,
    out-of-memory) never raise here.
    """
    out_path = Path(out_path)
    try:
        manifest, artifact_dir = _manifest_of(artifact)
        target, module_sha = manifest.target.tvm, manifest.files["module.json"]
        tuning_sha = manifest.files[TUNING_FILE] if tuned else None
    except (OSError, ValueError, KeyError, TypeError, ArtifactError) as e:
        return WorkerResult(False, 0.0, f"cannot read the artifact's manifest: {type(e).__name__}: {e}")
    start = time.monotonic()
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.worker-", dir=out_path.parent))
    except OSError as e:
        return WorkerResult(False, 0.0, f"cannot create the compile worker's scratch directory: {e}")
    request = {
        "module": str(Path(artifact_dir).resolve() / "module.json"),
        "module_sha256": module_sha,
        "tuning": str(Path(artifact_dir).resolve() / TUNING_FILE) if tuned else None,
        "tuning_sha256": tuning_sha,
        "requires": manifest.target.requires,
        "target": target,
        "bind": {str(k): int(v) for k, v in bind.items()},
        "out": str(out_path.resolve()),
        "scratch": str(scratch.resolve()),
        "parent_pid": os.getpid(),
        "limits": {
            "memory_mb": memory_mb,
            # backstop for a worker whose parent is stopped; the wall-clock kill comes first
            "cpu_s": math.ceil(timeout_s) + 5,
            "nice": nice,
        },
    }
    env = dict(os.environ, TMPDIR=str(scratch), TVM_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop(RUNTIME_LIB_ENV, None)  # the worker compiles: the full TVM, whatever this process loaded
    root = str(Path(__file__).resolve().parents[2])  # so the worker imports this same edge package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    timed_out = False
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edge.jit.worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=env, cwd=scratch, start_new_session=True, close_fds=True,
            )
        except OSError as e:
            return WorkerResult(False, time.monotonic() - start, f"cannot start the compile worker: {e}")
        if running is not None:
            running.add(proc)
        try:
            output, _ = proc.communicate(json.dumps(request).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            output = _collect(proc)
        except BaseException:  # interrupted while waiting: never leave a compiler running
            _kill_group(proc)
            _collect(proc)
            raise
    finally:
        if running is not None:
            running.discard(locals().get("proc"))
        shutil.rmtree(scratch, ignore_errors=True)
    duration = time.monotonic() - start
    text = output.decode("utf-8", "replace") if output else ""
    return _result(proc.returncode, text, duration, timed_out, timeout_s, memory_mb, out_path)


def _manifest_of(artifact) -> tuple[Manifest, Path]:
    manifest = getattr(artifact, "manifest", None)
    if manifest is not None:
        return manifest, Path(artifact.path)
    artifact_dir = Path(artifact)
    return Manifest.from_json(json.loads((artifact_dir / MANIFEST).read_bytes())), artifact_dir


def abandon(running: set) -> None:
    """Kill the compile workers in `running` (their callers get a failed WorkerResult)."""
    for proc in list(running):
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    # The worker is not reaped yet, so its process group id cannot have been reused.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _collect(proc: subprocess.Popen) -> bytes:
    try:
        output, _ = proc.communicate(timeout=10)
        return output or b""
    except subprocess.TimeoutExpired:  # something outside the group holds the pipe open
        proc.kill()
        proc.wait()
        return b""


def _result(rc, text, duration, timed_out, timeout_s, memory_mb, out_path: Path) -> WorkerResult:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    tail = "\n".join("  | " + ln for ln in lines[-TAIL_LINES:])
    reported = next((ln[len(ERROR_PREFIX):] for ln in reversed(lines) if ln.startswith(ERROR_PREFIX)), None)
    killed_by = None
    if rc == 0 and not timed_out:
        if out_path.is_file():
            return WorkerResult(True, duration, returncode=0)
        summary = f"compile worker exited cleanly but wrote no library at {out_path}"
    elif timed_out:
        killed_by, summary = "timeout", f"compile timed out after {timeout_s:g} s; worker killed"
    elif rc == -signal.SIGXCPU:
        killed_by, summary = "timeout", "compile worker exceeded its CPU time limit"
    elif rc == EXIT_MEMORY or (rc != 0 and any(m in text for m in _MEMORY_MARKERS)):
        limit = f" (limit {memory_mb} MB)" if memory_mb else ""
        killed_by, summary = "memory", f"compile worker ran out of memory{limit}"
    elif rc < 0:
        sig = -rc
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = "unknown signal"
        killed_by, summary = f"signal {sig}", f"compile worker died from signal {sig} ({name})"
    else:
        summary = f"compile failed: {reported}" if reported else f"compile worker exited with status {rc}"
    return WorkerResult(False, duration, summary + ("\n" + tail if tail else ""), killed_by, rc)


# -- worker side -----------------------------------------------------------------------------
def _apply_limits(limits: dict, parent_pid: int) -> None:
    import resource

    _die_with_parent(parent_pid)
    if limits.get("memory_mb"):
        size = int(limits["memory_mb"]) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    if limits.get("cpu_s"):
        soft = int(limits["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 5))  # SIGXCPU, then SIGKILL
    if limits.get("nice"):
        os.nice(int(limits["nice"]))
        # and below every normal process: the compile only gets CPU time serving does not want
        if hasattr(os, "SCHED_IDLE"):
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except OSError:
                pass
    os.umask(0o077)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this worker when the serving process dies (best effort elsewhere).
    Strictly: when the thread that started it exits, which is after compile_in_worker returns."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(EXIT_ERROR)


def _test_fault(fault: str | None, stage: str):
    """Test-only misbehaviour, selected by EDGEJIT_WORKER_TEST_FAULT (see the module docstring)."""
    if fault == "hang" and stage == "start":  # a child first, so the test can see the group killed
        child = subprocess.Popen(["sleep", "600"])
        print(f"test fault: will hang, child pid {child.pid}", flush=True)
    if fault == "hang" and stage == "build":
        while True:
            time.sleep(1)
    if fault == "oom" and stage == "build":
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            raise RuntimeError("test fault 'oom' needs a memory limit")
        bytearray(limit)  # more than is left under the limit: fails at once, touches nothing
    if fault == "sigkill" and stage == "build":
        import tvm

        @tvm.instrument.pass_instrument
        class KillMidCompile:
            def __init__(self):
                self.passes = 0

            def run_before_pass(self, mod, info):
                self.passes += 1
                if self.passes == 20:
                    print(f"test fault: SIGKILL before pass {info.name}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)

        return tvm.transform.PassContext(instruments=[KillMidCompile()])
    return None


def _verified(path: str, expected: str | None) -> bytes:
    data = Path(path).read_bytes()
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise RuntimeError(f"{path} does not match the manifest's checksum (changed since the artifact was verified)")
    return data


def _compile(request: dict, fault: str | None) -> None:
    import contextlib

    data = _verified(request["module"], request.get("module_sha256"))

    import tvm

    from edge.runtime import pipeline as edge_build

    mod = tvm.ir.load_json(data.decode("utf-8"))
    target = request["target"]
    records = None
    if request.get("tuning"):
        from edge.runtime.tuning_records import TuningRecords

        records = TuningRecords(json.loads(_verified(request["tuning"], request.get("tuning_sha256"))), request["tuning"])
        records.check(target, request.get("requires", []))
    ctx = _test_fault(fault, "build") or contextlib.nullcontext()
    with ctx:
        executable = edge_build.build(mod, target, bind=request["bind"], tuning=records)
    tmp = Path(request["scratch"]) / "variant.so"
    edge_build.export(executable, tmp, target)
    os.chmod(tmp, 0o600)
    os.replace(tmp, request["out"])  # the scratch dir is created next to out: same filesystem


def main() -> int:
    try:
        request = json.loads(sys.stdin.buffer.read())
        limits, parent_pid = request["limits"], int(request["parent_pid"])
    except (ValueError, KeyError, TypeError) as e:
        print(f"{ERROR_PREFIX}bad request: {e}", flush=True)
        return EXIT_BAD_REQUEST
    try:
        _apply_limits(limits, parent_pid)
    except (OSError, ValueError) as e:
        print(f"{ERROR_PREFIX}cannot apply the limits {limits}: {e}", flush=True)
        return EXIT_BAD_REQUEST
    # tvm_ffi imports torch whenever it is installed (a build host): gigabytes of address space
    # the compiler does not need, and that can fail to load under the memory limit.
    sys.modules.setdefault("torch", None)
    fault = os.environ.get(TEST_FAULT_ENV)
    _test_fault(fault, "start")
    try:
        _compile(request, fault)
    except MemoryError:
        print(f"{ERROR_PREFIX}out of memory (MemoryError)", flush=True)
        return EXIT_MEMORY
    except Exception as e:
        import traceback

        traceback.print_exc(file=sys.stdout)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{ERROR_PREFIX}{type(e).__name__}: {first}", flush=True)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
