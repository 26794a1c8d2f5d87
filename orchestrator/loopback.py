"""What a one-machine job binds to: loopback only.

A job that runs on this machine alone (the embedded local Ray, `--launcher torchrun`) has
no peer on another host, so every server it starts listens on 127.0.0.1 (or ::1): the
rendezvous store, gloo's and NCCL's bootstrap sockets, and Ray's GCS, raylet, workers,
agents and Prometheus endpoint. docs/orchestration.md ("Network exposure") lists them.
"""
from __future__ import annotations

import ipaddress
import os
import socket

LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1, how a dual-stack
    socket bound to 127.0.0.1 shows in the socket table)."""
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def loopback_interface() -> str:
    """The name of the interface that carries 127.0.0.1 ("lo" on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and is_loopback(a.address) for a in addresses):
            return name
    return "lo"


def collective_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Socket interface for gloo and NCCL: loopback, unless the user chose one.

    Without it gloo binds the address the hostname resolves to, which on many hosts is
    the machine's public interface."""
    environ = os.environ if environ is None else environ
    interface = loopback_interface()
    return {key: environ.get(key, interface) for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 now (for a server that cannot be handed a bound socket)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]
