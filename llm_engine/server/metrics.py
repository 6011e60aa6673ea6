"""The server's Prometheus metrics (``GET /metrics``, text exposition format).

One :class:`ServerMetrics` per app, on its own ``CollectorRegistry`` (no global
state: two servers in one process keep their own counts). The engine loop updates
the token counts, latencies and gauges; an ASGI middleware counts HTTP responses.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "llm_engine_"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                    0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class ServerMetrics:
    """Counters, gauges and histograms of one server (the README lists the names)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            PREFIX + "http_requests", "HTTP responses by endpoint and status code",
            ["endpoint", "status"], registry=r)
        self.finished = Counter(
            PREFIX + "request_finished", "Completions finished, by finish reason",
            ["finish_reason"], registry=r)
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of the requests admitted", registry=r)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Seconds between two consecutive tokens of one completion",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Seconds from arrival to the last token",
            buckets=_E2E_BUCKETS, registry=r)
        self.running = Gauge(
            PREFIX + "num_requests_running",
            "Requests with a sequence running (holding KV blocks)", registry=r)
        self.waiting = Gauge(
            PREFIX + "num_requests_waiting",
            "Requests accepted and unfinished with no sequence running", registry=r)
        self.running_seqs = Gauge(
            PREFIX + "num_sequences_running",
            "Sequences running (a request with n=4 has up to 4)", registry=r)
        self.waiting_seqs = Gauge(
            PREFIX + "num_sequences_waiting",
            "Sequences in the scheduler's waiting queue (new or preempted)", registry=r)
        self.kv_usage = Gauge(
            PREFIX + "kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.prefix_hit_rate = Gauge(
            PREFIX + "prefix_cache_hit_rate",
            "Fraction of looked-up prompt tokens found in the prefix cache", registry=r)
        self.preemptions = Counter(
            PREFIX + "num_preemptions", "Sequences preempted (KV freed, recomputed later)",
            registry=r)

    def render(self) -> bytes:
        """The registry in Prometheus' text format (version 0.0.4)."""
        return generate_latest(self.registry)
