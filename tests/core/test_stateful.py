"""The Hypothesis lifecycle machine, run against the real hub."""

from wirestate.core.stateful import LifecycleMachine

TestLifecycle = LifecycleMachine.TestCase
