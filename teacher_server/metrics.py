"""Prometheus metrics of the teacher service (``--metrics-port``), with ``prometheus_client``.

Counters and histograms are updated where things happen (the servicer per call, the batcher per forward);
gauges that describe state (queue depth, handle store per client, active calls, bytes in flight) are read at
scrape time from the engine and the call tracker. Each server has its own registry, so several servers in one
process (tests) do not collide. docs/teacher_server.md lists every metric with a Grafana query.

The ``client`` label is bounded: with a token file it is the client's name (the file's names only: calls
without a valid token are refused before they hold anything), else one ``unauthenticated`` label for all peer
addresses (a thousand connections must not make a thousand series); mTLS certificate names (``cn:...``, bounded
by the CA) are kept.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
UNAUTHENTICATED_LABEL = "unauthenticated"


class ServiceMetrics:
    def __init__(self, *, authenticated: bool = False):
        self.authenticated = authenticated  # clients are token-file names (else: peers, one label)
        self.registry = CollectorRegistry()
        self.requests = Counter("teacher_requests", "TeacherService calls by method and status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("teacher_request_seconds", "Time from a call's arrival to its response "
                                 "(before streaming the response)", ["method"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.batch_samples = Histogram("teacher_batch_samples_fill", "Samples per teacher forward / "
                                       "max_batch_samples", buckets=FILL_BUCKETS, registry=self.registry)
        self.batch_tokens = Histogram("teacher_batch_tokens_fill", "Padded tokens per teacher forward / "
                                      "max_batch_tokens", buckets=FILL_BUCKETS, registry=self.registry)
        self.forwards = Counter("teacher_forwards", "Teacher body forwards run", registry=self.registry)
        self.bytes_received = Counter("teacher_received_bytes", "Request bytes received (Encode requests, "
                                      "Score frames)", registry=self.registry)
        self.bytes_sent = Counter("teacher_sent_bytes", "Response frame bytes sent (Encode, Score)",
                                  registry=self.registry)
        self._engine = None
        self._tracker = None
        self.registry.register(_StateCollector(self))

    def observe_call(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def observe_forward(self, num_samples: int, padded_tokens: int, *, max_samples: int, max_tokens: int) -> None:
        self.forwards.inc()
        self.batch_samples.observe(num_samples / max_samples)
        self.batch_tokens.observe(padded_tokens / max_tokens)

    def watch(self, *, engine=None, tracker=None) -> None:
        """Read state gauges from these at scrape time (the engine once it is loaded)."""
        if engine is not None:
            self._engine = engine
            engine.add_forward_observer(lambda samples, tokens: self.observe_forward(
                samples, tokens, max_samples=engine.config.max_batch_samples,
                max_tokens=engine.config.max_batch_tokens))
        if tracker is not None:
            self._tracker = tracker

    def client_label(self, client: str) -> str:
        """The ``client`` label of a client name (see the module docstring)."""
        if self.authenticated or client.startswith("cn:"):
            return client
        return UNAUTHENTICATED_LABEL

    def by_label(self, per_client: dict[str, int]) -> dict[str, int]:
        totals: Tally[str] = Tally()
        for client, value in per_client.items():
            totals[self.client_label(client)] += value
        return dict(totals)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Serve ``/metrics`` over HTTP; returns the (server, thread) pair (``server.shutdown()`` stops it)."""
        return start_http_server(port, addr=host, registry=self.registry)


class _StateCollector:
    def __init__(self, metrics: ServiceMetrics):
        self._metrics = metrics

    def collect(self):
        engine, tracker = self._metrics._engine, self._metrics._tracker
        if tracker is not None:
            yield GaugeMetricFamily("teacher_active_calls", "TeacherService calls in flight", value=tracker.active_calls)
            yield GaugeMetricFamily("teacher_inflight_bytes", "Payload bytes held by the calls in flight",
                                    value=tracker.inflight_bytes)
            cut = CounterMetricFamily("teacher_calls_cut", "Calls cancelled by the server: past its deadline, or "
                                      "a stream without progress", labels=["reason"])
            for reason, count in sorted(tracker.cut_calls.items()):
                cut.add_metric([reason], count)
            yield cut
        if engine is not None and not engine.closed:
            yield GaugeMetricFamily("teacher_queue_depth", "Jobs waiting for the device thread",
                                    value=engine.queue_depth)
            stored = GaugeMetricFamily("teacher_handle_store_bytes", "Bytes of kept teacher state charged to each "
                                       "client (a state shared through the encode cache: to each holder)",
                                       labels=["client"])
            for client, nbytes in sorted(self._metrics.by_label(engine.handle_bytes_by_client()).items()):
                stored.add_metric([client], nbytes)
            yield stored
            yield GaugeMetricFamily("teacher_handle_store_held_bytes", "Memory the handle store holds (a state "
                                    "shared by several handles counted once; bounded by --handle-store-gib)",
                                    value=engine.handle_bytes_held())
            evicted = CounterMetricFamily("teacher_handle_evictions", "Handles evicted because the store was full, "
                                          "by the client that owned them", labels=["client"])
            for client, count in sorted(self._metrics.by_label(engine.evictions_by_client()).items()):
                evicted.add_metric([client], count)
            yield evicted
