"""Exhaustive exploration of one circuit breaker, the second half of ``wirestate check``.

Breadth first over every interleaving of: acquiring a permit, settling any outstanding permit
as success, failure, ignored or cancelled, time passing in steps of one second, and the
operator's force_open, disable and reset. After every step a small reference model checks:

* each ``StateChanged`` starts where the previous one ended, and none is emitted for a
  same-state request;
* OPEN never becomes HALF_OPEN before ``opened_at + wait`` (the reference computes the wait
  from the config and its own count of openings, not from the breaker), and FORCED_OPEN
  never does by itself;
* a call is rejected in OPEN before the wait is over, and never in CLOSED or DISABLED;
* HALF_OPEN never has more than ``half_open_max_calls`` trials in flight.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from wirestate.core.breaker import (
    Backoff,
    Breaker,
    BreakerConfig,
    BreakerState,
    Permit,
    Rejected,
)
from wirestate.core.breaker.table import ENGINE
from wirestate.core.machine import Engine
from wirestate.core.verify.checks import InvariantViolation
from wirestate.core.verify.explore import Result, search

B = BreakerState

#: Small numbers so that every rule is reached within a few steps.
BREAKER_CONFIG = BreakerConfig(
    failure_threshold=2,
    reset_timeout=3.0,
    success_threshold=2,
    half_open_max_calls=2,
    half_open_max_wait=4.0,
    backoff=Backoff(multiplier=2.0, max=6.0),
)
MAX_PERMITS = 3
RULES = "breaker"

Label = tuple[Any, ...]


class BreakerWorld:
    """The breaker, the permits handed out and not yet settled, and the reference."""

    __slots__ = ("breaker", "now", "opened_at", "openings", "permits", "state")

    def __init__(self, config: BreakerConfig, engine: Engine[B] = ENGINE) -> None:
        self.breaker = Breaker("explored", config, engine=engine)
        self.now = 0.0
        self.permits: list[Permit] = []
        self.state = B.CLOSED  # the reference's idea of the state
        self.opened_at: float | None = None
        self.openings = 0  # since the last CLOSED: the backoff attempt

    def clone(self) -> BreakerWorld:
        other = copy.copy(self)
        other.breaker = copy.deepcopy(self.breaker)
        other.permits = list(self.permits)
        return other

    def key(self) -> tuple[Any, ...]:
        b, now = self.breaker, self.now
        snap = b.snapshot(now)
        return (
            snap.state,
            snap.consecutive_failures,
            snap.trial_successes,
            snap.trials_in_flight,
            snap.attempt,
            None if snap.opened_at is None else snap.opened_at - now,
            tuple(
                (p.generation == snap.generation, p.trial, p.started_at - now) for p in self.permits
            ),
            self.openings,
        )

    def wait(self) -> float:
        """The reference's own open duration for the current opening."""
        cfg = self.breaker.config
        base = cfg.reset_timeout
        if cfg.backoff is None:
            return base
        if cfg.backoff.base is not None:
            base = cfg.backoff.base
        return float(min(cfg.backoff.max, base * cfg.backoff.multiplier ** (self.openings - 1)))


def breaker_inputs(w: BreakerWorld) -> list[Label]:
    out: list[Label] = []
    if len(w.permits) < MAX_PERMITS:
        out.append(("acquire",))
    for i in range(len(w.permits)):
        out.extend([("success", i), ("failure", i), ("ignored", i), ("cancelled", i)])
    out += [("wait", 1.0), ("force_open",), ("disable",), ("reset",)]
    return out


class _Boom(Exception):
    """The upstream failed."""


def breaker_apply(w: BreakerWorld, label: Label) -> None:
    b, kind = w.breaker, label[0]
    if kind == "acquire":
        before = w.state
        result = b.acquire(w.now)
        if isinstance(result, Permit):
            w.permits.append(result)
        _check_events(w)
        if isinstance(result, Rejected) and before in (B.CLOSED, B.DISABLED):
            raise InvariantViolation(RULES, f"a call was rejected in {before.value}")
        if (
            isinstance(result, Permit)
            and before is B.OPEN
            and w.opened_at is not None
            and w.now < w.opened_at + w.wait()
        ):
            raise InvariantViolation(RULES, "a call was let through while OPEN")
    elif kind == "wait":
        w.now += label[1]
    elif kind in ("force_open", "disable", "reset"):
        getattr(b, kind)(w.now)
        _check_events(w)
    else:
        permit = w.permits.pop(label[1])
        if kind == "success":
            b.on_success(permit, w.now)
        elif kind == "failure":
            b.on_failure(permit, w.now, _Boom())
        elif kind == "ignored":
            b.on_ignored(permit, w.now)
        else:
            b.on_cancelled(permit, w.now)
        _check_events(w)
    snap = b.snapshot(w.now)
    if snap.state is not w.state:
        raise InvariantViolation(
            6, f"breaker is {snap.state.value}, its events say {w.state.value}"
        )
    if snap.trials_in_flight > b.config.half_open_max_calls:
        raise InvariantViolation(RULES, f"{snap.trials_in_flight} trials in flight")


def _check_events(w: BreakerWorld) -> None:
    for ev in w.breaker.actions():
        if ev.from_state is not w.state:
            raise InvariantViolation(
                RULES,
                f"{ev.from_state.value}->{ev.to_state.value} but the state was {w.state.value}",
            )
        if ev.from_state is ev.to_state:
            raise InvariantViolation(
                RULES, f"an event for a same-state request ({ev.to_state.value})"
            )
        if ev.to_state is B.HALF_OPEN:
            if ev.from_state is not B.OPEN:
                raise InvariantViolation(RULES, f"{ev.from_state.value} half-opened")
            assert w.opened_at is not None
            due = w.opened_at + w.wait()
            if ev.at < due:
                raise InvariantViolation(
                    6, f"half-opened at {ev.at:g}, {due - ev.at:g} s before its wait was over"
                )
        if ev.to_state is B.OPEN:
            w.opened_at = ev.at
            w.openings += 1
        if ev.to_state in (B.CLOSED, B.DISABLED, B.FORCED_OPEN):
            w.opened_at = None
        if ev.to_state is B.CLOSED:
            w.openings = 0
        w.state = ev.to_state


def describe(label: Label) -> str:
    return " ".join(str(x) for x in label)


def explore_breaker(
    depth: int = 12,
    *,
    config: BreakerConfig = BREAKER_CONFIG,
    clock: Callable[[], float],
    engine: Engine[B] = ENGINE,
) -> Result:
    """Every interleaving of calls, outcomes, time and operator actions, to ``depth``.
    ``engine``: the table's, or a mutant's to show that the search catches it."""
    return search(
        BreakerWorld(config, engine),
        breaker_inputs,
        breaker_apply,
        depth=depth,
        clock=clock,
        describe=describe,
    )
