"""The inbound rate limit: a token bucket per connection, refilled from ``now``. Pure.

The bucket holds one second's worth (``rate`` tokens) and refills continuously, so a client
may send a burst of ``rate`` messages, then ``rate`` per second. It costs no timer: the
tokens are recomputed from the time of the last message whenever a message arrives. The
bucket's state lives in the connection's own slots (``tokens``, ``tokens_at``), which start
at -1 (full on the first message).
"""

from __future__ import annotations

from typing import Protocol


class Bucket(Protocol):
    tokens: float
    tokens_at: float


def take(bucket: Bucket, now: float, rate: float) -> bool:
    """Refill ``bucket`` to ``now`` and take one token; False when none is left."""
    if bucket.tokens < 0:
        bucket.tokens = rate
    else:
        bucket.tokens = min(rate, bucket.tokens + (now - bucket.tokens_at) * rate)
    bucket.tokens_at = now
    if bucket.tokens >= 1.0:
        bucket.tokens -= 1.0
        return True
    return False
