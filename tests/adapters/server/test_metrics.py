"""Prometheus metrics: the names and labels of docs/operations.md, from the core's counters."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from wirestate.adapters.server.metrics import CONTENT_TYPE, Levels, Metrics
from wirestate.adapters.server.routes import HttpRequest
from wirestate.adapters.server.service import WirestateServer
from wirestate.core.breaker import BreakerState
from wirestate.core.causes import CloseCause
from wirestate.core.hub import HubStats
from wirestate.core.lifecycle import ConnState
from wirestate.testing.net import free_port, server_settings

BREAKER_STATES = ["closed", "open", "half_open", "forced_open", "disabled"]


def _stats() -> HubStats:
    return HubStats(
        disconnects=Counter({"keepalive_timeout": 2, "peer_close": 5}),
        dropped=Counter({"slow_consumer": 7, "closing": 1}),
        sent=42,
        published=9,
        pings=11,
        loop_stalls=1,
        loop_stall_seconds=0.5,
        stall_extensions=3,
        aborts=4,
    )


def _samples(metrics: Metrics) -> dict[str, list[Sample]]:
    """Samples by sample name, parsed back from the text `render` produced."""
    by_name: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            by_name.setdefault(sample.name, []).append(sample)
    return by_name


def _value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    (match,) = [s for s in samples[name] if s.labels == labels]
    return match.value


@pytest.fixture
def metrics() -> Metrics:
    stats = _stats()
    return Metrics(lambda: stats, lambda: {"open": 3, "closing": 1})


def test_every_design_metric_is_rendered_with_its_labels(metrics: Metrics) -> None:
    metrics.breaker_state("agent_status", "closed", BREAKER_STATES)
    metrics.breaker_transition("agent_status", "closed", "open")
    metrics.observe_publish_to_write(0.0004)
    metrics.observe_loop_lag(0.002)
    samples = _samples(metrics)

    assert _value(samples, "wirestate_connections", state="open") == 3
    assert _value(samples, "wirestate_connections", state="closing") == 1
    assert _value(samples, "wirestate_disconnects_total", cause="keepalive_timeout") == 2
    assert _value(samples, "wirestate_disconnects_total", cause="peer_close") == 5
    assert _value(samples, "wirestate_messages_sent_total") == 42
    assert _value(samples, "wirestate_messages_dropped_total", reason="slow_consumer") == 7
    assert _value(samples, "wirestate_messages_dropped_total", reason="closing") == 1
    assert _value(samples, "wirestate_breaker_state", breaker="agent_status", state="open") == 1
    assert (
        _value(
            samples,
            "wirestate_breaker_transitions_total",
            breaker="agent_status",
            from_state="closed",
            to_state="open",
        )
        == 1
    )
    assert _value(samples, "wirestate_publish_to_write_seconds_count") == 1
    assert _value(samples, "wirestate_publish_to_write_seconds_bucket", le="0.0005") == 1
    assert _value(samples, "wirestate_publish_to_write_seconds_bucket", le="0.00025") == 0
    assert _value(samples, "wirestate_event_loop_lag_seconds_count") == 1
    assert _value(samples, "wirestate_keepalive_stall_extensions_total") == 3
    # the rest of HubStats
    assert _value(samples, "wirestate_events_published_total") == 9
    assert _value(samples, "wirestate_pings_sent_total") == 11
    assert _value(samples, "wirestate_connections_aborted_total") == 4
    assert _value(samples, "wirestate_event_loop_stalls_total") == 1
    assert _value(samples, "wirestate_event_loop_stall_seconds_total") == 0.5


def test_type_lines_name_the_design_families(metrics: Metrics) -> None:
    text = metrics.render().decode()
    for line in [
        "# TYPE wirestate_connections gauge",
        "# TYPE wirestate_disconnects_total counter",
        "# TYPE wirestate_messages_sent_total counter",
        "# TYPE wirestate_messages_dropped_total counter",
        "# TYPE wirestate_breaker_state gauge",
        "# TYPE wirestate_breaker_transitions_total counter",
        "# TYPE wirestate_publish_to_write_seconds histogram",
        "# TYPE wirestate_event_loop_lag_seconds histogram",
        "# TYPE wirestate_keepalive_stall_extensions_total counter",
    ]:
        assert line in text


def test_every_close_cause_is_exported_before_its_first_disconnect(metrics: Metrics) -> None:
    samples = _samples(metrics)
    causes = {s.labels["cause"] for s in samples["wirestate_disconnects_total"]}
    assert causes >= {c.value for c in CloseCause}
    assert _value(samples, "wirestate_disconnects_total", cause="shutdown") == 0


def test_declared_drop_reasons_start_at_zero() -> None:
    metrics = Metrics(lambda: None, dict, drop_reasons=["slow_consumer", "closed"])
    samples = _samples(metrics)
    assert _value(samples, "wirestate_messages_dropped_total", reason="closed") == 0


def test_breaker_state_sets_exactly_one_state_to_one(metrics: Metrics) -> None:
    metrics.breaker_state("agent_status", "closed", BREAKER_STATES)
    metrics.breaker_state("bus", "open", BREAKER_STATES)
    for current in ["open", "half_open", "closed"]:
        metrics.breaker_state("agent_status", current, BREAKER_STATES)
        states = {
            s.labels["state"]: s.value
            for s in _samples(metrics)["wirestate_breaker_state"]
            if s.labels["breaker"] == "agent_status"
        }
        assert set(states) == set(BREAKER_STATES)
        assert [state for state, value in states.items() if value == 1] == [current]
        assert sum(states.values()) == 1
    assert _value(_samples(metrics), "wirestate_breaker_state", breaker="bus", state="open") == 1


def test_transition_moves_the_state_and_counts(metrics: Metrics) -> None:
    metrics.breaker_state("src", "closed", BREAKER_STATES)
    metrics.breaker_transition("src", "closed", "open")
    metrics.breaker_transition("src", "open", "half_open")
    metrics.breaker_transition("src", "half_open", "open")
    metrics.breaker_transition("src", "open", "half_open")
    samples = _samples(metrics)
    states = [s for s in samples["wirestate_breaker_state"] if s.labels["breaker"] == "src"]
    assert len(states) == len(BREAKER_STATES)
    assert [s.labels["state"] for s in states if s.value == 1] == ["half_open"]
    count = _value(
        samples,
        "wirestate_breaker_transitions_total",
        breaker="src",
        from_state="open",
        to_state="half_open",
    )
    assert count == 2


def test_a_transition_without_known_states_lists_both_ends() -> None:
    metrics = Metrics(lambda: None, dict)
    metrics.breaker_transition("new", "closed", "open")
    states = {s.labels["state"]: s.value for s in _samples(metrics)["wirestate_breaker_state"]}
    assert states == {"closed": 0, "open": 1}


def test_no_hub_yet_reads_zero() -> None:
    samples = _samples(Metrics(lambda: None, dict))
    assert _value(samples, "wirestate_messages_sent_total") == 0
    assert "wirestate_connections" not in samples  # no state has a connection yet


def test_counters_are_read_at_scrape_time() -> None:
    stats = HubStats()
    metrics = Metrics(lambda: stats, dict)
    assert _value(_samples(metrics), "wirestate_messages_sent_total") == 0
    stats.sent += 5  # the core counts; nothing calls into Metrics
    stats.disconnects["slow_consumer"] += 1
    samples = _samples(metrics)
    assert _value(samples, "wirestate_messages_sent_total") == 5
    assert _value(samples, "wirestate_disconnects_total", cause="slow_consumer") == 1


def test_two_instances_have_separate_registries() -> None:
    first = Metrics(lambda: HubStats(sent=1), dict)
    second = Metrics(lambda: HubStats(sent=2), dict)
    first.observe_loop_lag(0.1)
    assert _value(_samples(first), "wirestate_messages_sent_total") == 1
    assert _value(_samples(second), "wirestate_messages_sent_total") == 2
    assert _value(_samples(second), "wirestate_event_loop_lag_seconds_count") == 0


def test_process_collector_is_included(metrics: Metrics) -> None:
    samples = _samples(metrics)
    assert samples["process_resident_memory_bytes"][0].value > 0
    assert "process_cpu_seconds_total" in samples


async def test_endpoint_serves_the_text_format(metrics: Metrics) -> None:
    request = HttpRequest("GET", "/metrics", "/metrics", "", (), b"")
    response = await metrics.endpoint(request)
    assert response.status == 200
    assert dict(response.headers) == {"content-type": CONTENT_TYPE}
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert b"wirestate_messages_sent_total 42.0" in response.body


def test_the_servers_own_levels_are_read_at_scrape_time() -> None:
    levels = Levels(topics=7, topics_refused=2, handshakes=3)
    metrics = Metrics(lambda: None, dict, levels=lambda: levels)
    samples = _samples(metrics)
    assert _value(samples, "wirestate_topics") == 7
    assert _value(samples, "wirestate_topics_refused_total") == 2
    assert _value(samples, "wirestate_handshakes_in_flight") == 3
    levels = Levels(topics=8)
    assert _value(_samples(metrics), "wirestate_topics") == 8
    text = metrics.render().decode()
    assert "# TYPE wirestate_topics gauge" in text
    assert "# TYPE wirestate_handshakes_in_flight gauge" in text


def test_without_levels_they_read_zero() -> None:
    samples = _samples(Metrics(lambda: None, dict))
    assert _value(samples, "wirestate_topics") == 0
    assert _value(samples, "wirestate_handshakes_in_flight") == 0


async def test_a_fresh_server_exports_every_gauge_state_before_anything_happens() -> None:
    source = {
        "topic": "agents",
        "kind": "http",
        "url": f"http://127.0.0.1:{free_port()}/never-asked",
        "interval": 3600.0,
    }
    async with WirestateServer(server_settings({"sources": [source]})) as server:
        text = server.metrics.render().decode()
    for breaker in ("agents", "system_status"):
        for state in BreakerState:
            value = "1.0" if state is BreakerState.CLOSED else "0.0"
            line = f'wirestate_breaker_state{{breaker="{breaker}",state="{state.value}"}} {value}'
            assert line in text, line
    for conn_state in ConnState:
        assert f'wirestate_connections{{state="{conn_state.value}"}} 0.0' in text, conn_state


def test_the_source_leader_gauge_says_which_shared_sources_this_node_polls(
    metrics: Metrics,
) -> None:
    assert "wirestate_source_leader" not in _samples(metrics)  # no shared source yet
    metrics.source_leader("agents", False)
    metrics.source_leader("orders", False)
    assert _value(_samples(metrics), "wirestate_source_leader", source="agents") == 0
    metrics.source_leader("agents", True)
    samples = _samples(metrics)
    assert _value(samples, "wirestate_source_leader", source="agents") == 1
    assert _value(samples, "wirestate_source_leader", source="orders") == 0
