"""Prometheus text-format metrics (exposition format 0.0.4), kept in memory.

Small on purpose: counters, one latency histogram family and gauges read at scrape time. The
runtime and the JIT report through `ModelListener`, which only updates counters under a lock.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict

# Time to first token, seconds: a short prompt on a small model to a long prompt behind a queue.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Seconds: from sub-millisecond (tiny models, variants) to the generic module on a long input.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(pairs) -> str:
    if not pairs:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in pairs) + "}"


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: tuple) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            out.append(f"{name}_bucket{_labels(labels + (('le', repr(float(bound))),))} {cumulative}")
        out.append(f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {self.sum!r}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self.http = defaultdict(int)  # (model, endpoint, code) -> requests
        self.inference = defaultdict(Histogram)  # (model, kind) -> seconds in the runtime
        self.request = defaultdict(Histogram)  # model -> seconds from body read to response
        self.jit = defaultdict(int)  # (model, event) -> count
        self.reloads = defaultdict(int)  # (model, result) -> count
        self.rejected = defaultdict(int)  # reason -> count
        self.gen_tokens = defaultdict(int)  # (model, "prompt" | "completion") -> tokens
        self.gen_requests = defaultdict(int)  # (model, finish_reason) -> generation requests
        self.ttft = defaultdict(lambda: Histogram(TTFT_BUCKETS))  # model -> seconds to the first token
        self.gauges = []  # callables returning [(name, help, [(labels, value)])]

    def count_http(self, model: str, endpoint: str, code: int) -> None:
        with self._lock:
            self.http[(model, endpoint, code)] += 1

    def observe_request(self, model: str, seconds: float) -> None:
        with self._lock:
            self.request[model].observe(seconds)

    def on_request(self, model: str, seq_len, kind: str, latency_s: float) -> None:
        with self._lock:
            self.inference[(model, kind)].observe(latency_s)

    def on_jit(self, model: str, event: dict) -> None:
        with self._lock:
            self.jit[(model, str(event.get("event")))] += 1

    def count_reload(self, model: str, result: str) -> None:
        with self._lock:
            self.reloads[(model, result)] += 1

    def count_rejected(self, reason: str) -> None:
        with self._lock:
            self.rejected[reason] += 1

    def on_generation(self, model: str, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                      ttft_s: float | None) -> None:
        """One generation request ended (finish_reason: stop, length, cancelled, timeout, error)."""
        with self._lock:
            self.gen_tokens[(model, "prompt")] += prompt_tokens
            self.gen_tokens[(model, "completion")] += completion_tokens
            self.gen_requests[(model, finish_reason)] += 1
            if ttft_s is not None:
                self.ttft[model].observe(ttft_s)

    def render(self) -> str:
        lines: list[str] = []

        def family(name, kind, help_):
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")

        with self._lock:
            family("edgejit_http_requests_total", "counter", "HTTP requests by model, endpoint and status code")
            for (model, endpoint, code), n in sorted(self.http.items()):
                lines.append(f"edgejit_http_requests_total{_labels((('model', model), ('endpoint', endpoint), ('code', code)))} {n}")
            family("edgejit_rejected_total", "counter", "requests turned away before running (saturated, draining, too many connections)")
            for reason, n in sorted(self.rejected.items()):
                lines.append(f"edgejit_rejected_total{_labels((('reason', reason),))} {n}")
            family("edgejit_inference_seconds", "histogram", "time in the runtime per inference, by model and module kind (generic, variant, padded)")
            for (model, kind), h in sorted(self.inference.items()):
                lines.extend(h.lines("edgejit_inference_seconds", (("model", model), ("kind", kind))))
            family("edgejit_request_seconds", "histogram", "time per inference request including queueing and encoding")
            for model, h in sorted(self.request.items()):
                lines.extend(h.lines("edgejit_request_seconds", (("model", model),)))
            family("edgejit_jit_events_total", "counter", "JIT events (compile_started, compile_finished, compile_failed, cache_hit, swapped_in, ...)")
            for (model, event), n in sorted(self.jit.items()):
                lines.append(f"edgejit_jit_events_total{_labels((('model', model), ('event', event)))} {n}")
            family("edgejit_generation_prompt_tokens_total", "counter", "prompt tokens of finished generation requests")
            for (model, kind), n in sorted(self.gen_tokens.items()):
                if kind == "prompt":
                    lines.append(f"edgejit_generation_prompt_tokens_total{_labels((('model', model),))} {n}")
            family("edgejit_generation_completion_tokens_total", "counter", "tokens generated")
            for (model, kind), n in sorted(self.gen_tokens.items()):
                if kind == "completion":
                    lines.append(f"edgejit_generation_completion_tokens_total{_labels((('model', model),))} {n}")
            family("edgejit_generation_requests_total", "counter", "generation requests by finish reason (stop, length, cancelled, timeout, error)")
            for (model, reason), n in sorted(self.gen_requests.items()):
                lines.append(f"edgejit_generation_requests_total{_labels((('model', model), ('finish_reason', reason)))} {n}")
            family("edgejit_generation_ttft_seconds", "histogram", "time to first token (request received -> first token), by model")
            for model, h in sorted(self.ttft.items()):
                lines.extend(h.lines("edgejit_generation_ttft_seconds", (("model", model),)))
            family("edgejit_reloads_total", "counter", "artifact reloads by result (swapped, rolled_back)")
            for (model, result), n in sorted(self.reloads.items()):
                lines.append(f"edgejit_reloads_total{_labels((('model', model), ('result', result)))} {n}")
        for gauge in self.gauges:
            for name, help_, samples in gauge():
                family(name, "gauge", help_)
                for labels, value in samples:
                    lines.append(f"{name}{_labels(labels)} {value}")
        family("edgejit_uptime_seconds", "gauge", "seconds since the daemon started")
        lines.append(f"edgejit_uptime_seconds {time.time() - self.started:.3f}")
        return "\n".join(lines) + "\n"
