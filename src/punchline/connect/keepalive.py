"""How often to send on a NAT mapping we depend on, from the NAT's measured idle lifetime.

A mapping that sees no outbound packet for its idle lifetime is dropped by the NAT, and with it
every path through it: the daemon's media socket (its reflexive candidate), its session to the
supernode. Half the lifetime leaves room for one lost keepalive. The bounds come from the other
jobs the same packets do: the supernode session's pings also prove the supernode alive, so they
never get rarer than that proof needs, and a lifetime measured absurdly short must not turn
keepalives into a flood.
"""

from __future__ import annotations


def keepalive_interval(lifetime: float | None, ceiling: float, floor: float) -> float:
    """Seconds between keepalives for a mapping that lives `lifetime` s idle (None: unknown)."""
    if lifetime is None or lifetime <= 0:
        return ceiling
    return max(floor, min(ceiling, lifetime * 0.5))
