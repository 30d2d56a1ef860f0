"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own (one per server): ours (``ivl_*``)
and, beside them, vLLM's names for the same quantities (``vllm:*``, labelled ``model_name``), so that dashboards and
autoscalers written for a vLLM server read this one. The scheduler reports through the methods below."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class Metrics:
    def __init__(self, model_name: str = "ivl"):
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
        # vLLM's names (its v1 engine's), one sequence counted as one request
        m = ["model_name"]
        self._vllm = dict(
            running=Gauge("vllm:num_requests_running", "sequences decoding", m, registry=r),
            waiting=Gauge("vllm:num_requests_waiting", "sequences waiting for a slot", m, registry=r),
            prompt=Counter("vllm:prompt_tokens", "prompt tokens prefilled", m, registry=r),
            generation=Counter("vllm:generation_tokens", "tokens generated", m, registry=r),
            ttft=Histogram(
                "vllm:time_to_first_token_seconds", "time to the first token", m, buckets=LATENCY_BUCKETS, registry=r
            ),
            tpot=Histogram(
                "vllm:time_per_output_token_seconds", "time between tokens", m, buckets=LATENCY_BUCKETS, registry=r
            ),
            itl=Histogram(
                "vllm:inter_token_latency_seconds", "time between tokens", m, buckets=LATENCY_BUCKETS, registry=r
            ),
            e2e=Histogram(
                "vllm:e2e_request_latency_seconds", "submission to the end", m, buckets=REQUEST_BUCKETS, registry=r
            ),
            success=Counter("vllm:request_success", "sequences finished", [*m, "finished_reason"], registry=r),
        )
        self.model_name = model_name

    def _v(self, name: str):
        return self._vllm[name].labels(self.model_name)

    def load(self, running: int, waiting: int, slots: int) -> None:
        self.queue_depth.set(waiting)
        self.batch_occupancy.set(running / slots)
        self._v("running").set(running)
        self._v("waiting").set(waiting)

    def admitted(self, prompt_tokens: int) -> None:
        self._v("prompt").inc(prompt_tokens)

    def token(self, since_last: float | None, since_submitted: float) -> None:
        """A sequence's new token: ``since_last`` None for its first."""
        self.tokens.inc()
        self._v("generation").inc()
        if since_last is None:
            self.ttft.observe(since_submitted)
            self._v("ttft").observe(since_submitted)
        else:
            self.per_token.observe(since_last)
            self._v("tpot").observe(since_last)
            self._v("itl").observe(since_last)

    def finished(self, reason: str, seconds: float) -> None:
        self._vllm["success"].labels(self.model_name, reason).inc()
        self._v("e2e").observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
