"""Mergeable Prometheus metrics without a client library.

Each replica (ingress or engine) keeps a `Registry`; `/metrics` collects every replica's
`snapshot()` (a plain dict, cheap to send through Ray), `merge`s them and renders the text format
(https://prometheus.io/docs/instrumenting/exposition_formats/). Counters and histograms add up
across replicas; gauges add up too (running sequences, cached conversations).
"""
from __future__ import annotations

import bisect
import threading
from typing import Any, Iterable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)

# name -> (kind, help, buckets)
SPECS: dict[str, tuple[str, str, tuple | None]] = {
    "ctxmem_requests_total": ("counter", "HTTP requests by endpoint and status code", None),
    "ctxmem_prompt_tokens_total": ("counter", "prompt tokens of finished requests", None),
    "ctxmem_completion_tokens_total": ("counter", "generated tokens of finished requests", None),
    "ctxmem_time_to_first_token_seconds": ("histogram", "request arrival to first token, at the ingress",
                                           LATENCY_BUCKETS),
    "ctxmem_inter_token_latency_seconds": ("histogram", "gap between consecutive tokens of a stream, at the ingress",
                                           LATENCY_BUCKETS),
    "ctxmem_request_duration_seconds": ("histogram", "request arrival to last token, at the ingress",
                                        LATENCY_BUCKETS),
    "ctxmem_batch_size": ("histogram", "sequences in each decode step of the engine", BATCH_BUCKETS),
    "ctxmem_prefill_tokens_total": ("counter", "prompt tokens run through the model (not reused from cache)", None),
    "ctxmem_cached_tokens_total": ("counter", "prompt tokens whose KV state was reused", None),
    "ctxmem_kv_cache_lookups_total": ("counter", "conversation KV cache lookups by result (hit, miss)", None),
    "ctxmem_evicted_tokens_total": ("counter", "tokens the window evicted from finished requests' contexts", None),
    "ctxmem_queue_seconds": ("histogram", "engine queue wait before prefill", LATENCY_BUCKETS),
    "ctxmem_running_sequences": ("gauge", "sequences in the running batch", None),
    "ctxmem_waiting_requests": ("gauge", "requests queued in the engine", None),
    "ctxmem_kv_cache_sessions": ("gauge", "conversation states kept by the engine", None),
    "ctxmem_kv_cache_bytes": ("gauge", "bytes of conversation states kept by the engine", None),
    "ctxmem_engine_replicas": ("gauge", "engine replicas that answered this scrape", None),
}


def _key(labels: dict[str, str] | None) -> tuple:
    return tuple(sorted((labels or {}).items()))


class Registry:
    """Thread-safe counters, gauges and histograms keyed by (name, labels)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, Any]] = {}

    def inc(self, name: str, value: float = 1.0, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            series = self._values.setdefault(name, {})
            k = _key(labels)
            series[k] = series.get(k, 0.0) + value

    def set(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            self._values.setdefault(name, {})[_key(labels)] = float(value)

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None, count: int = 1) -> None:
        buckets = SPECS[name][2]
        with self._lock:
            series = self._values.setdefault(name, {})
            k = _key(labels)
            h = series.get(k)
            if h is None:
                h = series[k] = {"buckets": [0] * (len(buckets) + 1), "sum": 0.0, "count": 0}
            h["buckets"][bisect.bisect_left(buckets, value)] += count
            h["sum"] += value * count
            h["count"] += count

    def snapshot(self) -> dict[str, list]:
        """{name: [[labels as pairs, value], ...]} - JSON/pickle friendly."""
        with self._lock:
            return {name: [[list(map(list, k)), _copy(v)] for k, v in series.items()]
                    for name, series in self._values.items()}

    def get(self, name: str, labels: dict[str, str] | None = None) -> Any:
        with self._lock:
            return _copy(self._values.get(name, {}).get(_key(labels)))


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {"buckets": list(v["buckets"]), "sum": v["sum"], "count": v["count"]}
    return v


def merge(snapshots: Iterable[dict[str, list]]) -> dict[str, dict[tuple, Any]]:
    out: dict[str, dict[tuple, Any]] = {}
    for snap in snapshots:
        for name, series in snap.items():
            dst = out.setdefault(name, {})
            for labels, value in series:
                k = tuple(tuple(p) for p in labels)
                if isinstance(value, dict):
                    cur = dst.get(k)
                    if cur is None:
                        dst[k] = _copy(value)
                    else:
                        cur["buckets"] = [a + b for a, b in zip(cur["buckets"], value["buckets"])]
                        cur["sum"] += value["sum"]
                        cur["count"] += value["count"]
                else:
                    dst[k] = dst.get(k, 0.0) + value
    return out


def _labels(pairs: Iterable[tuple[str, str]], extra: tuple[str, str] | None = None) -> str:
    items = list(pairs) + ([extra] if extra else [])
    if not items:
        return ""
    esc = lambda s: str(s).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def render(merged: dict[str, dict[tuple, Any]]) -> str:
    lines: list[str] = []
    for name, (kind, help_, buckets) in SPECS.items():
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        series = merged.get(name, {})
        if not series and kind != "histogram":
            lines.append(f"{name} 0")
        for labels, value in sorted(series.items()):
            if kind == "histogram":
                cumulative = 0
                for bound, n in zip(list(buckets) + ["+Inf"], value["buckets"]):
                    cumulative += n
                    le = bound if bound == "+Inf" else _num(bound)
                    lines.append(f"{name}_bucket{_labels(labels, ('le', str(le)))} {cumulative}")
                lines.append(f"{name}_sum{_labels(labels)} {_num(value['sum'])}")
                lines.append(f"{name}_count{_labels(labels)} {value['count']}")
            else:
                lines.append(f"{name}{_labels(labels)} {_num(value)}")
    return "\n".join(lines) + "\n"


def histogram_quantile(h: dict[str, Any], q: float, buckets: tuple) -> float | None:
    """Upper bucket bound holding quantile q (coarse; for logs and the README example)."""
    if not h or not h["count"]:
        return None
    target, seen = q * h["count"], 0
    for bound, n in zip(list(buckets) + [float("inf")], h["buckets"]):
        seen += n
        if seen >= target:
            return bound
    return float("inf")
