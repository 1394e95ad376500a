"""Prometheus metrics for one server, in a registry of its own (docs/operations.md, "Metrics").

Rules:

* Nothing on the hot path. The core counts in plain integers (`HubStats`); this module
  reads a snapshot of them only when scraped, through a custom collector. The adapter calls
  into `Metrics` only for rare events (a breaker transition) and for two timings it samples
  (publish-to-write latency, event-loop lag), each one ``Histogram.observe``.
* One `CollectorRegistry` per `Metrics`, never the process-global one, so several servers
  (and tests) coexist in one process. The process collectors (CPU, memory, open files),
  the platform and the GC collectors are registered in it too.
* Not thread-safe: the stats callables and `render` run on the event loop's thread, where
  the core mutates the stats, so a scrape sees one consistent snapshot.

Names (docs/operations.md): ``wirestate_connections{state}``,
``wirestate_disconnects_total{cause}``, ``wirestate_messages_sent_total``,
``wirestate_messages_dropped_total{reason}``, ``wirestate_breaker_state{breaker,state}`` (1 for the
current state, 0 for the others),
``wirestate_breaker_transitions_total{breaker,from_state,to_state}``,
``wirestate_publish_to_write_seconds`` (histogram), ``wirestate_source_leader{source}`` (1 on
the node that polls a shared source, 0 on the others); plus ``wirestate_event_loop_lag_seconds``
(histogram), ``wirestate_keepalive_stall_extensions_total`` and the rest of `HubStats`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from wirestate.adapters.server.routes import HttpRequest, HttpResponse
from wirestate.core.causes import CloseCause
from wirestate.core.hub import HubStats

__all__ = ["CONTENT_TYPE", "LAG_BUCKETS", "LATENCY_BUCKETS", "Levels", "Metrics"]

#: The Prometheus text format version `render` produces.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: Publish-to-write: a loopback write is tens of microseconds, a slow consumer seconds.
LATENCY_BUCKETS: Final = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Event-loop lag: below a millisecond is healthy; stalls that extend pong deadlines are long.
LAG_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


@dataclass(frozen=True)
class Levels:
    """Counts the server keeps outside the hub's stats, read at scrape time."""

    topics: int = 0  # wirestate_topics
    topics_refused: int = 0  # wirestate_topics_refused_total
    handshakes: int = 0  # wirestate_handshakes_in_flight


class Metrics:
    """The metrics of one server.

    ``stats`` returns the hub's live `HubStats` (or None before the hub exists: every
    counter then reads 0); ``connections`` returns the number of connections per lifecycle
    state. Both are called at scrape time only, as is ``levels``, which returns `Levels`
    (the server's own counts: topics, refusals, upgrades in flight). ``drop_reasons`` are
    exported at 0 before their first drop (every `CloseCause` is, for disconnects), so
    ``rate()`` works from the first scrape.
    """

    def __init__(
        self,
        stats: Callable[[], HubStats | None],
        connections: Callable[[], Mapping[str, int]],
        *,
        drop_reasons: Iterable[str] = (),
        levels: Callable[[], Levels] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self._stats = stats
        self._connections = connections
        self._levels = levels or Levels
        self._drop_reasons = tuple(drop_reasons)
        # Breaker metrics are rare events kept in plain dicts and exported by the same
        # collector, so they carry no ``_created`` series and need no label bookkeeping.
        self._breaker_states: dict[str, tuple[str, tuple[str, ...]]] = {}
        self._transitions: Counter[tuple[str, str, str]] = Counter()
        #: shared sources (on a Redis bus), 1 for those this node polls now
        self._leaders: dict[str, int] = {}
        #: upgrades the server refused before the handshake, by reason (limits, shutdown)
        self.rejections: Counter[str] = Counter()
        self.registry.register(_Collector(self._families))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._publish_to_write = Histogram(
            "wirestate_publish_to_write_seconds",
            "Seconds from publish to the frame's transport write.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._loop_lag = Histogram(
            "wirestate_event_loop_lag_seconds",
            "How late the event loop woke the lag probe, in seconds.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )

    # -- what the adapter reports ---------------------------------------------------------

    def observe_publish_to_write(self, seconds: float) -> None:
        self._publish_to_write.observe(seconds)

    def observe_loop_lag(self, seconds: float) -> None:
        self._loop_lag.observe(seconds)

    def breaker_transition(self, breaker: str, from_state: str, to_state: str) -> None:
        """Count one transition and make ``to_state`` the breaker's current state.

        The state gauge lists the states last given to `breaker_state` (or just these two)."""
        self._transitions[(breaker, from_state, to_state)] += 1
        _, known = self._breaker_states.get(breaker, ("", ()))
        states = known or (from_state, to_state)
        self.breaker_state(breaker, to_state, states)

    def breaker_state(self, breaker: str, state: str, all_states: Iterable[str]) -> None:
        """Set ``breaker``'s current state; ``all_states`` are exported at 0 beside it."""
        names = tuple(dict.fromkeys((*all_states, state)))
        self._breaker_states[breaker] = (state, names)

    def source_leader(self, source: str, leading: bool) -> None:
        """Whether this node polls the shared ``source`` now (call once at start with False:
        the gauge then shows the source from the first scrape)."""
        self._leaders[source] = int(leading)

    # -- exposition -----------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format (`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    async def endpoint(self, request: HttpRequest) -> HttpResponse:
        """A ``GET /metrics`` handler for `wirestate.adapters.server.transports.http.Router`."""
        return HttpResponse(200, (("content-type", CONTENT_TYPE),), self.render())

    # -- the collector's view -------------------------------------------------------------

    def _families(self) -> Iterator[Metric]:
        stats = self._stats() or HubStats()

        connections = GaugeMetricFamily(
            "wirestate_connections", "Connections by lifecycle state.", labels=["state"]
        )
        for state, count in sorted(self._connections().items()):
            connections.add_metric([state], count)
        yield connections

        levels = self._levels()
        yield GaugeMetricFamily(
            "wirestate_topics", "Topics this node holds ([limits] max_topics).", value=levels.topics
        )
        yield CounterMetricFamily(
            "wirestate_topics_refused",
            "Topic creations refused at [limits] max_topics (error topic_limit).",
            value=levels.topics_refused,
        )
        yield GaugeMetricFamily(
            "wirestate_handshakes_in_flight",
            "Connections accepted and not yet upgraded or answered ([limits] max_handshakes).",
            value=levels.handshakes,
        )

        disconnects = CounterMetricFamily(
            "wirestate_disconnects", "Connections closed, by close cause.", labels=["cause"]
        )
        causes = Counter(dict.fromkeys((c.value for c in CloseCause), 0))
        causes.update(stats.disconnects)
        for cause, count in sorted(causes.items()):
            disconnects.add_metric([cause], count)
        yield disconnects

        yield CounterMetricFamily(
            "wirestate_messages_sent", "Frames handed to connection writers.", value=stats.sent
        )

        dropped = CounterMetricFamily(
            "wirestate_messages_dropped", "Frames not delivered, by reason.", labels=["reason"]
        )
        reasons = Counter(dict.fromkeys(self._drop_reasons, 0))
        reasons.update(stats.dropped)
        for reason, count in sorted(reasons.items()):
            dropped.add_metric([reason], count)
        yield dropped

        yield CounterMetricFamily(
            "wirestate_events_published", "Events published to the hub.", value=stats.published
        )
        yield CounterMetricFamily(
            "wirestate_pings_sent", "Keep-alive pings the hub decided.", value=stats.pings
        )
        yield CounterMetricFamily(
            "wirestate_connections_aborted",
            "Connections aborted because a pump outlived the close timeout.",
            value=stats.aborts,
        )
        yield CounterMetricFamily(
            "wirestate_event_loop_stalls", "Event-loop stalls reported.", value=stats.loop_stalls
        )
        yield CounterMetricFamily(
            "wirestate_event_loop_stall_seconds",
            "Total length of the reported event-loop stalls.",
            value=stats.loop_stall_seconds,
        )
        yield CounterMetricFamily(
            "wirestate_keepalive_stall_extensions",
            "Pong deadlines extended because the event loop itself stalled.",
            value=stats.stall_extensions,
        )
        yield CounterMetricFamily(
            "wirestate_messages_rate_limited",
            "Inbound messages refused by the per-client rate limit ([limits] messages_per_second).",
            value=stats.rate_limited,
        )
        errors = CounterMetricFamily(
            "wirestate_errors_sent",
            "error messages sent to clients, by code (limits, bad input, forbidden topics).",
            labels=["code"],
        )
        for code, count in sorted(stats.errors.items()):
            errors.add_metric([code], count)
        yield errors
        rejected = CounterMetricFamily(
            "wirestate_connections_rejected",
            "Upgrades refused before the handshake, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(self.rejections.items()):
            rejected.add_metric([reason], count)
        yield rejected

        states = GaugeMetricFamily(
            "wirestate_breaker_state",
            "1 for each breaker's current state, 0 for its other states.",
            labels=["breaker", "state"],
        )
        for breaker, (current, names) in sorted(self._breaker_states.items()):
            for name in names:
                states.add_metric([breaker, name], 1 if name == current else 0)
        yield states

        transitions = CounterMetricFamily(
            "wirestate_breaker_transitions",
            "Circuit-breaker transitions.",
            labels=["breaker", "from_state", "to_state"],
        )
        for key, count in sorted(self._transitions.items()):
            transitions.add_metric(list(key), count)
        yield transitions

        leaders = GaugeMetricFamily(
            "wirestate_source_leader",
            "1 for each shared source this node polls (it holds the lease), else 0.",
            labels=["source"],
        )
        for source, leading in sorted(self._leaders.items()):
            leaders.add_metric([source], leading)
        yield leaders


class _Collector:
    """Reads `Metrics`' sources at scrape time (prometheus_client's ``Collector`` protocol)."""

    def __init__(self, families: Callable[[], Iterator[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def describe(self) -> Iterable[Metric]:
        # Names only, without calling the sources (the hub may not exist yet): the registry
        # checks them for clashes with the other collectors.
        return [GaugeMetricFamily(name, "") for name in _GAUGES] + [
            CounterMetricFamily(name, "") for name in _COUNTERS
        ]


_GAUGES: Final = (
    "wirestate_connections",
    "wirestate_topics",
    "wirestate_handshakes_in_flight",
    "wirestate_breaker_state",
)
_COUNTERS: Final = (
    "wirestate_disconnects",
    "wirestate_topics_refused",
    "wirestate_messages_sent",
    "wirestate_messages_dropped",
    "wirestate_events_published",
    "wirestate_pings_sent",
    "wirestate_connections_aborted",
    "wirestate_event_loop_stalls",
    "wirestate_event_loop_stall_seconds",
    "wirestate_keepalive_stall_extensions",
    "wirestate_messages_rate_limited",
    "wirestate_errors_sent",
    "wirestate_connections_rejected",
    "wirestate_breaker_transitions",
)
