"""The fleet report: devices online/offline/silent, merged latency percentiles per model and length
bucket (fleet-wide and per device), text generation per model (time to first token, inter-token
latency, decode tokens/s, queue, running sequences, KV memory, prefix-cache hit rate), JIT hit
rate and compile times, and latency regressions of each device against its own history. Built as a dict (exported as JSON) and rendered as text.

Percentiles always come from merged DDSketches, never from averaging percentiles.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

from edge.files import write_atomic
from edge.telemetry import sketch

from deploy.fleet.coordinator.store import Store

QS = (0.5, 0.95, 0.99)


def bucket(seq_len: int) -> tuple[int, int]:
    """Power-of-two length buckets: 1, 2, 3-4, 5-8, 9-16, ... ((0, 0) = unknown length)."""
    if seq_len <= 0:
        return (0, 0)
    hi = 1 << (seq_len - 1).bit_length()
    return (hi // 2 + 1 if hi > 1 else 1, hi)


def bucket_label(b: tuple[int, int]) -> str:
    return "?" if b == (0, 0) else (str(b[1]) if b[0] == b[1] else f"{b[0]}-{b[1]}")


def _summary(sk, count: int) -> dict:
    p50, p95, p99 = sketch.quantiles(sk, QS)
    return {"count": count, "p50_ms": p50, "p95_ms": p95, "p99_ms": p99}


def build(store: Store, *, regress_threshold: float = 0.25, min_count: int = 20, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    db = store.db
    devices = []
    for (fleet, device, birth_session, birth, death_session, death_clean, first_seen, last_seen,
         d_size, d_age, d_refused) in db.execute(
        "SELECT fleet, device, birth_session, birth, death_session, death_clean, first_seen, last_seen, "
        "spool_dropped_size, spool_dropped_age, spool_dropped_refused FROM devices ORDER BY fleet, device"
    ):
        b = json.loads(birth) if birth else {}
        if birth_session is None:
            state = "unknown"
        elif death_session is not None and death_session >= birth_session:
            state = "offline"
        else:
            state = "online"
            window_s = b.get("window_s") or 10.0
            if now - last_seen > 3 * window_s + 5:  # no heartbeat window for a while, and no Will either
                state = "silent"
        devices.append({
            "fleet": fleet, "device": device, "state": state, "session": birth_session,
            "last_seen": last_seen, "last_seen_ago_s": round(now - last_seen, 3), "first_seen": first_seen,
            "clean_shutdown": None if state != "offline" else bool(death_clean),
            "arch": b.get("host", {}).get("arch"), "versions": b.get("versions", {}),
            "models": [m["name"] for m in b.get("models", [])],
            "spool_dropped": {"size": d_size, "age": d_age, "refused": d_refused},
            "missing_windows": 0,
        })
    by_dev = {(d["fleet"], d["device"]): d for d in devices}
    for fleet, device, count, top, pruned in db.execute(
        "SELECT m.fleet, m.device, COUNT(*), MAX(m.seq), COALESCE(MAX(p.n), 0) FROM messages m LEFT JOIN pruned p "
        "ON p.fleet = m.fleet AND p.device = m.device AND p.session = m.session GROUP BY m.fleet, m.device, m.session"
    ):
        if (fleet, device) in by_dev:
            by_dev[(fleet, device)]["missing_windows"] += top + 1 - count - pruned

    # rollups -> per model/bucket: fleet sketch, per-device sketches, per-kind counts, per-period
    fleet_sk = defaultdict(sketch.new)
    fleet_n = defaultdict(int)
    kinds = defaultdict(lambda: defaultdict(int))
    dev_sk = defaultdict(sketch.new)
    dev_n = defaultdict(int)
    periods = defaultdict(lambda: defaultdict(sketch.new))
    for device, model, seq_len, kind, period, count, sk_text in db.execute(
        "SELECT device, model, seq_len, kind, period, count, sketch FROM rollups"
    ):
        sk = sketch.decode(sk_text)
        key = (model, bucket(seq_len))
        fleet_sk[key].merge(sk)
        fleet_n[key] += count
        kinds[key][kind] += count
        dev_sk[key + (device,)].merge(sk)
        dev_n[key + (device,)] += count
        periods[key + (device,)][period].merge(sk)

    models: dict[str, dict] = {}
    for (model, b) in sorted(fleet_sk):
        entry = models.setdefault(model, {"buckets": [], "jit": None})
        key = (model, b)
        entry["buckets"].append({
            "bucket": bucket_label(b), "lo": b[0], "hi": b[1], **_summary(fleet_sk[key], fleet_n[key]),
            "kinds": dict(kinds[key]),
            "devices": {d: _summary(dev_sk[k], dev_n[k]) for k in sorted(dev_sk) if k[:2] == key for d in [k[2]]},
        })

    regressions = []
    for (model, b, device), per in sorted(periods.items()):
        if len(per) < 2:
            continue
        latest = max(per)
        recent = per[latest]
        history = sketch.merged(s for p, s in per.items() if p != latest)
        if recent.count < min_count or history.count < min_count:
            continue
        r50, h50 = recent.get_quantile_value(0.5), history.get_quantile_value(0.5)
        if h50 and r50 > h50 * (1 + regress_threshold):
            regressions.append({
                "device": device, "model": model, "bucket": bucket_label(b),
                "recent_p50_ms": r50, "history_p50_ms": h50, "ratio": r50 / h50,
                "recent_p95_ms": recent.get_quantile_value(0.95), "history_p95_ms": history.get_quantile_value(0.95),
                "recent_count": int(recent.count), "history_count": int(history.count), "period": latest,
            })

    for model, stats in _jit(db).items():
        models.setdefault(model, {"buckets": [], "jit": None})["jit"] = stats
    for model, gen in _generation(db).items():
        models.setdefault(model, {"buckets": [], "jit": None})["generation"] = gen

    return {
        "generated": now,
        "rollup_s": store.rollup_s,
        "devices": devices,
        "online": sum(d["state"] == "online" for d in devices),
        "offline": sum(d["state"] == "offline" for d in devices),
        "silent": sum(d["state"] == "silent" for d in devices),
        "models": models,
        "regressions": regressions,
        "counters": store.counters(),
        "regress_threshold": regress_threshold,
    }


def _jit(db) -> dict:
    out = {}
    counts = defaultdict(lambda: defaultdict(int))
    for model, event, n in db.execute("SELECT model, event, COUNT(*) FROM jit_events GROUP BY model, event"):
        counts[model][event] = n
    durations = defaultdict(list)
    for model, d in db.execute(
        "SELECT model, duration_s FROM jit_events WHERE event='compile_finished' AND duration_s IS NOT NULL ORDER BY duration_s"
    ):
        durations[model].append(d)
    for model, c in counts.items():
        events = dict(c)
        lookups = c["cache_hit"] + c["cache_miss"]
        ds = durations[model]
        out[model] = {
            "events": events,
            "hit_rate": c["cache_hit"] / lookups if lookups else None,
            "compiles": len(ds),
            "compile_failed": c["compile_failed"],
            "compile_p50_s": ds[len(ds) // 2] if ds else None,
            "compile_max_s": ds[-1] if ds else None,
        }
    return out


GEN_METRICS = ("ttft_ms", "itl_ms", "tok_s", "queued", "running", "kv_bytes")


def _dist(sk, count: int, total: float, hi: float) -> dict:
    p50, p95, p99 = sketch.quantiles(sk, QS)
    return {"count": count, "mean": total / count if count else None, "p50": p50, "p95": p95, "p99": p99, "max": hi}


def _generation(db) -> dict:
    """Per text-generation model: merged distributions (fleet and per device) and summed counts."""
    sks = defaultdict(sketch.new)
    agg = defaultdict(lambda: [0, 0.0, 0.0])  # count, sum, max
    for device, model, metric, count, total, hi, sk_text in db.execute(
        "SELECT device, model, metric, count, sum, max, sketch FROM gen_rollups"
    ):
        sk = sketch.decode(sk_text)
        for key in ((model, metric, None), (model, metric, device)):
            sks[key].merge(sk)
            a = agg[key]
            a[0] += count
            a[1] += total
            a[2] = max(a[2], hi)
    counts = defaultdict(lambda: defaultdict(int))
    for device, model, name, value in db.execute("SELECT device, model, name, SUM(value) FROM gen_counts GROUP BY device, model, name"):
        counts[(model, None)][name] += value
        counts[(model, device)][name] += value

    def entry(model, device) -> dict:
        c = counts.get((model, device), {})
        lookups = c.get("prefix_lookups")
        out = {
            "requests": c.get("requests", 0), "prompt_tokens": c.get("prompt_tokens", 0),
            "completion_tokens": c.get("completion_tokens", 0),
            "finish": {k.removeprefix("finish_"): v for k, v in sorted(c.items()) if k.startswith("finish_")},
            "prefix_hits": c.get("prefix_hits"), "prefix_lookups": lookups,
            "prefix_hit_rate": c.get("prefix_hits", 0) / lookups if lookups else None,
        }
        for metric in GEN_METRICS:
            key = (model, metric, device)
            out[metric] = _dist(sks[key], *agg[key]) if key in sks else None
        return out

    out = {}
    for model in sorted({m for m, _ in counts} | {k[0] for k in sks}):
        devices = sorted({d for m, d in counts if m == model and d} | {k[2] for k in sks if k[0] == model and k[2]})
        out[model] = {**entry(model, None), "devices": {d: entry(model, d) for d in devices}}
    return out


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    return (f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}") + unit


def _render_generation(g: dict, per_device: bool) -> list[str]:
    lines = [f"  generation: {g['requests']} requests, {g['prompt_tokens']} prompt + {g['completion_tokens']} completion tokens"
             + (f" (finish: {', '.join(f'{k} {v}' for k, v in g['finish'].items())})" if g["finish"] else "")]
    rows = [("time to first token", "ttft_ms", " ms"), ("inter-token latency", "itl_ms", " ms"),
            ("decode tokens/s", "tok_s", ""), ("requests queued", "queued", ""), ("sequences running", "running", "")]
    lines.append(f"    {'':<22} {'n':>6} {'p50':>9} {'p95':>9} {'p99':>9} {'max':>9}")
    for label, key, unit in rows:
        d = g[key]
        if d is not None:
            lines.append(f"    {label:<22} {d['count']:>6} {_fmt(d['p50'], unit):>9} {_fmt(d['p95'], unit):>9} "
                         f"{_fmt(d['p99'], unit):>9} {_fmt(d['max'], unit):>9}")
    kv = g["kv_bytes"]
    if kv is not None:
        lines.append(f"    {'KV cache in use':<22} {kv['count']:>6} {_fmt(kv['p50'] / 2**20, ' MiB'):>9} "
                     f"{_fmt(kv['p95'] / 2**20, ' MiB'):>9} {_fmt(kv['p99'] / 2**20, ' MiB'):>9} {_fmt(kv['max'] / 2**20, ' MiB'):>9}")
    if g["prefix_lookups"] is not None:
        rate = "-" if g["prefix_hit_rate"] is None else f"{100 * g['prefix_hit_rate']:.0f}%"
        lines.append(f"    prefix cache: hit rate {rate} ({g['prefix_hits']} of {g['prefix_lookups']} lookups)")
    if per_device and len(g["devices"]) > 1:
        lines.append(f"    {'DEVICE':<18} {'REQUESTS':>8} {'TTFT p50':>10} {'TTFT p99':>10} {'tok/s p50':>10} {'tok/s p99':>10}")
        for dev, d in g["devices"].items():
            t, r = d["ttft_ms"] or {}, d["tok_s"] or {}
            lines.append(f"    {dev:<18} {d['requests']:>8} {_fmt(t.get('p50'), ' ms'):>10} {_fmt(t.get('p99'), ' ms'):>10} "
                         f"{_fmt(r.get('p50')):>10} {_fmt(r.get('p99')):>10}")
    return lines


def _ms(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if v < 100 else f"{v:.0f}")


def render(rep: dict, *, per_device: bool = True) -> str:
    lines = []
    c = rep["counters"]
    rejected = {k.removeprefix("rejected_"): v for k, v in c.items() if k.startswith("rejected_")}
    lines.append(
        f"fleet: {len(rep['devices'])} devices ({rep['online']} online, {rep['offline']} offline"
        + (f", {rep['silent']} silent" if rep["silent"] else "") + "); "
        f"{c.get('stored_metrics', 0)} metrics + {c.get('stored_jit', 0)} jit windows stored, "
        f"{c.get('duplicates', 0)} duplicates dropped, "
        f"{sum(rejected.values())} rejected" + (f" ({', '.join(f'{k} {v}' for k, v in sorted(rejected.items()))})" if rejected else "")
    )
    lines.append("")
    lines.append(f"{'DEVICE':<20} {'STATE':<8} {'LAST SEEN (UTC)':<20} {'SESSION':>7} {'MISSING':>7} {'SPOOL DROPS':>11}  MODELS")
    for d in rep["devices"]:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d["last_seen"]))
        drops = sum(d["spool_dropped"].values())
        state = d["state"] + ("" if d["clean_shutdown"] is not False else "!")
        lines.append(f"{d['device']:<20} {state:<8} {seen:<20} {str(d['session'] if d['session'] is not None else '-'):>7} "
                     f"{d['missing_windows']:>7} {drops:>11}  {', '.join(d['models'])}")
    if any(d["clean_shutdown"] is False for d in rep["devices"]):
        lines.append("  (offline! = connection lost without a clean shutdown: the broker delivered its Will)")
    if any(d["state"] == "silent" for d in rep["devices"]):
        lines.append("  (silent = connected as far as the broker said, but no window for over 3 windows)")
    for model, m in sorted(rep["models"].items()):
        lines.append("")
        lines.append(f"model {model}")
        if m["buckets"]:
            lines.append(f"  {'LENGTH':<9} {'REQUESTS':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  SERVED BY")
            for b in m["buckets"]:
                served = ", ".join(f"{k} {v}" for k, v in sorted(b["kinds"].items()))
                lines.append(f"  {b['bucket']:<9} {b['count']:>9} {_ms(b['p50_ms']):>8} {_ms(b['p95_ms']):>8} {_ms(b['p99_ms']):>8}  {served}")
                if per_device and len(b["devices"]) > 1:
                    for dev, s in b["devices"].items():
                        lines.append(f"    {dev:<18} {s['count']:>6} {_ms(s['p50_ms']):>8} {_ms(s['p95_ms']):>8} {_ms(s['p99_ms']):>8}")
        if m.get("generation"):
            lines += _render_generation(m["generation"], per_device)
        j = m["jit"]
        if j:
            hit = "-" if j["hit_rate"] is None else f"{100 * j['hit_rate']:.0f}%"
            comp = "" if not j["compiles"] else f", compile p50 {j['compile_p50_s']:.2f} s, max {j['compile_max_s']:.2f} s"
            lines.append(f"  JIT: cache hit rate {hit}, {j['compiles']} compiles{comp}, {j['compile_failed']} failed, "
                         f"{j['events'].get('evicted', 0)} evicted, {j['events'].get('swapped_in', 0)} swapped in")
    lines.append("")
    if rep["regressions"]:
        lines.append(f"latency regressions (latest period p50 > history p50 by more than {100 * rep['regress_threshold']:.0f}%):")
        for r in rep["regressions"]:
            lines.append(f"  {r['device']} {r['model']} length {r['bucket']}: p50 {_ms(r['recent_p50_ms'])} ms vs "
                         f"{_ms(r['history_p50_ms'])} ms (x{r['ratio']:.2f}; n={r['recent_count']} vs {r['history_count']})")
    else:
        lines.append("latency regressions: none")
    return "\n".join(lines) + "\n"


def write_json(rep: dict, path: str | Path) -> None:
    write_text(path, json.dumps(rep, indent=1, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    write_atomic(path, text.encode(), 0o644)
