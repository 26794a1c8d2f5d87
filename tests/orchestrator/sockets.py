"""The socket table of a job's processes, for the network-exposure tests."""
from __future__ import annotations

from dataclasses import dataclass

import psutil

from orchestrator.loopback import is_loopback


@dataclass(frozen=True)
class Listening:
    ip: str
    port: int
    pid: int
    command: str

    @property
    def loopback(self) -> bool:
        return is_loopback(self.ip)


def process_tree(root_pid: int) -> list[psutil.Process]:
    root = psutil.Process(root_pid)
    return [root, *root.children(recursive=True)]


def listening_sockets(processes: list[psutil.Process]) -> list[Listening]:
    """Every TCP socket in LISTEN state that one of the processes holds (IPv4 and IPv6)."""
    found = []
    for proc in processes:
        try:
            command = " ".join(proc.cmdline())[:120]
            connections = proc.net_connections(kind="tcp")
        except psutil.Error:        # exited meanwhile
            continue
        found += [Listening(c.laddr.ip, c.laddr.port, proc.pid, command)
                  for c in connections if c.status == psutil.CONN_LISTEN]
    return found
