"""GET /metrics: the gateway's Prometheus metrics (prometheus_client, one registry per app).

Two kinds of series, and the rule for each:

* Cluster state (kernels by pool and state, waiting launches, workers and slots, failures and
  culls by reason) is read from the registry at scrape time by :class:`ClusterCollector`, with
  the same builders as ``/api/pools``; every gateway replica reports the same values, so
  aggregate them with ``max``, not ``sum``.
* Process activity (launch latency, WebSocket connections, messages and bytes) is counted by
  this gateway process; replicas add up. Each launch is observed once in the cluster, by the
  gateway whose tally listener claims its RUNNING event (gateway/tally.py), whichever gateway
  or path (``?wait=false`` included) started it. The WebSocket hot path only bumps plain integers on
  the connection it runs on (:class:`WsStats`, one writer thread each); the collector adds
  them up at scrape time.

:class:`GatewayMetrics` implements the ``Hooks`` that the WebSocket ``Bridge`` and the tally
listener call (gateway/channels/hooks.py), which keeps them free of any dependency on metrics.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..workers.config import Config
from ..workers.protocol import KernelStatus
from ..workers.registry import Registry
from .api.pools import build_pools, read_state
from .channels.hooks import Hooks, WsStats
from .state import AppState, state
from .tally import CULL_KINDS, FAILURE_KINDS

log = logging.getLogger(__name__)
bp = Blueprint("metrics", __name__)
#: Launches take from well under a second (a local ipykernel) to minutes (a pod, a YARN app).
LAUNCH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 45.0, 60.0, 90.0,
                  120.0, 180.0, 300.0, 600.0, 1200.0, 1800.0)
DIRECTIONS = ("client_to_kernel", "kernel_to_client")


def launch_durations(timing: Mapping[str, Any]) -> tuple[float, float] | None:
    """(seconds waiting in the queue, seconds starting) from a first launch's timing (the
    supervisor's RUNNING event carries it: queued, taken, launch)."""
    try:
        queued, taken = float(timing.get("queued") or 0), float(timing.get("taken") or 0)
        start = float(timing["launch"])
    except (KeyError, TypeError, ValueError):
        return None
    if not queued or not taken:
        return None
    return max(0.0, taken - queued), max(0.0, start)


class GatewayMetrics(Hooks):
    """The per-app metrics: a CollectorRegistry with histograms and the collectors."""

    def __init__(self, config: Config, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queue_wait = Histogram(
            "poolgate_launch_queue_seconds", "Seconds a launch waited in its pool's queue "
            "before a worker took it", ["pool"], buckets=LAUNCH_BUCKETS, registry=self.registry)
        self.start_time = Histogram(
            "poolgate_launch_start_seconds", "Seconds a worker took to start a kernel, from "
            "taking the launch to RUNNING", ["pool"], buckets=LAUNCH_BUCKETS,
            registry=self.registry)
        for pool in config.pools:
            self.queue_wait.labels(pool)
            self.start_time.labels(pool)
        self._lock = threading.Lock()
        self.open: set[WsStats] = set()
        self.closed: dict[tuple[str, str], list[int]] = {}
        self.registry.register(ClusterCollector(config, registry))
        self.registry.register(WsCollector(self))

    # -- hooks ----------------------------------------------------------------------------

    def launched(self, pool: str, timing: Mapping[str, Any]) -> None:
        durations = launch_durations(timing)
        if durations is not None:
            self.queue_wait.labels(pool).observe(durations[0])
            self.start_time.labels(pool).observe(durations[1])

    def ws_opened(self, stats: WsStats) -> None:
        with self._lock:
            self.open.add(stats)

    def ws_closed(self, stats: WsStats) -> None:
        with self._lock:
            self.open.discard(stats)
            for key, (n, b) in stats.counts.items():
                total = self.closed.setdefault(key, [0, 0])
                total[0] += n
                total[1] += b

    def ws_totals(self) -> tuple[int, dict[tuple[str, str], list[int]]]:
        """(open connections, (direction, channel) -> [messages, bytes]) of this process."""
        with self._lock:
            live = list(self.open)
            totals = {k: list(v) for k, v in self.closed.items()}
        for stats in live:
            for key, (n, b) in dict(stats.counts).items():  # dict(): one atomic copy
                total = totals.setdefault(key, [0, 0])
                total[0] += n
                total[1] += b
        return len(live), totals

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ClusterCollector(Collector):
    """Cluster-wide series, read from the registry at scrape time (same on every replica)."""

    def __init__(self, config: Config, registry: Registry) -> None:
        self.config = config
        self.reg = registry

    def describe(self) -> Iterator[Metric]:
        return iter(())  # computed at scrape time only: no registry reads at registration

    def collect(self) -> Iterator[Metric]:
        state = read_state(self.config, self.reg)
        pools = build_pools(self.config, state)
        kernels = GaugeMetricFamily("poolgate_kernels", "Kernels in the registry by pool and "
                                    "lifecycle state", labels=["pool", "state"])
        gauges = {key: GaugeMetricFamily(f"poolgate_pool_{key}", text, labels=["pool"])
                  for key, text in (("workers", "Live workers serving the pool"),
                                    ("slots", "Kernel slots of the pool's live workers"),
                                    ("slots_used", "Slots in use on the pool's live workers"),
                                    ("slots_free", "Free slots of the pool's workers that "
                                                   "take launches (not draining)"))}
        waiting = GaugeMetricFamily("poolgate_launches_waiting", "Launches waiting in the "
                                    "pool's queue for a free slot", labels=["pool"])
        failures = CounterMetricFamily("poolgate_kernel_failures", "Kernels that failed, by "
                                       "pool and reason", labels=["pool", "reason"])
        culls = CounterMetricFamily("poolgate_kernels_culled", "Kernels the culler stopped, by "
                                    "pool and reason", labels=["pool", "reason"])
        for p in pools:
            name = p["name"]
            for status in KernelStatus:
                kernels.add_metric([name, status.value.lower()],
                                   p["kernels_by_status"][status.value])
            for key, field in (("workers", "workers"), ("slots", "slots"),
                               ("slots_used", "used"), ("slots_free", "free")):
                gauges[key].add_metric([name], p[field])
            waiting.add_metric([name], p["waiting"])
            for kind in sorted({*FAILURE_KINDS, *p["failures_by_kind"]}):
                failures.add_metric([name, kind], p["failures_by_kind"].get(kind, 0))
            for kind in sorted({*CULL_KINDS, *p["culls_by_kind"]}):
                culls.add_metric([name, kind], p["culls_by_kind"].get(kind, 0))
        yield kernels
        yield waiting
        yield from gauges.values()
        yield failures
        yield culls


class WsCollector(Collector):
    """This process's WebSocket connections, messages and bytes per channel."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        n, totals = self.metrics.ws_totals()
        conns = GaugeMetricFamily("poolgate_websocket_connections",
                                  "Client WebSockets this gateway process serves now")
        conns.add_metric([], n)
        msgs = CounterMetricFamily("poolgate_websocket_messages", "Jupyter messages moved "
                                   "between clients and kernels", labels=["channel", "direction"])
        size = CounterMetricFamily("poolgate_websocket_bytes", "Bytes of WebSocket frames moved "
                                   "between clients and kernels", labels=["channel", "direction"])
        for channel in ("shell", "iopub", "stdin", "control"):
            for direction in DIRECTIONS:
                if channel == "iopub" and direction == "client_to_kernel":
                    continue
                n_msgs, n_bytes = totals.pop((direction, channel), [0, 0])
                msgs.add_metric([channel, direction], n_msgs)
                size.add_metric([channel, direction], n_bytes)
        for (direction, channel), (n_msgs, n_bytes) in sorted(totals.items()):
            msgs.add_metric([channel, direction], n_msgs)
            size.add_metric([channel, direction], n_bytes)
        yield conns
        yield msgs
        yield size


@bp.get("/metrics")
def metrics() -> Any:
    m = state().metrics
    assert isinstance(m, GatewayMetrics), "install() runs in create_app (gateway/operating.py)"
    return Response(m.render(), content_type=CONTENT_TYPE_LATEST)


def install(shared: AppState) -> GatewayMetrics:
    """Create the app's metrics and connect the bridge to them."""
    m = GatewayMetrics(shared.config, shared.registry)
    shared.metrics = m
    shared.bridge.metrics = m
    return m
