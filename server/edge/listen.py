"""Whether the server can listen where its settings say, probed before grpc binds."""

from __future__ import annotations

import errno
import socket

from cosserve.server.settings import SettingError, Settings

__all__ = ["check_listen"]


def _check_port_free(name: str, host: str, port: int) -> None:
    """SettingError unless host:port can be listened on now (port 0 always can)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as err:
        raise SettingError("host", host, f"is not an address or a name this machine resolves ({err})") from None
    if port == 0:
        return
    for family, kind, proto, _, address in addresses:
        # SO_REUSEADDR as grpc and http.server set it: a port left in TIME_WAIT is free, one with
        # a listener is not. grpc's SO_REUSEPORT is off (app._grpc_options), so nobody shares it.
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise SettingError(name, port, f"{host}:{port} is in use by another process") from None
                if err.errno == errno.EADDRNOTAVAIL:
                    raise SettingError("host", host, "is not an address of this machine") from None
                if err.errno == errno.EACCES:
                    raise SettingError(name, port, "needs privileges this process lacks (ports below 1024)") from None
                raise SettingError(name, port, f"cannot listen on {host}:{port}: {err.strerror}") from None


def check_listen(settings: Settings) -> None:
    """SettingError unless --host resolves and --port, --metrics-port and --http-port are free:
    checked before grpc binds, so a port in use is one line here, not grpc's log and a RuntimeError."""
    _check_port_free("port", settings.host, settings.port)
    if settings.metrics_port:
        _check_port_free("metrics_port", settings.host, settings.metrics_port)
    if settings.http_port > 0:
        _check_port_free("http_port", settings.host, settings.http_port)
