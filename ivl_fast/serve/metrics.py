"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own (one per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "ivl_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.tokens = Counter("ivl_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge("ivl_queue_depth", "sequences waiting for a slot", registry=r)
        self.batch_occupancy = Gauge("ivl_batch_occupancy", "share of the batch's slots decoding", registry=r)
        self.ttft = Histogram(
            "ivl_time_to_first_token_seconds", "from submission to the first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.per_token = Histogram(
            "ivl_time_per_output_token_seconds",
            "between consecutive tokens of a sequence",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
