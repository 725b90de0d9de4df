"""TLS and mutual TLS on a real server: who gets in, who is refused, and certificates rotated live."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError
from cosserve.server.edge.app import RunningServer
from tests.certs import CertSet, issue, make_authority, make_certs
from tests.conftest import start_server

# A refused handshake fails the call at once (UNAVAILABLE); this only bounds a test that would hang.
_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_server(certs: CertSet) -> Iterator[RunningServer]:
    running = start_server(tls_cert=str(certs.server.cert), tls_key=str(certs.server.key))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def mtls_server(certs: CertSet) -> Iterator[RunningServer]:
    running = start_server(
        tls_cert=str(certs.server.cert), tls_key=str(certs.server.key), tls_client_ca=str(certs.ca.pem)
    )
    yield running
    running.stop(0)


def _refused(client: Client) -> grpc.StatusCode:
    with client, pytest.raises(CosserveRpcError) as caught:
        client.operators()
    return caught.value.code()


def _cosine_through_a_session(client: Client) -> None:
    rng = np.random.default_rng(9)
    x, y = rng.standard_normal((4, 16), dtype=np.float32), rng.standard_normal((4, 16), dtype=np.float32)
    with client, client.session("cpu") as session:
        session.feed_blob("X", x)
        session.feed_blob("Y", y)
        session.run_operator("CosineSimilarity", ["X", "Y"], ["out"])
        got = session.fetch_blob("out")
    expected = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("as_", ["path", "bytes", "pathlike"])
def test_tls_client_gets_correct_results(tls_server, certs, as_):
    roots = {"path": str(certs.ca.pem), "bytes": certs.ca.pem_bytes, "pathlike": certs.ca.pem}[as_]
    _cosine_through_a_session(Client(tls_server.address, root_certificates=roots, timeout=_TIMEOUT_S))


def test_plaintext_client_to_a_tls_server_is_refused(tls_server):
    assert _refused(Client(tls_server.address, timeout=_TIMEOUT_S)) == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_is_refused(tls_server, certs):
    client = Client(tls_server.address, root_certificates=certs.other_ca.pem_bytes, timeout=_TIMEOUT_S)
    assert _refused(client) == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_the_system_roots_refuses_a_private_ca(tls_server):
    # tls=True trusts the system's CAs, which never signed the tests' CA.
    assert _refused(Client(tls_server.address, tls=True, timeout=_TIMEOUT_S)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_client_with_a_good_certificate_gets_correct_results(mtls_server, certs):
    client = Client(
        mtls_server.address,
        root_certificates=certs.ca.pem,
        client_cert=certs.client.cert,
        client_key=certs.client.key_pem,
        timeout=_TIMEOUT_S,
    )
    _cosine_through_a_session(client)


@pytest.mark.parametrize("who", ["no-certificate", "another-ca", "expired"])
def test_mutual_tls_refuses_clients_without_a_valid_certificate(mtls_server, certs, who):
    pair = {"no-certificate": None, "another-ca": certs.foreign_client, "expired": certs.expired_client}[who]
    client = Client(
        mtls_server.address,
        root_certificates=certs.ca.pem,
        client_cert=None if pair is None else pair.cert,
        client_key=None if pair is None else pair.key,
        timeout=_TIMEOUT_S,
    )
    assert _refused(client) == grpc.StatusCode.UNAVAILABLE


def test_client_cert_without_its_key_is_a_usage_error(certs):
    with pytest.raises(ValueError, match="client_cert and client_key"):
        Client("127.0.0.1:1", client_cert=certs.client.cert)


def _replace(path: Path, data: bytes) -> None:
    """Write a file whole, as a deployment would (a new file renamed over the old)."""
    temporary = path.with_suffix(path.suffix + ".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def test_rotated_server_certificate_is_used_by_new_connections_without_a_restart(tmp_path):
    first = make_certs(tmp_path / "first")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(first.server.cert_pem)
    key.write_bytes(first.server.key_pem)
    running = start_server(tls_cert=str(cert), tls_key=str(key))
    try:
        _cosine_through_a_session(Client(running.address, root_certificates=first.ca.pem, timeout=_TIMEOUT_S))
        new_ca = make_authority(tmp_path, "new-ca")
        new_server = issue(new_ca, tmp_path, "new-server", server=True)
        # The certificate lands first, the key after: in between the files do not match, and
        # the server keeps its old pair rather than break handshakes.
        _replace(cert, new_server.cert_pem)
        old_client = Client(running.address, root_certificates=first.ca.pem, timeout=_TIMEOUT_S)
        _cosine_through_a_session(old_client)
        _replace(key, new_server.key_pem)
        _cosine_through_a_session(Client(running.address, root_certificates=new_ca.pem, timeout=_TIMEOUT_S))
        stale = Client(running.address, root_certificates=first.ca.pem, timeout=_TIMEOUT_S)
        assert _refused(stale) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.stop(0)


def test_health_command_speaks_mutual_tls(mtls_server, certs):
    import subprocess
    import sys

    def health(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cosserve.cli", "health", "--server", mtls_server.address,
                               "--timeout", "5", *flags], capture_output=True, text=True, timeout=60)

    ok = health("--root-certificates", str(certs.ca.pem), "--client-cert", str(certs.client.cert),
                "--client-key", str(certs.client.key))
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
    plaintext = health()
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr
