"""Who is calling: API keys, the one-token shortcut and mutual-TLS subjects, as identity names.

No grpc import: the edge hands in the call's metadata and the peer's certificate subject.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
from collections.abc import Iterable

from cosserve.server.settings import Settings
from cosserve.server.state.sessions import ANONYMOUS

__all__ = [
    "ANONYMOUS",
    "CALLER",
    "CERTIFICATE_PREFIX",
    "TOKEN_IDENTITY",
    "Identities",
    "authorization",
    "load_api_keys",
]

log = logging.getLogger("cosserve.server")

# The identity of the call being served, set by interceptors.AuthInterceptor in the call's task
# and read by the servicer; ANONYMOUS on a server without authentication.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("cosserve_caller", default=ANONYMOUS)

# The identity of a caller holding --auth-token; no line of an API keys file may take the name.
TOKEN_IDENTITY = "auth-token"
# Identities proven by a client certificate are its subject after this prefix. Key names cannot
# contain ':', so a certificate can never pass for a key's identity, nor a key for a certificate's.
CERTIFICATE_PREFIX = "x509:"

# A key's identity name: short and plain, as it shows in log lines and messages.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_BEARER = "bearer "


def _digest(key: str) -> bytes:
    # surrogateescape: a header grpc could only decode as Latin-1 still hashes (and matches nothing).
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def load_api_keys(path: str) -> tuple[tuple[bytes, str], ...]:
    """(sha256 digest, identity name) of every key in the file of `name:sha256-hex-of-key` lines.
    Blank lines and lines starting with '#' are skipped. A name may have several keys (rotation);
    a digest may not have several names.

    Raises:
        ValueError: naming the file (and the line) that cannot be read or is not of that form.
    """
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--api-keys-file {path}: cannot read it: {err}") from None
    keys: dict[bytes, tuple[str, int]] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"--api-keys-file {path}, line {number}"
        name, sep, hex_digest = text.partition(":")
        name, hex_digest = name.strip(), hex_digest.strip()
        if not sep or not _NAME.fullmatch(name):
            raise ValueError(
                f"{where}: expected 'name:sha256-hex-of-key' with a name of letters, digits and ._@+- "
                "(at most 128 characters)"
            )
        if name == TOKEN_IDENTITY:
            raise ValueError(f"{where}: the name {TOKEN_IDENTITY!r} is the identity of --auth-token")
        if not _SHA256_HEX.fullmatch(hex_digest):
            # Never echo the value: it might be a key written in by mistake.
            raise ValueError(
                f"{where}: after '{name}:' must come the 64 hex digits of the key's SHA-256 "
                "(sha256sum of the key), never the key itself"
            )
        digest = bytes.fromhex(hex_digest)
        earlier = keys.get(digest)
        if earlier is not None and earlier[0] != name:
            raise ValueError(f"{where}: the same key is already the identity {earlier[0]!r} on line {earlier[1]}")
        keys[digest] = (name, number)
    return tuple((digest, name) for digest, (name, _) in keys.items())


def authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> list[str]:
    """The values of the call's 'authorization' metadata (grpc has lower-cased the keys)."""
    return [value for key, value in metadata or () if key == "authorization" and isinstance(value, str)]


class Identities:
    """The identities a server accepts: the keys of --api-keys-file (reread by `reload`), the
    --auth-token shortcut (identity TOKEN_IDENTITY) and, with --tls-client-ca, the subject of the
    client certificate (identity CERTIFICATE_PREFIX + subject). Only digests of keys are kept."""

    def __init__(self, token: str = "", keys_file: str = "", certificates: bool = False) -> None:
        self.keys_file = keys_file
        # With mutual TLS every connection has passed the handshake with a certificate the CA
        # signed, so a call without a key is the certificate's identity.
        self.certificates = certificates
        self._token = _digest(token) if token else None
        # Replaced whole on reload, never changed in place: calls read it without a lock.
        self._keys = load_api_keys(keys_file) if keys_file else ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Identities | None:
        """None when the server authenticates nobody (every caller is ANONYMOUS).

        Raises:
            ValueError: the API keys file cannot be read or has a bad line.
        """
        if not (settings.auth_token or settings.api_keys_file or settings.tls_client_ca):
            return None
        return cls(settings.auth_token, settings.api_keys_file, bool(settings.tls_client_ca))

    def __len__(self) -> int:
        """Keys accepted (the --auth-token one included)."""
        return len(self._keys) + (self._token is not None)

    def reload(self) -> bool:
        """Reread the API keys file (on SIGHUP). A file that cannot be read or has a bad line
        changes nothing: the keys already loaded stay, and one error line is logged."""
        if not self.keys_file:
            log.info("no --api-keys-file to reread")
            return False
        try:
            keys = load_api_keys(self.keys_file)
        except ValueError as err:
            log.error("%s; keeping the %d API keys loaded before", err, len(self._keys))
            return False
        self._keys = keys
        log.info("loaded %d API keys from %s", len(keys), self.keys_file)
        return True

    def of_key(self, header: str) -> str | None:
        """The identity of an 'authorization: Bearer KEY' value, or None if it proves none."""
        if header[: len(_BEARER)].lower() != _BEARER:
            return None
        digest = _digest(header[len(_BEARER) :].strip())
        # Every digest is compared, in constant time, so the time taken tells nothing of which
        # key came close or matched.
        found = None
        if self._token is not None and hmac.compare_digest(digest, self._token):
            found = TOKEN_IDENTITY
        for known, name in self._keys:
            if hmac.compare_digest(digest, known):
                found = name
        return found

    def of_subject(self, subject: str | None) -> str | None:
        """The identity of a verified client certificate's subject, or None without mutual TLS."""
        if not self.certificates or not subject:
            return None
        return CERTIFICATE_PREFIX + subject

    def caller(self, metadata: Iterable[tuple[str, str | bytes]] | None, subject: str | None = None) -> str | None:
        """The identity the call's credentials prove, or None if they prove none. A key, when one
        is sent, decides (a wrong key is refused even on a mutual-TLS connection); without one,
        the certificate's subject."""
        headers = authorization(metadata)
        if len(headers) > 1:
            return None  # which one would count is ambiguous: refuse
        if headers:
            return self.of_key(headers[0])
        return self.of_subject(subject)
