"""Session affinity on the wire (issue 13), against a real server: the client proposes a new
session's id in CreateSession and in the `cosserve-session-id` metadata that a load balancer hashes
on; the server takes a well-formed id that is not in use, refuses anything else without telling
whose it is, and refuses a call whose metadata names another session than its request."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError, limits
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import start_process, start_server, stop_process

pytest.importorskip("torch")

KEYS = {"alice": "alice-key-" + "a" * 20, "bob": "bob-key-" + "b" * 20}
HEADER = limits.SESSION_ID_METADATA


def keys_file(directory: Path) -> str:
    path = directory / "keys"
    path.write_text("".join(f"{name}:{hashlib.sha256(key.encode()).hexdigest()}\n" for name, key in KEYS.items()))
    return str(path)


def metadata(name: str, session: str | None = None, *more: str) -> tuple[tuple[str, str], ...]:
    """alice's or bob's token, and `cosserve-session-id` once per id given."""
    ids = ([session] if session is not None else []) + list(more)
    return (("authorization", f"Bearer {KEYS[name]}"), *((HEADER, i) for i in ids))


def refusal(call: Any, request: Any, md: tuple[tuple[str, str], ...]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(request, metadata=md, timeout=10)
    return err.value


def create(stub: Any, proposed: str, who: str = "alice", header: str | None = "same") -> pb.CreateSessionResponse:
    md = metadata(who, proposed if header == "same" else header)
    return stub.CreateSession(pb.CreateSessionRequest(device="cpu", session_id=proposed), metadata=md, timeout=10)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    running = start_server(api_keys_file=keys_file(tmp_path_factory.mktemp("keys")), session_idle_timeout_s=0.5)
    yield running
    running.stop(0)


@pytest.fixture
def stub(keyed: Any) -> Iterator[Any]:
    with Client(keyed.address) as client:  # a bare channel: every call's metadata is the test's
        yield client.stub


def test_the_proposed_id_names_the_session_and_an_empty_proposal_lets_the_server_pick(keyed, stub):
    proposed = secrets.token_hex(16)
    reply = create(stub, proposed)
    assert reply.session_id == proposed and reply.device == "cpu"
    picked = create(stub, "", header=None).session_id
    assert len(picked) == 32 and int(picked, 16) >= 0 and picked != proposed
    # The friendly client proposes its own ids, and every call of its session carries the header.
    with Client(keyed.address, token=KEYS["alice"]) as alice, alice.session("cpu") as s:
        assert len(s.id) == 32 and s.id == s.id.lower() and int(s.id, 16) >= 0
        s.feed_blob("x", np.arange(4.0))
        assert s.fetch_blob("x").tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "proposed",
    [
        "A" * 32,  # upper case
        "0" * 31,
        "0" * 33,
        "g" * 32,
        "../" * 10 + "xx",  # it would name a file of the state directory
        "0" * 31 + "\n",
        "é" * 32,
        "0" * 100_000,
    ],
    ids=["upper", "short", "long", "not-hex", "path", "newline", "unicode", "huge"],
)
def test_a_malformed_proposal_is_invalid_argument(stub, proposed):
    err = refusal(stub.CreateSession, pb.CreateSessionRequest(device="cpu", session_id=proposed), metadata("alice"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "32 lowercase hex digits" in err.details() and len(err.details()) < 400


def test_an_id_in_use_is_already_exists_whoever_holds_it_and_nothing_is_handed_over(keyed, stub):
    held = secrets.token_hex(16)
    create(stub, held, "alice")
    with Client(keyed.address, token=KEYS["alice"]) as alice:
        alice.attach(held).feed_blob("x", np.arange(3.0))
    answers = []
    for who in ("alice", "bob", "alice"):
        err = refusal(stub.CreateSession, pb.CreateSessionRequest(device="cpu", session_id=held), metadata(who, held))
        assert err.code() == grpc.StatusCode.ALREADY_EXISTS, who
        answers.append(err.details())
    assert len(set(answers)) == 1 and "is taken" in answers[0], answers  # the same for the owner and anyone else
    # bob got nothing: the session is still alice's alone, with its blob.
    err = refusal(stub.ListBlobs, pb.ListBlobsRequest(session_id=held), metadata("bob", held))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert stub.ListBlobs(pb.ListBlobsRequest(session_id=held), metadata=metadata("alice", held), timeout=10).names == ["x"]


def test_closed_and_expired_ids_are_never_taken_again(keyed, stub):
    closed, expired = secrets.token_hex(16), secrets.token_hex(16)
    create(stub, closed)
    create(stub, expired)
    stub.CloseSession(pb.CloseSessionRequest(session_id=closed), metadata=metadata("alice", closed), timeout=10)
    time.sleep(1.2)  # past the 0.5 s idle timeout, and a sweep
    for session_id in (closed, expired):
        for who in ("alice", "bob"):
            err = refusal(stub.CreateSession, pb.CreateSessionRequest(device="cpu", session_id=session_id), metadata(who, session_id))
            assert err.code() == grpc.StatusCode.ALREADY_EXISTS, (session_id, who)
    # A stale handle still hears the truth, not an empty workspace: its owner is told it expired.
    err = refusal(stub.HasBlob, pb.HasBlobRequest(session_id=expired, name="x"), metadata("alice", expired))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "expired" in err.details()


def test_a_session_call_whose_metadata_names_another_session_is_invalid_argument(stub):
    mine, other = secrets.token_hex(16), secrets.token_hex(16)
    create(stub, mine)
    create(stub, other)
    ask = pb.HasBlobRequest(session_id=mine, name="x")
    for md in (metadata("alice", other), metadata("alice", mine, other), metadata("alice", "")):
        err = refusal(stub.HasBlob, ask, md)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, md
        assert HEADER in err.details() and len(err.details()) < 400
    # The same for a creation whose metadata and request disagree: nothing is created.
    third = secrets.token_hex(16)
    for header in (other, third + "0", ""):
        err = refusal(stub.CreateSession, pb.CreateSessionRequest(device="cpu", session_id=third), metadata("alice", header))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, header
    assert create(stub, third).session_id == third  # the id was not taken by the refused calls
    # A stub user that sends no metadata is served as before.
    assert not stub.HasBlob(ask, metadata=metadata("alice"), timeout=10).exists
    assert not stub.HasBlob(ask, metadata=metadata("alice", mine), timeout=10).exists


def test_a_session_this_replica_does_not_hold_is_not_found_saying_so_the_same_for_anyone(stub):
    theirs, unknown = secrets.token_hex(16), secrets.token_hex(16)
    create(stub, theirs, "bob")
    answers = []
    for session_id in (theirs, unknown):
        err = refusal(stub.ListBlobs, pb.ListBlobsRequest(session_id=session_id), metadata("alice", session_id))
        assert err.code() == grpc.StatusCode.NOT_FOUND
        answers.append(err.details().replace(session_id, "ID"))
    assert answers[0] == answers[1] and "does not exist on this server" in answers[0], answers


def test_ids_restored_or_unrestorable_after_a_restart_are_taken(tmp_path: Path):
    state = tmp_path / "state"
    flags = ("--state-dir", str(state), "--durability", "snapshot", "--api-keys-file", keys_file(tmp_path))
    proc, address = start_process(*flags)
    try:
        with Client(address, token=KEYS["alice"]) as alice:
            restored, broken = alice.session("cpu"), alice.session("cpu")
            for session in (restored, broken):
                session.feed_blob("x", np.arange(1000, dtype=np.float32))
    finally:
        stop_process(proc)
    (state / "sessions" / f"{broken.id}.json").unlink()  # its manifest gone: it cannot come back
    proc, address = start_process(*flags)
    try:
        with Client(address) as client:
            for session_id in (restored.id, broken.id):
                for who in ("alice", "bob"):
                    err = refusal(
                        client.stub.CreateSession,
                        pb.CreateSessionRequest(device="cpu", session_id=session_id),
                        metadata(who, session_id),
                    )
                    assert err.code() == grpc.StatusCode.ALREADY_EXISTS, (session_id, who)
        with Client(address, token=KEYS["alice"]) as alice:
            assert alice.attach(restored.id).fetch_blob("x").shape == (1000,)  # untouched by the refusals
            with pytest.raises(CosserveRpcError) as err:
                alice.attach(broken.id)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stop_process(proc)
