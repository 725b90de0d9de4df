"""The server's TLS credentials: grpc asks at every handshake, and files that changed are reread."""

from __future__ import annotations

import logging
import os
import threading

import grpc

from cosserve.server.settings import SettingError, Settings, TlsFiles, read_tls_files

__all__ = ["TlsWatcher", "server_credentials"]

log = logging.getLogger("cosserve.server")


class TlsWatcher:
    """The server's TLS files, reread when they change: `changed()` is asked on every handshake."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._lock = threading.Lock()  # handshakes may ask from several grpc threads at once
        self._stamp = self._stat()
        self.current = read_tls_files(settings)

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        paths = [self._settings.tls_cert, self._settings.tls_key]
        if self._settings.tls_client_ca:
            paths.append(self._settings.tls_client_ca)
        stamps = []
        for path in paths:
            try:
                st = os.stat(path)
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stamps.append((0, 0, 0))
        return tuple(stamps)

    def changed(self) -> TlsFiles | None:
        """The new files when they changed and still belong together; None to keep the current ones.
        A half-written rotation (a new certificate, the old key) keeps the current ones and is
        tried again once the files change again."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            self._stamp = stamp
            try:
                files = read_tls_files(self._settings)
            except SettingError as err:
                log.warning("TLS files changed but cannot be used yet (%s); keeping the previous ones", err)
                return None
            if files == self.current:
                return None
            self.current = files
        log.info("TLS files changed; new connections use them")
        return files


def server_credentials(settings: Settings) -> grpc.ServerCredentials:
    """TLS only, with the client certificate required under --tls-client-ca. grpc asks `fetch` at
    every handshake; it rereads the files when they changed, so rotated certificates are used by
    new connections without a restart."""
    watcher = TlsWatcher(settings)  # SettingError for files that are bad now

    def configuration(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(files.private_key, files.cert_chain)], root_certificates=files.client_ca
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        files = watcher.changed()
        return None if files is None else configuration(files)

    return grpc.dynamic_ssl_server_credentials(
        configuration(watcher.current), fetch, require_client_authentication=bool(settings.tls_client_ca)
    )
