"""The deterministic simulation: same seed, same run; the default client keeps every property
under cuts, slow readers and restarts; broken reconnect logic is caught and named."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wirestate.core.causes import OverflowPolicy
from wirestate.core.hub import HubConfig
from wirestate.core.verify.simulation import SIM_CONFIG, Rates, ResumingClient, Simulation, Since

SEEDS = range(6)
FAULTS: dict[str, Any] = {"cut_rate": 0.05, "slow_rate": 0.05, "restart_rate": 0.01}


def small(policy: OverflowPolicy) -> HubConfig:
    return HubConfig(
        ping_interval=5.0,
        ping_timeout=2.0,
        close_timeout=1.0,
        send_queue_size=6,
        history_size=3,
        default_overflow=policy,
    )


def sim(seed: int, **kwargs: Any) -> Simulation:
    return Simulation(random.Random(seed).random, **kwargs)


# -- determinism -----------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_trace_and_report() -> None:
    runs = [sim(3, topics=("a", "b")).run(300, **FAULTS).settle() for _ in range(2)]
    assert runs[0].report() == runs[1].report()
    assert runs[0].trace == runs[1].trace
    other = sim(4, topics=("a", "b")).run(300, **FAULTS).settle()
    assert other.report() != runs[0].report()


def test_the_simulation_module_imports_no_random_and_no_io() -> None:
    code = (
        "import sys, wirestate.testing\n"
        "print([m for m in ('random', 'asyncio', 'socket', 'time') if m in sys.modules])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    # `random` may be loaded by a dependency; the module itself must not name it.
    assert "asyncio" not in out
    assert "socket" not in out
    import wirestate.core.verify.simulation as module

    assert "random" not in vars(module)
    assert "import random" not in Path(module.__file__).read_text(encoding="utf-8")


# -- properties under faults -----------------------------------------------------------------


@pytest.mark.parametrize("policy", list(OverflowPolicy))
@pytest.mark.parametrize("seed", SEEDS)
def test_the_resuming_client_keeps_every_property_under_faults(
    policy: OverflowPolicy, seed: int
) -> None:
    s = sim(seed, clients=3, topics=("a", "b"), config=small(policy))
    s.run(400, **FAULTS)
    s.check()  # mid-run: no hole below what each client has heard of
    s.settle().check()
    r = s.report()
    assert r.published > 100
    assert r.cuts > 0
    assert all(c.reconnects > 0 for c in r.clients)
    assert r.delivered > r.published  # three clients


@pytest.mark.parametrize("policy", list(OverflowPolicy))
def test_faults_really_happen_for_each_policy(policy: OverflowPolicy) -> None:
    reports = [sim(seed, config=small(policy)).run(400, **FAULTS).settle() for seed in SEEDS]
    for s in reports:
        s.check()
    gaps = [g for s in reports for c in s.report().clients for gs in c.gaps.values() for g in gs]
    reasons = {reason for _, _, reason in gaps}
    assert "history_evicted" in reasons
    assert "epoch_changed" in reasons
    assert sum(s.restarts for s in reports) > 0
    if policy is OverflowPolicy.DISCONNECT:
        assert sum(s.server_closes for s in reports) > 0
        assert "slow_consumer" not in reasons
    else:
        assert "slow_consumer" in reasons


def test_a_slow_reader_that_misses_its_pongs_is_closed_and_comes_back() -> None:
    s = sim(0, clients=1)
    s.slots[0].slow = 100
    for _ in range(6):
        s.publish("t")
        s.step(Rates(publish=0.0, cut=0.0, slow=0.0, tick=1.0))  # time passes to each deadline
    assert "keepalive_timeout" in " ".join(s.trace)
    s.settle().check()
    assert s.report().clients[0].reconnects == 1


def test_the_default_config_and_rates() -> None:
    s = sim(1).run(200).settle()
    s.check()
    assert s.config is SIM_CONFIG
    assert s.report().steps == 200


# -- broken reconnect logic is caught --------------------------------------------------------


class SkipsOne(ResumingClient):
    """Resumes from the seq after the last one it has: skips an event on every resume."""

    def resume_since(self) -> Since:
        return {t: (seq + 1, self.epochs[t]) for t, seq in self.last.items()}


class NeverResumes(ResumingClient):
    def resume_since(self) -> Since:
        return {}


class ForgetsEpoch(ResumingClient):
    """Counts seqs without epochs: after a restart it resumes into the new sequence."""

    def on_frame(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "subscribed":
            for topic in msg["topics"]:
                self.last.setdefault(topic, 0)
        else:
            super().on_frame(msg)

    def resume_since(self) -> Since:
        return dict(self.last)


@pytest.mark.parametrize("client", [SkipsOne, NeverResumes])
@pytest.mark.parametrize("seed", SEEDS)
def test_a_client_that_does_not_resume_correctly_is_caught(
    client: type[ResumingClient], seed: int
) -> None:
    s = sim(seed, client_factory=client).run(300, **FAULTS).settle()
    with pytest.raises(AssertionError, match=r"client c\d: topic 't' epoch 'e\d+': seq \d+ "):
        s.check()


def test_a_client_that_forgets_the_epoch_is_caught() -> None:
    s = sim(0, clients=1, client_factory=ForgetsEpoch)
    for _ in range(3):
        s.publish("t")
    s.settle().check()  # it has seqs 1..3 of epoch e0
    s.cut("c0")
    s.publish("t")  # seq 4 of e0: the client never sees it
    s.restart()
    for _ in range(5):
        s.publish("t")  # seqs 1..5 of e1
    s.settle()  # resumes with since=3: the hub replays 4..5 of e1 as if nothing happened
    with pytest.raises(
        AssertionError,
        match="client c0: topic 't' epoch 'e0': seq 4 published while subscribed was "
        "neither received nor inside a gap",
    ):
        s.check()


def test_the_default_client_passes_the_same_scenario() -> None:
    s = sim(0, clients=1)
    for _ in range(3):
        s.publish("t")
    s.settle()
    s.cut("c0")
    s.publish("t")
    s.restart()
    for _ in range(5):
        s.publish("t")
    s.settle().check()
    (c,) = s.report().clients
    # The new epoch from its start, as far as the hub holds it (a history of 4).
    assert c.received == {("e0", "t"): (1, 2, 3), ("e1", "t"): (2, 3, 4, 5)}
    assert c.gaps == {
        ("e0", "t"): ((4, None, "epoch_changed"),),
        ("e1", "t"): ((1, 1, "history_evicted"),),
    }
    # subscribed named 0 in e1, so all of e1 is owed: a replay short of seq 2 is caught.
    s.slots[0].received[("e1", "t")].remove(2)
    with pytest.raises(AssertionError, match="epoch 'e1': seq 2 published"):
        s.check()


def test_the_default_client_enters_a_new_epoch_only_with_its_epoch_changed_gap() -> None:
    client = ResumingClient()
    client.on_frame(subscribed("e0", recovered=True, seq=0))
    client.on_frame({"type": "event", "topic": "t", "seq": 3})
    # Resumed into e1; the connection is cut before the epoch_changed gap arrives.
    client.on_frame(subscribed("e1", recovered=False, seq=0))
    assert client.resume_since() == {"t": (3, "e0")}  # so the next resume is told again
    client.on_frame(subscribed("e1", recovered=False, seq=0))
    client.on_frame(
        {"type": "gap", "topic": "t", "from_seq": None, "to_seq": None, "reason": "epoch_changed"}
    )
    assert client.resume_since() == {"t": (0, "e1")}
    client.on_frame(
        {"type": "gap", "topic": "t", "from_seq": 1, "to_seq": 2, "reason": "history_evicted"}
    )
    assert client.resume_since() == {"t": (2, "e1")}
    # A resume refused in the same epoch (history lost) keeps the count.
    client.on_frame(subscribed("e1", recovered=False, seq=2))
    assert client.resume_since() == {"t": (2, "e1")}


def subscribed(epoch: str, *, recovered: bool, seq: int) -> dict[str, Any]:
    return {
        "type": "subscribed",
        "topics": ["t"],
        "recovered": {"t": recovered},
        "epoch": {"t": epoch},
        "seq": {"t": seq},
    }


def test_a_client_cut_before_its_epoch_changed_gap_is_owed_nothing_of_that_epoch() -> None:
    s = sim(0, clients=1, topics=("a", "b"), config=HubConfig(send_queue_size=3)).settle()
    s.restart()
    s.settle(max_rounds=1)  # welcome, subscribed, a's gap: b's gap overflows and closes
    assert s.slots[0].conn is None
    s.publish("b")  # seq 1 of e1, which the client never entered
    s.config = SIM_CONFIG
    s.restart()
    s.settle().check()  # resumed from e0 into e2: told epoch_changed for e0, nothing of e1
    (c,) = s.report().clients
    assert ("e1", "b") not in c.received
    assert c.gaps[("e0", "b")] == ((1, None, "epoch_changed"),)


TICK = Rates(publish=0.0, cut=0.0, slow=0.0, tick=1.0)  # time passes to the next deadline


def test_a_topic_dropped_and_created_again_counts_in_its_own_epoch() -> None:
    config = HubConfig(ping_interval=1000.0, history_max_age=10.0)
    s = sim(0, clients=1, config=config)
    s.publish("t")
    s.settle()
    s.cut("c0")
    s.publish("t")  # seq 2 of e0: the client never sees it
    s.step(TICK)  # history ages out: the idle topic goes
    s.step(TICK)
    assert "t" not in s.hub.topics
    s.publish("t")  # seq 1 of e0.1
    s.settle().check()
    (c,) = s.report().clients
    assert c.received == {("e0", "t"): (1,), ("e0.1", "t"): (1,)}
    assert c.gaps == {("e0", "t"): ((2, None, "epoch_changed"),)}


def test_what_a_dropped_topic_published_is_still_owed() -> None:
    config = HubConfig(ping_interval=1000.0, history_max_age=10.0)
    s = sim(0, clients=1, config=config, client_factory=NeverResumes)
    s.publish("t")
    s.settle()
    s.cut("c0")
    s.publish("t")
    s.publish("t")  # seqs 2 and 3 of e0: the client never sees them
    s.step(TICK)
    s.step(TICK)
    s.publish("t")  # seq 1 of e0.1
    s.settle()
    with pytest.raises(AssertionError, match="epoch 'e0': seq 2 published"):
        s.check()


def test_duplicates_and_reordering_are_named() -> None:
    s = sim(0, clients=1)
    s.slots[0].received[("e0", "t")] = [1, 2, 2]
    with pytest.raises(AssertionError, match="seq 2 received after 2 is a duplicate"):
        s.check()
    s.slots[0].received[("e0", "t")] = [1, 3, 2]
    with pytest.raises(AssertionError, match="seq 2 received after 3 is out of order"):
        s.check()


def test_a_client_left_behind_by_settle_is_named() -> None:
    s = sim(0, clients=2).settle()
    s.cut("c1")
    s.cut("c1")  # a cut of a client that is down does nothing
    s.settle(max_rounds=0)
    with pytest.raises(AssertionError, match="client c1: not connected and drained"):
        s.check()


def test_a_refused_subscription_is_named() -> None:
    config = HubConfig(max_subscriptions=1)
    s = sim(0, clients=1, topics=("a", "b"), config=config).settle()
    with pytest.raises(AssertionError, match="client c0: topic 'a' not subscribed in epoch 'e0'"):
        s.check()


# -- misuse and the public package -----------------------------------------------------------


def test_misuse_raises() -> None:
    with pytest.raises(ValueError, match="at least one client"):
        sim(0, clients=0)
    with pytest.raises(ValueError, match="at least one client"):
        sim(0, topics=())
    with pytest.raises(ValueError, match="sum to at most 1"):
        Rates(publish=0.9, cut=0.2)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        Rates(slow=-0.1)
    with pytest.raises(KeyError):
        sim(0).cut("nobody")


def test_users_import_it_from_wirestate_testing() -> None:
    from wirestate import testing

    assert testing.Simulation is Simulation
    assert testing.ResumingClient is ResumingClient
    s = testing.Simulation(random.Random(7).random, clients=2, topics=("x",))
    s.run(200, cut_rate=0.1, slow_rate=0.05, restart_rate=0.01).settle().check()
    assert isinstance(s.report(), testing.Report)


def subscribed_at(seq: int) -> dict[str, Any]:
    return {
        "type": "subscribed",
        "topics": ["t"],
        "recovered": {"t": True},
        "epoch": {"t": "e1"},
        "seq": {"t": seq},
    }


def test_the_default_client_resumes_a_quiet_topic_from_where_it_was_subscribed() -> None:
    """Not from 0: what the topic held before the subscription is not the client's, and a
    history that no longer reaches back that far would answer with a needless gap."""
    client = ResumingClient()
    client.on_frame(subscribed_at(5))
    assert client.resume_since() == {"t": (5, "e1")}
    client.on_frame({"type": "event", "topic": "t", "seq": 6})
    assert client.resume_since() == {"t": (6, "e1")}
    client.on_frame(subscribed_at(6))  # a resume's subscribed names its since
    assert client.resume_since() == {"t": (6, "e1")}
