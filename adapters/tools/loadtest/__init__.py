"""``wirestate loadtest``: N subscribers, a paced publisher, and what they saw.

The run, in phases, every wait bounded:

1. **Setup.** The soft RLIMIT_NOFILE is raised to the hard limit; when N connections (plus
   the publishers and a reserve) still do not fit, the run stops before connecting, saying
   what to change.
2. **Publishers.** ``publishers`` lean connections (default: one per 40 events/s, under the
   server's default inbound limit of 50 messages/s per connection). The first one also
   subscribes to the topic: what it receives is what the server *sequenced*, so a publish
   the server refused (``rate_limited``, ``forbidden``) is reported as refused, not as a
   delivery lost by every client. A publisher that cannot connect stops the run (exit 1).
3. **Clients.** N `wirestate.adapters.tools.leanws` connections, at most ``concurrency``
   handshakes in flight (and at most ``ramp`` new ones per second when given), each sending
   ``subscribe`` right after the upgrade and counted as connected on ``subscribed``. A
   failure is recorded by kind (``refused``, ``timeout``, ``http_429``, ...) and the run goes
   on; after ``GIVE_UP`` failures with no success at all it stops trying.
4. **Publishing.** ``rate`` events/s for ``duration`` seconds, round robin over the
   publishers, each a ``publish`` message whose data carries the run's id, a per-run event
   id and the wall-clock publish time (``{"run": …, "id": k, "t": time.time()}``).
   Latency = receive wall time - ``t``, per delivery; throughput per 1 s bucket of receive
   time since the first publish.
5. **Drain**, up to ``drain_timeout``: each publisher, then the observer, sends an
   application ``ping`` until its ``pong`` comes back (resent every ``SYNC_EVERY``: a
   publisher over its rate limit has pings dropped too); then the server has handled every
   publish and the observer's count is final. The drain ends when every client has that
   many events.
6. **Close**: every connection closed with 1000, waiting up to ``close_timeout`` for the
   server's answer, then dropped.

Checked per client: seqs consecutive (a jump without a ``gap`` counts its events as
``missing``; a ``gap`` counts its range as ``gapped``; a seq at or below the last one is a
duplicate) and, at the end, the sequenced events it never got (``lost``). Every close not
started by the loadtest's own final close is a *disconnect*, recorded with its code and the
cause the wirestate server names in the close frame's reason (`wirestate.adapters.client.
parse_close`; no close frame is ``1006 read_error``).

The run fails (exit 1) on any connection failure, disconnect, lost, missing or duplicated
delivery, refused publish or ``error`` message to a client; `Report.failure` says why in one
line. Bad options, too few file descriptors and ``--plot`` without matplotlib are usage
errors (exit 2), found before anything connects.

Cost per delivery: one dict lookup of the payload (every client receives the same bytes, so
the JSON is parsed once per event, not once per delivery), a seq comparison and a log-bucket
histogram increment: memory does not grow with the number of deliveries.
"""

from wirestate.adapters.tools.loadtest.options import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    LoadTestError,
    LoadTestOptions,
    ensure_fds,
)
from wirestate.adapters.tools.loadtest.plot import plot_report
from wirestate.adapters.tools.loadtest.report import Report
from wirestate.adapters.tools.loadtest.run import execute, run_loadtest

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "LoadTestError",
    "LoadTestOptions",
    "Report",
    "ensure_fds",
    "execute",
    "plot_report",
    "run_loadtest",
]
