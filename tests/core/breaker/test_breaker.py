"""docs/breaker.md's scenarios S01-S33 on the pure breaker with a fake clock, plus table checks.

Background B (docs/breaker.md): breaker "src-A" with failure_threshold=5, reset_timeout=300,
success_threshold=1, half_open_max_calls=1, call_timeout=30; polls every 60 s; the cache is
primed with v0 fetched at t=-60. F = the fetch raises UpstreamError, anything else = the fetch
returns that value.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import math
import random
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from transitions import MachineError

from wirestate.core.breaker import (
    MACHINE,
    NO_VALUE,
    REFUSED,
    TRANSITIONS,
    TRIGGERS,
    Backoff,
    Breaker,
    BreakerConfig,
    BreakerState,
    CachedSource,
    CacheEntry,
    CallFailed,
    CallIgnored,
    CallRejected,
    CallSucceeded,
    CallTimeout,
    CountWindow,
    FailureRateRule,
    Outcome,
    Permit,
    PersistedBreaker,
    PollReason,
    PollResult,
    Rejected,
    RejectReason,
    SlowCallRule,
    StateChanged,
    TimeWindow,
    TransitionCause,
    wall_iso,
)
from wirestate.core.breaker.table import INITIAL

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
FORCED_OPEN, DISABLED = BreakerState.FORCED_OPEN, BreakerState.DISABLED
W = 1_735_689_600.0  # 2025-01-01T00:00:00Z: wall time = W + monotonic t
F = "F"


class UpstreamError(Exception):
    pass


class FakeClock:
    """Monotonic seconds, moved only by the test."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def set(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Harness:
    """One source behind one breaker, with a scripted upstream and a recorded event log."""

    def __init__(self, *, empty: bool = False, name: str = "src-A", **overrides: Any) -> None:
        settings: dict[str, Any] = {
            "failure_threshold": 5,
            "reset_timeout": 300.0,
            "success_threshold": 1,
            "half_open_max_calls": 1,
            "call_timeout": 30.0,
        }
        settings.update(overrides)
        self.clock = FakeClock()
        self.breaker = Breaker(name, BreakerConfig(**settings))
        cached = None if empty else CacheEntry("v0", -60.0)
        self.src: CachedSource[Any] = CachedSource(self.breaker, cached=cached)
        self.upstream_calls = 0
        self.events: list[StateChanged] = []
        self.calls: list[Any] = []

    def fetcher(self, outcome: object, took: float = 0.0) -> Callable[[], object]:
        def fetch() -> object:
            self.upstream_calls += 1
            self.clock.set(self.clock.t + took)
            if outcome == F:
                raise UpstreamError("boom")
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return fetch

    def poll(self, t: float, outcome: object = F, took: float = 0.0) -> PollResult[Any]:
        self.clock.set(t)
        result = self.src.poll(self.fetcher(outcome, took), t, clock=self.clock)
        self.drain()
        return result

    def polls(self, times: Iterable[float], outcomes: Iterable[object]) -> list[PollResult[Any]]:
        return [self.poll(t, o) for t, o in zip(times, outcomes, strict=True)]

    def drain(self) -> None:
        self.events += self.breaker.actions()
        self.calls += self.breaker.call_events()

    def trip_at_240(self) -> None:
        self.polls(range(0, 241, 60), [F] * 5)
        assert self.breaker.state is OPEN

    def transitions(self) -> list[tuple[BreakerState, BreakerState, float]]:
        self.drain()
        return [(e.from_state, e.to_state, e.at) for e in self.events]

    def count(self, kind: type) -> int:
        self.drain()
        return sum(isinstance(c, kind) for c in self.calls)


def stale_v0(result: PollResult[Any], reason: PollReason) -> None:
    assert (result.value, result.stale, result.fetched_at, result.reason) == (
        "v0",
        True,
        -60.0,
        reason,
    )


# --------------------------------------------------------------------------- A. counting


def test_s01_failures_below_threshold_keep_closed_and_serve_stale() -> None:
    h = Harness()
    results = h.polls([0, 60, 120, 180], [F] * 4)
    assert h.breaker.state is CLOSED
    assert h.breaker.consecutive_failures == 4
    assert h.upstream_calls == 4
    for t, r in zip([0, 60, 120, 180], results, strict=True):
        stale_v0(r, PollReason.UPSTREAM_ERROR)
        assert r.error == "UpstreamError"
        assert r.age == t + 60
    assert h.events == []


def test_s02_fifth_failure_trips_exactly_once_on_that_call() -> None:
    h = Harness()
    h.polls([0, 60, 120, 180], [F] * 4)
    r = h.poll(240, F)
    assert h.breaker.state is OPEN
    assert h.breaker.opened_at == 240
    assert h.breaker.snapshot(240).retry_at == 540
    assert h.events == [
        StateChanged("src-A", CLOSED, OPEN, 240, 5, 540.0, TransitionCause.FAILURE_THRESHOLD)
    ]
    assert h.upstream_calls == 5
    stale_v0(r, PollReason.UPSTREAM_ERROR)
    assert (r.error, r.state) == ("UpstreamError", OPEN)


def test_s03_a_success_resets_the_consecutive_count() -> None:
    h = Harness()
    outcomes = [F, F, F, F, "v1", F, F, F, F]
    results = h.polls(range(0, 481, 60), outcomes)
    assert h.breaker.state is CLOSED
    assert h.breaker.consecutive_failures == 4
    assert h.events == []
    fresh = results[4]
    assert (fresh.value, fresh.stale, fresh.fetched_at, fresh.reason) == (
        "v1",
        False,
        240,
        PollReason.FRESH,
    )
    assert h.src.cached == CacheEntry("v1", 240)
    h.poll(540, F)
    assert h.transitions() == [(CLOSED, OPEN, 540)]


# --------------------------------------------------------------------------- B. OPEN


def test_s04_open_short_circuits_and_serves_the_unchanged_stale_value() -> None:
    h = Harness()
    h.trip_at_240()
    entry = h.src.cached
    h.drain()
    rejected_before, events_before = h.count(CallRejected), len(h.events)
    for t in (300, 360, 420, 480):
        r = h.poll(t, "never")
        stale_v0(r, PollReason.CIRCUIT_OPEN)
        assert r.age == t + 60
        assert r.retry_after == 540 - t
    assert h.upstream_calls == 5
    assert h.count(CallRejected) - rejected_before == 4
    assert len(h.events) == events_before
    assert h.src.cached is entry
    assert h.src.cached == CacheEntry("v0", -60.0)


def test_s05_no_cached_value_degrades_to_no_data_and_never_raises() -> None:
    h = Harness(empty=True)
    for r in h.polls(range(0, 241, 60), [F] * 5):
        assert (r.value, r.stale, r.reason, r.fetched_at, r.age) == (
            None,
            False,
            PollReason.UPSTREAM_ERROR,
            None,
            None,
        )
        assert r.no_data
    assert h.breaker.state is OPEN
    r = h.poll(300, "never")
    assert (r.value, r.reason, r.retry_after, r.no_data) == (
        None,
        PollReason.CIRCUIT_OPEN,
        240,
        True,
    )
    assert h.upstream_calls == 5
    r = h.poll(540, "v1")
    assert (r.value, r.stale, r.reason) == ("v1", False, PollReason.FRESH)
    assert h.breaker.state is CLOSED


def test_s06_the_wait_boundary_is_inclusive() -> None:
    h = Harness()
    h.trip_at_240()
    got = h.breaker.acquire(539.999)
    assert isinstance(got, Rejected)
    assert got.reason is RejectReason.CIRCUIT_OPEN
    assert got.retry_after == pytest.approx(0.001)
    h.poll(540, "v1")
    assert (OPEN, HALF_OPEN, 540) in h.transitions()
    assert h.upstream_calls == 6


def test_s07_the_transition_is_lazy_and_state_reads_are_pure() -> None:
    h = Harness()
    h.trip_at_240()
    h.drain()
    before = len(h.events)
    state_before = dict(vars(h.breaker))
    first, second = h.breaker.snapshot(1000), h.breaker.snapshot(1000)
    assert first == second
    assert (first.state, first.probe_due, first.retry_after) == (OPEN, True, 0.0)
    assert vars(h.breaker) == state_before
    assert h.breaker.actions() == []
    assert h.breaker.call_events() == []
    h.poll(1000, F)
    assert [e for e in h.transitions()[before:] if e[1] is HALF_OPEN] == [(OPEN, HALF_OPEN, 1000)]
    assert h.upstream_calls == 6


# --------------------------------------------------------------------------- C. HALF_OPEN


def test_s08_a_successful_trial_closes_the_breaker() -> None:
    h = Harness()
    h.trip_at_240()
    r = h.poll(540, "v1")
    assert (r.value, r.stale, r.reason, r.state) == ("v1", False, PollReason.FRESH, CLOSED)
    assert h.breaker.consecutive_failures == 0
    assert h.transitions()[-2:] == [(OPEN, HALF_OPEN, 540), (HALF_OPEN, CLOSED, 540)]
    h.poll(600, "v2")
    assert h.upstream_calls == 7
    assert h.src.cached == CacheEntry("v2", 600)


def test_s09_a_failed_trial_reopens_with_a_fresh_timer() -> None:
    h = Harness()
    h.trip_at_240()
    r = h.poll(540, F)
    assert h.breaker.state is OPEN
    assert h.breaker.opened_at == 540
    assert h.breaker.snapshot(540).retry_at == 840
    stale_v0(r, PollReason.UPSTREAM_ERROR)
    assert h.transitions()[-2:] == [(OPEN, HALF_OPEN, 540), (HALF_OPEN, OPEN, 540)]
    assert h.events[-1].retry_at == 840
    assert h.events[-1].cause is TransitionCause.TRIAL_FAILED
    for t in (600, 660, 720, 780):
        assert h.poll(t, "never").reason is PollReason.CIRCUIT_OPEN
    assert h.upstream_calls == 6
    assert h.poll(840, "v1").reason is PollReason.FRESH
    assert h.upstream_calls == 7


def test_s10_one_trial_and_concurrent_callers_are_rejected_not_blocked() -> None:
    h = Harness()
    h.trip_at_240()
    p1 = h.src.begin(540)
    assert isinstance(p1, Permit)
    assert p1.trial
    r = h.poll(545, "never")
    stale_v0(r, PollReason.HALF_OPEN_BUSY)
    assert r.retry_after == 25  # the trial's lease (call_timeout 30) runs out at 570
    assert h.upstream_calls == 5  # the trial's own fetch is "still pending" in the test
    h.src.complete(p1, 546, value="v1")
    assert h.breaker.state is CLOSED
    assert isinstance(h.breaker.acquire(547), Permit)


def _open_at_240_with_three_trials() -> tuple[Harness, list[Permit]]:
    h = Harness(half_open_max_calls=3, success_threshold=3)
    h.trip_at_240()
    got = [h.breaker.acquire(540) for _ in range(4)]
    permits = [p for p in got if isinstance(p, Permit)]
    assert len(permits) == 3
    assert isinstance(got[3], Rejected)
    assert got[3].reason is RejectReason.HALF_OPEN_BUSY
    h.drain()
    return h, permits


def test_s11_case_a_three_trial_successes_close_once() -> None:
    h, (p1, p2, p3) = _open_at_240_with_three_trials()
    h.breaker.on_success(p1, 541)
    h.breaker.on_success(p2, 542)
    assert h.breaker.state is HALF_OPEN
    h.breaker.on_success(p3, 543)
    assert h.breaker.state is CLOSED
    assert [t for t in h.transitions() if t[1] is CLOSED] == [(HALF_OPEN, CLOSED, 543)]


def test_s11_case_b_a_failure_wins_and_late_outcomes_change_nothing() -> None:
    h, (p1, p2, p3) = _open_at_240_with_three_trials()
    h.breaker.on_success(p1, 541)
    h.breaker.on_failure(p2, 542, UpstreamError())
    assert h.breaker.state is OPEN
    assert h.breaker.opened_at == 542
    assert h.breaker.snapshot(542).retry_at == 842
    assert h.transitions()[-1] == (HALF_OPEN, OPEN, 542)
    h.drain()
    events, calls = len(h.events), len(h.calls)
    snap = h.breaker.snapshot(543)
    settled = h.breaker.on_success(p3, 543)
    assert (settled.outcome, settled.current, settled.counted) == (Outcome.SUCCESS, False, False)
    assert h.breaker.state is OPEN
    assert h.breaker.snapshot(543) == snap
    h.drain()
    assert (len(h.events), len(h.calls)) == (events, calls)


def test_s12_the_success_threshold_across_sequential_polls() -> None:
    h = Harness(success_threshold=3)
    h.trip_at_240()
    for t, value in ((540, "v1"), (600, "v2")):
        r = h.poll(t, value)
        assert (r.value, r.stale, r.reason) == (value, False, PollReason.FRESH)
        assert h.breaker.state is HALF_OPEN
    h.poll(660, "v3")
    assert h.breaker.state is CLOSED


def test_s12_variant_success_success_failure_reopens_and_resets_the_count() -> None:
    h = Harness(success_threshold=3)
    h.trip_at_240()
    h.poll(540, "v1")
    h.poll(600, "v2")
    assert h.breaker.snapshot(600).trial_successes == 2
    h.poll(660, F)
    snap = h.breaker.snapshot(660)
    assert (snap.state, snap.trial_successes, snap.retry_at) == (OPEN, 0, 960)


def test_s13_a_timed_out_trial_reopens_the_breaker() -> None:
    h = Harness(half_open_max_wait=60)
    h.trip_at_240()
    p = h.breaker.acquire(540)
    assert isinstance(p, Permit)
    settled = h.breaker.on_failure(p, 570, CallTimeout())
    assert settled.outcome is Outcome.TIMEOUT
    assert (h.breaker.state, h.breaker.opened_at) == (OPEN, 570)


def test_s13_a_lost_trial_expires_and_cannot_wedge_half_open() -> None:
    h = Harness(half_open_max_wait=60)
    h.trip_at_240()
    p = h.breaker.acquire(540)
    assert isinstance(p, Permit)
    assert isinstance(h.breaker.acquire(599), Rejected)  # still within its lease: busy
    h.drain()
    before = len(h.events)
    got = h.breaker.acquire(600)
    assert isinstance(got, Rejected)
    assert got.reason is RejectReason.CIRCUIT_OPEN
    h.drain()
    assert h.events[before:] == [
        StateChanged("src-A", HALF_OPEN, OPEN, 600, 6, 900.0, TransitionCause.LEASE_EXPIRED)
    ]
    assert any(isinstance(c, CallFailed) and c.outcome is Outcome.EXPIRED for c in h.calls)
    late = h.breaker.on_success(p, 601)
    assert late.outcome is Outcome.ALREADY_SETTLED
    assert (h.breaker.state, h.breaker.opened_at) == (OPEN, 600)
    assert h.breaker.actions() == []


def test_s14_cancellation_is_released_uncounted_and_propagates() -> None:
    h = Harness()
    h.trip_at_240()
    h.drain()
    events = len(h.events)
    snap = h.breaker.snapshot(540)
    with pytest.raises(asyncio.CancelledError):
        h.poll(540, asyncio.CancelledError(), took=1)
    assert h.breaker.state is HALF_OPEN
    after = h.breaker.snapshot(541)
    assert (after.consecutive_failures, after.trial_successes, after.trials_in_flight) == (
        snap.consecutive_failures,
        0,
        0,
    )
    assert h.transitions()[events:] == [(OPEN, HALF_OPEN, 540)]  # the trial's own entry only
    assert not any(c.at == 541 for c in h.calls)
    r = h.poll(600, "v1")
    assert r.reason is PollReason.FRESH
    assert h.upstream_calls == 7


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)])
def test_s14_interpreter_exits_propagate_and_are_not_counted(exc: BaseException) -> None:
    h = Harness()
    h.polls([0, 60, 120], [F] * 3)
    with pytest.raises(type(exc)):
        h.poll(180, exc)
    assert h.breaker.consecutive_failures == 3
    assert h.events == []
    assert not any(isinstance(c, CallFailed) and c.at == 180 for c in h.calls)


def test_s14_complete_re_raises_a_passed_cancellation() -> None:
    h = Harness()
    p = h.src.begin(0)
    assert isinstance(p, Permit)
    err = asyncio.CancelledError()
    with pytest.raises(asyncio.CancelledError) as caught:
        h.src.complete(p, 1, error=err)
    assert caught.value is err
    assert h.breaker.on_success(p, 2).outcome is Outcome.ALREADY_SETTLED
    assert h.breaker.consecutive_failures == 0


# --------------------------------------------------------------------------- D. classifying


class NotModified(Exception):
    pass


class NotModifiedAtAll(NotModified):
    pass


class HTTPError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _is_404(e: BaseException) -> bool:
    return isinstance(e, HTTPError) and e.status == 404


def test_s15_ignored_exceptions_count_as_neither() -> None:
    h = Harness(ignore=(NotModified, _is_404))
    h.polls([0, 60, 120], [F] * 3)
    for t, exc in ((180, NotModified()), (181, NotModifiedAtAll()), (182, HTTPError(404))):
        r = h.poll(t, exc)
        stale_v0(r, PollReason.UPSTREAM_ERROR)
        assert r.error == type(exc).__name__
        assert h.breaker.consecutive_failures == 3
    assert h.events == []
    assert h.count(CallIgnored) == 3
    h.poll(240, HTTPError(500))
    assert h.breaker.state is CLOSED
    h.poll(300, F)
    assert h.breaker.state is OPEN
    assert h.breaker.consecutive_failures == 5


def test_s15_an_ignored_trial_releases_the_permit() -> None:
    h = Harness(ignore=(NotModified,))
    h.trip_at_240()
    h.poll(540, NotModified())
    assert h.breaker.state is HALF_OPEN
    assert h.breaker.snapshot(540).trials_in_flight == 0
    r = h.poll(541, "v1")
    assert (r.reason, h.breaker.state) == (PollReason.FRESH, CLOSED)


def test_s15_success_on_counts_the_error_as_a_success_without_refreshing() -> None:
    h = Harness(success_on=(NotModified,))
    h.polls([0, 60, 120], [F] * 3)
    r = h.poll(180, NotModified())
    assert h.breaker.consecutive_failures == 0
    stale_v0(r, PollReason.UPSTREAM_ERROR)
    assert r.error == "NotModified"
    assert h.count(CallSucceeded) == 1


@dataclass(frozen=True)
class Envelope:
    status: int
    items: tuple[str, ...]


def test_s16_a_bad_result_is_a_failure() -> None:
    h = Harness(is_failure_result=lambda r: r.status >= 500 or not r.items)
    r = h.poll(0, Envelope(503, ()))
    assert h.breaker.consecutive_failures == 1
    assert h.src.cached == CacheEntry("v0", -60.0)
    stale_v0(r, PollReason.UPSTREAM_ERROR)
    assert r.error is None
    h.polls([60, 120, 180, 240], [Envelope(200, ())] + [Envelope(503, ("x",))] * 3)
    assert h.breaker.state is OPEN
    good = Harness(is_failure_result=lambda r: r.status >= 500 or not r.items)
    assert good.poll(0, Envelope(200, ("a",))).reason is PollReason.FRESH


def test_s17_a_timeout_is_a_failure_and_the_late_value_is_discarded() -> None:
    h = Harness()
    p = h.src.begin(0)
    assert isinstance(p, Permit)
    r = h.src.complete(p, 30, error=CallTimeout())
    stale_v0(r, PollReason.TIMEOUT)
    assert r.error == "CallTimeout"
    assert h.breaker.consecutive_failures == 1
    late = h.src.complete(p, 35, value="v1")
    assert late.reason is PollReason.TIMEOUT
    assert h.src.cached == CacheEntry("v0", -60.0)
    assert h.breaker.consecutive_failures == 1
    # The core contract: a value settled >= call_timeout after the permit is a TIMEOUT.
    for t in (60, 120, 180):
        r = h.poll(t, "too-late", took=30)
        assert (r.reason, r.value) == (PollReason.TIMEOUT, "v0")
    assert h.breaker.state is CLOSED
    h.poll(240, "too-late", took=31)
    assert h.breaker.state is OPEN
    assert h.src.cached == CacheEntry("v0", -60.0)
    assert h.count(CallFailed) == 5


def test_s18_slow_calls_trip_the_optional_slow_call_rule() -> None:
    rule = SlowCallRule(duration=10, rate_threshold=100, window=CountWindow(5), min_calls=5)
    h = Harness(slow_call=rule)
    for i, t in enumerate(range(0, 241, 60)):
        r = h.poll(t, f"v{i + 1}", took=12)
        assert (r.stale, r.reason, r.fetched_at) == (False, PollReason.FRESH, t + 12)
        assert h.breaker.consecutive_failures == 0
    assert h.breaker.state is OPEN
    assert h.events == [
        StateChanged("src-A", CLOSED, OPEN, 252, 0, 552.0, TransitionCause.SLOW_CALL_RATE)
    ]
    assert h.count(CallSucceeded) == 5


@pytest.mark.parametrize(
    "durations", [[10.0] * 5, [11, 11, 11, 11, 3]], ids=["exactly-10-is-not-slow", "80-percent"]
)
def test_s18_calls_that_are_not_slow_enough_stay_closed(durations: list[float]) -> None:
    rule = SlowCallRule(duration=10, rate_threshold=100, window=CountWindow(5), min_calls=5)
    h = Harness(slow_call=rule)
    for t, took in zip(range(0, 241, 60), durations, strict=True):
        h.poll(t, "v", took=took)
    assert h.breaker.state is CLOSED
    assert h.breaker.snapshot(300).slow_window == (5, sum(d > 10 for d in durations))
    assert h.src.breaker is h.breaker
    h.breaker.reset(300)
    assert h.breaker.snapshot(300).slow_window == (0, 0)


# --------------------------------------------------------------------------- E. rate windows


def test_s19_count_window_minimum_calls_and_inclusive_threshold() -> None:
    rate = FailureRateRule(threshold=50, window=CountWindow(10), min_calls=5)
    h = Harness(failure_rate=rate)
    h.polls([0, 60, 120, 180], ["a", "b", F, F])
    assert h.breaker.state is CLOSED
    assert h.breaker.snapshot(180).failure_window == (4, 2)
    h.poll(240, "c")
    assert h.breaker.state is CLOSED
    h.poll(300, F)
    assert h.breaker.state is OPEN
    assert h.transitions() == [(CLOSED, OPEN, 300)]
    assert h.events[0].cause is TransitionCause.FAILURE_RATE
    h.breaker.reset(310)
    assert h.breaker.snapshot(310).failure_window == (0, 0)  # a fresh window after closing


def test_s19_min_calls_above_the_window_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_calls"):
        FailureRateRule(threshold=50, window=CountWindow(10), min_calls=11)
    with pytest.raises(ValueError, match="min_calls"):
        SlowCallRule(duration=1, window=CountWindow(3), min_calls=4)


def test_s19_the_count_window_slides() -> None:
    rate = FailureRateRule(threshold=60, window=CountWindow(3), min_calls=3)
    h = Harness(failure_rate=rate)
    h.polls([0, 60, 120, 180], [F, "a", "b", F])  # window [a, b, F]: 1/3
    assert h.breaker.snapshot(180).failure_window == (3, 1)
    h.poll(240, F)  # [b, F, F]: 2/3 >= 60 %
    assert h.breaker.state is OPEN


def test_s20_time_window_expiry() -> None:
    rate = FailureRateRule(threshold=50, window=TimeWindow(600), min_calls=3)
    h = Harness(failure_rate=rate, failure_threshold=1)
    h.polls([0, 60, 700], [F, F, F])
    assert h.breaker.snapshot(700).failure_window == (1, 1)
    assert h.breaker.state is CLOSED
    h.polls([760, 820], [F, F])
    assert h.breaker.state is OPEN
    assert h.transitions() == [(CLOSED, OPEN, 820)]


def test_s20_the_poller_wiring_rejects_a_rule_that_can_never_fire() -> None:
    never = FailureRateRule(threshold=50, window=TimeWindow(600), min_calls=100)
    config = BreakerConfig(failure_rate=never)
    with pytest.raises(ValueError, match="min_calls"):
        CachedSource(Breaker("src-A", config), poll_interval=60)
    fits = FailureRateRule(threshold=50, window=TimeWindow(600), min_calls=10)
    CachedSource(Breaker("src-A", BreakerConfig(failure_rate=fits)), poll_interval=60)
    slow = SlowCallRule(duration=5, window=TimeWindow(60), min_calls=2)
    with pytest.raises(ValueError, match=r"slow_call\.min_calls"):
        BreakerConfig(slow_call=slow).check_cadence(60)
    # Count windows and endless time windows always fill up.
    BreakerConfig(
        failure_rate=FailureRateRule(window=TimeWindow(math.inf), min_calls=100),
        slow_call=SlowCallRule(duration=5, window=CountWindow(50), min_calls=50),
    ).check_cadence(3600)
    with pytest.raises(ValueError, match="poll_interval"):
        BreakerConfig().check_cadence(0)


# --------------------------------------------------------------------------- F. manual control


def test_s21_force_open_holds_until_reset_and_never_half_opens() -> None:
    h = Harness()
    assert h.breaker.force_open(100)
    assert h.transitions() == [(CLOSED, FORCED_OPEN, 100)]
    assert h.events[0].retry_at == math.inf
    for t in (120, 180, 86_400):
        r = h.poll(t, "never")
        stale_v0(r, PollReason.FORCED_OPEN)
        assert r.retry_after == math.inf
    assert h.upstream_calls == 0
    assert not h.breaker.snapshot(86_400).probe_due
    assert not h.breaker.force_open(200)
    assert h.breaker.reset(90_000)
    assert h.transitions() == [(CLOSED, FORCED_OPEN, 100), (FORCED_OPEN, CLOSED, 90_000)]
    snap = h.breaker.snapshot(90_000)
    assert (snap.consecutive_failures, snap.attempt, snap.trial_successes) == (0, 0, 0)
    assert h.poll(90_060, "v1").reason is PollReason.FRESH
    assert h.upstream_calls == 1


def test_s21_variant_force_open_cancels_the_pending_retry() -> None:
    h = Harness()
    h.trip_at_240()
    h.breaker.force_open(300)
    r = h.poll(540, "never")
    assert (r.reason, r.state) == (PollReason.FORCED_OPEN, FORCED_OPEN)
    assert h.transitions()[-1] == (OPEN, FORCED_OPEN, 300)
    assert h.upstream_calls == 5


def test_s22_disable_is_a_pass_through_that_records_nothing() -> None:
    h = Harness()
    assert h.breaker.disable(0)
    assert h.transitions() == [(CLOSED, DISABLED, 0)]
    for t in range(0, 20 * 60, 60):
        stale_v0(h.poll(t, F), PollReason.UPSTREAM_ERROR)
    assert h.upstream_calls == 20
    assert h.count(CallRejected) == 0
    assert len(h.transitions()) == 1
    assert h.breaker.consecutive_failures == 0
    assert h.poll(1200, "v1").reason is PollReason.FRESH  # successes still refresh the cache
    assert not h.breaker.disable(1200)
    assert h.breaker.reset(1260)
    assert (h.breaker.state, h.breaker.consecutive_failures) == (CLOSED, 0)
    h.poll(1320, F)
    assert h.breaker.state is CLOSED


def test_s23_manual_reset_from_open() -> None:
    h = Harness(backoff=Backoff(multiplier=2, max=3600))
    h.trip_at_240()
    assert h.breaker.attempt == 1
    h.drain()
    before = len(h.events)
    assert h.breaker.reset(300)
    assert (h.breaker.state, h.breaker.consecutive_failures, h.breaker.attempt) == (CLOSED, 0, 0)
    h.drain()
    assert h.events[before:] == [
        StateChanged("src-A", OPEN, CLOSED, 300, 0, None, TransitionCause.RESET)
    ]
    assert not h.breaker.reset(301)
    assert h.breaker.actions() == []


def test_s23_closed_to_half_open_is_refused() -> None:
    b = Breaker("src-A")
    b.acquire(0)
    generation = b.generation
    with pytest.raises(MachineError):
        MACHINE.events["probe"].trigger(b, now=1)
    assert b.state is CLOSED
    assert b.generation == generation
    assert b.actions() == []
    assert not hasattr(b, "to_half_open")
    assert not hasattr(b, "half_open")


# --------------------------------------------------------------------------- G. events


def test_s24_the_full_life_cycle_emits_each_transition_once_in_order() -> None:
    h = Harness()
    assert h.breaker.actions() == []  # nothing at construction
    h.polls(range(0, 241, 60), [F] * 5)
    h.polls(range(300, 481, 60), ["never"] * 4)
    h.poll(540, F)
    h.polls(range(600, 781, 60), ["never"] * 4)
    h.poll(840, "v1")
    h.poll(900, "v2")
    assert h.transitions() == [
        (CLOSED, OPEN, 240),
        (OPEN, HALF_OPEN, 540),
        (HALF_OPEN, OPEN, 540),
        (OPEN, HALF_OPEN, 840),
        (HALF_OPEN, CLOSED, 840),
    ]
    for previous, event in zip(h.events, h.events[1:], strict=False):
        assert event.from_state is previous.to_state
    assert [h.count(k) for k in (CallFailed, CallRejected, CallSucceeded)] == [6, 8, 2]
    assert h.upstream_calls == 8


def _manual_refresh_then_trip(**overrides: Any) -> tuple[Harness, Permit]:
    h = Harness(**overrides)
    h.polls([0, 60, 120, 180], [F] * 4)
    p_old = h.src.begin(200)
    assert isinstance(p_old, Permit)
    h.poll(240, F)
    assert h.breaker.state is OPEN
    h.drain()
    return h, p_old


def test_s25_a_late_failure_never_re_trips_or_extends() -> None:
    h, p_old = _manual_refresh_then_trip()
    settled = h.breaker.on_failure(p_old, 250, UpstreamError())
    assert not settled.counted
    assert h.breaker.actions() == []
    assert h.breaker.opened_at == 240
    assert h.breaker.snapshot(250).retry_at == 540


def test_s25_a_late_success_never_closes_and_a_timed_out_value_is_not_cached() -> None:
    h, p_old = _manual_refresh_then_trip()  # call_timeout=30: 50 s is a timeout (S17)
    r = h.src.complete(p_old, 250, value="v_late")
    assert (r.reason, r.state) == (PollReason.TIMEOUT, OPEN)
    assert h.breaker.actions() == []
    assert h.src.cached == CacheEntry("v0", -60.0)


def test_s25_a_late_success_may_refresh_the_cache_because_it_is_newer() -> None:
    h, p_old = _manual_refresh_then_trip(call_timeout=None)
    r = h.src.complete(p_old, 250, value="v_late")
    assert (r.value, r.stale, r.reason, r.state) == ("v_late", False, PollReason.FRESH, OPEN)
    assert h.breaker.state is OPEN
    assert h.breaker.actions() == []
    assert h.breaker.call_events() == []
    assert h.breaker.snapshot(250).retry_at == 540
    later = h.poll(300, "never")
    assert (later.value, later.stale, later.fetched_at, later.reason) == (
        "v_late",
        True,
        250,
        PollReason.CIRCUIT_OPEN,
    )


def test_s26_a_failing_listener_is_isolated(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()
    received: list[StateChanged] = []

    def l1(change: StateChanged) -> None:
        raise RuntimeError("secret upstream text")

    h.breaker.add_listener(l1)
    h.breaker.add_listener(received.append)
    with caplog.at_level(logging.ERROR, logger="wirestate.core.breaker"):
        results = h.polls(range(0, 241, 60), [F] * 5)
    assert h.breaker.state is OPEN
    assert [(c.from_state, c.to_state) for c in received] == [(CLOSED, OPEN)]
    stale_v0(results[-1], PollReason.UPSTREAM_ERROR)
    assert "RuntimeError" in caplog.text
    assert "l1" in caplog.text
    assert "secret" not in caplog.text
    h.breaker.remove_listener(l1)
    h.breaker.reset(300)
    assert [c.to_state for c in received] == [OPEN, CLOSED]


# --------------------------------------------------------------------------- H. backoff


def test_s27_exponential_open_duration_capped_and_reset_on_close() -> None:
    h = Harness(backoff=Backoff(base=300, multiplier=2, max=3600, jitter=0))
    h.trip_at_240()
    trials = [540, 1140, 2340, 4740, 8340, 11_940]
    for attempt, t in enumerate(trials, start=1):
        assert h.breaker.attempt == attempt
        assert not h.breaker.snapshot(t - 0.5).probe_due
        assert h.breaker.snapshot(t).probe_due
        h.drain()
        before = len(h.events)
        if t == trials[-1]:
            break
        h.poll(t, F)
        assert h.transitions()[before:] == [(OPEN, HALF_OPEN, t), (HALF_OPEN, OPEN, t)]
    h.poll(11_940, "v1")
    assert h.breaker.state is CLOSED
    h.polls([12_000 + 60 * i for i in range(5)], [F] * 5)
    assert h.breaker.snapshot(12_240).retry_after == 300
    assert h.breaker.snapshot(12_240).wait == 300


def test_s27_jitter_is_deterministic_with_a_seeded_rng_and_bounded() -> None:
    backoff = Backoff(base=300, multiplier=2, max=3600, jitter=0.1)

    def waits(seed: int) -> list[float]:
        b = Breaker("j", BreakerConfig(backoff=backoff), rng=random.Random(seed).random)
        out, t = [], 0.0
        for _ in range(5):
            b.on_failure(_permit(b.acquire(t)), t, UpstreamError())
        for _ in range(8):
            snap = b.snapshot(t)
            out.append(snap.wait)
            t += snap.wait
            b.on_failure(_permit(b.acquire(t)), t, UpstreamError())
        return out

    first = waits(7)
    assert first == waits(7)
    assert first != waits(8)
    for attempt, wait in enumerate(first, start=1):
        d = min(300 * 2 ** (attempt - 1), 3600)
        assert 0.9 * d <= wait <= min(1.1 * d, 3600)


def test_s27_the_backoff_function_receives_the_attempt_count() -> None:
    backoff = Backoff(multiplier=3, max=10_000)
    assert [backoff.duration(n, 10) for n in (1, 2, 3, 4)] == [10, 30, 90, 270]
    assert backoff.duration(50, 10) == 10_000
    jittered = Backoff(multiplier=2, max=100, jitter=0.5)
    assert jittered.duration(1, 10, u=0.0) == 5
    assert jittered.duration(1, 10, u=0.999) == pytest.approx(14.99)
    assert jittered.duration(7, 10, u=0.999) == 100  # capped after the jitter too


def _permit(got: Permit | Rejected) -> Permit:
    assert isinstance(got, Permit), got
    return got


def test_s27_jitter_needs_an_rng_and_survives_a_bad_one() -> None:
    jittery = BreakerConfig(failure_threshold=1, backoff=Backoff(max=600, jitter=0.2))
    with pytest.raises(ValueError, match="rng"):
        Breaker("j", jittery)
    b = Breaker("j", jittery, rng=lambda: math.nan)
    b.on_failure(_permit(b.acquire(0)), 0, UpstreamError())
    assert b.snapshot(0).wait == 300  # NaN from the rng: no jitter, no crash


# --------------------------------------------------------------------------- I. time anomalies


def _open_at_1000() -> Harness:
    h = Harness()
    h.polls([1000] * 5, [F] * 5)
    assert (h.breaker.state, h.breaker.opened_at) == (OPEN, 1000)
    return h


def test_s28_the_clock_goes_backwards_while_open() -> None:
    h = _open_at_1000()
    seen = []
    for t, expected in ((1100, 200), (400, 200), (500, 100)):
        r = h.poll(t, "never")
        assert r.reason is PollReason.CIRCUIT_OPEN
        assert r.retry_after == expected
        seen.append(r.retry_after)
    assert all(0 <= s <= 300 for s in seen)
    assert h.breaker.snapshot(450).retry_after == 100  # a read behind the clock: no progress
    r = h.poll(600, "v1")
    assert r.reason is PollReason.FRESH
    assert h.transitions()[-2:] == [(OPEN, HALF_OPEN, 600), (HALF_OPEN, CLOSED, 600)]


def test_s28_rate_samples_from_before_a_backwards_jump_still_expire() -> None:
    rate = FailureRateRule(threshold=50, window=TimeWindow(600), min_calls=3)
    h = Harness(failure_rate=rate)
    h.polls([1000, 400, 1000], [F, F, F])  # forward progress: 0, 0, 600
    assert h.breaker.snapshot(1000).failure_window == (1, 1)
    assert h.breaker.state is CLOSED


def test_s29_a_very_large_forward_gap_is_one_transition() -> None:
    h = Harness()
    h.trip_at_240()
    h.drain()
    before = len(h.events)
    r = h.poll(259_440, F)
    assert h.transitions()[before:] == [(OPEN, HALF_OPEN, 259_440), (HALF_OPEN, OPEN, 259_440)]
    assert h.upstream_calls == 6
    assert h.breaker.snapshot(259_440).retry_at == 259_740
    assert h.breaker.opened_at == 259_440
    stale_v0(r, PollReason.UPSTREAM_ERROR)
    assert r.age == 259_500


def test_s29_the_gap_leaves_the_attempt_count_unchanged() -> None:
    h = Harness(backoff=Backoff(multiplier=2, max=3600))
    h.trip_at_240()
    got = h.breaker.acquire(259_440)
    assert isinstance(got, Permit)
    assert (h.breaker.state, h.breaker.attempt) == (HALF_OPEN, 1)


def test_s29_rate_samples_expire_and_consecutive_counts_do_not_decay() -> None:
    rate = FailureRateRule(threshold=50, window=TimeWindow(600), min_calls=1)
    h = Harness(failure_rate=rate, success_threshold=1)
    h.polls([0, 60], ["a", "b"])
    assert h.breaker.snapshot(259_380).failure_window == (0, 0)
    consecutive = Harness()
    consecutive.polls([0, 60, 120, 180], [F] * 4)
    consecutive.poll(259_380, F)
    assert consecutive.breaker.state is OPEN


def test_s30_extreme_durations_do_not_overflow() -> None:
    forced = Breaker("x")
    forced.force_open(0)
    snap = forced.snapshot(10, wall_offset=W)
    assert (snap.retry_after, snap.retry_at, snap.retry_at_wall) == (math.inf, math.inf, None)
    assert wall_iso(snap.retry_at_wall) is None
    assert wall_iso(math.inf) is None

    endless = Harness(reset_timeout=math.inf)
    endless.trip_at_240()
    snap = endless.breaker.snapshot(1e12, wall_offset=W)
    assert (snap.retry_after, snap.retry_at, snap.probe_due) == (math.inf, math.inf, False)
    assert endless.events[-1].retry_at == math.inf
    assert wall_iso(snap.retry_at_wall) is None
    assert endless.poll(1e12, "never").retry_after == math.inf

    unbounded = Backoff(multiplier=10, max=math.inf)
    assert unbounded.duration(5000, 300) == math.inf
    restored = Breaker.restore(
        "x",
        BreakerConfig(backoff=unbounded),
        PersistedBreaker(state=OPEN, attempt=5000, opened_at_wall=W),
        now=0,
        wall_now=W,
    )
    assert restored.snapshot(1e15).retry_after == math.inf


def test_s30_wall_clock_display() -> None:
    assert wall_iso(W) == "2025-01-01T00:00:00.000Z"
    assert wall_iso(None) is None
    assert wall_iso(math.nan) is None
    assert wall_iso(1e20) is None  # beyond datetime: None, not OverflowError
    h = Harness()
    h.trip_at_240()
    snap = h.breaker.snapshot(240, wall_offset=W)
    assert snap.retry_at_wall == W + 540
    assert wall_iso(snap.retry_at_wall) == "2025-01-01T00:09:00.000Z"
    assert h.breaker.snapshot(240).retry_at_wall is None


# --------------------------------------------------------------------------- J. isolation etc.


def test_s31_breakers_are_isolated_per_source() -> None:
    a, b = Harness(name="A"), Harness(name="B")
    b.src = CachedSource(b.breaker, cached=CacheEntry("b0", -60.0))
    for i, t in enumerate(range(0, 241, 60)):
        a.poll(t, F)
        r = b.poll(t, f"b{i + 1}")
        assert (r.value, r.stale, r.reason) == (f"b{i + 1}", False, PollReason.FRESH)
    assert (a.breaker.state, b.breaker.state) == (OPEN, CLOSED)
    r = b.poll(300, "b6")
    assert r.value == "b6"
    assert a.poll(300, "never").value == "v0"
    assert {e.breaker for e in a.events} == {"A"}
    assert b.events == []
    assert {c.breaker for c in a.calls} == {"A"}
    with pytest.raises(ValueError, match="not issued"):
        a.breaker.on_success(_permit(b.breaker.acquire(360)), 360)


def test_s32_restoring_emits_nothing_and_keeps_the_timer() -> None:
    saved = PersistedBreaker(state=OPEN, opened_at_wall=W + 200, consecutive_failures=5, attempt=1)
    now = 5000.0  # this process's monotonic clock: unrelated to the saving process's
    b = Breaker.restore("src-A", BreakerConfig(), saved, now=now, wall_now=W + 300)
    assert b.actions() == []
    snap = b.snapshot(now, wall_offset=W + 300 - now)
    assert snap.retry_at_wall == W + 500
    assert snap.retry_after == 200
    assert (snap.state, snap.consecutive_failures, snap.attempt) == (OPEN, 5, 1)
    assert b.persist(now + 50, W + 350) == dataclasses.replace(saved, opened_at_wall=W + 200)
    assert isinstance(b.acquire(now + 199), Rejected)
    assert isinstance(b.acquire(now + 200), Permit)


def test_s32_an_opening_in_the_future_counts_as_now() -> None:
    saved = PersistedBreaker(state=OPEN, opened_at_wall=W + 400, consecutive_failures=5)
    b = Breaker.restore("src-A", None, saved, now=0, wall_now=W + 300)
    snap = b.snapshot(0)
    assert snap.retry_after == 300
    assert snap.attempt == 1
    assert b.actions() == []


@pytest.mark.parametrize("state", [CLOSED, HALF_OPEN, FORCED_OPEN, DISABLED])
def test_s32_other_states_restore_without_events(state: BreakerState) -> None:
    saved = PersistedBreaker(state=state, consecutive_failures=2, attempt=1)
    b = Breaker.restore("src-A", None, saved, now=10, wall_now=W)
    assert (b.state, b.consecutive_failures, b.attempt) == (state, 2, 1)
    assert b.actions() == []
    assert b.persist(10, W) == saved
    got = b.acquire(10)
    assert isinstance(got, Permit) == (state is not FORCED_OPEN)


def test_s32_a_persisted_snapshot_is_validated() -> None:
    with pytest.raises(ValueError, match="opened_at_wall"):
        PersistedBreaker(state=OPEN)
    with pytest.raises(ValueError, match="opened_at_wall"):
        PersistedBreaker(state=OPEN, opened_at_wall=math.inf)
    with pytest.raises(ValueError, match="consecutive_failures"):
        PersistedBreaker(state=CLOSED, consecutive_failures=-1)
    with pytest.raises(ValueError, match="attempt"):
        PersistedBreaker(state=CLOSED, attempt=-1)
    with pytest.raises(ValueError, match="state"):
        PersistedBreaker(state="open")  # type: ignore[arg-type]


_INVALID: list[tuple[str, Callable[[], object]]] = [
    ("failure_threshold", lambda: BreakerConfig(failure_threshold=0)),
    ("failure_threshold", lambda: BreakerConfig(failure_threshold=True)),
    ("failure_threshold", lambda: BreakerConfig(failure_threshold=2.5)),  # type: ignore[arg-type]
    ("reset_timeout", lambda: BreakerConfig(reset_timeout=0)),
    ("reset_timeout", lambda: BreakerConfig(reset_timeout=-1)),
    ("reset_timeout", lambda: BreakerConfig(reset_timeout=math.nan)),
    ("reset_timeout", lambda: BreakerConfig(reset_timeout="300")),  # type: ignore[arg-type]
    ("success_threshold", lambda: BreakerConfig(success_threshold=0)),
    ("half_open_max_calls", lambda: BreakerConfig(half_open_max_calls=0)),
    ("half_open_max_wait", lambda: BreakerConfig(half_open_max_wait=0)),
    ("call_timeout", lambda: BreakerConfig(call_timeout=-5)),
    ("call_timeout", lambda: BreakerConfig(call_timeout=math.nan)),
    ("threshold", lambda: FailureRateRule(threshold=0)),
    ("threshold", lambda: FailureRateRule(threshold=100.5)),
    ("threshold", lambda: FailureRateRule(threshold=math.nan)),
    ("rate_threshold", lambda: SlowCallRule(duration=1, rate_threshold=0)),
    ("min_calls", lambda: FailureRateRule(min_calls=0)),
    ("min_calls", lambda: SlowCallRule(duration=1, min_calls=0)),
    ("size", lambda: CountWindow(0)),
    ("seconds", lambda: TimeWindow(0.5)),
    ("seconds", lambda: TimeWindow(math.nan)),
    ("window", lambda: FailureRateRule(window=10)),  # type: ignore[arg-type]
    ("slow_call.duration", lambda: SlowCallRule(duration=0)),
    ("multiplier", lambda: Backoff(multiplier=0.5)),
    ("multiplier", lambda: Backoff(multiplier=math.inf)),
    ("multiplier", lambda: Backoff(multiplier=math.nan)),
    ("backoff.max", lambda: Backoff(base=300, max=100)),
    ("backoff.max", lambda: BreakerConfig(reset_timeout=600, backoff=Backoff(max=300))),
    ("backoff.base", lambda: Backoff(base=0)),
    ("jitter", lambda: Backoff(jitter=1)),
    ("jitter", lambda: Backoff(jitter=-0.1)),
    ("backoff", lambda: BreakerConfig(backoff=2)),  # type: ignore[arg-type]
    ("failure_rate", lambda: BreakerConfig(failure_rate=50)),  # type: ignore[arg-type]
    ("slow_call", lambda: BreakerConfig(slow_call=10)),  # type: ignore[arg-type]
    ("ignore", lambda: BreakerConfig(ignore=[ValueError])),  # type: ignore[arg-type]
    ("success_on", lambda: BreakerConfig(success_on=(42,))),  # type: ignore[arg-type]
    ("is_failure_result", lambda: BreakerConfig(is_failure_result=1)),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("field", "build"), _INVALID, ids=[f for f, _ in _INVALID])
def test_s33_invalid_configuration_fails_at_construction(
    field: str, build: Callable[[], object]
) -> None:
    with pytest.raises(ValueError, match=field):
        build()


def test_s33_valid_edges_are_accepted() -> None:
    config = BreakerConfig(
        reset_timeout=math.inf,
        half_open_max_wait=math.inf,
        call_timeout=0.001,
        backoff=Backoff(base=1, multiplier=1, max=1),
        failure_rate=FailureRateRule(threshold=100, window=CountWindow(1), min_calls=1),
        ignore=(KeyError, lambda e: False),
    )
    assert config.first_wait == 1
    assert BreakerConfig().lease == 60
    assert BreakerConfig(call_timeout=30).lease == 30
    assert BreakerConfig(call_timeout=30, half_open_max_wait=90).lease == 90
    defaults = BreakerConfig()
    assert (defaults.failure_threshold, defaults.reset_timeout) == (5, 300)
    assert (defaults.success_threshold, defaults.half_open_max_calls) == (1, 1)


# --------------------------------------------------------------------------- the table


def _rows(state: BreakerState, trigger: str) -> list[dict[str, Any]]:
    def sources(row: dict[str, Any]) -> list[BreakerState]:
        src = row["source"]
        return list(src) if isinstance(src, list) else [src]

    return [r for r in TRANSITIONS if r["trigger"] == trigger and state in sources(r)]


def test_table_every_pair_is_a_row_or_a_documented_refusal() -> None:
    for state in BreakerState:
        for trigger in TRIGGERS:
            has_row = bool(_rows(state, trigger))
            assert has_row != ((state, trigger) in REFUSED), (state, trigger)


@pytest.mark.parametrize(("state", "trigger"), sorted(REFUSED, key=str))
def test_table_refused_pairs_raise_and_change_nothing(state: BreakerState, trigger: str) -> None:
    b = Breaker("t")
    b.state = state
    generation = b.generation
    with pytest.raises(MachineError):
        MACHINE.events[trigger].trigger(b, now=1.0)
    assert (b.state, b.generation, b.actions()) == (state, generation, [])


def test_table_every_state_is_reachable_and_can_get_back_to_closed() -> None:
    edges: dict[BreakerState, set[BreakerState]] = {s: set() for s in BreakerState}
    for row in TRANSITIONS:
        src = row["source"] if isinstance(row["source"], list) else [row["source"]]
        for s in src:
            edges[s].add(row["dest"] or s)

    def reach(start: BreakerState) -> set[BreakerState]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert reach(INITIAL) == set(BreakerState)
    for state in BreakerState:
        assert CLOSED in reach(state), state
    assert HALF_OPEN not in edges[CLOSED]
    assert edges[FORCED_OPEN] == {FORCED_OPEN, CLOSED, DISABLED}


def test_table_every_guard_and_callback_is_a_callable_of_the_table() -> None:
    from wirestate.core.breaker import table

    for row in TRANSITIONS:
        assert set(row) <= {"trigger", "source", "dest", "conditions", "before", "after"}
        for key in ("conditions", "before", "after"):
            value = row.get(key)
            if value is not None:
                assert callable(value), "callables, not names resolved on the model"
                assert getattr(table, value.__name__) is value, value
    # every step the table calls exists on the breaker (table.Model, checked by mypy too)
    for name in table.Model.__dict__:
        if (
            name.startswith("_")
            and not name.startswith("__")
            and callable(table.Model.__dict__[name])
        ):
            assert callable(getattr(Breaker, name)), name
    assert sorted(MACHINE.events) == sorted(TRIGGERS)
    assert not [e for e in MACHINE.events if e.startswith("to_")]
    assert MACHINE.models == []
    assert [s.value for s in BreakerState] == [
        "closed",
        "open",
        "half_open",
        "forced_open",
        "disabled",
    ]
    assert str(HALF_OPEN) == "half_open"


def test_table_same_state_requests_emit_nothing() -> None:
    b = Breaker("t")
    assert not b.reset(0)
    b.force_open(1)
    b.actions()
    assert not b.force_open(2)
    b.disable(3)
    b.actions()
    assert not b.disable(4)
    assert b.actions() == []


def test_breakers_compare_by_identity() -> None:
    a, b = Breaker("same"), Breaker("same")
    assert a != b
    assert a == a
    assert len({a, b}) == 2
    assert "same" in repr(a)


def test_core_breaker_is_pure() -> None:
    code = (
        "import sys, wirestate.core.breaker, wirestate.core.breaker.table;"
        "bad = {'asyncio', 'socket', 'random', 'uuid', 'transitions.extensions', 'hypothesis'};"
        "print(sorted(bad & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
    package = Path(__file__).resolve().parents[3] / "core" / "breaker"
    paths = sorted(package.glob("*.py"))
    assert len(paths) >= 5
    for path in paths:
        text = path.read_text()
        for forbidden in (
            "import asyncio",
            "import socket",
            "import threading",
            "import random",
            "import time",
            "time.monotonic",
            "datetime.now",
            "uuid4",
            "transitions.extensions",
        ):
            assert forbidden not in text, (path.name, forbidden)


# --------------------------------------------------------------------------- misuse and edges


def test_settling_twice_changes_nothing() -> None:
    b = Breaker("t")
    p = _permit(b.acquire(0))
    assert b.on_failure(p, 1, UpstreamError()).counted
    again = b.on_failure(p, 2, UpstreamError())
    assert (again.outcome, again.counted) == (Outcome.ALREADY_SETTLED, False)
    assert b.consecutive_failures == 1


def test_foreign_and_forged_permits_are_refused() -> None:
    b = Breaker("t")
    p = _permit(b.acquire(0))
    with pytest.raises(ValueError, match="not issued"):
        b.on_success(Permit("t", 99, 0, 0.0, False), 1)
    with pytest.raises(ValueError, match="not issued"):
        b.on_success(Permit("other", p.id, 0, 0.0, False), 1)
    with pytest.raises(ValueError, match="does not match"):
        b.on_success(dataclasses.replace(p, trial=True), 1)
    assert b.on_success(p, 1).counted


@pytest.mark.parametrize("now", [math.nan, math.inf, -math.inf, True, "1"])
def test_now_must_be_finite(now: Any) -> None:
    b = Breaker("t")
    with pytest.raises(ValueError, match="now"):
        b.acquire(now)
    with pytest.raises(ValueError, match="now"):
        b.snapshot(now)


def test_settle_and_complete_take_one_result() -> None:
    h = Harness()
    p = _permit(h.breaker.acquire(0))
    with pytest.raises(ValueError, match="not both"):
        h.breaker.settle(p, 1, value=1, error=UpstreamError())
    with pytest.raises(ValueError, match="exactly one"):
        h.src.complete(p, 1)
    with pytest.raises(ValueError, match="exactly one"):
        h.src.complete(p, 1, value="v", error=UpstreamError())
    assert h.breaker.settle(p, 1, value="v").outcome is Outcome.SUCCESS


def test_classify_follows_the_documented_order(caplog: pytest.LogCaptureFixture) -> None:
    def explode(_: object) -> bool:
        raise LookupError("hidden detail")

    b = Breaker(
        "t",
        BreakerConfig(
            ignore=(NotModified,),
            success_on=(NotModified, explode, HTTPError),
            is_failure_result=lambda v: v == "bad",
        ),
    )
    assert b.classify(error=asyncio.CancelledError()) is Outcome.CANCELLED
    assert b.classify(error=NotModified()) is Outcome.IGNORED
    assert b.classify(error=HTTPError(500)) is Outcome.SUCCESS
    with caplog.at_level(logging.ERROR, logger="wirestate.core.breaker"):
        assert b.classify(error=CallTimeout()) is Outcome.TIMEOUT
        assert b.classify(error=UpstreamError()) is Outcome.FAILURE
    assert "LookupError" in caplog.text
    assert "hidden detail" not in caplog.text
    assert b.classify(value="bad") is Outcome.FAILURE
    assert b.classify(value="good") is Outcome.SUCCESS
    assert b.classify() is Outcome.SUCCESS
    assert b.classify(value=NO_VALUE) is Outcome.SUCCESS
    raising = Breaker("t", BreakerConfig(is_failure_result=explode))
    assert raising.classify(value=1) is Outcome.FAILURE


def test_on_ignored_and_on_cancelled_release_without_counting() -> None:
    b = Breaker("t", BreakerConfig(failure_threshold=1))
    p, q = _permit(b.acquire(0)), _permit(b.acquire(0))
    for permit, error in ((p, NotModified()), (q, None)):
        settled = b.on_ignored(permit, 1, error)
        assert (settled.outcome, settled.current, settled.counted) == (
            Outcome.IGNORED,
            True,
            False,
        )
    r = _permit(b.acquire(2))
    assert not b.on_cancelled(r, 3).counted
    events = b.call_events()
    assert [type(e) for e in events] == [CallIgnored, CallIgnored]
    assert isinstance(events[0], CallIgnored)
    assert events[0].error == "NotModified"
    assert (b.state, b.consecutive_failures) == (CLOSED, 0)


def test_disabled_permits_pass_through_uncounted_with_call_events() -> None:
    b = Breaker("t", BreakerConfig(failure_threshold=1, call_timeout=5))
    b.disable(0)
    p = _permit(b.acquire(0))
    settled = b.on_success(p, 6)  # overdue: still a TIMEOUT result, but nothing recorded
    assert (settled.outcome, settled.current, settled.counted) == (Outcome.TIMEOUT, True, False)
    assert b.state is DISABLED
    assert [type(e) for e in b.call_events()] == [CallFailed]


def test_lost_stale_permits_are_forgotten_after_their_horizon() -> None:
    b = Breaker("t", BreakerConfig(failure_threshold=1, call_timeout=10))
    lost = _permit(b.acquire(0))
    b.on_failure(_permit(b.acquire(0)), 0, UpstreamError())  # OPEN: `lost` is now stale
    b.acquire(9)
    assert b.on_success(lost, 9.5).outcome is Outcome.SUCCESS  # stale, within its horizon
    b.reset(20)
    lost2 = _permit(b.acquire(20))
    b.force_open(21)
    b.acquire(30)  # lost2 is 10 s old and stale: dropped
    assert b.on_success(lost2, 31).outcome is Outcome.ALREADY_SETTLED


def test_busy_half_open_reports_the_lease_and_expires_several_trials_at_once() -> None:
    b = Breaker("t", BreakerConfig(failure_threshold=1, half_open_max_calls=2))
    b.on_failure(_permit(b.acquire(0)), 0, UpstreamError())
    p1, p2 = _permit(b.acquire(300)), _permit(b.acquire(310))
    assert isinstance(b.acquire(320), Rejected)
    assert b.snapshot(320).retry_after == 40  # the default lease is 60 s without call_timeout
    b.actions()
    b.acquire(370)
    changes = b.actions()
    assert [(c.from_state, c.to_state, c.cause) for c in changes] == [
        (HALF_OPEN, OPEN, TransitionCause.LEASE_EXPIRED)
    ]
    expired = [e for e in b.call_events() if isinstance(e, CallFailed)]
    assert {e.permit_id for e in expired if e.outcome is Outcome.EXPIRED} == {p1.id, p2.id}


def test_latest_reports_the_last_result_re_aged() -> None:
    h = Harness(empty=True)
    first = h.src.latest(0)
    assert (first.value, first.reason, first.no_data) == (None, PollReason.NO_DATA, True)
    h.poll(0, "v1")
    later = h.src.latest(100)
    assert (later.value, later.stale, later.age, later.reason) == (
        "v1",
        False,
        100,
        PollReason.FRESH,
    )
    h.polls(range(60, 301, 60), [F] * 5)
    stale = h.src.latest(400)
    assert (stale.value, stale.stale, stale.age, stale.state) == ("v1", True, 400, OPEN)
    assert stale.retry_after == 200
    primed = Harness()
    assert (primed.src.latest(0).value, primed.src.latest(0).stale) == ("v0", True)
    assert primed.src.latest(0).reason is PollReason.NO_DATA
    assert Harness(empty=True).src.latest(5).age is None


def test_cancel_releases_a_permit() -> None:
    h = Harness()
    h.trip_at_240()
    p = h.src.begin(540)
    assert isinstance(p, Permit)
    h.src.cancel(p, 541)
    assert h.breaker.snapshot(541).trials_in_flight == 0
    assert h.breaker.state is HALF_OPEN


def test_a_breaker_can_be_deep_copied_for_exploration() -> None:
    b = Breaker("t", BreakerConfig(failure_threshold=1))
    p = _permit(b.acquire(0))
    twin = copy.deepcopy(b)
    b.on_failure(p, 1, UpstreamError())
    assert (b.state, twin.state) == (OPEN, CLOSED)
    assert twin.on_success(p, 1).counted
    assert twin.actions() == []
