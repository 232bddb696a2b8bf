"""The daemon's Prometheus metrics, on `prometheus_client` (one CollectorRegistry per daemon).

Counters and histograms are updated where things happen (the runtime and the JIT report through
`ModelListener`); gauges are read at scrape time from callables the service registers.
"""

from __future__ import annotations

import time

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edge.runtime.memory import peak_rss_bytes

# The exposition format generate_latest writes (with its default escaping) is the 0.0.4 text format;
# prometheus_client >= 0.22 announces it as 1.0.0 in CONTENT_TYPE_LATEST, which older scrapers do not
# know. Say 0.0.4 (what CONTENT_TYPE_LATEST was before) so every Prometheus version accepts it.
CONTENT_TYPE = getattr(prometheus_client.exposition, "CONTENT_TYPE_PLAIN_0_0_4", CONTENT_TYPE_LATEST)

# No `<name>_created` series beside each counter and histogram: they double a scrape on a small
# device and no dashboard of ours reads them. (Process-wide, and the daemon is the only user here.)
prometheus_client.disable_created_metrics()

# Time to first token, seconds: a short prompt on a small model to a long prompt behind a queue.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
TOK_S_BUCKETS = (1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500)

# Seconds: from sub-millisecond (tiny models, variants) to the generic module on a long input.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _ScrapeGauges:
    """Gauges computed at scrape time: each callable in `gauges` returns [(name, help, [(labels, value)])],
    labels a tuple of (name, value) pairs, the same names for every sample of a family."""

    def __init__(self, gauges: list):
        self.gauges = gauges

    def collect(self):
        for gauge in self.gauges:
            for name, help_, samples in gauge():
                names = [k for k, _ in samples[0][0]] if samples else []
                family = GaugeMetricFamily(name, help_, labels=names)
                for labels, value in samples:
                    family.add_metric([str(v) for _, v in labels], value)
                yield family


class Metrics:
    def __init__(self):
        self.started = time.time()
        self.registry = r = CollectorRegistry()
        self.http = Counter("edgejit_http_requests_total", "HTTP requests by model, endpoint and status code",
                            ["model", "endpoint", "code"], registry=r)
        self._rejected = Counter("edgejit_rejected_total",
                                 "requests turned away before running (saturated, draining, too many connections)",
                                 ["reason"], registry=r)
        self.inference = Histogram("edgejit_inference_seconds",
                                   "time in the runtime per inference, by model and module kind (generic, variant, padded)",
                                   ["model", "kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.request = Histogram("edgejit_request_seconds", "time per inference request including queueing and encoding",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.jit = Counter("edgejit_jit_events_total",
                           "JIT events (compile_started, compile_finished, compile_failed, cache_hit, swapped_in, ...)",
                           ["model", "event"], registry=r)
        self.prompt_tokens = Counter("edgejit_generation_prompt_tokens_total", "prompt tokens of finished generation requests",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("edgejit_generation_completion_tokens_total", "tokens generated",
                                         ["model"], registry=r)
        self.gen_requests = Counter("edgejit_generation_requests_total",
                                    "generation requests by finish reason (stop, length, cancelled, timeout, error)",
                                    ["model", "finish_reason"], registry=r)
        self.ttft = Histogram("edgejit_generation_ttft_seconds",
                              "time to first token (request received -> first token), by model",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("edgejit_generation_inter_token_seconds",
                             "mean time between generated tokens of a request (decode time / (tokens - 1)), by model",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.tok_s = Histogram("edgejit_generation_decode_tokens_per_second",
                               "decode speed of a request ((tokens - 1) / decode time), by model",
                               ["model"], buckets=TOK_S_BUCKETS, registry=r)
        self.reloads = Counter("edgejit_reloads_total", "artifact reloads by result (swapped, rolled_back)",
                               ["model", "result"], registry=r)
        self.gauges = []  # callables returning [(name, help, [(labels, value)])], read at each scrape
        r.register(_ScrapeGauges(self.gauges))
        Gauge("edgejit_uptime_seconds", "seconds since the daemon started",
              registry=r).set_function(lambda: time.time() - self.started)
        prometheus_client.ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, fds (Linux)
        Gauge("edgejit_process_peak_resident_memory_bytes", "the most resident memory the daemon process has had",
              registry=r).set_function(peak_rss_bytes)

    @property
    def rejected(self) -> dict[str, float]:
        """reason -> requests turned away so far."""
        return {s.labels["reason"]: s.value for m in self._rejected.collect() for s in m.samples
                if s.name == "edgejit_rejected_total"}

    def count_http(self, model: str, endpoint: str, code: int) -> None:
        self.http.labels(model, endpoint, code).inc()

    def observe_request(self, model: str, seconds: float) -> None:
        self.request.labels(model).observe(seconds)

    def on_request(self, model: str, seq_len, kind: str, latency_s: float) -> None:
        self.inference.labels(model, kind).observe(latency_s)

    def on_jit(self, model: str, event: dict) -> None:
        self.jit.labels(model, str(event.get("event"))).inc()

    def count_reload(self, model: str, result: str) -> None:
        self.reloads.labels(model, result).inc()

    def count_rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def on_generation(self, model: str, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                      ttft_s: float | None) -> None:
        """One generation request ended (finish_reason: stop, length, cancelled, timeout, error)."""
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)
        self.gen_requests.labels(model, finish_reason).inc()
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)

    def on_generation_speed(self, model: str, stats) -> None:
        """A generation request with at least two tokens: its inter-token latency and decode speed."""
        n = stats.completion_tokens - 1
        if n >= 1 and stats.decode_s > 0:
            self.itl.labels(model).observe(stats.decode_s / n)
            self.tok_s.labels(model).observe(n / stats.decode_s)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
