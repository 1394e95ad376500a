"""The Hypothesis lifecycle machine, run against the real hub."""

from wirestate.core.verify.stateful import LifecycleMachine

TestLifecycle = LifecycleMachine.TestCase


def test_a_conflation_gap_is_accounted_for_as_delivery() -> None:
    """A plain replay of the keep_latest path, so the reference's gap bookkeeping is always
    exercised, whatever the random draws of the run."""
    machine = LifecycleMachine()
    script = [
        ("accept", 0),
        ("start", 0),
        ("subscribe", 0, "k"),
        ("write", 0),
        ("publish", "k"),
        ("publish", "k"),
        ("publish", "k"),  # the outbox holds 2: k1 is conflated away, a gap is owed
        ("write", 0),
    ]
    for label in script:
        machine._step(label)
        machine.delivery_matches_reference()
    assert machine.received[(0, "k")] == [1, 2, 3]
    assert machine.expected[(0, "k")] == [1, 2, 3]


def test_subscribing_again_to_a_held_topic_owes_nothing_twice() -> None:
    """The reference catches a replay to a client that already holds the topic: its
    retained event would be received twice."""
    machine = LifecycleMachine()
    script = [
        ("accept", 0),
        ("start", 0),
        ("write", 0),  # the welcome
        ("publish", "t"),
        ("subscribe", 0, "t"),  # the retained t1
        ("write", 0),
        ("subscribe", 0, "t"),  # again: acknowledged, t1 not resent
        ("publish", "t"),
        ("write", 0),
    ]
    for label in script:
        machine._step(label)
        machine.delivery_matches_reference()
    assert machine.received[(0, "t")] == [1, 2]
