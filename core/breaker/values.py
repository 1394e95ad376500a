"""The values a breaker hands out and reports: permits and rejections, settlements,
state changes and call events, snapshots and what is persisted for a restart. All frozen;
tests compare them with ``==``. Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Final, TypeAlias

from wirestate.core.breaker.config import check_int, invalid
from wirestate.core.breaker.table import BreakerState


class CallTimeout(TimeoutError):
    """Raised or passed by a shell whose call outlived `call_timeout` (a counted failure)."""


class NoValue(Enum):
    """The type of `NO_VALUE`."""

    NO_VALUE = "no_value"


#: Marks "no value came back" where `None` is a legitimate value.
NO_VALUE: Final = NoValue.NO_VALUE


class TransitionCause(Enum):
    """Why a state changed (carried by every `StateChanged`)."""

    FAILURE_THRESHOLD = "failure_threshold"
    FAILURE_RATE = "failure_rate"
    SLOW_CALL_RATE = "slow_call_rate"
    TRIAL_FAILED = "trial_failed"
    LEASE_EXPIRED = "lease_expired"
    WAIT_ELAPSED = "wait_elapsed"
    TRIALS_SUCCEEDED = "trials_succeeded"
    FORCED = "forced"
    DISABLED = "disabled"
    RESET = "reset"


class RejectReason(Enum):
    CIRCUIT_OPEN = "circuit_open"
    HALF_OPEN_BUSY = "half_open_busy"
    FORCED_OPEN = "forced_open"


class Outcome(Enum):
    """How a settlement was classified (docs/breaker.md, rules 5 and 6)."""

    SUCCESS = "success"
    FAILURE = "failure"
    TIMEOUT = "timeout"
    IGNORED = "ignored"
    CANCELLED = "cancelled"
    #: a trial lease ran out before the permit was settled (only in `CallFailed`)
    EXPIRED = "expired"
    #: the permit had already been settled, expired, or dropped: nothing happened
    ALREADY_SETTLED = "already_settled"


@dataclass(frozen=True)
class Permit:
    """Permission for one call. Settle it exactly once with `on_success`, `on_failure`,
    `on_ignored`, `on_cancelled` or `settle`, passing it back to the breaker that issued it."""

    breaker: str
    id: int
    generation: int
    started_at: float
    trial: bool


@dataclass(frozen=True)
class Rejected:
    """No permit: make no call. `retry_after` is in seconds (`inf` while forced open)."""

    reason: RejectReason
    retry_after: float


@dataclass(frozen=True)
class Settlement:
    """What settling a permit did. `current`: the permit was of the current generation.
    `counted`: the breaker's counters took it (false when stale, disabled, ignored...)."""

    outcome: Outcome
    current: bool
    counted: bool


@dataclass(frozen=True)
class StateChanged:
    """One real state change. `retry_at` (monotonic) is when a trial is due after entering
    OPEN, `inf` after entering FORCED_OPEN, else None."""

    breaker: str
    from_state: BreakerState
    to_state: BreakerState
    at: float
    failures: int
    retry_at: float | None
    cause: TransitionCause


@dataclass(frozen=True)
class CallRejected:
    breaker: str
    at: float
    reason: RejectReason
    retry_after: float


@dataclass(frozen=True)
class CallSucceeded:
    breaker: str
    at: float
    permit_id: int
    duration: float
    slow: bool


@dataclass(frozen=True)
class CallFailed:
    """A counted failure: `outcome` is FAILURE, TIMEOUT or EXPIRED; `error` a type name."""

    breaker: str
    at: float
    permit_id: int
    duration: float
    outcome: Outcome
    error: str | None


@dataclass(frozen=True)
class CallIgnored:
    breaker: str
    at: float
    permit_id: int
    duration: float
    error: str | None


CallEvent: TypeAlias = CallRejected | CallSucceeded | CallFailed | CallIgnored


@dataclass(frozen=True)
class BreakerSnapshot:
    """A pure read of a breaker at `at` (S07).

    - `retry_after`: seconds until `acquire()` could next be granted a permit: 0 in CLOSED,
      DISABLED and HALF_OPEN with a free trial slot; the remaining wait in OPEN (0 once
      `probe_due`); in a busy HALF_OPEN, the time until the oldest trial lease runs out;
      `inf` in FORCED_OPEN. Never negative, never more than the open duration.
    - `retry_at`: `at + retry_after`, None in CLOSED and DISABLED.
    - `retry_at_wall`: `retry_at` on the wall clock when a `wall_offset` was given and the
      value is finite, else None.
    - `wait`: the open duration of the current (or next) opening.
    - `failure_window`, `slow_window`: (calls, hits) in the rate rules' windows at `at`, None
      when the rule is off.
    """

    name: str
    state: BreakerState
    at: float
    opened_at: float | None
    retry_at: float | None
    retry_after: float
    retry_at_wall: float | None
    probe_due: bool
    consecutive_failures: int
    trial_successes: int
    trials_in_flight: int
    attempt: int
    generation: int
    wait: float
    failure_window: tuple[int, int] | None
    slow_window: tuple[int, int] | None


@dataclass(frozen=True, kw_only=True)
class PersistedBreaker:
    """What survives a restart (S32). Only wall-clock times: monotonic readings are not
    comparable across processes. `opened_at_wall` is required for OPEN."""

    state: BreakerState
    consecutive_failures: int = 0
    attempt: int = 0
    opened_at_wall: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.state, BreakerState):
            raise invalid("state", "a BreakerState", self.state)
        check_int("consecutive_failures", self.consecutive_failures, 0)
        check_int("attempt", self.attempt, 0)
        if self.state is BreakerState.OPEN and (
            not isinstance(self.opened_at_wall, int | float)
            or not math.isfinite(self.opened_at_wall)
        ):
            raise invalid("opened_at_wall", "a finite wall time for OPEN", self.opened_at_wall)


def wall_iso(wall: float | None) -> str | None:
    """ISO 8601 UTC text for wall-clock seconds, or None when there is no displayable time
    (None, inf, NaN, or outside `datetime`'s range): never `OverflowError` (S30)."""
    if wall is None or not math.isfinite(wall):
        return None
    try:
        moment = datetime.fromtimestamp(wall, tz=UTC)
    except (OverflowError, ValueError, OSError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_name(error: BaseException | None) -> str | None:
    return None if error is None else type(error).__name__
