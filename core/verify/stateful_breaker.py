"""A Hypothesis state machine for the circuit breaker, importable for your own fuzz tests.

    from wirestate.core.verify.stateful_breaker import BreakerMachine
    TestBreaker = BreakerMachine.TestCase

It drives one `CachedSource` (and so its `Breaker`) through its public API with acquire,
success, failure, timeout, ignored and cancelled settlements, time passing (backwards steps
included), force_open, disable and reset, and after every step compares the breaker with
`_Reference`, a small independent model of docs/breaker.md written without `transitions`.

Invariants checked at every step:
- the snapshot (state, counters, trials in flight, attempt, generation, wait, retry_after,
  probe_due) equals the model's;
- never HALF_OPEN before `opened + wait` of forward progress (progress as the breaker observes
  it: the non-negative steps between the `now` values of its inputs);
- trial permits in flight never exceed `half_open_max_calls`;
- every `StateChanged` starts where the previous one ended, and the sequence equals the
  model's; a same-state request emits nothing;
- the call-level events equal the model's;
- a result that is not FRESH never refreshes the cache's `fetched_at`.

This module imports Hypothesis and is for tests only: nothing in the runtime core imports it.
The rules follow what makes Hypothesis machines shrink well: one rule is one external event, permits
are chosen through a Bundle, parameters come from small discrete sets (dyadic, so float sums are
exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from wirestate.core.breaker import (
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
    Permit,
    PollReason,
    PollResult,
)
from wirestate.core.breaker.table import ENGINE
from wirestate.core.machine import Engine

__all__ = ["BreakerMachine"]

_C, _O, _H, _F, _D = (
    BreakerState.CLOSED,
    BreakerState.OPEN,
    BreakerState.HALF_OPEN,
    BreakerState.FORCED_OPEN,
    BreakerState.DISABLED,
)
_REJECTED_AS = {
    _O: PollReason.CIRCUIT_OPEN,
    _H: PollReason.HALF_OPEN_BUSY,
    _F: PollReason.FORCED_OPEN,
}


class UpstreamError(Exception):
    """A counted failure."""


class Unchanged(Exception):
    """Configured as ignored: neither success nor failure."""


class Interrupted(BaseException):
    """Stands in for CancelledError / KeyboardInterrupt: released uncounted, re-raised."""


@dataclass(frozen=True)
class _Lease:
    generation: int
    progress: float
    trial: bool


class _Reference:
    """docs/breaker.md restated plainly. Knows nothing of the implementation but its config."""

    def __init__(self, config: BreakerConfig, cache: tuple[str, float] | None) -> None:
        self.cfg = config
        self.state = _C
        self.generation = 0
        self.failures = 0
        self.trial_successes = 0
        self.attempt = 0
        self.opened = 0.0  # progress when last opened
        self.wait = self._wait_for(1)
        self.progress = 0.0
        self.last_now: float | None = None
        self.leases: dict[int, _Lease] = {}
        self.next_id = 1
        self.cache = cache
        self.changes: list[tuple[BreakerState, BreakerState]] = []
        self.calls: list[tuple[Any, ...]] = []

    # -- time and bookkeeping

    @property
    def lease(self) -> float:
        cfg = self.cfg
        if cfg.half_open_max_wait is not None:
            return cfg.half_open_max_wait
        return cfg.call_timeout if cfg.call_timeout is not None else 60.0

    def _wait_for(self, attempt: int) -> float:
        backoff = self.cfg.backoff
        if backoff is None:
            return self.cfg.reset_timeout
        base = backoff.base if backoff.base is not None else self.cfg.reset_timeout
        return min(backoff.max, base * 2.0 ** (attempt - 1))

    def progress_at(self, now: float) -> float:
        if self.last_now is None:
            return self.progress
        return self.progress + max(0.0, now - self.last_now)

    def trials(self) -> list[_Lease]:
        return [v for v in self.leases.values() if v.trial and v.generation == self.generation]

    def _go(self, to: BreakerState) -> None:
        self.changes.append((self.state, to))
        self.state = to
        self.generation += 1

    def _open(self) -> None:
        self._go(_O)
        self.opened = self.progress
        self.attempt += 1
        self.wait = self._wait_for(self.attempt)
        self.trial_successes = 0

    def _close(self, *, emit: bool = True) -> None:
        if emit:
            self._go(_C)
        else:
            self.generation += 1
        self.failures = self.trial_successes = self.attempt = 0
        self.wait = self._wait_for(1)

    def begin(self, now: float) -> None:
        self.progress = self.progress_at(now)
        self.last_now = now
        horizon = self.cfg.call_timeout if self.cfg.call_timeout is not None else self.lease
        for pid, lease in list(self.leases.items()):
            if lease.generation != self.generation and self.progress >= lease.progress + horizon:
                del self.leases[pid]
        if self.state is _H:
            expired = [
                pid
                for pid, lease in self.leases.items()
                if lease.trial
                and lease.generation == self.generation
                and self.progress >= lease.progress + self.lease
            ]
            if expired:
                for pid in expired:
                    del self.leases[pid]
                    self.calls.append(("failed", pid, "expired"))
                self.failures += 1
                self._open()

    def retry_after(self, progress: float) -> float:
        if self.state is _O:
            return max(0.0, self.opened + self.wait - progress)
        if self.state is _F:
            return math.inf
        trials = self.trials()
        if self.state is _H and len(trials) >= self.cfg.half_open_max_calls:
            return max(0.0, min(t.progress for t in trials) + self.lease - progress)
        return 0.0

    # -- inputs

    def acquire(self, now: float) -> int | tuple[PollReason, float]:
        """A permit id, or (reason, retry_after)."""
        self.begin(now)
        if self.state is _O and self.progress >= self.opened + self.wait:
            self._go(_H)
            self.trial_successes = 0
        trial = self.state is _H
        if self.state in (_C, _D) or (trial and len(self.trials()) < self.cfg.half_open_max_calls):
            pid, self.next_id = self.next_id, self.next_id + 1
            self.leases[pid] = _Lease(self.generation, self.progress, trial)
            return pid
        rejected = (_REJECTED_AS[self.state], self.retry_after(self.progress))
        self.calls.append(("rejected", *rejected))
        return rejected

    def settle(self, pid: int, now: float, how: str) -> str:
        """The outcome name; `how` is success, failure, timeout, ignored or cancelled."""
        self.begin(now)
        lease = self.leases.pop(pid, None)
        if lease is None:
            return "already_settled"
        outcome = how
        timeout = self.cfg.call_timeout
        overdue = timeout is not None and self.progress >= lease.progress + timeout
        if overdue and how in ("success", "failure"):
            outcome = "timeout"
        if lease.generation != self.generation or outcome == "cancelled":
            return outcome
        if outcome == "success":
            self.calls.append(("succeeded", pid))
        elif outcome == "ignored":
            self.calls.append(("ignored", pid))
        else:
            self.calls.append(("failed", pid, outcome))
        if self.state is _D or outcome == "ignored":
            return outcome
        if outcome == "success":
            self.failures = 0
            if self.state is _H:
                if self.trial_successes + 1 >= self.cfg.success_threshold:
                    self._close()
                else:
                    self.trial_successes += 1
        else:
            self.failures += 1
            if self.state is _H or self.failures >= self.cfg.failure_threshold:
                self._open()
        return outcome

    def manual(self, now: float, target: BreakerState) -> None:
        self.begin(now)
        if target is _C:
            self._close(emit=self.state is not _C)
        elif self.state is not target:
            self._go(target)
            self.trial_successes = 0


_TIME_STEPS = (0.5, 1.0, 2.5, 4.0, 10.0, 30.0, 100.0)
_OUTCOMES = ("success", "failure", "timeout", "ignored", "cancelled")
# A poller sees mostly successes and failures; `outage` supplies runs of failures.
_POLL_OUTCOMES = ("success", "failure", "success", "timeout", "ignored", "cancelled")
_TOOK = (0.0, 0.5, 2.5, 4.0, 15.0, 30.0)  # 4 and 15 are call timeouts in the config space


def _configs() -> st.SearchStrategy[BreakerConfig]:
    @st.composite
    def build(draw: st.DrawFn) -> BreakerConfig:
        reset_timeout = draw(st.sampled_from([10.0, 30.0]))
        backoff = draw(st.sampled_from([None, Backoff(multiplier=2, max=4 * reset_timeout)]))
        return BreakerConfig(
            failure_threshold=draw(st.integers(1, 3)),
            reset_timeout=reset_timeout,
            success_threshold=draw(st.integers(1, 2)),
            half_open_max_calls=draw(st.integers(1, 2)),
            half_open_max_wait=draw(st.sampled_from([None, 5.0, 20.0])),
            call_timeout=draw(st.sampled_from([None, 4.0, 15.0])),
            backoff=backoff,
            ignore=(Unchanged,),
        )

    return build()


class BreakerMachine(RuleBasedStateMachine):
    """Breaker + cache vs `_Reference`, compared after every step.

    ``ENGINE`` runs the breakers under test: the real table's, or a mutant's in a subclass
    made by `with_engine` (how the mutation tests prove the machine bites)."""

    ENGINE: ClassVar[Engine[BreakerState]] = ENGINE

    @classmethod
    def with_engine(cls, engine: Engine[BreakerState]) -> type[BreakerMachine]:
        """This machine, its breakers run by ``engine``."""
        return type(f"{cls.__name__}WithEngine", (cls,), {"ENGINE": engine})

    permits = Bundle("permits")  # issued, not yet settled by the test
    settled = Bundle("settled")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.values = 0
        self.last_to = _C
        self.opened_progress = 0.0
        self.visited: set[BreakerState] = {_C}

    @initialize(config=_configs(), primed=st.booleans())
    def setup(self, config: BreakerConfig, primed: bool) -> None:
        cache = ("v0", -60.0) if primed else None
        self.breaker = Breaker("fuzz", config, engine=self.ENGINE)
        self.source: CachedSource[str] = CachedSource(
            self.breaker, cached=None if cache is None else CacheEntry(*cache)
        )
        self.model = _Reference(config, cache)

    # -- rules

    @rule(target=permits)
    def acquire(self) -> Any:
        permit = self._acquire()
        return multiple() if permit is None else multiple(permit)

    @rule(
        target=settled,
        permit=consumes(permits),
        how=st.sampled_from(_OUTCOMES),
        took=st.sampled_from(_TOOK),
    )
    def settle(self, permit: Permit, how: str, took: float) -> Permit:
        """The call in flight returns `took` seconds from now with this outcome."""
        self.now += took
        self._settle(permit, how)
        return permit

    @rule(permit=settled, how=st.sampled_from(_OUTCOMES))
    def settle_again(self, permit: Permit, how: str) -> None:
        """A late duplicate report (S17: the abandoned call returns after its timeout)."""
        self._settle(permit, how)

    @rule(how=st.sampled_from(_POLL_OUTCOMES), took=st.sampled_from(_TOOK))
    def poll(self, how: str, took: float) -> None:
        """A burst rule: acquire and settle at once, as a real poller does."""
        permit = self._acquire()
        if permit is not None:
            self.now += took
            self._settle(permit, how)

    @rule(n=st.integers(1, 3))
    def outage(self, n: int) -> None:
        """A burst rule: `n` failing polls in a row, enough to trip from CLOSED."""
        for _ in range(n):
            self.poll("failure", 0.0)

    @rule(dt=st.sampled_from(_TIME_STEPS))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule(dt=st.sampled_from([1.0, 5.0, 50.0]))
    def clock_steps_back(self, dt: float) -> None:
        self.now -= dt

    @precondition(lambda self: 0 < self.model.retry_after(self.model.progress) < math.inf)
    @rule()
    def time_reaches_retry_at(self) -> None:
        """A burst rule: move the clock exactly to the model's retry_at (the S06 boundary)."""
        model = self.model
        assert model.last_now is not None  # retry_after > 0 needs an earlier input
        self.now = max(self.now, model.last_now) + model.retry_after(model.progress)

    @rule(request=st.sampled_from(["reset", "force_open", "disable"]))
    def operator(self, request: str) -> None:
        """Manual control, as one rule so that it does not crowd out the others."""
        target = {"reset": _C, "force_open": _F, "disable": _D}[request]
        self._manual(target, getattr(self.breaker, request))

    # -- invariants

    @precondition(lambda self: hasattr(self, "model"))
    @invariant()
    def matches_the_reference(self) -> None:
        model, snap = self.model, self.breaker.snapshot(self.now)
        progress = model.progress_at(self.now)
        got = (
            snap.state,
            snap.consecutive_failures,
            snap.trial_successes,
            snap.trials_in_flight,
            snap.attempt,
            snap.generation,
            snap.wait,
            snap.retry_after,
            snap.probe_due,
        )
        expected = (
            model.state,
            model.failures,
            model.trial_successes,
            len(model.trials()),
            model.attempt,
            model.generation,
            model.wait,
            model.retry_after(progress),
            model.state is _O and progress >= model.opened + model.wait,
        )
        assert got == expected, f"breaker {got} != model {expected}"
        assert snap.trials_in_flight <= self.breaker.config.half_open_max_calls
        assert snap.retry_after >= 0

    def teardown(self) -> None:
        for state in sorted(self.visited, key=lambda s: s.value):
            event(f"visited {state.value}")

    # -- helpers

    def _acquire(self) -> Permit | None:
        before = self.source.cached
        got = self.source.begin(self.now)
        expected = self.model.acquire(self.now)
        self._after_step()
        if isinstance(got, Permit):
            assert got.id == expected, (got, expected)
            return got
        assert (got.reason, got.retry_after) == expected, (got, expected)
        self._check_fallback(got, before)
        return None

    def _settle(self, permit: Permit, how: str) -> None:
        result: dict[str, Any]
        if how == "success":
            self.values += 1
            result = {"value": f"v{self.values}"}
        else:
            error = {"failure": UpstreamError, "timeout": CallTimeout, "ignored": Unchanged}
            result = {"error": error.get(how, Interrupted)()}
        before = self.source.cached
        outcome = self.model.settle(permit.id, self.now, how)
        if how == "cancelled":
            swallowed = True
            try:
                self.source.complete(permit, self.now, **result)
            except Interrupted:
                swallowed = False  # the contract: released uncounted, then re-raised
            assert not swallowed, "a cancellation was swallowed"
            self._after_step()
            assert self.source.cached == before
            return
        got = self.source.complete(permit, self.now, **result)
        if outcome == "success":
            self.model.cache = (result["value"], self.now)
        self._after_step()
        if outcome == "success":
            assert (got.value, got.stale, got.reason) == (result["value"], False, PollReason.FRESH)
            assert self.source.cached == CacheEntry(result["value"], self.now)
        else:
            timed_out = outcome in ("timeout", "already_settled")
            reason = PollReason.TIMEOUT if timed_out else PollReason.UPSTREAM_ERROR
            assert got.reason is reason, (got, outcome)
            self._check_fallback(got, before)
        assert got.state is self.model.state
        assert got.retry_after == self.model.retry_after(self.model.progress)

    def _check_fallback(self, got: PollResult[str], before: CacheEntry[str] | None) -> None:
        # A result that is not FRESH never refreshes the cache (docs/breaker.md, rule 7).
        assert self.source.cached == before
        cache = self.model.cache
        if cache is None:
            assert (got.value, got.stale, got.fetched_at, got.age) == (None, False, None, None)
        else:
            assert (got.value, got.stale, got.fetched_at) == (cache[0], True, cache[1])
            assert got.age == max(0.0, self.now - cache[1])

    def _manual(self, target: BreakerState, action: Callable[[float], bool]) -> None:
        was = self.breaker.state
        changed = action(self.now)
        self.model.manual(self.now, target)
        drained = self._after_step()
        if was is target:
            assert drained == [], "a same-state request emitted an event"
            assert not changed
        else:
            # An expired trial lease may reopen the breaker first (H -> O), then the request.
            assert changed
            assert drained[-1][1] is target

    def _after_step(self) -> list[tuple[BreakerState, BreakerState]]:
        """Drain the breaker's outputs and check them against the model's."""
        changes = self.breaker.actions()
        drained = [(c.from_state, c.to_state) for c in changes]
        for change in changes:
            assert change.breaker == "fuzz"
            assert change.from_state is self.last_to, (change, self.last_to)
            self.last_to = change.to_state
            self.visited.add(change.to_state)
            if change.to_state is _O:
                self.opened_progress = self.model.progress
            elif change.to_state is _H:
                wait = self.model._wait_for(max(1, self.model.attempt))
                assert self.model.progress >= self.opened_progress + wait, (
                    "HALF_OPEN before the wait elapsed",
                    self.model.progress,
                    self.opened_progress,
                    wait,
                )
        assert drained == self.model.changes, (drained, self.model.changes)
        self.model.changes = []
        calls: list[tuple[Any, ...]] = []
        for call in self.breaker.call_events():
            if isinstance(call, CallRejected):
                calls.append(("rejected", PollReason(call.reason.value), call.retry_after))
            elif isinstance(call, CallSucceeded):
                calls.append(("succeeded", call.permit_id))
            elif isinstance(call, CallIgnored):
                calls.append(("ignored", call.permit_id))
            else:
                assert isinstance(call, CallFailed)
                calls.append(("failed", call.permit_id, call.outcome.value))
        assert calls == self.model.calls, (calls, self.model.calls)
        self.model.calls = []
        return drained
