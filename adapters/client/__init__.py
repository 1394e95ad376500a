"""The client side: the reconnecting subscriber (exported here), the one-connection probe
behind ``wirestate client``, and ``--reconnect``'s follower."""

from wirestate.adapters.client.subscriber import (
    Backoff,
    ConnectionLost,
    Event,
    Gap,
    Subscription,
    SubscriptionError,
    SubscriptionRefused,
    connect,
)

__all__ = [
    "Backoff",
    "ConnectionLost",
    "Event",
    "Gap",
    "Subscription",
    "SubscriptionError",
    "SubscriptionRefused",
    "connect",
]
