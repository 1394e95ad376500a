"""Hypothesis state machine for the connection lifecycle and delivery, importable by users.

``LifecycleMachine`` drives the real hub with several clients through the same inputs as
``wirestate check`` (each step draws one of the inputs enabled in the current state), checks
the five lifecycle invariants after every step (`wirestate.core.verify.checks.Referee`), and
compares what each client receives against a small reference model of delivery: every event
published on a topic while the client was subscribed and accepting is, in order and exactly
once, either written, still queued, or covered by a ``gap`` (written or owed). Subscribing
again to a topic the client holds is one of its rules: it owes nothing new, so a replay
would show up as a seq received twice.

Use it as is (``TestLifecycle = LifecycleMachine.TestCase``) or subclass it to add rules and
invariants of your own; ``CLIENTS``, ``CONFIG`` and ``ENGINE`` are class attributes to
override.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from wirestate.core.hub import HubConfig
from wirestate.core.lifecycle import ENGINE as LIFECYCLE
from wirestate.core.lifecycle import ConnState
from wirestate.core.machine import Engine
from wirestate.core.verify.explore import EXPLORE_CONFIG, Label, World, apply, describe, inputs

#: Kinds of input a test case may switch off (never all the ones that keep a case going).
SWARM = ("reject", "shutdown", "burst", "unregister", "bad_input", "close", "write_error")


class LifecycleMachine(RuleBasedStateMachine):
    CLIENTS: ClassVar[int] = 3
    CONFIG: ClassVar[HubConfig] = EXPLORE_CONFIG
    #: The engine of the hub under test: the real table's, or a mutant's (`with_engine`).
    ENGINE: ClassVar[Engine[ConnState]] = LIFECYCLE

    @classmethod
    def with_engine(cls, engine: Engine[ConnState]) -> type[LifecycleMachine]:
        """This machine, its hub's connections run by ``engine``."""
        return type(f"{cls.__name__}WithEngine", (cls,), {"ENGINE": engine})

    def __init__(self) -> None:
        super().__init__()
        self.world = World.initial(self.CLIENTS, self.CONFIG, self.ENGINE)
        # Delivery reference: (client, topic) -> seqs owed to the client, in order, and the
        # seqs it has received (as events or inside gaps).
        self.expected: dict[tuple[int, str], list[int]] = {}
        self.received: dict[tuple[int, str], list[int]] = {}
        self.seen: set[str] = set()
        self.off: frozenset[str] = frozenset()

    # -- plumbing ------------------------------------------------------------------------

    def _step(self, label: Label) -> None:
        self.seen.add(f"input {label[0]}")
        before = self._accepting_subscriptions()
        seqs = {name: t.seq for name, t in self.world.hub.topics.items()}
        written = apply(self.world, label)
        self._track(label, before, seqs, written)

    # -- rules: one per kind of input ----------------------------------------------------

    @initialize(off=st.sets(st.sampled_from(SWARM)))
    def swarm(self, off: set[str]) -> None:
        """Swarm testing: each test case switches some kinds of input off, so that runs
        also go deep into the rarer paths (keep-alive, stalls) instead of ending early in
        a shutdown or an overflow."""
        self.off = frozenset(off)

    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        """One input, drawn among every input an adapter could feed the hub now: a
        client's handshake, pumps, frames, pongs, writes, errors or unregistration, or a
        publish, a burst, time passing, a loop stall, shutdown."""
        enabled = [label for label in inputs(self.world) if label[0] not in self.off]
        label = data.draw(st.sampled_from(enabled), label="input")
        self._step(label)

    @rule(data=st.data())
    def subscribe_again(self, data: st.DataObject) -> None:
        """A client subscribes again to a topic it holds (the explorer never does, as it
        changes no state): acknowledged, and nothing of the topic is queued twice."""
        held = sorted(self._accepting_subscriptions())
        if held:
            client, topic = data.draw(st.sampled_from(held), label="held")
            self._step(("subscribe", client, topic))

    # -- delivery reference --------------------------------------------------------------

    def _accepting_subscriptions(self) -> set[tuple[int, str]]:
        return {
            (i, topic)
            for i, c in enumerate(self.world.conns)
            if c is not None and c.accepting
            for topic in c.topics
        }

    def _track(
        self,
        label: Label,
        before: set[tuple[int, str]],
        seqs: dict[str, int],
        written: list[bytes],
    ) -> None:
        hub = self.world.hub
        after = self._accepting_subscriptions()
        # New subscriptions owe the retained event (if any) from here on.
        for key in after - before:
            topic = hub.topics[key[1]]
            start = seqs.get(key[1], 0)
            self.expected[key] = [start] if start and topic.retained else []
            self.received[key] = []
        # Events published by this step, to everyone subscribed before and after it.
        for key in before & after:
            old = seqs.get(key[1], 0)
            self.expected[key].extend(range(old + 1, hub.topics[key[1]].seq + 1))
        # Subscriptions that ended (unsubscribe, close) are no longer owed anything.
        for key in before - after:
            self.expected.pop(key, None)
            self.received.pop(key, None)
        if label[0] == "write":
            self._received(label[1], written)

    def _received(self, client: int, frames: list[bytes]) -> None:
        for raw in frames:
            msg: dict[str, Any] = orjson.loads(raw)
            key = (client, msg.get("topic", ""))
            if key not in self.received:
                continue
            if msg["type"] == "event":
                self.received[key].append(msg["seq"])
            elif msg["type"] == "gap" and msg["from_seq"] is not None:
                self.seen.add(f"gap {msg['reason']}")
                self.received[key].extend(range(msg["from_seq"], msg["to_seq"] + 1))

    @invariant()
    def delivery_matches_reference(self) -> None:
        conns = self.world.conns
        for (client, topic), expected in self.expected.items():
            conn = conns[client]
            assert conn is not None
            got = self.received[(client, topic)]
            assert got == sorted(set(got)), f"c{client} {topic}: out of order or twice: {got}"
            pending = [
                e.seq  # type: ignore[union-attr]
                for e in conn.outbox
                if e.__class__ is not bytes and e.topic == topic  # type: ignore[union-attr]
            ]
            for lo, hi in (conn.owed or {}).get(topic, []):
                pending.extend(range(lo, hi + 1))
            accounted = sorted(got + pending)
            assert accounted == expected, (
                f"c{client} {topic}: published {expected}, accounted for {accounted}"
            )

    def teardown(self) -> None:
        for seen in sorted(self.seen):  # coverage signal: --hypothesis-show-statistics
            event(seen)


__all__ = ["LifecycleMachine", "describe"]
