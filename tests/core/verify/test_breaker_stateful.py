"""The breaker's Hypothesis state machine, and proof that its invariants bite.

`BreakerMachine` (core/verify/stateful_breaker.py) compares the breaker with an independent model
after every step. The mutation test plants a guard that half-opens after half the wait and
checks that the machine finds it and shrinks it to a short trace.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from wirestate.core.breaker import Backoff, BreakerConfig, BreakerState, Permit
from wirestate.core.verify.mutants import mutant
from wirestate.core.verify.stateful_breaker import BreakerMachine, Unchanged

TestBreaker = BreakerMachine.TestCase
# Examples and steps come from the active profile (tests/conftest.py: ci, dev, deep).
TestBreaker.settings = settings(deadline=None)


def test_the_machine_catches_an_early_half_open() -> None:
    planted = BreakerMachine.with_engine(mutant("early_half_open").engine())
    hunt = settings(
        max_examples=500,
        stateful_step_count=10,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        # no explain phase: it replays the shrunk trace many times and adds nothing here
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    with pytest.raises(AssertionError) as caught:
        run_state_machine_as_test(planted, settings=hunt)
    notes = getattr(caught.value, "__notes__", [])
    steps = [n for n in notes if n.startswith("state.") and n.split("(")[0] not in _NOT_STEPS]
    assert 1 <= len(steps) <= 8, notes


_NOT_STEPS = {"state.setup", "state.matches_the_reference", "state.teardown"}


def _walk(
    config: BreakerConfig, steps: list[tuple[str, dict[str, Any]]], *, primed: bool = True
) -> BreakerMachine:
    """Replay rules by hand, checking the invariants after each, as Hypothesis would."""
    machine = BreakerMachine()
    machine.setup(config=config, primed=primed)
    machine.matches_the_reference()
    bundle: list[Permit] = []
    for name, kwargs in steps:
        if "permit" in kwargs:
            kwargs = {**kwargs, "permit": bundle[kwargs["permit"]]}
        result = getattr(machine, name)(**kwargs)
        if name == "acquire":
            bundle.extend(result.values)
        machine.matches_the_reference()
    return machine


def test_regression_the_shrunk_mutant_trace_passes_on_the_real_breaker() -> None:
    config = BreakerConfig(failure_threshold=1, reset_timeout=10.0, ignore=(Unchanged,))
    _walk(
        config,
        [("outage", {"n": 1}), ("time_reaches_retry_at", {}), ("clock_steps_back", {"dt": 1.0})],
        primed=False,
    )


def test_a_scripted_walk_through_trials_leases_and_manual_control() -> None:
    config = BreakerConfig(
        failure_threshold=2,
        reset_timeout=10.0,
        success_threshold=2,
        half_open_max_calls=2,
        half_open_max_wait=5.0,
        call_timeout=4.0,
        backoff=Backoff(multiplier=2, max=40.0),
        ignore=(Unchanged,),
    )
    machine = _walk(
        config,
        [
            ("acquire", {}),  # permit 0, CLOSED
            ("acquire", {}),  # permit 1, CLOSED
            ("outage", {"n": 2}),  # OPEN
            ("settle", {"permit": 0, "how": "success", "took": 0.5}),  # stale: cached anyway
            ("time_reaches_retry_at", {}),
            ("settle", {"permit": 1, "how": "failure", "took": 0.0}),  # stale, past its horizon
            ("acquire", {}),  # permit 2: HALF_OPEN trial
            ("acquire", {}),  # permit 3: second trial
            ("acquire", {}),  # busy
            ("settle", {"permit": 2, "how": "success", "took": 0.5}),
            ("settle", {"permit": 3, "how": "success", "took": 0.5}),  # CLOSED
            ("settle_again", {"permit": 3, "how": "failure"}),  # duplicate: nothing
            ("poll", {"how": "success", "took": 4.0}),  # overdue: a TIMEOUT failure
            ("poll", {"how": "ignored", "took": 0.0}),
            ("poll", {"how": "cancelled", "took": 0.0}),
            ("poll", {"how": "timeout", "took": 0.0}),  # OPEN (attempt 1)
            ("time_passes", {"dt": 10.0}),
            ("acquire", {}),  # permit 4: trial
            ("time_passes", {"dt": 30.0}),
            ("acquire", {}),  # the trial's lease ran out: OPEN again (attempt 2)
            ("operator", {"request": "force_open"}),
            ("operator", {"request": "force_open"}),  # same state: no event
            ("operator", {"request": "disable"}),
            ("poll", {"how": "failure", "took": 0.0}),  # disabled: recorded nowhere
            ("operator", {"request": "reset"}),
            ("operator", {"request": "reset"}),  # same state: no event
            ("clock_steps_back", {"dt": 50.0}),
            ("poll", {"how": "success", "took": 0.0}),
        ],
    )
    assert machine.visited == set(BreakerState)
