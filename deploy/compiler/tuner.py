"""`edgejit compile --tune TRIALS`: MetaSchedule on the host, one static shape per sequence length.

For each length L (batch and any other symbolic dim bound to 1) the module is lowered exactly as
the device JIT lowers a variant (edge.kernels.lower), and every PrimFunc is timed with the
default schedule. The ones that matter (at least MIN_SHARE of the model's kernel time) and that a
search can improve are tuned: the register-tiled dense kernel runs near the core's peak and is
left alone, and integer-input functions (gathers, masks) are skipped. After the search, each
function's best schedule is timed against the default one by the same harness and kept only if
it is faster (KEEP_BELOW). Finally the tuned variant is built and checked against the untuned
one. Records go to the artifact's tuning.json (edge/runtime/tuning_records.py) and are applied by every later
build of the same shape for the same target: the host's check and the device's JIT variants.

The search state lives in a MetaSchedule JSON database per length under the tuning directory
(default: the user cache, keyed by module, target and versions). Interrupting keeps it; running
the same command again counts the trials already measured and continues from the best ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.runtime import pipeline as edge_build
from edge import machine
from edge.runtime import tuning_records as tuning
from edge.artifact.reader import tvm_versions
from edge.errors import EdgeJitError
from edge.files import write_atomic
from edge.kernels import dense
from edge.kernels.rules import is_scheduled, schedule_func

from edge.runtime.samples import sample_inputs

DEFAULT_LENGTHS = (16, 32, 64, 128, 256)
MIN_SHARE = 0.02
MIN_TRIALS_PER_TASK = 8  # fewer trials per function than this find nothing: tune fewer functions
KEEP_BELOW = 0.95
TRIALS_PER_ITER = 16
BUILD_TIMEOUT_S = 120  # MetaSchedule's 30 s is too short for a large function on a busy 2-core host
CHECK_TOLERANCE = 1e-4  # tuned vs untuned variant, relative to the output's scale


@dataclass
class Task:
    name: str
    func: object  # tirx.PrimFunc
    calls: int
    default_ms: float
    tunable: str = ""  # why not, when not
    tuned_ms: float | None = None
    kept: bool = False

    @property
    def share_ms(self) -> float:
        return self.default_ms * self.calls


def default_dir(mod_json: str, target: dict) -> Path:
    from edge.jit.cache import default_cache_dir

    key = hashlib.sha256(json.dumps({
        "module": hashlib.sha256(mod_json.encode()).hexdigest(),
        "target": tuning.canonical_target(target),
        "tvm": tvm_versions(),
        "pipeline": edge_build.PIPELINE_VERSION,
    }, sort_keys=True).encode()).hexdigest()[:16]
    return default_cache_dir().parent / "tuning" / key


def parse_lengths(text: str | None, max_seq: int) -> list[int]:
    if text is None:
        return [n for n in DEFAULT_LENGTHS if n <= max_seq] or [max_seq]
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise EdgeJitError(f"--tune-lengths wants comma-separated integers, got '{text}'") from None
    bad = [n for n in lengths if not 1 <= n <= max_seq]
    if not lengths or bad:
        raise EdgeJitError(f"--tune-lengths must be between 1 and --max-seq {max_seq}, got '{text}'")
    return lengths


def preflight(preset, trials: int) -> None:
    """What can be refused before the long compile."""
    _check_extras()
    if not preset.runs_here():
        raise EdgeJitError(f"--tune measures candidates on this machine, and target {preset.name} does not run here: "
                           "tune on a machine of the target's kind")
    if trials < 1:
        raise EdgeJitError("--tune wants a positive number of trials per length")


def tune(mod, params, preset, *, dims: list[str], seq_dim: str, lengths: list[int], trials: int,
         work_dir: Path, inputs, log=print) -> dict:
    """Tune `mod` (host-prepared Relax module, params as inputs) for `preset` at `lengths`;
    returns the tuning.json document."""
    import tvm
    from tvm import relax

    from edge import kernels
    from edge.runtime.module import set_threads

    preflight(preset, trials)
    threads = machine.cores()
    set_threads(threads)  # the measuring subprocesses inherit the pool size
    target = tvm.target.Target(preset.target)
    ms_target = tvm.target.Target(dict(preset.target, **{"num-cores": threads}))
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        (work_dir / ".writable").touch()
    except OSError as e:
        raise EdgeJitError(f"cannot keep the search state in {work_dir}: {e.strerror or e} (choose another --tune-dir)") from None
    log(f"tuning {len(lengths)} lengths x {trials} trials for {preset.name} (search state: {work_dir}; "
        "interrupt at any time, the same command resumes)")
    doc = {
        "format": tuning.FORMAT,
        "target": json.loads(json.dumps(preset.target)),
        "requires": preset.requires,
        "tuned_on": {"cpu": machine.cpu_model(), "threads": threads},
        "tvm": tvm_versions(),
        "pipeline": edge_build.PIPELINE_VERSION,
        "seq_dim": seq_dim,
        "dims": dims,
        "lengths": {},
        "records": [],
    }
    for length in lengths:
        bind = tuning.static_bind(dims, seq_dim, length)
        static = relax.transform.BindSymbolicVars(bind)(mod)
        lowered = kernels.lower(static, target)
        tasks = _tasks(lowered, target)
        candidates = [t for t in tasks if not t.tunable]
        chosen = candidates[: max(1, trials // MIN_TRIALS_PER_TASK)]
        for t in candidates[len(chosen):]:
            t.tunable = "not among the largest (more trials would include it)"
        total = sum(t.share_ms for t in tasks)
        log(f"{seq_dim}={length}: {len(tasks)} kernels, {total:.2f} ms with default schedules; tuning "
            + (", ".join(f"{t.name} ({100 * t.share_ms / total:.0f}%)" for t in chosen) or "none"))
        entries = []
        if chosen:
            db = _search(chosen, ms_target, work_dir / f"{seq_dim}-{length}", trials, log=log, label=f"{seq_dim}={length}")
            entries = _keep_winners(chosen, db, target, log)
        doc["records"].extend({"length": length, **e} for e in entries)
        doc["lengths"][str(length)] = {
            "bind": bind,
            "kernels_ms_default": round(total, 4),
            "tasks": [{"name": t.name, "calls": t.calls, "default_ms": round(t.default_ms, 5),
                       "tuned_ms": None if t.tuned_ms is None else round(t.tuned_ms, 5), "kept": t.kept,
                       **({"skipped": t.tunable} if t.tunable else {})} for t in tasks],
        }
    records = tuning.TuningRecords(doc)
    for length in lengths:
        doc["lengths"][str(length)]["check"] = _check_variant(mod, params, preset, records, length, inputs, log)
    return doc


def _check_extras() -> None:
    missing = []
    for name in ("xgboost", "psutil", "cloudpickle", "tqdm"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise EdgeJitError(f"--tune needs {', '.join(missing)} (MetaSchedule's extras and the progress bar): pip install 'edgejit[host]'")


# -- tasks ----------------------------------------------------------------------------------
def _tasks(lowered, target) -> list[Task]:
    from tvm import relax, tirx
    from tvm.ir import Op

    calls: dict[str, int] = {}
    call_tir = Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir):
            calls[e.args[0].name_hint] = calls.get(e.args[0].name_hint, 0) + 1

    for _, func in lowered.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    tasks = []
    for gv, func in lowered.functions_items():
        if not isinstance(func, tirx.PrimFunc) or gv.name_hint not in calls:
            continue
        why = _not_tunable(func)
        default = func if is_scheduled(func) else _scheduled_or_self(func, target, gv.name_hint)
        try:
            default_ms = measure(default, target)
        except Exception as e:  # some functions only compile inside their module (e.g. bool masks)
            if not why:
                why = f"cannot be measured alone ({type(e).__name__})"
            default_ms = 0.0
        tasks.append(Task(gv.name_hint, func, calls[gv.name_hint], default_ms, why))
    total = sum(t.share_ms for t in tasks) or 1.0
    for t in tasks:
        if not t.tunable and t.share_ms < MIN_SHARE * total:
            t.tunable = f"under {100 * MIN_SHARE:.0f}% of the time"
    tasks.sort(key=lambda t: -t.share_ms)
    return tasks


def _not_tunable(func) -> str:
    from tvm.s_tir import meta_schedule as ms

    if is_scheduled(func):
        return "hand-scheduled kernel"
    if dense.BLOCK_NAME in str(func):
        return "dense kernel (near peak with its default schedule)"
    try:
        infos = ms.arg_info.ArgInfo.from_prim_func(func)
    except (TypeError, ValueError):  # it wants static shapes (and no scalar shape arguments)
        return "symbolic shape"
    if not all(str(info.dtype).startswith("float") for info in infos):
        return "integer inputs"
    return ""


def _scheduled_or_self(func, target, name):
    sch = schedule_func(func, target, name)
    return sch.mod["main"] if sch is not None else func


def measure(func, target) -> float:
    """Milliseconds per call of a PrimFunc on this machine (random inputs, best of 5)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    lib = tvm.compile(tuning.workload_mod(func), target=target)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = []
    for info in ms.arg_info.ArgInfo.from_prim_func(func):
        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
        if dtype.startswith("float"):
            a = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype == "bool":
            a = np.ones(shape, bool)
        else:
            a = np.zeros(shape, dtype)
        args.append(tvm.runtime.tensor(a, dev))
    timer = lib.mod.time_evaluator("main", dev, number=1, repeat=5, min_repeat_ms=30)
    return min(timer(*args).results) * 1e3


# -- search ---------------------------------------------------------------------------------
def _search(tasks: list[Task], ms_target, work_dir: Path, trials: int, *, log, label: str):
    from tvm.s_tir import meta_schedule as ms

    work_dir.mkdir(parents=True, exist_ok=True)
    _repair_state(work_dir, log)
    db = ms.database.JSONDatabase(work_dir=str(work_dir))
    # trials already measured for these functions (a resumed search, or another run's selection)
    workloads = [db.commit_workload(tuning.workload_mod(t.func)) for t in tasks]
    done = sum(1 for r in db.get_all_tuning_records() if any(r.workload.same_as(w) for w in workloads))
    remaining = trials - done
    if remaining <= 0:
        log(f"{label}: {done} trials already measured ({work_dir}): nothing left to search")
        return db
    if done:
        log(f"{label}: resuming, {done} of {trials} trials already measured")
    contexts = [
        ms.TuneContext(
            mod=tuning.workload_mod(t.func), target=ms_target, space_generator="post-order-apply",
            search_strategy="evolutionary", task_name=t.name, num_threads="physical",
            logger=_quiet_logger(work_dir, t.name), rand_state=i + done,
        ).clone()
        for i, t in enumerate(tasks)
    ]
    stop = _StopFlag(label)
    progress = _progress_callback(tasks, done, trials, label, stop)
    builder = ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S)
    with stop, _workers_without_torch(work_dir):
        try:
            ms.tune_tasks(
                tasks=contexts, task_weights=[float(t.share_ms) for t in tasks], work_dir=str(work_dir),
                # small batches while the budget is small, so that every function gets candidates
                max_trials_global=remaining, num_trials_per_iter=max(2, min(TRIALS_PER_ITER, remaining // len(tasks))),
                builder=builder, database=db, cost_model="xgb", task_scheduler="gradient",
                measure_callbacks=list(ms.measure_callback.MeasureCallback.create("default")) + [progress],
            )
        except Exception:
            if not stop.requested:
                raise
        finally:
            progress.finish()
    if stop.requested:
        log(f"{label}: interrupted; the {len(db)} trials measured are kept in {work_dir}: run the same command to resume")
        raise KeyboardInterrupt
    return db


def _repair_state(work_dir: Path, log) -> None:
    """A process killed while appending can leave the last line of the search state cut short,
    and MetaSchedule then refuses the whole file: drop that line (only that one)."""
    for name in ("database_workload.json", "database_tuning_record.json"):
        path = work_dir / name
        if not path.exists():
            continue
        lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
        for i, line in enumerate(lines):
            try:
                json.loads(line)
            except ValueError:
                if i != len(lines) - 1:
                    raise EdgeJitError(f"the search state {path} is damaged at line {i + 1}: delete {work_dir} to start over") from None
                log(f"dropping the cut-short last line of {path} (a killed search)")
                write_atomic(path, b"".join(x + b"\n" for x in lines[:-1]))


class _StopFlag:
    """Ctrl-C during the search asks it to stop after the batch being measured (its records are
    then committed); a second Ctrl-C stops at once. MetaSchedule runs in C++ with Python
    callbacks: an exception raised by a signal handler at an arbitrary point there can abort the
    process, so the first Ctrl-C only sets this flag and the progress callback raises."""

    def __init__(self, label):
        self.requested = False
        self.label = label
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _on_sigint(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"\n{self.label}: stopping after the candidates being measured (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _workers_without_torch(work_dir: Path):
    """MetaSchedule builds and runs candidates in fresh Python processes that import tvm, and
    tvm_ffi imports torch whenever it is installed (a build host often has it): seconds per
    process for nothing, enough to hit the build timeout on a busy machine. Those processes get a
    `torch` that cannot be imported."""
    stub = work_dir / ".no-torch"
    stub.mkdir(exist_ok=True)
    (stub / "torch.py").write_text('raise ImportError("torch is not used by edgejit\'s tuning workers")\n')
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(stub), old) if p)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _quiet_logger(work_dir: Path, name: str) -> logging.Logger:
    """MetaSchedule's per-task log goes to a file in the search directory, not the terminal."""
    logger = logging.getLogger(f"edgejit.tune.{work_dir.name}.{name}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        logger.addHandler(logging.FileHandler(work_dir / "search.log"))
    return logger


def _progress_callback(tasks: list[Task], done: int, trials: int, label: str, stop: _StopFlag):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    from deploy.tools.progress import Progress as Bar

    @derived_object
    class Progress(ms.measure_callback.PyMeasureCallback):
        def __init__(self):
            self.done = done
            self.best = [None] * len(tasks)
            self.start = time.monotonic()
            self.bar = Bar(trials, label, unit="trial", initial=done)

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if runner_results:  # empty when the search found no new candidate this round
                self._show(task_id, runner_results)
            if stop.requested:  # this batch's records are committed by now (AddToDatabase runs first)
                raise _Stop()

        def _show(self, task_id, runner_results):
            self.done += len(runner_results)
            for r in runner_results:
                if r.run_secs:
                    t = float(np.median([float(s) for s in r.run_secs])) * 1e3
                    if self.best[task_id] is None or t < self.best[task_id]:
                        self.best[task_id] = t
            task = tasks[task_id]
            best = self.best[task_id]
            status = (f"{task.name} best {best:.4f} ms (default {task.default_ms:.4f})" if best is not None else
                      f"{task.name}: no valid candidate yet")
            rate = (time.monotonic() - self.start) / max(1, self.done - done)
            line = (f"{label}: {min(self.done, trials)}/{trials} trials, ~{rate * max(0, trials - self.done):.0f} s left; {status}"
                    if best is not None else f"{label}: {min(self.done, trials)}/{trials} trials; {status}")
            self.bar.update(len(runner_results), status, line)

        def finish(self):
            self.bar.close()

    return Progress()


def _keep_winners(tasks: list[Task], db, target, log) -> list[dict]:
    entries = []
    for t in tasks:
        wmod = tuning.workload_mod(t.func)
        workload = db.commit_workload(wmod)  # already there (_search commits every task's)
        top = db.get_top_k(workload, 1)
        if not top:
            log(f"  {t.name}: no valid candidate; default schedule kept")
            continue
        sch = db.query_schedule(wmod, target, "main")
        t.tuned_ms = measure(sch.mod["main"], target)
        t.kept = t.tuned_ms < KEEP_BELOW * t.default_ms
        log(f"  {t.name}: default {t.default_ms:.4f} ms, tuned {t.tuned_ms:.4f} ms -> "
            + ("tuned kept" if t.kept else "default kept"))
        if t.kept:
            entries.append({"name": t.name, "workload": workload.as_json(), "record": top[0].as_json()})
    return entries


def _check_variant(mod, params, preset, records, length: int, inputs, log) -> dict:
    """Build the variant with and without the records; they must agree. Returns the numbers."""
    from edge.runtime.module import CompiledModule

    import tvm

    bind = records.bind(length)
    tensors = [tvm.runtime.tensor(p) for p in params]
    out = {}
    runs = {}
    for kind, recs in (("default", None), ("tuned", records)):
        t0 = time.perf_counter()
        ex = edge_build.build(mod, preset.target, bind=bind, tuning=recs)
        out[f"build_s_{kind}"] = round(time.perf_counter() - t0, 2)
        runs[kind] = CompiledModule(ex, tensors, kind="variant", bind=bind)
    x = sample_inputs(inputs, bind, seed=length)
    arrays = [x[s.name] for s in inputs]
    ref = runs["default"](arrays)
    got = runs["tuned"](arrays)
    worst = max(float(np.abs(r.astype(np.float64) - g).max()) / max(1.0, float(np.abs(r).max())) for r, g in zip(ref, got))
    if worst > CHECK_TOLERANCE:
        raise EdgeJitError(f"the tuned variant at {records.seq_dim}={length} differs from the untuned one by {worst:.2e} "
                           "(relative): a bad schedule; nothing written")
    for kind in ("default", "tuned"):
        out[f"ms_{kind}"] = round(_latency(runs[kind], arrays), 4)
    out["max_rel_diff"] = worst
    log(f"{records.seq_dim}={length}: variant {out['ms_default']:.2f} ms untuned -> {out['ms_tuned']:.2f} ms tuned "
        f"(outputs agree to {worst:.1e})")
    return out


def _latency(module, arrays, rounds: int = 20) -> float:
    module(arrays)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        module(arrays)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3
