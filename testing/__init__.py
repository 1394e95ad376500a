"""Test your own reconnect handling against the real hub, deterministically.

A `Simulation` drives the pure hub with a fake clock and a seeded scheduler, cutting
connections, stalling readers and restarting the node, while your client logic decides what
to resume from; `Simulation.check` then says which client missed or repeated which event::

    import random
    from wirestate.testing import ResumingClient, Simulation

    class MyClient(ResumingClient):
        ...  # override on_frame / resume_since

    sim = Simulation(random.Random(7).random, clients=3, client_factory=MyClient)
    sim.run(500, cut_rate=0.05, slow_rate=0.05, restart_rate=0.01).settle().check()

The simulation itself lives in `wirestate.core.verify.simulation` (pure: no clock, no I/O).
"""

from wirestate.core.verify.simulation import (
    SIM_CONFIG,
    Client,
    ClientReport,
    Rates,
    Report,
    ResumingClient,
    Simulation,
)

__all__ = [
    "SIM_CONFIG",
    "Client",
    "ClientReport",
    "Rates",
    "Report",
    "ResumingClient",
    "Simulation",
]
