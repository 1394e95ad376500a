"""The breaker's configuration: thresholds, rate and slow-call rules, backoff, and the
validation that rejects at construction whatever could never work (S33). Pure.

Every duration is forward seconds of the injected clock (docs/breaker.md); every check
raises ``ValueError`` naming the field, the requirement and the value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

#: An exception type (matched with isinstance) or a predicate on the exception.
ErrorMatcher: TypeAlias = type[BaseException] | Callable[[BaseException], bool]


def invalid(name: str, requirement: str, value: object) -> ValueError:
    return ValueError(f"{name} must be {requirement}, got {value!r}")


def check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise invalid(name, f"an integer >= {minimum}", value)


def check_duration(name: str, value: object, *, optional: bool = False) -> None:
    """A duration is a positive number of seconds; `inf` is allowed, NaN is not (S30, S33)."""
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or value <= 0
    ):
        raise invalid(name, "a number of seconds > 0 (inf allowed)", value)


def check_percent(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or not 0 < value <= 100
    ):
        raise invalid(name, "a percentage in (0, 100]", value)


@dataclass(frozen=True)
class CountWindow:
    """The last `size` counted calls."""

    size: int

    def __post_init__(self) -> None:
        check_int("size", self.size, 1)


@dataclass(frozen=True)
class TimeWindow:
    """The calls counted during the last `seconds` of forward progress.

    A sample exactly `seconds` old has expired, so at most `ceil(seconds / interval)` samples
    fit at a fixed cadence (see `BreakerConfig.check_cadence`).
    """

    seconds: float

    def __post_init__(self) -> None:
        if (
            isinstance(self.seconds, bool)
            or not isinstance(self.seconds, int | float)
            or math.isnan(self.seconds)
            or self.seconds < 1
        ):
            raise invalid("seconds", "a window size >= 1 s", self.seconds)


Window: TypeAlias = CountWindow | TimeWindow


def _check_window_rule(prefix: str, window: object, min_calls: object) -> None:
    if not isinstance(window, CountWindow | TimeWindow):
        raise invalid(f"{prefix}.window", "a CountWindow or a TimeWindow", window)
    check_int(f"{prefix}.min_calls", min_calls, 1)
    # resilience4j clamps; rejecting says at construction that the rule could never fire (S19).
    if isinstance(window, CountWindow) and isinstance(min_calls, int) and min_calls > window.size:
        raise ValueError(
            f"{prefix}.min_calls ({min_calls}) exceeds the window size ({window.size}): "
            "the rule could never fire"
        )


def _exceeded(threshold: float, min_calls: int, calls: int, hits: int) -> bool:
    # Inclusive (S19: 3/6 meets 50 %), compared without dividing.
    return calls >= min_calls and hits * 100 >= threshold * calls


@dataclass(frozen=True, kw_only=True)
class FailureRateRule:
    """Rate mode (off by default: docs/breaker.md, design choices): trip when, over `window`, at
    least `min_calls` calls were counted and at least `threshold` percent of them failed. It
    replaces the consecutive rule; `consecutive_failures` is still reported."""

    threshold: float = 50.0
    window: Window = field(default_factory=lambda: CountWindow(10))
    min_calls: int = 5

    def __post_init__(self) -> None:
        check_percent("failure_rate.threshold", self.threshold)
        _check_window_rule("failure_rate", self.window, self.min_calls)

    def exceeded(self, calls: int, failures: int) -> bool:
        return _exceeded(self.threshold, self.min_calls, calls, failures)


@dataclass(frozen=True, kw_only=True)
class SlowCallRule:
    """Optional slow-call rule (S18): a counted call lasting strictly more than `duration`
    seconds is slow; trip when, over `window`, at least `min_calls` calls were counted and at
    least `rate_threshold` percent of them were slow. A slow success is still a success."""

    duration: float
    rate_threshold: float = 100.0
    window: Window = field(default_factory=lambda: CountWindow(5))
    min_calls: int = 5

    def __post_init__(self) -> None:
        check_duration("slow_call.duration", self.duration)
        check_percent("slow_call.rate_threshold", self.rate_threshold)
        _check_window_rule("slow_call", self.window, self.min_calls)

    def exceeded(self, calls: int, slow: int) -> bool:
        return _exceeded(self.rate_threshold, self.min_calls, calls, slow)


@dataclass(frozen=True, kw_only=True)
class Backoff:
    """Exponential open duration (S27): attempt n waits `min(max, base * multiplier**(n-1))`,
    then jittered by a factor in `[1 - jitter, 1 + jitter)` and capped at `max` again.

    `base=None` means the config's `reset_timeout`. The attempt count is the number of
    openings since the breaker was last CLOSED.
    """

    base: float | None = None
    multiplier: float = 2.0
    max: float = 3600.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        check_duration("backoff.base", self.base, optional=True)
        if (
            isinstance(self.multiplier, bool)
            or not isinstance(self.multiplier, int | float)
            or not self.multiplier >= 1  # also rejects NaN
            or math.isinf(self.multiplier)
        ):
            raise invalid("backoff.multiplier", "a finite number >= 1", self.multiplier)
        check_duration("backoff.max", self.max)
        if self.base is not None and self.max < self.base:
            raise invalid("backoff.max", f">= backoff.base ({self.base})", self.max)
        if (
            isinstance(self.jitter, bool)
            or not isinstance(self.jitter, int | float)
            or not 0 <= self.jitter < 1
        ):
            raise invalid("backoff.jitter", "a fraction in [0, 1)", self.jitter)

    def duration(self, attempt: int, base: float, u: float = 0.5) -> float:
        """The open duration of `attempt` (>= 1), with `u` in [0, 1) drawn for the jitter.

        Pure; never raises `OverflowError`: a power too large for a float is `inf`, then capped.
        """
        try:
            # floats throughout: int ** int would build an exact giant integer instead
            wait = float(base) * float(self.multiplier) ** max(0, attempt - 1)
        except OverflowError:
            wait = math.inf
        wait = min(wait, float(self.max))
        if self.jitter:
            wait = min(wait * (1 + self.jitter * (2 * u - 1)), self.max)
        return wait


@dataclass(frozen=True, kw_only=True)
class BreakerConfig:
    """What a breaker does; validated at construction (S33: `ValueError` naming the field).

    Defaults are the original service's: 5 consecutive failures open it for 300 s, one trial
    permit, one success closes it.

    - `half_open_max_wait`: how long a trial permit may stay unsettled before its lease
      expires (S13). `None` means `call_timeout` when that is set, else 60 s.
    - `call_timeout`: a permit settled this long after it was issued is a TIMEOUT failure.
    - `ignore`: errors that count as neither success nor failure (exception types or
      predicates). `success_on`: errors that count as a success. Checked in that order.
    - `is_failure_result`: a returned value for which it is true is a failure (S16).
    A predicate that raises is logged (type name only) and its call counts as a failure.
    """

    failure_threshold: int = 5
    reset_timeout: float = 300.0
    success_threshold: int = 1
    half_open_max_calls: int = 1
    half_open_max_wait: float | None = None
    call_timeout: float | None = None
    backoff: Backoff | None = None
    failure_rate: FailureRateRule | None = None
    slow_call: SlowCallRule | None = None
    ignore: tuple[ErrorMatcher, ...] = ()
    success_on: tuple[ErrorMatcher, ...] = ()
    is_failure_result: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        check_int("failure_threshold", self.failure_threshold, 1)
        check_duration("reset_timeout", self.reset_timeout)
        check_int("success_threshold", self.success_threshold, 1)
        check_int("half_open_max_calls", self.half_open_max_calls, 1)
        check_duration("half_open_max_wait", self.half_open_max_wait, optional=True)
        check_duration("call_timeout", self.call_timeout, optional=True)
        if self.backoff is not None:
            if not isinstance(self.backoff, Backoff):
                raise invalid("backoff", "a Backoff or None", self.backoff)
            if self.backoff.max < self.first_wait:
                raise invalid(
                    "backoff.max", f">= the base wait ({self.first_wait})", self.backoff.max
                )
        if self.failure_rate is not None and not isinstance(self.failure_rate, FailureRateRule):
            raise invalid("failure_rate", "a FailureRateRule or None", self.failure_rate)
        if self.slow_call is not None and not isinstance(self.slow_call, SlowCallRule):
            raise invalid("slow_call", "a SlowCallRule or None", self.slow_call)
        for name in ("ignore", "success_on"):
            matchers = getattr(self, name)
            if not isinstance(matchers, tuple) or not all(
                (isinstance(m, type) and issubclass(m, BaseException)) or callable(m)
                for m in matchers
            ):
                raise invalid(name, "a tuple of exception types or predicates", matchers)
        if self.is_failure_result is not None and not callable(self.is_failure_result):
            raise invalid("is_failure_result", "a predicate or None", self.is_failure_result)

    @property
    def first_wait(self) -> float:
        """The open duration of the first opening (before jitter)."""
        if self.backoff is not None and self.backoff.base is not None:
            return self.backoff.base
        return self.reset_timeout

    @property
    def lease(self) -> float:
        """The effective `half_open_max_wait`."""
        if self.half_open_max_wait is not None:
            return self.half_open_max_wait
        return self.call_timeout if self.call_timeout is not None else 60.0

    def check_cadence(self, poll_interval: float) -> None:
        """Reject rate rules that can never fire at this poll cadence (S20).

        A time window of W seconds holds at most `ceil(W / poll_interval)` samples from one
        poller; a `min_calls` above that is a `ValueError` naming `min_calls`.
        """
        check_duration("poll_interval", poll_interval)
        rules: list[tuple[str, Window, int]] = []
        if self.failure_rate is not None:
            rules.append(("failure_rate", self.failure_rate.window, self.failure_rate.min_calls))
        if self.slow_call is not None:
            rules.append(("slow_call", self.slow_call.window, self.slow_call.min_calls))
        for prefix, window, min_calls in rules:
            if isinstance(window, TimeWindow) and math.isfinite(window.seconds):
                fits = math.ceil(window.seconds / poll_interval)
                if min_calls > fits:
                    raise ValueError(
                        f"{prefix}.min_calls ({min_calls}) can never be reached: a "
                        f"{window.seconds:g} s window holds at most {fits} polls every "
                        f"{poll_interval:g} s"
                    )
