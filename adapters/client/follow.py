"""``wirestate client --reconnect``: follow topics across reconnects with the subscriber.

The plain ``wirestate client`` watches one connection and reports how it ended (close code
and cause): the tool for "why did my client disconnect". With ``--reconnect`` it uses
`wirestate.adapters.client.subscriber` instead: the connection is re-established with backoff and
resumed from the last seq (or, for a topic that delivered nothing yet, from the seq its
``subscribed`` named), so the output is what an application would see, every event once and
in order or a gap naming what was lost, and the summary counts reconnects and gaps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from wirestate.adapters.client.subscriber import (
    Backoff,
    ConnectionLost,
    Event,
    Gap,
    Subscription,
    SubscriptionError,
    connect,
)
from wirestate.adapters.client.urls import safe_url


async def follow(
    url: str,
    topics: Sequence[str],
    *,
    count: int | None = None,
    duration: float | None = None,
    json_lines: bool = False,
    out: TextIO,
    err: TextIO,
    backoff: Backoff | None = None,
) -> int:
    """Print events and gaps until ``count`` events or ``duration`` seconds; 0 on a normal
    end, 1 when the server could not be reached within the backoff's attempts."""
    started = time.monotonic()
    events = gaps = 0
    sub: Subscription | None = None
    interrupted = False
    try:
        async with asyncio.timeout(duration):
            retry = backoff or Backoff(base=0.1, cap=5.0, attempts=10)
            async with connect(url, topics, backoff=retry) as sub:
                async for item in sub:
                    if isinstance(item, Event):
                        events += 1
                        _print_event(item, json_lines, out)
                        if count is not None and events >= count:
                            break
                    else:
                        gaps += 1
                        _print_gap(item, json_lines, out)
    except TimeoutError:
        pass  # --duration ended it
    except asyncio.CancelledError:
        # Ctrl-C: leaving `connect` closed the connection with 1000; say so, then let the
        # caller pick the exit status.
        interrupted = True
    except SubscriptionError as exc:
        err.write(f"wirestate client: {_why(exc)}\n")
        return 1
    reconnects = max(sub.connections - 1, 0) if sub is not None else 0
    summary: dict[str, Any] = {
        "url": safe_url(url),
        "duration": round(time.monotonic() - started, 3),
        "events": events,
        "gaps": gaps,
        "reconnects": reconnects,
    }
    closed = sub.closed_with if sub is not None else None
    if interrupted:
        summary["end"] = "interrupted"
        summary["close"] = None if closed is None else {"code": closed, "by": "client"}
    if json_lines:
        out.write(orjson.dumps({"summary": summary}).decode() + "\n")
    else:
        end = ""
        if interrupted:
            how = "not connected" if closed is None else f"closed {closed} by this client"
            end = f" (interrupted; {how})"
        out.write(
            f"--- {summary['url']} followed for {summary['duration']} s: {events} events,"
            f" {gaps} gaps,"
            f" {reconnects} reconnects{end} ---\n"
        )
    if interrupted:
        raise asyncio.CancelledError
    return 0


def _print_event(e: Event, json_lines: bool, out: TextIO) -> None:
    if json_lines:
        out.write(
            orjson.dumps(
                {
                    "type": "event",
                    "topic": e.topic,
                    "seq": e.seq,
                    "ts": e.ts,
                    "data": e.data,
                    "stale": e.stale,
                }
            ).decode()
            + "\n"
        )
        return
    stale = f" (stale, age {e.age:.1f} s)" if e.stale and e.age is not None else ""
    out.write(f"{e.topic} #{e.seq} {e.ts} {orjson.dumps(e.data).decode()}{stale}\n")


def _print_gap(g: Gap, json_lines: bool, out: TextIO) -> None:
    if json_lines:
        out.write(
            orjson.dumps(
                {
                    "type": "gap",
                    "topic": g.topic,
                    "from_seq": g.from_seq,
                    "to_seq": g.to_seq,
                    "reason": str(g.reason),
                }
            ).decode()
            + "\n"
        )
        return
    if g.from_seq is None:
        out.write(f"!! GAP {g.topic}: the sequence restarted ({g.reason})\n")
    else:
        lost = f"events #{g.from_seq}..#{g.to_seq}"
        out.write(f"!! GAP {g.topic}: {lost} will not be delivered ({g.reason})\n")


def _why(exc: Exception) -> str:
    if isinstance(exc, ConnectionLost):
        return "could not reach the server after every retry; is `wirestate serve` running?"
    return "the server refused the subscription (forbidden or too many topics)"
