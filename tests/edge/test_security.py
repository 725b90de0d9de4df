"""Identities against a real server: API keys, sessions that belong to their creator, what is
open without credentials, undecodable bytes, cancels and bounded messages."""

from __future__ import annotations

import hashlib
import logging
import secrets
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cosserve import Client, CosserveRpcError, wire
from cosserve.server.edge.status import MAX_DETAILS, bounded, wire_bytes
from cosserve.server.state import identity
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import start_process, start_server, start_server_with_metrics

pytest.importorskip("torch")

SERVICE = pb.DESCRIPTOR.services_by_name["Cosserve"]
KEYS = {"alice": "alice-key-" + "a" * 20, "bob": "bob-key-" + "b" * 20, "carol": "carol-key-" + "c" * 20}


def key_line(name: str) -> str:
    return f"{name}:{hashlib.sha256(KEYS[name].encode()).hexdigest()}\n"


def keys_file(tmp_path: Path, *names: str, text: str = "") -> str:
    path = tmp_path / "keys"
    path.write_text("# name:sha256 of the key\n\n" + "".join(key_line(n) for n in names) + text)
    return str(path)


def bearer(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[name]}"),)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A server that knows alice and bob, with shared memory and snapshots on (so their RPCs reach the session)."""
    running = start_server(
        api_keys_file=keys_file(tmp_path_factory.mktemp("keys"), "alice", "bob"),
        allow_shm=True,
        state_dir=str(tmp_path_factory.mktemp("state")),  # so SaveWorkspace and LoadWorkspace reach the session
    )
    yield running
    running.stop(0)


# ---- keys -------------------------------------------------------------------------------


def test_keys_file_identities_and_refusals(keyed, tmp_path):
    with Client(keyed.address, token=KEYS["alice"]) as alice, alice.session("cpu") as s:
        s.feed_blob("x", np.arange(3.0))
        assert s.blobs() == ["x"]
    for token in (None, "wrong", KEYS["carol"], "Bearer " + KEYS["alice"]):
        with Client(keyed.address, token=token) as other:
            with pytest.raises(CosserveRpcError) as err:
                other.operators()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
    with grpc.insecure_channel(keyed.address) as channel:  # not "Bearer ...", or two headers
        call = channel.unary_unary("/cosserve.v1.Cosserve/ListOperators")
        for metadata in ((("authorization", KEYS["alice"]),), (*bearer("alice"), *bearer("bob"))):
            with pytest.raises(grpc.RpcError) as raw:
                call(b"", metadata=metadata, timeout=10)
            assert raw.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("alice\n", "expected 'name:sha256-hex-of-key'"),
        ("alice:the-key-itself\n", "never the key itself"),
        ("al ice:" + "0" * 64 + "\n", "expected 'name:sha256-hex-of-key'"),
        ("auth-token:" + "0" * 64 + "\n", "identity of --auth-token"),
        (key_line("alice").replace("alice", "eve"), "already the identity 'alice' on line 3"),
    ],
)
def test_a_bad_keys_file_fails_start_naming_file_and_line(tmp_path, text, complaint):
    path = keys_file(tmp_path, "alice", text=text)
    with pytest.raises(ValueError) as err:
        start_server(api_keys_file=path)
    assert f"--api-keys-file {path}, line 4: " in str(err.value) and complaint in str(err.value)
    assert "the-key-itself" not in str(err.value)
    with pytest.raises(ValueError, match="cannot read it"):
        identity.load_api_keys(str(tmp_path / "absent"))


def test_auth_token_is_the_auth_token_identity_beside_the_keys(tmp_path):
    running = start_server(auth_token="s3cret", api_keys_file=keys_file(tmp_path, "alice"))
    try:
        with Client(running.address, token="s3cret") as token, Client(running.address, token=KEYS["alice"]) as alice:
            session = token.session("cpu")
            with pytest.raises(CosserveRpcError) as err:  # a different identity from alice
                alice._call("ListBlobs", pb.ListBlobsRequest(session_id=session.id))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            session.close()
        assert running.identities is not None and running.identities.of_key("Bearer s3cret") == identity.TOKEN_IDENTITY
    finally:
        running.stop(0)


def test_sighup_rereads_the_keys_file(tmp_path):
    path = keys_file(tmp_path, "alice")
    log: list[str] = []
    proc, address = start_process("--api-keys-file", path, log=log)

    def code(name: str) -> grpc.StatusCode:
        with Client(address, token=KEYS[name]) as c:
            try:
                c.operators()
                return grpc.StatusCode.OK
            except CosserveRpcError as err:
                return err.code()

    def reload_until(name: str, wanted: grpc.StatusCode) -> None:
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while code(name) != wanted:
            assert time.monotonic() < deadline, f"{name} still not {wanted} after SIGHUP"
            time.sleep(0.05)

    try:
        assert code("alice") == grpc.StatusCode.OK and code("carol") == grpc.StatusCode.UNAUTHENTICATED
        Path(path).write_text(key_line("carol"))  # carol in, alice out
        reload_until("carol", grpc.StatusCode.OK)
        assert code("alice") == grpc.StatusCode.UNAUTHENTICATED
        Path(path).write_text(key_line("alice") + "bob\n")  # a bad file: the old keys stay
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("keeping the 1 API keys loaded before" in line for line in log):
            assert time.monotonic() < deadline, "no error line for the bad file"
            time.sleep(0.05)
        assert code("carol") == grpc.StatusCode.OK and code("alice") == grpc.StatusCode.UNAUTHENTICATED
        errors = [line for line in log if " ERROR " in line or "Traceback" in line]
        assert len(errors) == 1 and "line 2" in errors[0], errors
    finally:
        proc.terminate()
        proc.wait(30)


# ---- what is open ----------------------------------------------------------------------


def _reflect(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))
        return {s.name for s in reply.list_services_response.service}


def test_health_is_open_and_reflection_follows_auth(keyed, tmp_path):
    with grpc.insecure_channel(keyed.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        _reflect(keyed.address)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "cosserve.v1.Cosserve" in _reflect(keyed.address, bearer("bob"))
    running = start_server(api_keys_file=keys_file(tmp_path, "alice"), reflection_open=True)
    try:
        assert "cosserve.v1.Cosserve" in _reflect(running.address)
    finally:
        running.stop(0)


# ---- sessions belong to their creator ----------------------------------------------------

F32 = pb.FLOAT32


def _tensor(values: np.ndarray) -> pb.Tensor:
    return pb.Tensor(dtype=F32, shape=values.shape, data=np.ascontiguousarray(values, np.float32).tobytes())


def _op(kind: str, inputs: list[str], outputs: list[str]) -> pb.OperatorDef:
    return pb.OperatorDef(type=kind, input=inputs, output=outputs)


# Every RPC that takes a session id: (method, the request for session `sid`). Streams send a list.
SESSION_CALLS: dict[str, Callable[[str], Any]] = {
    "CloseSession": lambda sid: pb.CloseSessionRequest(session_id=sid),
    "FeedBlob": lambda sid: pb.FeedBlobRequest(session_id=sid, name="x", tensor=_tensor(np.zeros((2, 4)))),
    "FeedBlobStream": lambda sid: [
        pb.FeedBlobChunk(session_id=sid, name="x", dtype=F32, shape=[2, 4], data=bytes(16)),
        pb.FeedBlobChunk(data=bytes(16)),
    ],
    "FetchBlob": lambda sid: pb.FetchBlobRequest(session_id=sid, name="x"),
    "FetchBlobStream": lambda sid: pb.FetchBlobRequest(session_id=sid, name="x"),
    "FeedBlobShm": lambda sid: pb.FeedBlobShmRequest(
        session_id=sid, name="x", dtype=F32, shape=[2, 4], shm_name=f"cosserve_{sid}_theft"
    ),
    "FetchBlobShm": lambda sid: pb.FetchBlobShmRequest(session_id=sid, name="x", shm_name=""),
    "HasBlob": lambda sid: pb.HasBlobRequest(session_id=sid, name="x"),
    "ListBlobs": lambda sid: pb.ListBlobsRequest(session_id=sid),
    "RemoveBlob": lambda sid: pb.RemoveBlobRequest(session_id=sid, name="x"),
    "ResetWorkspace": lambda sid: pb.ResetWorkspaceRequest(session_id=sid),
    "RunOperator": lambda sid: pb.RunOperatorRequest(session_id=sid, op=_op("Cos", ["x"], ["x"])),
    "RunNet": lambda sid: pb.RunNetRequest(session_id=sid, ops=[_op("Cos", ["x"], ["y"]), _op("Cos", ["y"], ["x"])]),
    "CheckGradient": lambda sid: pb.CheckGradientRequest(
        session_id=sid, op=_op("CosineSimilarity", ["x", "x"], ["s"]), step_size=1e-3
    ),
    "ScoreTopK": lambda sid: [pb.TopKRequest(session_id=sid, corpus="x", k=1, queries=_tensor(np.ones((1, 4))))],
    "ScoreRange": lambda sid: [pb.RangeRequest(session_id=sid, corpus="x", min_score=-2.0, queries=_tensor(np.ones((1, 4))))],
    "SaveWorkspace": lambda sid: pb.SaveWorkspaceRequest(session_id=sid, name="theft"),
    "LoadWorkspace": lambda sid: pb.LoadWorkspaceRequest(session_id=sid, name="theft"),
    "PublishCorpus": lambda sid: pb.PublishCorpusRequest(session_id=sid, blob="x", name="theft"),
}


def _rpc(channel: grpc.Channel, method: str, request: Any, metadata: tuple[tuple[str, str], ...]) -> tuple[str, str]:
    """(status code name, details) of one call, made through protobuf stubs."""
    rpc = SERVICE.methods_by_name[method]
    response = getattr(pb, rpc.output_type.name)
    kind = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary", (True, True): "stream_stream"}
    callable_ = getattr(channel, kind[(rpc.client_streaming, rpc.server_streaming)])(
        f"/{SERVICE.full_name}/{method}", request_serializer=type(request if not isinstance(request, list) else request[0]).SerializeToString, response_deserializer=response.FromString
    )
    try:
        result = callable_(iter(request) if isinstance(request, list) else request, metadata=metadata, timeout=30)
        if rpc.server_streaming:
            list(result)
        return "OK", ""
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""


def test_every_rpc_with_a_session_id_is_covered():
    takes_session = {m.name for m in SERVICE.methods if "session_id" in m.input_type.fields_by_name}
    # CreateSession's session_id is the id proposed for a new session, not one to act on: the
    # proposal of an id in use has its own tests (tests/state/test_affinity.py).
    assert takes_session - {"CreateSession"} == set(SESSION_CALLS)


def test_another_identity_holding_a_session_id_gets_not_found_as_for_an_unknown_id(keyed):
    """Bob, who has seen alice's session id, calls every RPC on it: each answer is the one an id
    that never existed gets, and alice's blobs are bit-exact afterwards."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 4)).astype(np.float32)
    corpus = rng.standard_normal((5, 4)).astype(np.float32)
    with Client(keyed.address, token=KEYS["alice"]) as alice, alice.session("cpu") as mine:
        mine.feed_blob("x", x)
        mine.feed_blob("corpus", corpus)
        with grpc.insecure_channel(keyed.address) as channel:
            for method, request in SESSION_CALLS.items():
                unknown = secrets.token_hex(16)
                stolen = _rpc(channel, method, request(mine.id), bearer("bob"))
                never = _rpc(channel, method, request(unknown), bearer("bob"))
                assert stolen[0] == "NOT_FOUND", (method, stolen)
                assert stolen == (never[0], never[1].replace(unknown, mine.id)), method
        assert mine.blobs() == ["corpus", "x"]
        assert mine.fetch_blob("x").tobytes() == x.tobytes()
        assert mine.fetch_blob("corpus").tobytes() == corpus.tobytes()

        # Alice herself is served by every one of them (so the caller reaches every handler).
        scratch = alice.session("cpu")
        scratch.feed_blob("x", x)
        with grpc.insecure_channel(keyed.address) as channel:
            for method, request in SESSION_CALLS.items():
                if method in ("CloseSession", "FeedBlobShm"):
                    continue  # last / needs a region
                code, details = _rpc(channel, method, request(scratch.id), bearer("alice"))
                assert code == "OK", (method, details)
                if method in ("RemoveBlob", "ResetWorkspace"):
                    scratch.feed_blob("x", x)
            code, details = _rpc(channel, "FeedBlobShm", SESSION_CALLS["FeedBlobShm"](scratch.id), bearer("alice"))
            assert code == "NOT_FOUND" and "shared memory region" in details, details  # the session was found
            assert _rpc(channel, "CloseSession", SESSION_CALLS["CloseSession"](scratch.id), bearer("alice")) == ("OK", "")
        scratch.closed = True


# ---- undecodable bytes, before and after auth --------------------------------------------

# Field 1 claims 5 bytes and has 1: no method can parse it.
GARBAGE = b"\x0a\x05\xff"


def _raw(channel: grpc.Channel, path: str, streaming: tuple[bool, bool], metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    kind = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary", (True, True): "stream_stream"}
    call = getattr(channel, kind[streaming])(path)
    try:
        result = call(iter([GARBAGE]) if streaming[0] else GARBAGE, metadata=metadata, timeout=10)
        if streaming[1]:
            list(result)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def test_undecodable_bytes_on_every_path_are_refused_without_a_log_line(keyed, caplog):
    paths = [(f"/{SERVICE.full_name}/{m.name}", (m.client_streaming, m.server_streaming)) for m in SERVICE.methods]
    paths += [("/grpc.health.v1.Health/Check", (False, False)), ("/grpc.health.v1.Health/Watch", (False, True))]
    paths += [("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", (True, True))]
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(keyed.address) as channel:
        for path, streaming in paths:
            open_path = path.startswith("/grpc.health")
            # Without a key the bytes are never parsed: UNAUTHENTICATED, not INVALID_ARGUMENT.
            assert _raw(channel, path, streaming, ()) == (
                grpc.StatusCode.INVALID_ARGUMENT if open_path else grpc.StatusCode.UNAUTHENTICATED
            ), path
            assert _raw(channel, path, streaming, bearer("alice")) == grpc.StatusCode.INVALID_ARGUMENT, path
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage()[:200] for r in noisy]


def _h2_call(address: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """One gRPC call over raw HTTP/2, for header bytes grpc's own client refuses to send."""
    h2_connection = pytest.importorskip("h2.connection")
    import h2.config
    import h2.events

    host, port = address.rsplit(":", 1)
    config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
    conn = h2_connection.H2Connection(config)
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()), (b":authority", address.encode()),
        (b"content-type", b"application/grpc"), (b"te", b"trailers"), *headers,
    ])
    conn.send_data(stream, b"\x00" + struct.pack(">I", 0), end_stream=True)
    result: dict[bytes, bytes] = {}
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            events = conn.receive_data(data)
            for event in events:
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    result.update(dict(event.headers))
            sock.sendall(conn.data_to_send())
            if any(isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) for e in events):
                break
    return result


@pytest.mark.parametrize("token", ["s3cr\u00e9t".encode(), b"\xff\xfe\x80", "s3cr\u00e9t".encode("latin-1")], ids=["utf8", "bytes", "latin1"])
def test_a_non_ascii_token_is_unauthenticated_and_logs_nothing(token, caplog):
    pytest.importorskip("h2")
    running = start_server(auth_token="s3cret")
    caplog.set_level(logging.INFO)
    try:
        reply = _h2_call(running.address, "/cosserve.v1.Cosserve/ListOperators", [(b"authorization", b"Bearer " + token)])
        assert reply.get(b"grpc-status") == b"16", reply  # UNAUTHENTICATED
        good = _h2_call(running.address, "/cosserve.v1.Cosserve/ListOperators", [(b"authorization", b"Bearer s3cret")])
        assert good.get(b"grpc-status") == b"0", good
    finally:
        running.stop(0)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage()[:200] for r in noisy]


# ---- a client's cancel --------------------------------------------------------------------


def _metrics(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("cosserve_rpcs_total{")}


def test_a_client_cancel_is_cancelled_in_metrics_and_not_logged(caplog):
    running = start_server_with_metrics(max_workers=2)
    caplog.set_level(logging.INFO)
    try:
        with Client(running.address) as c, c.session("cpu") as s, grpc.insecure_channel(running.address) as channel:
            s.feed_blob("big", np.ones(32 * 1024 * 1024, np.uint8))
            s.feed_blob("a", np.ones((2000, 2000), np.float32))
            fetch = channel.unary_stream("/cosserve.v1.Cosserve/FetchBlobStream", request_serializer=pb.FetchBlobRequest.SerializeToString)
            replies = fetch(pb.FetchBlobRequest(session_id=s.id, name="big"), timeout=30)
            next(replies)
            replies.cancel()

            feed = channel.stream_unary("/cosserve.v1.Cosserve/FeedBlobStream")
            hold = threading.Event()

            def chunks() -> Iterator[bytes]:
                yield wire.feed_blob_chunk_header(s.id, "x", pb.UINT8, [1 << 20]) + b"".join(wire.feed_blob_chunk_data(bytes(1 << 16)))
                hold.wait(10)

            pending = feed.future(chunks(), timeout=30)
            time.sleep(0.3)
            pending.cancel()
            hold.set()

            run = channel.unary_unary("/cosserve.v1.Cosserve/RunOperator", request_serializer=pb.RunOperatorRequest.SerializeToString)
            op = _op("CosineSimilarityMatrix", ["a", "a"], ["y"])
            pending = run.future(pb.RunOperatorRequest(session_id=s.id, op=op), timeout=30)
            time.sleep(0.05)
            pending.cancel()

            wanted = [f'cosserve_rpcs_total{{code="CANCELLED",method="{m}"}}' for m in ("FetchBlobStream", "FeedBlobStream", "RunOperator")]
            deadline = time.monotonic() + 15
            while not all(_metrics(running.metrics_port).get(w) == 1.0 for w in wanted):
                assert time.monotonic() < deadline, _metrics(running.metrics_port)
                time.sleep(0.1)
        counted = _metrics(running.metrics_port)
        assert not [k for k in counted if "INTERNAL" in k or "INVALID_ARGUMENT" in k], counted
    finally:
        running.stop(0)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage()[:300] for r in noisy]


# ---- bounded messages ---------------------------------------------------------------------


@pytest.mark.parametrize("char", ["n", "\u20ac", "\x00", "\U0001f600"], ids=["ascii", "euro", "nul", "emoji"])
def test_a_huge_name_keeps_its_code_and_a_bounded_message(client, char):
    name = char * 20_000
    with client.session("cpu") as s:
        s.feed_blob("x", np.ones(2, np.float32))
        attempts: list[Callable[[], Any]] = [
            lambda: s.fetch_blob(name),
            lambda: s.remove_blob(name),
            lambda: s.run_operator("Cos", [name], ["y"]),
            lambda: client._call("ListBlobs", pb.ListBlobsRequest(session_id=name)),
        ]
        for attempt in attempts:
            with pytest.raises(CosserveRpcError) as err:
                attempt()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()[:200]
            details = err.value.details()
            assert wire_bytes(details) <= MAX_DETAILS and "(20000 chars)" in details, details


def test_bounded_cuts_names_inside_and_bytes_outside():
    message = "blob " + repr("\u20ac" * 5000) + " is not in session abc"
    cut = bounded(message)
    assert wire_bytes(cut) <= MAX_DETAILS and cut.endswith("(5000 chars) is not in session abc")
    assert wire_bytes(bounded("\U0001f600" * 5000)) <= MAX_DETAILS
    assert bounded("short") == "short"
    assert bounded("lone \udcff surrogate") == "lone \\udcff surrogate"


def test_cert_identity_names_cannot_be_key_names():
    ids = identity.Identities(certificates=True)
    assert ids.of_subject("CN=alice") == "x509:CN=alice"
    assert ids.caller((), subject="CN=alice") == "x509:CN=alice"
    assert ids.caller((("authorization", "Bearer nope"),), subject="CN=alice") is None  # a wrong key decides
    assert identity.Identities().of_subject("CN=alice") is None


def test_a_client_certificate_is_an_identity_of_its_own(tmp_path):
    """With --tls-client-ca a call without a key is its certificate's subject; a key on the same
    connection is the key's identity, and neither sees the other's sessions."""
    certs = pytest.importorskip("tests.certs").make_certs(tmp_path / "certs")
    running = start_server(
        tls_cert=str(certs.server.cert), tls_key=str(certs.server.key), tls_client_ca=str(certs.ca.pem),
        api_keys_file=keys_file(tmp_path, "alice"),
    )
    try:
        credentials = grpc.ssl_channel_credentials(certs.ca.pem_bytes, certs.client.key_pem, certs.client.cert_pem)
        with grpc.secure_channel(f"localhost:{running.port}", credentials) as channel:
            create = channel.unary_unary(
                "/cosserve.v1.Cosserve/CreateSession",
                request_serializer=pb.CreateSessionRequest.SerializeToString,
                response_deserializer=pb.CreateSessionResponse.FromString,
            )
            session_id = create(pb.CreateSessionRequest(device="cpu"), timeout=10).session_id
            assert _rpc(channel, "ListBlobs", pb.ListBlobsRequest(session_id=session_id), ()) == ("OK", "")
            code, _ = _rpc(channel, "ListBlobs", pb.ListBlobsRequest(session_id=session_id), bearer("alice"))
            assert code == "NOT_FOUND"
            assert _rpc(channel, "ListOperators", pb.ListOperatorsRequest(), (("authorization", "Bearer wrong"),))[0] == "UNAUTHENTICATED"
        owners = set(running.store._owners.values())
        assert len(owners) == 1 and next(iter(owners)).startswith("x509:") and "CN=client" in next(iter(owners))
    finally:
        running.stop(0)
