"""The bind-address rule the view and the HL7 gateway share: only loopback goes without TLS."""

from __future__ import annotations

import pytest

from streamer.netaddr import is_loopback


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("ward-3.example", False),
    ("localhost.evil.example", False), ("", False), ("[::ffff:10.0.0.1]", False)])
def test_only_loopback_addresses_are_loopback(host, loopback):
    assert is_loopback(host) is loopback
