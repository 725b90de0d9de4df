"""Sessions against a real server: exact idle expiry, memory freed without traffic, and limits
per identity (sessions, bytes across its sessions)."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import secrets
import time
import weakref
from pathlib import Path

import grpc
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError
from cosserve.server import errors
from cosserve.server.settings import Settings
from cosserve.server.state import sessions
from cosserve.server.state.sessions import SessionStore
from cosserve.v1 import cosserve_pb2 as pb
from tests.conftest import start_server

pytest.importorskip("torch")

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789"}


def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "keys"
    path.write_text("".join(f"{n}:{hashlib.sha256(k.encode()).hexdigest()}\n" for n, k in KEYS.items()))
    return str(path)


def _code_and_details(client: Client, session_id: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(CosserveRpcError) as err:
        client._call("ListBlobs", pb.ListBlobsRequest(session_id=session_id))
    return err.value.code(), err.value.details()


def test_a_session_idle_past_its_timeout_is_not_found_saying_it_expired(tmp_path):
    running = start_server(session_idle_timeout_s=1.0, api_keys_file=keys_file(tmp_path))
    try:
        with Client(running.address, token=KEYS["alice"]) as alice, Client(running.address, token=KEYS["bob"]) as bob:
            kept, idle = alice.session("cpu"), alice.session("cpu")
            for _ in range(3):  # used every 0.5 s: stays
                time.sleep(0.5)
                assert kept.blobs() == []
            code, details = _code_and_details(alice, idle.id)
            assert code == grpc.StatusCode.NOT_FOUND and "expired: it was idle for more than 1 s" in details, details
            # To another identity an expired session is no different from one never created.
            unknown = secrets.token_hex(16)
            assert _code_and_details(bob, idle.id) == (
                grpc.StatusCode.NOT_FOUND,
                _code_and_details(bob, unknown)[1].replace(unknown, idle.id),
            )
            idle.closed = True
            kept.close()
    finally:
        running.stop(0)


def test_the_call_that_comes_after_the_timeout_expires_the_session_itself():
    # A bare store has no sweep: the lookup alone must see that the timeout has passed.
    store = SessionStore(dataclasses.replace(Settings(), session_idle_timeout_s=0.2, device="cpu"))
    idle, used = store.create("cpu", "alice"), store.create("cpu", "alice")
    time.sleep(0.12)
    store.get(used.id, "alice")  # touching a session keeps it alive
    time.sleep(0.12)
    with pytest.raises(errors.NotFound, match="expired: it was idle"):
        store.get(idle.id, "alice")
    assert idle.closed and len(store) == 1
    with pytest.raises(errors.NotFound, match="does not exist"):
        store.get(idle.id, "bob")
    assert store.get(used.id, "alice") is used


def test_expired_ids_are_remembered_in_a_bounded_table(monkeypatch):
    monkeypatch.setattr(sessions, "EXPIRED_REMEMBERED", 3)
    store = SessionStore(dataclasses.replace(Settings(), session_idle_timeout_s=0.05, device="cpu"))
    made = [store.create("cpu").id for _ in range(5)]
    time.sleep(0.1)
    assert store.expire_idle() == 5
    said = []
    for session_id in made:
        with pytest.raises(errors.NotFound) as err:
            store.get(session_id)
        said.append("was idle for more than" in str(err.value))
    assert said == [False, False, True, True, True]  # the two oldest are forgotten


def test_an_expired_session_is_freed_within_a_second_without_any_call():
    running = start_server(session_idle_timeout_s=1.0)
    try:
        with Client(running.address) as c:
            s = c.session("cpu")
            s.feed_blob("big", np.ones(8 * 1024 * 1024, np.uint8))
            (workspace,) = list(running.store)
            blob = weakref.ref(workspace.get("big"))
            expires = workspace.last_used + 1.0
            del workspace
            while blob() is not None:
                assert time.monotonic() < expires + 1.0, "the blob was still held a second after expiry"
                time.sleep(0.02)
                gc.collect(0)
            assert time.monotonic() >= expires and len(running.store) == 0
            s.closed = True
    finally:
        running.stop(0)


def test_an_identity_has_its_own_session_limit(tmp_path):
    running = start_server(max_identity_sessions=2, api_keys_file=keys_file(tmp_path))
    try:
        with Client(running.address, token=KEYS["alice"]) as alice, Client(running.address, token=KEYS["bob"]) as bob:
            first, second = alice.session("cpu"), alice.session("cpu")
            with pytest.raises(CosserveRpcError) as err:
                alice.session("cpu")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-identity-sessions" in err.value.details()
            bob.session("cpu").close()  # another identity is not held back
            first.close()
            alice.session("cpu").close()  # room again
            second.close()
    finally:
        running.stop(0)


def test_an_identity_has_its_own_byte_limit_across_its_sessions(tmp_path):
    running = start_server(max_identity_bytes=1 << 20, api_keys_file=keys_file(tmp_path))
    try:
        with Client(running.address, token=KEYS["alice"]) as alice, Client(running.address, token=KEYS["bob"]) as bob:
            one, two = alice.session("cpu"), alice.session("cpu")
            one.feed_blob("x", np.ones(600_000, np.uint8))
            with pytest.raises(CosserveRpcError) as err:
                two.feed_blob("x", np.ones(600_000, np.uint8))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-identity-bytes" in err.value.details()
            with bob.session("cpu") as other:  # bob's bytes are his own
                other.feed_blob("x", np.ones(600_000, np.uint8))
            assert running.store.held_by("alice") >= 600_000
            one.close()
            two.feed_blob("x", np.ones(600_000, np.uint8))  # alice's first session gave its bytes back
            two.close()
            assert running.store.held_by("alice") == 0
    finally:
        running.stop(0)
