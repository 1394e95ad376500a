"""The circuit breaker, pure: its transition table (`table`), its configuration
(`config`), the values it hands out (`values`), the `Breaker` itself (`breaker`) and the
cached-value fallback around it (`cached`). docs/breaker.md gives the contract; everything
public is importable from here."""

from wirestate.core.breaker.breaker import Breaker
from wirestate.core.breaker.cached import CachedSource, CacheEntry, PollReason, PollResult
from wirestate.core.breaker.config import (
    Backoff,
    BreakerConfig,
    CountWindow,
    ErrorMatcher,
    FailureRateRule,
    SlowCallRule,
    TimeWindow,
)
from wirestate.core.breaker.table import MACHINE, REFUSED, TRANSITIONS, TRIGGERS, BreakerState
from wirestate.core.breaker.values import (
    NO_VALUE,
    BreakerSnapshot,
    CallEvent,
    CallFailed,
    CallIgnored,
    CallRejected,
    CallSucceeded,
    CallTimeout,
    Outcome,
    Permit,
    PersistedBreaker,
    Rejected,
    RejectReason,
    Settlement,
    StateChanged,
    TransitionCause,
    wall_iso,
)

__all__ = [
    "MACHINE",
    "NO_VALUE",
    "REFUSED",
    "TRANSITIONS",
    "TRIGGERS",
    "Backoff",
    "Breaker",
    "BreakerConfig",
    "BreakerSnapshot",
    "BreakerState",
    "CacheEntry",
    "CachedSource",
    "CallEvent",
    "CallFailed",
    "CallIgnored",
    "CallRejected",
    "CallSucceeded",
    "CallTimeout",
    "CountWindow",
    "ErrorMatcher",
    "FailureRateRule",
    "Outcome",
    "Permit",
    "PersistedBreaker",
    "PollReason",
    "PollResult",
    "RejectReason",
    "Rejected",
    "Settlement",
    "SlowCallRule",
    "StateChanged",
    "TimeWindow",
    "TransitionCause",
    "wall_iso",
]
