"""Local mode keeps every Ray socket on loopback.

`LOOPBACK_RAY` is Ray's own switch for local-only Ray (meant for laptops, honoured on any
OS): the node IP becomes 127.0.0.1 and Ray binds its GCS, raylet, object manager, workers,
agents and metrics port there. It is read once, when Ray is first imported, so
`orthovision serve` sets it before importing Ray. One socket escapes it: Ray Serve 2.60
starts an inter-deployment gRPC server in every replica on "[::]:0", hard-coded
(ray/serve/_private/replica.py); `confine_replica_grpc` rebinds it to 127.0.0.1 in a replica
of a local-only cluster. An unauthenticated Ray port on a hospital network is remote code
execution (ShadowRay); tests/serve/test_serve_command.py lists every listening socket.
"""

from __future__ import annotations

import os

LOOPBACK_RAY = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def local_only() -> bool:
    """True in a process of a Ray started with LOOPBACK_RAY (replicas inherit it)."""
    return os.environ.get(LOOPBACK_RAY[0]) == LOOPBACK_RAY[1]


def confine_replica_grpc() -> None:
    """In a local-only replica: the inter-deployment gRPC server binds 127.0.0.1, not [::].

    Called from each deployment's constructor, which runs before Serve starts that server.
    A Ray without the hook is left alone (the socket test then says so)."""
    if not local_only():
        return
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "confined", False):
        return

    def loopback_bind(server, address: str) -> int:
        return bind(server, address.replace("[::]", "127.0.0.1"))

    loopback_bind.confined = True
    replica.add_port_to_grpc_server = loopback_bind
