"""The one rule every listening command applies to its bind address (the ward view, the HL7 gateway):
loopback needs no TLS, anything else does. Standard library only."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether `host` (a name, an IPv4 or an IPv6 address, bracketed or not) is loopback. A name other than
    localhost may resolve anywhere, so it is not."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
