"""URLs as the client side shows them: never with the token a ``?token=`` carries."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["safe_url"]


def safe_url(url: str) -> str:
    """``url`` with a ``?token=`` value replaced by ``***``: for logs, errors and output."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [
        (key, "***" if key.lower() == "token" else value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))
