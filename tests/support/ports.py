"""Ports the tests choose now and bind later, safe from the two ways another process takes them.

The stack chooses its servers' ports when the session starts (the workers read them from their
environment) and a module binds its server minutes later. A port the OS handed out
(``bind(("127.0.0.1", 0))``) lies in the kernel's ephemeral range, which is also where every
outgoing connection's source port comes from: in between, a client connection of any process
can take it (a fresh-clone CI run failed so: the SFTP server's port was in use when its module
started). So these ports come from below the ephemeral range, which the kernel never hands out
on its own, and each pytest-xdist process counts through a block of its own, so two processes
never choose the same port either. A port something listens on (or in TIME_WAIT) is skipped.
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path

from sluice.stack import bindable

BLOCK = 2000  # ports per pytest process; a session chooses a few hundred
FIRST = 10_000  # below this are the well-known and registered ports other tools listen on


def _ephemeral_start() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
    except OSError:
        return 32_768  # Linux's default
    return int(text.split()[0])


def block(worker: str) -> range:
    """The ports of xdist's ``worker``: ``gw3`` counts from the fourth block, no xdist the first."""
    match = re.fullmatch(r"gw(\d+)", worker)
    blocks = max(1, (_ephemeral_start() - FIRST) // BLOCK)
    start = FIRST + (int(match.group(1)) if match else 0) % blocks * BLOCK
    return range(start, start + BLOCK)


class Ports:
    """Counts round ``block``, handing out the ports nothing listens on."""

    def __init__(self, block: range) -> None:
        self.block = block
        self._ports = itertools.cycle(block)

    def free_port(self) -> int:
        for port in itertools.islice(self._ports, len(self.block)):
            # Not every test server sets SO_REUSEADDR: a port in TIME_WAIT is skipped too.
            if bindable(port, reuse_address=False):
                return port
        raise RuntimeError(f"every port of {self.block} is in use")


_PORTS = Ports(block(os.environ.get("PYTEST_XDIST_WORKER", "")))


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on, which no other test process will choose."""
    return _PORTS.free_port()
