"""The cached-value fallback around a breaker: the last good value, served with
``stale`` and its age while the breaker refuses calls or the upstream fails (S04, S05).
Pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Generic, TypeVar

from wirestate.core.breaker.breaker import Breaker
from wirestate.core.breaker.table import BreakerState
from wirestate.core.breaker.values import NO_VALUE, NoValue, Outcome, Permit, error_name

T = TypeVar("T")


class PollReason(Enum):
    """Why a poll result looks the way it does. The reason always names the cause, also
    when there is no cached value to serve (S05: `value=None, reason=CIRCUIT_OPEN`); see
    `PollResult.no_data`. NO_DATA is the reason of `CachedSource.latest()` before anything
    was ever fetched."""

    FRESH = "fresh"
    UPSTREAM_ERROR = "upstream_error"
    TIMEOUT = "timeout"
    CIRCUIT_OPEN = "circuit_open"
    HALF_OPEN_BUSY = "half_open_busy"
    FORCED_OPEN = "forced_open"
    NO_DATA = "no_data"


@dataclass(frozen=True)
class CacheEntry(Generic[T]):
    value: T
    fetched_at: float  # the monotonic `now` at which the call that produced it completed


@dataclass(frozen=True)
class PollResult(Generic[T]):
    """One poll's answer; never an exception (docs/breaker.md, rule 7).

    FRESH: `value` was just fetched, `stale=False`, `age=0`. Otherwise the last good value
    with `stale=True`, its original `fetched_at` and `age = now - fetched_at` (never
    negative), or, with nothing cached, `value=None, stale=False, fetched_at=None, age=None`.
    `error` is the exception's type name only (no text: it may carry upstream data).
    `state` and `retry_after` are the breaker's after this poll.
    """

    value: T | None
    stale: bool
    fetched_at: float | None
    age: float | None
    state: BreakerState
    reason: PollReason
    error: str | None = None
    retry_after: float = 0.0

    @property
    def no_data(self) -> bool:
        """Nothing has been fetched yet: there is no value to serve."""
        return self.fetched_at is None


class CachedSource(Generic[T]):
    """One upstream source behind its own breaker (one per upstream), with the last good value.

    Sans-I/O: `begin(now)` then, if a `Permit` came back, make the call and hand its result to
    `complete(...)` (or `cancel(...)` before re-raising a cancellation). `poll(fetch, now)`
    does both around a synchronous callable. Only a FRESH result changes the cache; a failed,
    ignored, rejected or late call never refreshes `fetched_at` (rule 7).

    A success of an older generation that is not a timeout (S25, a slow manual refresh
    finishing after the breaker opened) counts for nothing in the breaker but its value is
    real: it is cached and returned FRESH with the breaker's current state. Arrival order
    defines "newer": completion times only go backwards with the clock itself.
    """

    def __init__(
        self,
        breaker: Breaker,
        *,
        cached: CacheEntry[T] | None = None,
        poll_interval: float | None = None,
    ) -> None:
        """With `poll_interval`, rate rules that could never fire at that cadence are a
        `ValueError` naming `min_calls` (S20)."""
        if poll_interval is not None:
            breaker.config.check_cadence(poll_interval)
        self._breaker = breaker
        self._cached = cached
        self._last: PollResult[T] | None = None

    @property
    def breaker(self) -> Breaker:
        return self._breaker

    @property
    def cached(self) -> CacheEntry[T] | None:
        return self._cached

    def begin(self, now: float) -> Permit | PollResult[T]:
        """A permit to make the call, or the fallback result when the breaker rejects (no call
        must be made then)."""
        got = self._breaker.acquire(now)
        if isinstance(got, Permit):
            return got
        return self._fallback(now, PollReason(got.reason.value), None, got.retry_after)

    def complete(
        self,
        permit: Permit,
        now: float,
        *,
        value: T | NoValue = NO_VALUE,
        error: BaseException | None = None,
    ) -> PollResult[T]:
        """Settle `permit` with the call's value or error (`Breaker.settle`) and answer.

        Cancellations are released uncounted and re-raised. A permit that had already been
        settled (timed out, lease expired) is a TIMEOUT result and its value is discarded
        (S17). Exactly one of `value` and `error` must be given (`ValueError`).
        """
        if (value is NO_VALUE) == (error is None):
            raise ValueError("complete() takes exactly one of value= and error=")
        settled = self._breaker.settle(permit, now, value=value, error=error)
        if settled.outcome is Outcome.SUCCESS and not isinstance(value, NoValue):
            self._cached = CacheEntry(value, now)
            return self._answer(
                PollResult(
                    value,
                    stale=False,
                    fetched_at=now,
                    age=0.0,
                    state=self._breaker.state,
                    reason=PollReason.FRESH,
                    retry_after=self._breaker.snapshot(now).retry_after,
                )
            )
        timed_out = settled.outcome in (Outcome.TIMEOUT, Outcome.ALREADY_SETTLED)
        reason = PollReason.TIMEOUT if timed_out else PollReason.UPSTREAM_ERROR
        retry_after = self._breaker.snapshot(now).retry_after
        return self._fallback(now, reason, error_name(error), retry_after)

    def cancel(self, permit: Permit, now: float) -> None:
        """Release `permit` uncounted; the caller then re-raises its cancellation (S14)."""
        self._breaker.on_cancelled(permit, now)

    def poll(
        self,
        fetch: Callable[[], T],
        now: float,
        *,
        clock: Callable[[], float] | None = None,
    ) -> PollResult[T]:
        """Call `fetch()` through the breaker, synchronously. `clock`, if given, is read once
        after `fetch` finishes for the completion time (else the call took no time).

        Every `Exception` from `fetch` becomes a result; cancellations and interpreter exits
        (`BaseException`) release the permit and propagate (S14).
        """
        got = self.begin(now)
        if isinstance(got, PollResult):
            return got
        try:
            value = fetch()
        except BaseException as exc:
            # Classified (and, for a cancellation, re-raised) by complete(); nothing is hidden.
            return self.complete(got, clock() if clock is not None else now, error=exc)
        return self.complete(got, clock() if clock is not None else now, value=value)

    def latest(self, now: float) -> PollResult[T]:
        """What a new subscriber gets at `now` without a poll: the last result, re-aged, with
        the breaker's current state; before the first poll, the primed cache as stale (reason
        NO_DATA: nothing has been fetched by this process yet) or `value=None, NO_DATA`.
        Pure."""
        snap = self._breaker.snapshot(now)
        last = self._last
        if last is None:
            return self._fallback(now, PollReason.NO_DATA, None, snap.retry_after, remember=False)
        age = None if last.fetched_at is None else max(0.0, now - last.fetched_at)
        return replace(last, age=age, state=snap.state, retry_after=snap.retry_after)

    def _fallback(
        self,
        now: float,
        reason: PollReason,
        error: str | None,
        retry_after: float,
        *,
        remember: bool = True,
    ) -> PollResult[T]:
        cached, state = self._cached, self._breaker.state
        if cached is None:
            result: PollResult[T] = PollResult(
                None, False, None, None, state, reason, error, retry_after
            )
        else:
            age = max(0.0, now - cached.fetched_at)
            result = PollResult(
                cached.value, True, cached.fetched_at, age, state, reason, error, retry_after
            )
        return self._answer(result) if remember else result

    def _answer(self, result: PollResult[T]) -> PollResult[T]:
        self._last = result
        return result
