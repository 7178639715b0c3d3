"""Prometheus metrics of one server (its own registry, so several apps in one process never mix): requests and
errors by route and status code, latency, batch sizes, generated tokens. `GET /metrics` serves them as text."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Telemetry:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("tunesmith_requests", "Requests answered, by route and status code.", ["route", "code"],
                                registry=self.registry)
        self.errors = Counter("tunesmith_errors", "Requests answered with an error (4xx, 5xx), by route and code.",
                              ["route", "code"], registry=self.registry)
        self.latency = Histogram("tunesmith_request_seconds", "Time from request to response, by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("tunesmith_batch_size", "Inputs run together in one model call, by model.", ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter("tunesmith_generated_tokens", "Tokens generated, by model.", ["model"],
                                        registry=self.registry)

    def observe(self, route: str, code: int, started: float) -> None:
        self.requests.labels(route, str(code)).inc()
        if code >= 400:
            self.errors.labels(route, str(code)).inc()
        self.latency.labels(route).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
