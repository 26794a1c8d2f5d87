"""What counts as loopback in the socket table, and the collective interface choice."""
from __future__ import annotations

import socket

from orchestrator.loopback import collective_env, free_loopback_port, is_loopback, loopback_interface


def test_loopback_addresses_as_the_socket_table_shows_them():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "fd00::2", "::ffff:10.0.0.1",
                                     "", "localhost"]))


def test_collectives_use_the_loopback_interface_unless_the_user_chose_one():
    interface = loopback_interface()
    import psutil

    addresses = psutil.net_if_addrs()[interface]
    assert any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses)
    assert collective_env({}) == {"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface}
    chosen = collective_env({"GLOO_SOCKET_IFNAME": "eth7"})
    assert chosen == {"GLOO_SOCKET_IFNAME": "eth7", "NCCL_SOCKET_IFNAME": interface}


def test_free_loopback_port_is_bindable_on_loopback():
    port = free_loopback_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
