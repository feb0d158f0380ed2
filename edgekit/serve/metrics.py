"""Prometheus metrics of one daemon (own registry per app: no global state, several apps per process in tests)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Request latency buckets in seconds: embeddings take milliseconds, generations up to minutes.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServeMetrics:
    """The daemon's counters, histograms and gauges."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("edgekit_requests", "HTTP requests by model, endpoint and status code.",
                                ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram("edgekit_request_duration_seconds", "Request latency by model and endpoint.",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_generated = Counter("edgekit_tokens_generated", "Completion tokens generated.", ["model"], registry=r)
        self.prompt_tokens = Counter("edgekit_prompt_tokens", "Prompt (input) tokens processed.", ["model"], registry=r)
        self.generations = Counter("edgekit_generations", "Finished generations by finish reason (stop, length, cancelled).",
                                   ["model", "finish_reason"], registry=r)
        self.streams = Counter("edgekit_streams", "Streamed text generations by who wrote their text events: the worker "
                               "(the client's socket was handed to it) or the daemon (relayed).", ["model", "writer"], registry=r)
        self.decode_rate = Gauge("edgekit_decode_tokens_per_second", "Decode speed of the last finished generation.",
                                 ["model"], registry=r)
        self.loaded_models = Gauge("edgekit_models_loaded", "Models loaded in a worker now.", registry=r)
        self.queue_depth = Gauge("edgekit_queue_depth", "Requests waiting for a model.", ["model"], registry=r)
        self.active = Gauge("edgekit_active_requests", "Requests holding or waiting for a model.", ["model"], registry=r)
        self.resident = Gauge("edgekit_resident_memory_bytes", "Resident memory of the daemon and of each model worker.",
                              ["process"], registry=r)
        self.connections_closed = Counter("edgekit_connections_closed", "Connections the daemon closed at a limit "
                                          "(headers timeout, body timeout, connection cap).", ["reason"], registry=r)
        self.worker_hangs = Counter("edgekit_worker_hangs", "Model workers killed for missing their heartbeat (also counted "
                                    "in edgekit_worker_restarts).", ["model"], registry=r)
        self.worker_restarts = Counter("edgekit_worker_restarts", "Model workers that stopped unexpectedly.", ["model"],
                                       registry=r)

    def render(self, entries: Iterable) -> bytes:
        """Refresh the gauges that are sampled (memory, queues, loaded models) and render the exposition text."""
        import psutil

        self.resident.labels(process="daemon").set(psutil.Process(os.getpid()).memory_info().rss)
        loaded = 0
        for entry in entries:
            self.queue_depth.labels(model=entry.name).set(entry.queue_depth)
            self.active.labels(model=entry.name).set(entry.active)
            if entry.worker is not None and entry.worker.alive:
                loaded += 1
                self.resident.labels(process=entry.name).set(entry.worker.rss())
            else:
                self.resident.labels(process=entry.name).set(0)
        self.loaded_models.set(loaded)
        return generate_latest(self.registry)
