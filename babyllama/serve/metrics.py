"""What `/metrics` reports, in Prometheus' text format (`prometheus_client`), named as vLLM's server names them
(with `babyllama_` for `vllm:`), so that dashboards made for it read these:

    babyllama_requests_total{route, status}           HTTP requests answered, by API route and status code
    babyllama_prompt_tokens_total{model}              prompt tokens of decoded requests; _cached: from the prefix cache
    babyllama_generation_tokens_total{model}          tokens generated
    babyllama_num_requests_running / _waiting         rows being decoded / requests waiting for a row (at scrape time)
    babyllama_batch_size                              rows decoded together, per decode step (histogram)
    babyllama_time_to_first_token_seconds{model}      from a request's arrival to its first token (histogram)
    babyllama_e2e_request_latency_seconds{model}      from arrival to its last choice's end (histogram)

Each app has its own registry (no process-wide state: two servers in one process, as in tests, count apart).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 (the route's media type)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    def __init__(self, load: Callable[[], dict[str, int]]):
        """`load`: the batcher's current rows decoding and requests waiting (read at each scrape)."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("babyllama_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("babyllama_prompt_tokens", "Prompt tokens of decoded requests", ["model"],
                                     registry=r)
        self.cached_tokens = Counter("babyllama_prompt_tokens_cached", "Prompt tokens taken from the prefix cache",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("babyllama_generation_tokens", "Tokens generated", ["model"], registry=r)
        running = Gauge("babyllama_num_requests_running", "Rows being decoded", registry=r)
        waiting = Gauge("babyllama_num_requests_waiting", "Requests waiting for a row", registry=r)
        running.set_function(lambda: load()["decoding"])
        waiting.set_function(lambda: load()["waiting"])
        self.batch_size = Histogram("babyllama_batch_size", "Rows decoded together in a decode step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.first_token = Histogram("babyllama_time_to_first_token_seconds", "From arrival to the first token",
                                     ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("babyllama_e2e_request_latency_seconds", "From arrival to the end of the reply",
                                 ["model"], buckets=_LATENCY_BUCKETS, registry=r)

    def text(self) -> bytes:
        return generate_latest(self.registry)
