"""The circuit breaker: pure, driven by an injected clock.

This module implements the breaker's contract (docs/breaker.md: rules 1-10, scenarios
S01-S33) around the transition table in `wirestate.core.breaker.table`. It never reads a
clock, sleeps, spawns, or draws random numbers: every input carries `now` (monotonic seconds,
finite) and jitter comes from an injected `rng` callable. Outputs are queued as frozen values
and drained by the caller: `actions()` gives the `StateChanged` transitions, `call_events()`
the call-level events.

Rules and invariants:

- Time is forward progress. The breaker adds up only the non-negative steps between the `now`
  values it is given; a backwards step counts as 0 and re-anchors (S28), a huge gap is one
  step (S29). Every duration (open wait, lease, call timeout, time windows) is measured in
  progress, never as `now - then`; the raw `now` values are only reported (`opened_at`, `at`,
  `retry_at = now + retry_after`). Durations may be `inf` (S30): arithmetic stays in floats.
- OPEN -> HALF_OPEN is evaluated lazily in `acquire()` through the single guard
  `Breaker._wait_elapsed(now)`, with an inclusive boundary (S06, S07). Reads (`snapshot`,
  `persist`) never change anything.
- Every input starts the same way: advance progress, drop stale leases past their horizon,
  then expire trial leases that ran out (HALF_OPEN -> OPEN, S13). Only then is the input
  applied.
- Every permit carries the generation it was issued in. Every state change (and `reset()`)
  starts a new generation; outcomes of older generations change no counter and emit nothing
  (S11, S25). A permit is settled at most once; later settlements report `ALREADY_SETTLED`
  and change nothing: a late or duplicate report is a normal race with timeouts and lease
  expiry, not misuse. A permit this breaker never issued is misuse and raises `ValueError`.
  Permits of older generations are forgotten once `call_timeout` (else the trial lease) of
  progress has passed, so lost permits cannot pile up.
- A permit settled `call_timeout` or more after it was issued is a TIMEOUT failure, even when a
  value came back (S17).
- Exactly one `StateChanged` per real state change, in order, appended after the fields have
  changed; none at construction, on restore, or for same-state requests (S24, S32, S21).
- Listeners are called after the trigger has returned; one that raises is logged with its
  exception type only, and never breaks the breaker (S26).
- Callbacks of the table only change fields and append actions; follow-ups are computed after
  a trigger returns (docs/contributing.md, rule 4).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import Final, NamedTuple

from wirestate.core.breaker.config import (
    BreakerConfig,
    CountWindow,
    ErrorMatcher,
    TimeWindow,
    Window,
)
from wirestate.core.breaker.table import ENGINE, INITIAL, BreakerState
from wirestate.core.breaker.values import (
    NO_VALUE,
    BreakerSnapshot,
    CallEvent,
    CallFailed,
    CallIgnored,
    CallRejected,
    CallSucceeded,
    Outcome,
    Permit,
    PersistedBreaker,
    Rejected,
    RejectReason,
    Settlement,
    StateChanged,
    TransitionCause,
    error_name,
)
from wirestate.core.machine import Engine

_log = logging.getLogger(__name__)


class _Lease(NamedTuple):
    permit: Permit
    progress: float  # forward progress when it was issued


class _Samples:
    """Outcome samples of one rate rule, stamped with forward progress (so samples never come
    "from the future", S28)."""

    def __init__(self, window: Window) -> None:
        self._window = window
        maxlen = window.size if isinstance(window, CountWindow) else None
        self._samples: deque[tuple[float, bool]] = deque(maxlen=maxlen)

    def _live(self, progress: float) -> list[bool]:
        window = self._window
        if isinstance(window, CountWindow):
            return [hit for _, hit in self._samples]
        return [hit for at, hit in self._samples if progress < at + window.seconds]

    def counts(self, progress: float) -> tuple[int, int]:
        """(calls, hits) in the window at `progress`."""
        live = self._live(progress)
        return len(live), sum(live)

    def counts_with(self, hit: bool, progress: float) -> tuple[int, int]:
        """(calls, hits) if a sample were added now; pure."""
        live = self._live(progress)
        if isinstance(self._window, CountWindow) and len(live) == self._window.size:
            live = live[1:]
        return len(live) + 1, sum(live) + hit

    def add(self, hit: bool, progress: float) -> None:
        window = self._window
        if isinstance(window, TimeWindow):
            while self._samples and progress >= self._samples[0][0] + window.seconds:
                self._samples.popleft()
        self._samples.append((progress, hit))

    def clear(self) -> None:
        self._samples.clear()


_REJECT_REASON: Final = {
    BreakerState.OPEN: RejectReason.CIRCUIT_OPEN,
    BreakerState.HALF_OPEN: RejectReason.HALF_OPEN_BUSY,
    BreakerState.FORCED_OPEN: RejectReason.FORCED_OPEN,
}

_CAUSE_BY_TRIGGER: Final = {
    "probe": TransitionCause.WAIT_ELAPSED,
    "expire": TransitionCause.LEASE_EXPIRED,
    "force_open": TransitionCause.FORCED,
    "disable": TransitionCause.DISABLED,
    "reset": TransitionCause.RESET,
}


def _callable_name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", type(fn).__qualname__))


class Breaker:
    """A circuit breaker for one upstream (docs/breaker.md, rule 13). A plain object with identity
    equality, fired through the shared `MACHINE`; not thread-safe (the adapters call it from one
    event loop).

    Use: `acquire(now)` before each call; with a `Permit`, make the call and settle the permit
    exactly once; with `Rejected`, make no call. Drain `actions()` and `call_events()` after
    each input. Every method taking `now` raises `ValueError` for a non-finite `now`; settling
    a permit this breaker did not issue raises `ValueError`.
    """

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        rng: Callable[[], float] | None = None,
        engine: Engine[BreakerState] = ENGINE,
    ) -> None:
        """`rng` returns floats in [0, 1) and is required when the backoff has jitter
        (`ValueError` otherwise); a value outside [0, 1] is treated as 0.5 (no jitter).
        `engine` runs the table: the real one, unless a checker plants a bug."""
        self.name = name
        self._engine = engine
        self.config = config if config is not None else BreakerConfig()
        if self.config.backoff is not None and self.config.backoff.jitter and rng is None:
            raise ValueError("rng is required when backoff.jitter > 0")
        self._rng = rng
        #: Written by the transitions machine only.
        self.state: BreakerState = INITIAL
        self._consecutive = 0
        self._trial_successes = 0
        self._attempt = 0
        self._generation = 0
        self._opened_at: float | None = None
        self._opened_progress = 0.0
        self._wait = self.config.first_wait
        self._progress = 0.0  # forward progress at the last input (see _progress_at)
        self._offset = 0.0
        self._last_now: float | None = None
        self._next_id = 1
        self._leases: dict[int, _Lease] = {}
        rate, slow = self.config.failure_rate, self.config.slow_call
        self._fail_window = _Samples(rate.window) if rate is not None else None
        self._slow_window = _Samples(slow.window) if slow is not None else None
        self._actions: list[StateChanged] = []
        self._calls: list[CallEvent] = []
        self._listeners: list[Callable[[StateChanged], None]] = []
        self._undispatched: list[StateChanged] = []

    def __repr__(self) -> str:
        return f"<Breaker {self.name!r} {self.state.value} gen={self._generation}>"

    # ----------------------------------------------------------------- read-only views

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    @property
    def attempt(self) -> int:
        """Openings since the breaker was last CLOSED (the backoff's attempt count)."""
        return self._attempt

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def opened_at(self) -> float | None:
        """The `now` at which the breaker last entered OPEN (None outside OPEN/HALF_OPEN)."""
        return self._opened_at

    # ----------------------------------------------------------------- inputs

    def acquire(self, now: float) -> Permit | Rejected:
        """Ask to make one call at `now`. In OPEN this is where HALF_OPEN is entered once the
        wait has elapsed (lazily, S07). Extra callers in HALF_OPEN are rejected at once (S10)."""
        self._begin_input(now)
        if self.state is BreakerState.OPEN:
            self._fire("probe", now)
        state = self.state
        result: Permit | Rejected
        if state is BreakerState.CLOSED or state is BreakerState.DISABLED:
            result = self._issue(now, trial=False)
        elif (
            state is BreakerState.HALF_OPEN
            and self._trials_in_flight() < self.config.half_open_max_calls
        ):
            result = self._issue(now, trial=True)
        else:
            result = Rejected(_REJECT_REASON[state], self._retry_after(self._progress))
            self._calls.append(CallRejected(self.name, now, result.reason, result.retry_after))
        self._dispatch()
        return result

    def on_success(self, permit: Permit, now: float) -> Settlement:
        """The call succeeded (a TIMEOUT failure if it took `call_timeout` or longer)."""
        return self._settle(permit, now, Outcome.SUCCESS, None)

    def on_failure(
        self, permit: Permit, now: float, error: BaseException | None = None
    ) -> Settlement:
        """The call failed: a counted failure, TIMEOUT if `error` is a `TimeoutError` or the
        call took `call_timeout` or longer. The caller's own classification: `ignore` and
        `success_on` are applied by `settle()`, not here."""
        outcome = Outcome.TIMEOUT if isinstance(error, TimeoutError) else Outcome.FAILURE
        return self._settle(permit, now, outcome, error)

    def on_ignored(
        self, permit: Permit, now: float, error: BaseException | None = None
    ) -> Settlement:
        """Neither success nor failure: the permit is released, no counter moves (S15)."""
        return self._settle(permit, now, Outcome.IGNORED, error)

    def on_cancelled(self, permit: Permit, now: float) -> Settlement:
        """The call was cancelled or interrupted: the permit is released, nothing is counted
        and no event is emitted (S14). The caller re-raises the cancellation."""
        return self._settle(permit, now, Outcome.CANCELLED, None)

    def classify(self, *, value: object = NO_VALUE, error: BaseException | None = None) -> Outcome:
        """The configured classification (docs/breaker.md, rule 6), before the call-timeout rule:
        non-`Exception` errors are CANCELLED; then `ignore` -> IGNORED; `success_on` ->
        SUCCESS; a `TimeoutError` -> TIMEOUT; any other error -> FAILURE; a value for which
        `is_failure_result` is true -> FAILURE; else SUCCESS. Pure apart from logging."""
        cfg = self.config
        if error is not None:
            if not isinstance(error, Exception):
                return Outcome.CANCELLED
            if self._matches("ignore", cfg.ignore, error):
                return Outcome.IGNORED
            if self._matches("success_on", cfg.success_on, error):
                return Outcome.SUCCESS
            return Outcome.TIMEOUT if isinstance(error, TimeoutError) else Outcome.FAILURE
        if cfg.is_failure_result is not None and value is not NO_VALUE:
            try:
                bad = bool(cfg.is_failure_result(value))
            except Exception as exc:
                self._predicate_failed("is_failure_result", exc)
                return Outcome.FAILURE
            if bad:
                return Outcome.FAILURE
        return Outcome.SUCCESS

    def settle(
        self,
        permit: Permit,
        now: float,
        *,
        value: object = NO_VALUE,
        error: BaseException | None = None,
    ) -> Settlement:
        """Classify the call's result (`classify`) and settle the permit accordingly.

        A cancellation (any non-`Exception` error: `CancelledError`, `KeyboardInterrupt`,
        `SystemExit`) releases the permit uncounted and is then re-raised (S14). Passing
        both `value` and `error` is a `ValueError`.
        """
        if value is not NO_VALUE and error is not None:
            raise ValueError("settle() takes a value or an error, not both")
        outcome = self.classify(value=value, error=error)
        if error is not None and outcome is Outcome.CANCELLED:
            self.on_cancelled(permit, now)
            raise error
        return self._settle(permit, now, outcome, error)

    def force_open(self, now: float) -> bool:
        """Hold the breaker open until `reset()` or `disable()`; it never half-opens by itself
        and a pending trial is cancelled (S21). True when the state changed."""
        return self._manual("force_open", now)

    def disable(self, now: float) -> bool:
        """Pass every call through and record nothing until `reset()` (S22)."""
        return self._manual("disable", now)

    def reset(self, now: float) -> bool:
        """Back to CLOSED with counters, windows and backoff cleared; permits issued before
        become stale. Emits an event only when the state changes (S23)."""
        return self._manual("reset", now)

    # ----------------------------------------------------------------- outputs and reads

    def actions(self) -> list[StateChanged]:
        """Drain the `StateChanged` values queued since the last call, oldest first."""
        out, self._actions = self._actions, []
        return out

    def call_events(self) -> list[CallEvent]:
        """Drain the call-level events queued since the last call, oldest first. Stale and
        duplicate settlements and cancellations emit none."""
        out, self._calls = self._calls, []
        return out

    def add_listener(self, listener: Callable[[StateChanged], None]) -> None:
        """Call `listener` with every later `StateChanged`, after the change (in addition to
        `actions()`). A listener that raises an `Exception` is logged and skipped (S26)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[StateChanged], None]) -> None:
        self._listeners.remove(listener)

    def snapshot(self, now: float, *, wall_offset: float | None = None) -> BreakerSnapshot:
        """A pure read at `now` (S07): nothing changes, nothing is emitted, even when the wait
        has elapsed (`probe_due`). `wall_offset` (wall minus monotonic seconds) fills
        `retry_at_wall`."""
        self._check_now(now)
        progress = self._progress_at(now)
        retry_after = self._retry_after(progress)
        retry_at = (
            None
            if self.state in (BreakerState.CLOSED, BreakerState.DISABLED)
            else now + retry_after
        )
        retry_at_wall = None
        if retry_at is not None and wall_offset is not None:
            wall = retry_at + wall_offset
            retry_at_wall = wall if math.isfinite(wall) else None
        return BreakerSnapshot(
            name=self.name,
            state=self.state,
            at=now,
            opened_at=self._opened_at,
            retry_at=retry_at,
            retry_after=retry_after,
            retry_at_wall=retry_at_wall,
            probe_due=self.state is BreakerState.OPEN and self._wait_elapsed(now),
            consecutive_failures=self._consecutive,
            trial_successes=self._trial_successes,
            trials_in_flight=self._trials_in_flight(),
            attempt=self._attempt,
            generation=self._generation,
            wait=self._wait,
            failure_window=None
            if self._fail_window is None
            else self._fail_window.counts(progress),
            slow_window=None if self._slow_window is None else self._slow_window.counts(progress),
        )

    def persist(self, now: float, wall_now: float) -> PersistedBreaker:
        """What to save for a restart, with the opening expressed on the wall clock."""
        self._check_now(now)
        opened_at_wall = None
        if self.state is BreakerState.OPEN:
            opened_at_wall = wall_now - self._open_elapsed(now)
        return PersistedBreaker(
            state=self.state,
            consecutive_failures=self._consecutive,
            attempt=self._attempt,
            opened_at_wall=opened_at_wall,
        )

    @classmethod
    def restore(
        cls,
        name: str,
        config: BreakerConfig | None,
        saved: PersistedBreaker,
        *,
        now: float,
        wall_now: float,
        rng: Callable[[], float] | None = None,
        engine: Engine[BreakerState] = ENGINE,
    ) -> Breaker:
        """A breaker in the saved state, emitting nothing (S32). An OPEN breaker keeps its
        timer: the wall time already spent open counts, and an opening "in the future" (clock
        skew) counts as now, so the remaining wait is never more than the open duration. A
        saved HALF_OPEN resumes with no trial in flight (those permits died with the process)."""
        breaker = cls(name, config, rng=rng, engine=engine)
        breaker._begin_input(now)
        breaker.state = saved.state
        breaker._consecutive = saved.consecutive_failures
        breaker._attempt = saved.attempt
        if saved.state is BreakerState.OPEN:
            assert saved.opened_at_wall is not None  # checked by PersistedBreaker
            spent = max(0.0, wall_now - saved.opened_at_wall)
            breaker._attempt = max(1, saved.attempt)
            breaker._opened_at = now - spent
            breaker._opened_progress = breaker._progress - spent
            breaker._wait = breaker._open_duration(breaker._attempt)
        return breaker

    # ----------------------------------------------------------------- the guard

    def _wait_elapsed(self, now: float) -> bool:
        """THE guard for OPEN -> HALF_OPEN: the open duration of forward progress has passed
        since the breaker opened, boundary included (S06, S28). Pure."""
        # Compared as deadlines (`opened + wait`), like retry_at, so that polling at exactly
        # the reported retry_at is never a rounding error short of the boundary.
        return self._progress_at(now) >= self._opened_progress + self._wait

    def _open_elapsed(self, now: float) -> float:
        return self._progress_at(now) - self._opened_progress

    # ----------------------------------------------------------------- plumbing

    @staticmethod
    def _check_now(now: float) -> None:
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise ValueError(f"now must be finite monotonic seconds, got {now!r}")

    def _progress_at(self, now: float) -> float:
        # Progress is `now` plus the sum of the backwards steps seen so far. With a clock that
        # never goes back the offset stays 0.0, so elapsed times are plain `now - then`, with no
        # rounding drift from adding up steps (the S06 boundary stays exact).
        last = self._last_now
        if last is not None and now < last:
            return last + self._offset
        return now + self._offset

    def _begin_input(self, now: float) -> None:
        self._check_now(now)
        last = self._last_now
        if last is not None and now < last:
            self._offset += last - now
        self._last_now = now
        self._progress = now + self._offset
        self._drop_stale_leases()
        self._expire_trials(now)

    def _drop_stale_leases(self) -> None:
        # A stale permit past this horizon would be a timeout (or an expired lease) anyway, so
        # its settlement could change nothing: forget it, so that lost permits cannot pile up.
        cfg = self.config
        horizon = cfg.call_timeout if cfg.call_timeout is not None else cfg.lease
        for pid, lease in list(self._leases.items()):
            if (
                lease.permit.generation != self._generation
                and self._progress >= lease.progress + horizon
            ):
                del self._leases[pid]

    def _expire_trials(self, now: float) -> None:
        if self.state is not BreakerState.HALF_OPEN:
            return
        expired = [
            lease
            for lease in self._current_trials()
            if self._progress >= lease.progress + self.config.lease
        ]
        if not expired:
            return
        for lease in expired:
            del self._leases[lease.permit.id]
            self._calls.append(
                CallFailed(
                    self.name,
                    now,
                    lease.permit.id,
                    self._progress - lease.progress,
                    Outcome.EXPIRED,
                    None,
                )
            )
        self._fire("expire", now)

    def _current_trials(self) -> list[_Lease]:
        gen = self._generation
        return [
            lease
            for lease in self._leases.values()
            if lease.permit.trial and lease.permit.generation == gen
        ]

    def _trials_in_flight(self) -> int:
        return len(self._current_trials())

    def _retry_after(self, progress: float) -> float:
        state = self.state
        if state is BreakerState.OPEN:
            return max(0.0, self._opened_progress + self._wait - progress)
        if state is BreakerState.FORCED_OPEN:
            return math.inf
        if state is BreakerState.HALF_OPEN:
            trials = self._current_trials()
            if len(trials) >= self.config.half_open_max_calls:
                oldest = min(lease.progress for lease in trials)
                return max(0.0, oldest + self.config.lease - progress)
        return 0.0

    def _issue(self, now: float, *, trial: bool) -> Permit:
        permit = Permit(self.name, self._next_id, self._generation, now, trial)
        self._next_id += 1
        self._leases[permit.id] = _Lease(permit, self._progress)
        return permit

    def _settle(
        self, permit: Permit, now: float, outcome: Outcome, error: BaseException | None
    ) -> Settlement:
        if (
            not isinstance(permit, Permit)
            or permit.breaker != self.name
            or not 0 < permit.id < self._next_id
        ):
            raise ValueError(f"{permit!r} was not issued by breaker {self.name!r}")
        known = self._leases.get(permit.id)
        if known is not None and known.permit != permit:
            raise ValueError(f"{permit!r} does not match the permit this breaker issued")
        self._begin_input(now)
        lease = self._leases.pop(permit.id, None)
        if lease is None:
            self._dispatch()
            return Settlement(Outcome.ALREADY_SETTLED, current=False, counted=False)
        duration = self._progress - lease.progress
        timeout = self.config.call_timeout
        overdue = timeout is not None and self._progress >= lease.progress + timeout
        if overdue and outcome in (Outcome.SUCCESS, Outcome.FAILURE):
            outcome = Outcome.TIMEOUT
        current = permit.generation == self._generation
        counted = False
        if current and outcome is not Outcome.CANCELLED:
            self._calls.append(self._call_event(permit, now, duration, outcome, error))
            if self.state is not BreakerState.DISABLED and outcome is not Outcome.IGNORED:
                trigger = "success" if outcome is Outcome.SUCCESS else "failure"
                self._fire(trigger, now, duration=duration)
                counted = True
        self._dispatch()
        return Settlement(outcome, current=current, counted=counted)

    def _call_event(
        self,
        permit: Permit,
        now: float,
        duration: float,
        outcome: Outcome,
        error: BaseException | None,
    ) -> CallEvent:
        if outcome is Outcome.SUCCESS:
            slow = self.config.slow_call is not None and duration > self.config.slow_call.duration
            return CallSucceeded(self.name, now, permit.id, duration, slow)
        if outcome is Outcome.IGNORED:
            return CallIgnored(self.name, now, permit.id, duration, error_name(error))
        return CallFailed(self.name, now, permit.id, duration, outcome, error_name(error))

    def _manual(self, trigger: str, now: float) -> bool:
        self._begin_input(now)
        before = self.state
        self._fire(trigger, now)
        self._dispatch()
        return self.state is not before

    def _fire(self, trigger: str, now: float, **kwargs: float) -> bool:
        return self._engine.fire(self, trigger, now=now, **kwargs)

    def _dispatch(self) -> None:
        if not self._undispatched:
            return
        pending, self._undispatched = self._undispatched, []
        for change in pending:
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception as exc:
                    # Only the type: exception text may carry upstream data (docs/contributing.md,
                    # rule 6).
                    _log.error(
                        "breaker %s: listener %s raised %s; ignored",
                        self.name,
                        _callable_name(listener),
                        type(exc).__name__,
                    )

    def _matches(self, what: str, matchers: tuple[ErrorMatcher, ...], error: Exception) -> bool:
        for matcher in matchers:
            if isinstance(matcher, type):
                if isinstance(error, matcher):
                    return True
                continue
            try:
                if matcher(error):
                    return True
            except Exception as exc:
                self._predicate_failed(what, exc)
        return False

    def _predicate_failed(self, what: str, exc: Exception) -> None:
        _log.error(
            "breaker %s: %s predicate raised %s; the call counts as a failure",
            self.name,
            what,
            type(exc).__name__,
        )

    def _open_duration(self, attempt: int) -> float:
        backoff = self.config.backoff
        if backoff is None:
            return self.config.reset_timeout
        u = 0.5
        if backoff.jitter and self._rng is not None:
            u = self._rng()
            if not 0.0 <= u <= 1.0:  # also NaN: a misbehaving rng must not break a transition
                u = 0.5
        return backoff.duration(attempt, self.config.first_wait, u)

    # ----------------------------------------------------------------- the table's steps
    # Called only by the rows of `wirestate.core.breaker.table` (its `Model`), each with the
    # values of the trigger it fires on.

    def _trips_on_failure(self, duration: float) -> bool:
        rate = self.config.failure_rate
        if rate is None:
            if self._consecutive + 1 >= self.config.failure_threshold:
                return True
        else:
            assert self._fail_window is not None
            if rate.exceeded(*self._fail_window.counts_with(True, self._progress)):
                return True
        return self._slow_trips(duration)

    def _slow_trips(self, duration: float) -> bool:
        rule = self.config.slow_call
        if rule is None:
            return False
        assert self._slow_window is not None
        return rule.exceeded(
            *self._slow_window.counts_with(duration > rule.duration, self._progress)
        )

    def _trials_suffice(self) -> bool:
        return self._trial_successes + 1 >= self.config.success_threshold

    # ----------------------------------------------------------------- table callbacks

    def _record_sample(self, failed: bool, duration: float) -> None:
        if self._fail_window is not None:
            self._fail_window.add(failed, self._progress)
        if self._slow_window is not None:
            assert self.config.slow_call is not None
            self._slow_window.add(duration > self.config.slow_call.duration, self._progress)

    def _count_failure(self, duration: float) -> None:
        self._consecutive += 1
        if self.state is BreakerState.CLOSED:
            self._record_sample(True, duration)

    def _count_success(self, duration: float) -> None:
        self._consecutive = 0
        self._record_sample(False, duration)

    def _count_trial_success(self) -> None:
        self._trial_successes += 1
        self._consecutive = 0

    def _enter_open(self, now: float) -> None:
        self._opened_at = now
        self._opened_progress = self._progress
        self._attempt += 1
        self._wait = self._open_duration(self._attempt)
        self._trial_successes = 0
        self._generation += 1

    def _enter_half_open(self) -> None:
        self._trial_successes = 0
        self._generation += 1

    def _enter_closed(self) -> None:
        self._consecutive = 0
        self._trial_successes = 0
        self._attempt = 0
        self._opened_at = None
        self._wait = self.config.first_wait
        for window in (self._fail_window, self._slow_window):
            if window is not None:
                window.clear()
        self._generation += 1

    def _enter_forced_open(self) -> None:
        """Entering FORCED_OPEN or DISABLED: no timer, no trial; older permits go stale."""
        self._opened_at = None
        self._trial_successes = 0
        self._generation += 1

    def _record_change(self, source: BreakerState, trigger: str, now: float) -> None:
        retry_at: float | None = None
        if self.state is BreakerState.OPEN:
            retry_at = now + self._wait
        elif self.state is BreakerState.FORCED_OPEN:
            retry_at = math.inf
        change = StateChanged(
            self.name,
            source,
            self.state,
            now,
            self._consecutive,
            retry_at,
            self._cause(trigger, source),
        )
        self._actions.append(change)
        self._undispatched.append(change)

    def _cause(self, trigger: str, source: BreakerState) -> TransitionCause:
        if trigger in _CAUSE_BY_TRIGGER:
            return _CAUSE_BY_TRIGGER[trigger]
        if source is BreakerState.HALF_OPEN:
            if trigger == "failure":
                return TransitionCause.TRIAL_FAILED
            return TransitionCause.TRIALS_SUCCEEDED
        if trigger == "failure":
            rate = self.config.failure_rate
            if rate is None:
                if self._consecutive >= self.config.failure_threshold:
                    return TransitionCause.FAILURE_THRESHOLD
            else:
                assert self._fail_window is not None
                if rate.exceeded(*self._fail_window.counts(self._progress)):
                    return TransitionCause.FAILURE_RATE
        return TransitionCause.SLOW_CALL_RATE
