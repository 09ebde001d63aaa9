"""The server's Prometheus metrics (``GET /metrics``, text format), in a registry owned by the server.

Event series are observed where the event happens (the HTTP handlers):
requests by endpoint and status, time to first token, inter-token latency
(time between two deliveries of a stream divided by the tokens delivered,
so a multi-step decode of k tokens counts k tokens each at 1/k of the gap),
end-to-end latency, images. Level series (queue length, running requests,
KV blocks, tokens/s, images/s, expert-cache hit rate, recoveries) are read
at scrape time from the engine loop's snapshot by a collector, so they are
never stale and nothing updates them in between.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _SnapshotCollector:
    """Gauges (and the recoveries counter) read from ``source()`` when Prometheus scrapes."""

    def __init__(self, source: Callable[[], Mapping[str, Any]]) -> None:
        self.source = source

    def describe(self):
        return []  # unknown until collected (the series depend on the engine kind)

    def collect(self):
        snap = dict(self.source() or {})
        gauges = {
            "tessera_queue_length": ("requests waiting to start (queued, not yet scheduled)", snap.get("waiting")),
            "tessera_running_requests": ("requests in the running batch", snap.get("running")),
            "tessera_kv_blocks_free": ("free KV-cache blocks", snap.get("kv_blocks_free")),
            "tessera_kv_blocks_used": (
                "KV-cache blocks held by requests",
                None if snap.get("kv_blocks_total") is None else snap["kv_blocks_total"] - snap.get("kv_blocks_free", 0),
            ),
            "tessera_generation_tokens_per_second": ("generated tokens per second over the last window",
                                                     snap.get("tokens_per_s")),
            "tessera_images_per_second": ("images per second over the last window", snap.get("images_per_s")),
            "tessera_expert_cache_hit_rate": ("expert-cache hit rate over every rank (offloaded experts only)",
                                              snap.get("expert_cache_hit_rate")),
            "tessera_engine_recovering": ("1 while the engine recovers from a worker failure",
                                          None if "state" not in snap else float(snap["state"] == "recovering")),
        }
        for name, (doc, value) in gauges.items():
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))
        if snap.get("recoveries") is not None:
            yield CounterMetricFamily("tessera_recoveries", "worker failures recovered by the engine",
                                      value=float(snap["recoveries"]))


class ServeMetrics:
    """One server's metrics; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("tessera_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("tessera_time_to_first_token_seconds", "time from request arrival to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("tessera_inter_token_latency_seconds", "time between two tokens of one stream",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("tessera_e2e_request_latency_seconds", "time from request arrival to its last byte",
                             ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tessera_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("tessera_generation_tokens", "tokens generated for clients", registry=r)
        self.images = Counter("tessera_images", "images generated", registry=r)
        r.register(_SnapshotCollector(snapshot))

    def request(self, endpoint: str, status: int | str) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
