"""Prometheus metrics of the serving stack, on `prometheus_client`, merged across replicas.

Each replica (ingress or engine) keeps a `Registry`: the metrics below in its own
`prometheus_client.CollectorRegistry` (nothing in the library's global registry, so two engines in
one process - or two tests - never share counts). `/metrics` collects every replica's `snapshot()`
(the collected metric families, picklable, so they cross Ray), `render` sums them per series and
writes the text format with `generate_latest`. Counters, histograms and gauges all add up across
replicas (running sequences, cached conversations).

The ingress records the request, token and latency series (`ClientTimer`), the engines the
scheduler and KV-cache series; every replica declares all of them, so a scrape always lists each.
"""
from __future__ import annotations

import time
from typing import Iterable, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Spec(NamedTuple):
    kind: str  # counter, gauge or histogram
    help: str
    buckets: tuple | None = None
    labels: tuple[str, ...] = ()


SPECS: dict[str, Spec] = {
    "ctxmem_requests_total": Spec("counter", "HTTP requests by endpoint and status code",
                                  labels=("endpoint", "status")),
    "ctxmem_prompt_tokens_total": Spec("counter", "prompt tokens of finished requests"),
    "ctxmem_completion_tokens_total": Spec("counter", "generated tokens of finished requests"),
    "ctxmem_time_to_first_token_seconds": Spec("histogram", "request arrival to first token, at the ingress",
                                               LATENCY_BUCKETS),
    "ctxmem_inter_token_latency_seconds": Spec("histogram", "gap between consecutive tokens of a stream, at the "
                                               "ingress", LATENCY_BUCKETS),
    "ctxmem_request_duration_seconds": Spec("histogram", "request arrival to last token, at the ingress",
                                            LATENCY_BUCKETS),
    "ctxmem_batch_size": Spec("histogram", "sequences in each decode step of the engine", BATCH_BUCKETS),
    "ctxmem_prefill_tokens_total": Spec("counter", "prompt tokens run through the model (not reused from cache)"),
    "ctxmem_cached_tokens_total": Spec("counter", "prompt tokens whose KV state was reused"),
    "ctxmem_kv_cache_lookups_total": Spec("counter", "conversation KV cache lookups by result (hit, miss)",
                                          labels=("result",)),
    "ctxmem_evicted_tokens_total": Spec("counter", "tokens the window evicted from finished requests' contexts"),
    "ctxmem_failed_sequences_total": Spec("counter", "requests failed alone by an error while prefilling or "
                                          "decoding them (the batch went on)", labels=("stage",)),
    "ctxmem_scheduler_restarts_total": Spec("counter", "times an engine's scheduler loop died and was restarted "
                                            "(its running requests failed)"),
    "ctxmem_queue_seconds": Spec("histogram", "engine queue wait before prefill", LATENCY_BUCKETS),
    "ctxmem_running_sequences": Spec("gauge", "sequences in the running batch"),
    "ctxmem_prefilling_sequences": Spec("gauge", "sequences whose prompt is being prefilled, a chunk per step"),
    "ctxmem_waiting_requests": Spec("gauge", "requests queued in the engine"),
    "ctxmem_kv_cache_sessions": Spec("gauge", "conversation states kept by the engine"),
    "ctxmem_kv_cache_bytes": Spec("gauge", "bytes of conversation states kept by the engine"),
    "ctxmem_kv_cache_store_bytes": Spec("gauge", "of those bytes, the retrieve policy's stores of evicted KV"),
    "ctxmem_recalled_tokens_total": Spec("counter", "evicted tokens the retrieve policy put back for finished "
                                         "replies (per reply: the union over its tokens)"),
}
# added by `render` (how many engine snapshots this scrape merged), not kept by any replica
ENGINE_REPLICAS = "ctxmem_engine_replicas"
ENGINE_REPLICAS_HELP = "engine replicas that answered this scrape"


class Registry:
    """One replica's metrics (thread-safe: prometheus_client locks each series)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._metrics = {}
        for name, spec in SPECS.items():
            if spec.kind == "histogram":
                metric = Histogram(name, spec.help, spec.labels, buckets=spec.buckets, registry=self.registry)
            else:
                metric = {"counter": Counter, "gauge": Gauge}[spec.kind](name, spec.help, spec.labels,
                                                                         registry=self.registry)
            self._metrics[name] = metric

    def _series(self, name: str, labels: dict[str, str] | None):
        metric = self._metrics[name]
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, value: float = 1.0, labels: dict[str, str] | None = None) -> None:
        self._series(name, labels).inc(value)

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        self._series(name, labels).set(value)

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None, count: int = 1) -> None:
        """`count` observations of `value` (tokens that arrived together share one gap), recorded at once:
        a coalesced chunk of n tokens costs one bucket update, not n."""
        series = self._series(name, labels)
        if count == 1:
            series.observe(value)
        elif count > 1:
            _observe_many(series, value, count)

    def snapshot(self) -> list[Metric]:
        """The collected metric families: plain picklable objects, cheap to send through Ray."""
        return list(self.registry.collect())


def _observe_many(histogram, value: float, count: int) -> None:
    """What `count` calls of `histogram.observe(value)` record (its sum, the one bucket `value` falls in;
    the cumulative buckets and the count are derived from those when collected), in one update. Uses
    prometheus_client's Histogram fields; should they ever change, it falls back to the calls."""
    bounds, buckets, total = (getattr(histogram, k, None) for k in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None:
        for _ in range(count):
            histogram.observe(value)
        return
    total.inc(value * count)
    for bound, bucket in zip(bounds, buckets):
        if value <= bound:
            bucket.inc(count)
            break


class _Collected:
    """A prometheus_client collector over families collected elsewhere."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge(snapshots: Iterable[list[Metric]]) -> list[Metric]:
    """Sum every series (same sample name and labels) across replicas' snapshots. `_created`
    timestamps are dropped: a sum of creation times means nothing."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for snapshot in snapshots:
        for family in snapshot:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            series = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                series[key] = series.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


CONTENT_TYPE = CONTENT_TYPE_LATEST  # of what `render` writes


def render(snapshots: Iterable[list[Metric]], engine_replicas: int | None = None) -> bytes:
    """The merged snapshots in the Prometheus text format; with `engine_replicas`, also that gauge."""
    families = merge(snapshots)
    if engine_replicas is not None:
        families.append(GaugeMetricFamily(ENGINE_REPLICAS, ENGINE_REPLICAS_HELP, value=engine_replicas))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected(families))
    return generate_latest(registry)


class ClientTimer:
    """Time to first token and inter-token latency of one request as the client sees them (at the
    ingress), fed with the token counts of the chunks as they are sent.

    Tokens that arrive together (a coalesced chunk) share the gap since the previous chunk; the ones
    that arrive with the first token follow it with no gap. So per request the inter-token histogram
    gets completion_tokens - 1 observations summing to (last token - first token)."""

    def __init__(self, metrics: Registry, arrived: float):
        self.metrics, self.arrived = metrics, arrived
        self.last: float | None = None

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.observe("ctxmem_time_to_first_token_seconds", now - self.arrived)
            if n > 1:
                self.metrics.observe("ctxmem_inter_token_latency_seconds", 0.0, count=n - 1)
        else:
            self.metrics.observe("ctxmem_inter_token_latency_seconds", (now - self.last) / n, count=n)
        self.last = now

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.metrics.inc("ctxmem_prompt_tokens_total", prompt_tokens)
        self.metrics.inc("ctxmem_completion_tokens_total", completion_tokens)
        self.metrics.observe("ctxmem_request_duration_seconds", time.perf_counter() - self.arrived)
