"""What a load test saw: throughput, latency percentiles, failures and disconnects, as text or
JSON, and the one-line reason a run failed."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from wirestate.adapters.tools.loadtest.client import Role, kind_text
from wirestate.adapters.tools.loadtest.options import GIVE_UP


@dataclass
class Report:
    """What a run measured. `to_dict` is the ``--json`` object; `failure` the one-line
    reason the run failed, or None."""

    url: str
    topic: str
    clients: int
    duration: float
    rate: float
    publishers: int
    connected: int
    connect_seconds: float
    failures: dict[str, int]
    published: int
    sequenced: int | None  # None: the observing publisher was lost
    publish_seconds: float
    expected: int
    received: int
    lost: int
    missing: int
    gapped: int
    gaps: int
    duplicates: int
    server_errors: dict[str, int]
    invalid: int
    latency: dict[str, float | None]  # seconds
    samples: int
    per_second: list[int]
    span: float  # first publish to last delivery, seconds
    disconnects: list[tuple[float | None, Role, int, str, str]]
    close_timeouts: int
    gave_up: bool
    histogram: list[int] = field(repr=False, default_factory=list)

    @property
    def window(self) -> float:
        """Seconds over which deliveries are averaged: the publishing phase, or longer when
        the last delivery came after it."""
        return max(self.span, self.publish_seconds)

    @property
    def throughput(self) -> float:
        return self.samples / self.window if self.window > 0 else 0.0

    def disconnects_by_cause(self) -> list[dict[str, Any]]:
        counts: Counter[tuple[int, str, Role]] = Counter(
            (code, cause, role) for _, role, code, cause, _ in self.disconnects
        )
        out = []
        for (code, cause, role), count in sorted(counts.items(), key=lambda kv: -kv[1]):
            times = [at for at, r, c, k, _ in self.disconnects if (c, k, r) == (code, cause, role)]
            known = [at for at in times if at is not None]
            out.append(
                {
                    "code": code,
                    "cause": cause,
                    "role": role,
                    "count": count,
                    "first_at": round(min(known), 3) if known else None,
                    "last_at": round(max(known), 3) if known else None,
                }
            )
        return out

    @property
    def failure(self) -> str | None:
        reasons: list[str] = []
        failed = sum(self.failures.values())
        if failed:
            kinds = ", ".join(f"{n:,} {kind_text(k)}{hint(k)}" for k, n in _by_count(self.failures))
            reasons.append(f"{_n(failed, 'connection failure')} ({kinds})")
            if self.gave_up:
                reasons.append(f"gave up after {GIVE_UP} failures and no connection")
        if self.disconnects:
            causes = ", ".join(
                f"{d['code']} {d['cause']}: {d['count']:,}"
                + ("" if d["role"] == "client" else f" ({d['role']})")
                for d in self.disconnects_by_cause()
            )
            reasons.append(f"{_n(len(self.disconnects), 'disconnect')} during the run ({causes})")
        if self.sequenced is not None and self.sequenced < self.published:
            refused = {
                k.split(":", 1)[1]: n
                for k, n in self.server_errors.items()
                if k.startswith("publish:")
            }
            why = ", ".join(f"{code}: {n:,}" for code, n in refused.items())
            if "rate_limited" in refused:
                why += " — more --publishers, or raise the server's messages_per_second"
            elif "forbidden" in refused:
                why += " — the token needs publish claims on the topic"
            unsequenced = _n(self.published - self.sequenced, "publish", "publishes")
            reasons.append(
                f"{unsequenced} not sequenced by the server" + (f" ({why})" if why else "")
            )
        if self.lost:
            reasons.append(f"{_n(self.lost, 'delivery', 'deliveries')} lost")
        if self.missing:
            reasons.append(f"{_n(self.missing, 'event')} skipped without a gap")
        if self.gapped:
            reasons.append(f"{_n(self.gapped, 'event')} announced lost by {_n(self.gaps, 'gap')}")
        if self.duplicates:
            reasons.append(f"{_n(self.duplicates, 'duplicate delivery', 'duplicate deliveries')}")
        client_errors = {k: n for k, n in self.server_errors.items() if k.startswith("client:")}
        if client_errors:
            text = ", ".join(f"{k.split(':', 1)[1]}: {n:,}" for k, n in client_errors.items())
            reasons.append(f"error messages to clients ({text})")
        if self.invalid:
            reasons.append(f"{_n(self.invalid, 'frame')} that are not protocol v1")
        return "; ".join(reasons) if reasons else None

    def to_dict(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1e3, 3)

        return {
            "url": self.url,
            "topic": self.topic,
            "clients": self.clients,
            "duration": self.duration,
            "rate": self.rate,
            "publishers": self.publishers,
            "connections": {
                "connected": self.connected,
                "failed": sum(self.failures.values()),
                "failures": dict(self.failures),
                "seconds": round(self.connect_seconds, 3),
                "per_second": round(self.connected / self.connect_seconds, 1)
                if self.connect_seconds > 0
                else None,
            },
            "published": self.published,
            "sequenced": self.sequenced,
            "publish_seconds": round(self.publish_seconds, 3),
            "deliveries": {
                "expected": self.expected,
                "received": self.received,
                "lost": self.lost,
                "missing": self.missing,
                "gapped": self.gapped,
                "gaps": self.gaps,
                "duplicates": self.duplicates,
            },
            "throughput": {
                "deliveries_per_second": round(self.throughput, 1),
                "seconds": round(self.window, 3),
                "per_second": self.per_second,
            },
            "latency_ms": {
                "min": ms(self.latency["min"]),
                "p50": ms(self.latency["p50"]),
                "p90": ms(self.latency["p90"]),
                "p99": ms(self.latency["p99"]),
                "max": ms(self.latency["max"]),
                "mean": ms(self.latency["mean"]),
                "samples": self.samples,
            },
            "disconnects": {
                "total": len(self.disconnects),
                "by_cause": self.disconnects_by_cause(),
            },
            "server_errors": dict(self.server_errors),
            "invalid_frames": self.invalid,
            "close_timeouts": self.close_timeouts,
            "ok": self.failure is None,
            "failure": self.failure,
        }

    def render(self) -> str:
        """The human summary, one aligned line per subject."""
        lat = self.latency
        lines = [f"wirestate loadtest {self.url} (topic {self.topic})"]
        failed = sum(self.failures.values())
        secs = self.connect_seconds
        rate = f" ({self.connected / secs:,.0f}/s)" if secs else ""
        conn = f"{self.connected:,} of {self.clients:,} connected in {secs:.2f} s{rate}"
        if failed:
            kinds = ", ".join(f"{n:,} {kind_text(k)}" for k, n in _by_count(self.failures))
            conn += f"; {failed:,} failed: {kinds}"
        lines.append(f"clients      {conn}")
        seq = "?" if self.sequenced is None else f"{self.sequenced:,}"
        lines.append(
            f"published    {self.published:,} events in {self.publish_seconds:.1f} s"
            f" ({self.rate:g}/s asked, {self.publishers} publisher"
            f"{'' if self.publishers == 1 else 's'}); {seq} sequenced by the server"
        )
        anomalies = [
            f"{self.lost:,} lost" if self.lost else "none lost",
            f"{self.missing:,} skipped" if self.missing else None,
            f"{self.gapped:,} in {self.gaps:,} gaps" if self.gaps else None,
            f"{self.duplicates:,} duplicates" if self.duplicates else "no duplicates",
        ]
        lines.append(
            f"deliveries   {self.received:,} of {self.expected:,} expected: "
            + ", ".join(a for a in anomalies if a)
        )
        if self.per_second:
            # Whole seconds of publishing only: the last bucket is a tail or a fraction.
            full = self.per_second[: int(self.publish_seconds)] or self.per_second
            lines.append(
                f"throughput   {self.throughput:,.0f} deliveries/s over {self.window:.1f} s"
                f" (per 1 s: min {min(full):,}, median {statistics.median(full):,.0f},"
                f" max {max(full):,})"
            )
        else:
            lines.append("throughput   no deliveries")
        if self.samples:
            lines.append(
                "latency      "
                + "  ".join(f"{k} {ms(lat[k])}" for k in ("p50", "p90", "p99", "max"))
                + f"  (mean {ms(lat['mean'])}, {self.samples:,} samples)"
            )
        if self.disconnects:
            by = ", ".join(
                f"{d['code']} {d['cause']}: {d['count']:,}"
                + ("" if d["role"] == "client" else f" ({d['role']})")
                for d in self.disconnects_by_cause()
            )
            lines.append(f"disconnects  {len(self.disconnects):,}: {by}")
        else:
            lines.append("disconnects  none during the run")
        if self.close_timeouts:
            lines.append(
                f"close        {self.close_timeouts:,} connections did not finish the closing"
                " handshake in time (dropped)"
            )
        failure = self.failure
        lines.append("result       OK" if failure is None else f"result       FAILED: {failure}")
        return "\n".join(lines) + "\n"


def _n(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def _by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    ms = seconds * 1e3
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:,.1f} ms" if ms < 10_000 else f"{ms / 1e3:,.1f} s"


def hint(kind: str) -> str:
    return {
        "refused": " — is `wirestate serve` running?",
        "timeout": " — is the host reachable and the port a wirestate server?",
        "http_401": " — the server wants a token: --token",
        "http_403": " — the server refused this origin or token",
        "http_404": " — check the path (the hub serves /ws)",
        "http_429": " — the server's [limits] max_connections_per_ip is reached",
        "http_503": " — the server is at max_connections or shutting down",
    }.get(kind, "")
