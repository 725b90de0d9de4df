"""One family of client errors: everything the client raises is a cosserve.CosserveError, client-side
mistakes also the matching TypeError/ValueError, server refusals CosserveRpcError with their code."""

from __future__ import annotations

import ast
import asyncio
import importlib
import pathlib
import re
import socket
from collections.abc import Callable

import grpc
import numpy as np
import pytest

import cosserve
from cosserve import (
    Client,
    CosserveError,
    CosserveRpcError,
    InvalidArgumentError,
    InvalidTypeError,
    OpSpecError,
    ProtocolError,
    ShapeError,
    UnsupportedDtypeError,
    aio,
    wire,
)
from cosserve.calls import FetchAssembler
from cosserve.v1 import cosserve_pb2 as pb

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_every_raise_in_the_client_is_of_the_family():
    """Every `raise SomeError(...)` in client/ names a CosserveError class (or AssertionError, for
    the unreachable). wire.py is the codec shared with the server; the client turns its WireError
    into ProtocolError (calls.FetchAssembler)."""
    offenders = []
    # The modules of client/ and of its command (cosserve.cli, whose jobs raise UsageError); a name
    # is looked up in the module that raises it, so a module's own error class counts when it is
    # of the family (datasets.DatasetError).
    for path in sorted([*(ROOT / "client").glob("*.py"), *(ROOT / "client" / "cli").glob("*.py")]):
        if path.name in ("wire.py", "__main__.py"):  # __main__ runs the command when imported; it raises nothing
            continue
        parts = path.relative_to(ROOT / "client").with_suffix("").parts
        module = importlib.import_module(".".join(("cosserve", *parts)).removesuffix(".__init__"))
        known = vars(module)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                name = node.exc.func.id
                cls = known.get(name)
                # rpc_error(err, method) is the one maker of CosserveRpcError from grpc's error.
                ok = name in ("AssertionError", "rpc_error") or (isinstance(cls, type) and issubclass(cls, CosserveError))
                if not ok:
                    offenders.append(f"{path.name}:{node.lineno} raise {name}")
    assert offenders == []


def test_the_family_is_exported_and_shaped_as_documented():
    for name in cosserve.errors.__all__:
        cls = getattr(cosserve, name)
        assert issubclass(cls, CosserveError), name
        assert cls.__doc__, name
    assert issubclass(UnsupportedDtypeError, TypeError) and issubclass(OpSpecError, TypeError)
    assert issubclass(InvalidTypeError, TypeError)
    assert issubclass(ShapeError, ValueError) and issubclass(InvalidArgumentError, ValueError)
    assert issubclass(ProtocolError, ValueError)
    assert issubclass(cosserve.SharedMemoryError, OSError)
    assert not issubclass(CosserveRpcError, (TypeError, ValueError))


def test_server_refusals_are_rpc_errors_of_the_family(cpu_ws):
    with pytest.raises(CosserveError) as err:
        cpu_ws.fetch_blob("absent")
    assert isinstance(err.value, CosserveRpcError)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "'absent'" in err.value.details()
    assert isinstance(err.value.__cause__, grpc.RpcError)  # chained, as STYLE.md asks


@pytest.mark.parametrize(
    "value, kind, words",
    [
        (np.ones(3, np.complex64), UnsupportedDtypeError, ("complex64", "float32")),
        (np.array(["a", "b"]), UnsupportedDtypeError, ("<U1",)),
        (np.array([object()]), UnsupportedDtypeError, ("object",)),
        ([[1.0, 2.0], [3.0]], ShapeError, ("one shape",)),
    ],
    ids=["complex64", "strings", "object", "ragged"],
)
def test_values_the_wire_cannot_carry_are_refused_before_sending(cpu_ws, value, kind, words):
    with pytest.raises(kind) as err:
        cpu_ws.feed_blob("X", value)
    assert isinstance(err.value, CosserveError)
    for word in words:
        assert word in str(err.value)
    assert cpu_ws.blobs() == []


def test_one_d_queries_and_bad_batch_sizes(cpu_ws):
    cpu_ws.feed_blob("C", np.ones((4, 3), np.float32))
    with pytest.raises(ShapeError, match=r"2-D \(N, D\), got shape \(3,\)"):
        cpu_ws.top_k(np.ones(3, np.float32), "C", k=2)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        cpu_ws.top_k(np.ones((2, 3), np.float32), "C", k=2, batch_size=0)
    with pytest.raises(InvalidArgumentError):
        cpu_ws.top_k(np.ones((2, 3), np.float32), "C", k=2, batch_size=0)


@pytest.mark.parametrize(
    "spec, words",
    [
        (("Cos", ["X"]), "(type, inputs, outputs[, args])"),
        ("Cos", "(type, inputs, outputs[, args])"),
        (42, "(type, inputs, outputs[, args])"),
        ({"type": "Cos", "inputs": ["X"]}, "missing ['outputs']"),
        ({"type": "Cos", "inputs": ["X"], "outputs": ["Y"], "arg": {}}, "unknown keys ['arg']"),
        (("Cos", "X", ["Y"]), "not a single string"),
        (("Cos", ["X"], [7]), "a blob name is a str, got 7"),
        ((None, ["X"], ["Y"]), "an operator type is a str"),
        (("Cos", ["X"], ["Y"], {"scale": [1, 2]}), "expected bool, int, float or str"),
        (("Cos", ["X"], ["Y"], ["scale"]), "arguments are a mapping"),
    ],
    ids=["short", "a-string", "an-int", "missing-key", "unknown-key", "string-inputs", "int-name", "no-type", "list-arg", "list-args"],
)
def test_malformed_run_net_specs(cpu_ws, spec, words):
    cpu_ws.feed_blob("X", np.ones((2, 3), np.float32))
    with pytest.raises(OpSpecError) as err:
        cpu_ws.run_net([spec])
    assert isinstance(err.value, TypeError) and isinstance(err.value, CosserveError)
    assert words in str(err.value)
    assert cpu_ws.blobs() == ["X"]  # nothing was sent, nothing changed


def test_bad_arguments_of_single_calls(cpu_ws, client):
    with pytest.raises(InvalidTypeError, match="expected bool, int, float or str"):
        cpu_ws.run_operator("Cos", ["X"], ["Y"], scale=None)
    with pytest.raises(InvalidTypeError, match="a blob name is a str"):
        cpu_ws.feed_blob(3, np.ones(2, np.float32))  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match="a blob name is a str"):
        cpu_ws.fetch_blob(b"X")  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match="mapping"):
        client.compute("Cos", [np.ones(2, np.float32)], ["Y"])  # type: ignore[arg-type]
    with pytest.raises(UnsupportedDtypeError):
        client.compute("Cos", {"X": np.ones(2, np.complex128)}, ["Y"])


def test_request_fields_of_the_wrong_type_or_range(cpu_ws, client):
    with pytest.raises(InvalidTypeError, match="CreateSessionRequest"):
        client.session(device=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match="SaveWorkspaceRequest"):
        cpu_ws.save(3)  # type: ignore[arg-type]
    cpu_ws.feed_blob("C", np.ones((4, 3), np.float32))
    with pytest.raises(InvalidArgumentError, match="must fit in int64"):
        cpu_ws.top_k(np.ones((2, 3), np.float32), "C", k=2**70)
    with pytest.raises(InvalidTypeError, match="k is an int"):
        cpu_ws.top_k(np.ones((2, 3), np.float32), "C", k=2.5)
    with pytest.raises(InvalidTypeError, match="CheckGradientRequest"):
        cpu_ws.check_gradient("Cos", ["C"], step_size="small")  # type: ignore[arg-type]


def test_tls_options_and_unreadable_files(tmp_path):
    with pytest.raises(InvalidArgumentError, match="client_cert and client_key go together"):
        Client("127.0.0.1:1", client_cert=b"x")
    with pytest.raises(InvalidArgumentError, match="cannot read the PEM file") as err:
        Client("127.0.0.1:1", root_certificates=str(tmp_path / "absent.pem"))
    assert isinstance(err.value, ValueError) and "absent.pem" in str(err.value)
    with pytest.raises(InvalidArgumentError, match="give credentials, or the TLS options"):
        Client("127.0.0.1:1", credentials=grpc.local_channel_credentials(), tls=True)


def test_replies_the_client_cannot_decode_are_protocol_errors():
    """The decoding of a fetch is pure (FetchAssembler): what a broken or foreign server could send."""
    header = b"".join(wire.fetch_blob_chunk(pb.FLOAT32, (4,), b"\0" * 8, header=True))  # 8 of 16 bytes
    blob = FetchAssembler("B", header)
    blob.add(b"".join(wire.fetch_blob_chunk(pb.FLOAT32, (4,), b"\0" * 8, header=False)))
    assert blob.result().shape == (4,)
    with pytest.raises(ProtocolError, match="more than the 16 bytes of blob 'B'"):
        blob.add(b"".join(wire.fetch_blob_chunk(pb.FLOAT32, (4,), b"\0" * 4, header=False)))
    with pytest.raises(ProtocolError, match="cannot decode"):
        FetchAssembler("B", b"\xff\xff\xff")
    with pytest.raises(ProtocolError, match="unknown dtype code 99"):
        FetchAssembler("B", pb.FetchBlobChunk(dtype=99, shape=[1], data=b"\0").SerializeToString())


# ---- errors grpc raises itself, and a server that is not there (issue 21, items 3 and 4) ----


def _every_client_call(client: Client, ws: cosserve.Session) -> dict[str, Callable[[], object]]:
    x = np.ones((2, 3), np.float32)
    return {
        "session": lambda: client.session("cpu"),
        "operators": client.operators,
        "compute": lambda: client.compute("Cos", {"X": x}, ["Y"]),
        "feed_blob": lambda: ws.feed_blob("X", x),
        "fetch_blob": lambda: ws.fetch_blob("X"),
        "top_k": lambda: ws.top_k(x, "X", k=1),
        "close": ws.close,
    }


def test_a_closed_client_and_its_sessions_raise_client_closed_error(server):
    """grpc raised a plain ValueError ("Cannot invoke RPC on closed channel!") for these."""
    client = Client(server.address)
    ws = client.session("cpu")
    client.close()
    for name, call in _every_client_call(client, ws).items():
        with pytest.raises(cosserve.ClientClosedError, match="the client is closed") as err:
            call()
        assert isinstance(err.value, CosserveError) and isinstance(err.value, ValueError), name


def test_a_closed_aio_client_and_its_sessions_raise_client_closed_error(server):
    """grpc.aio raised its UsageError ("Channel is closed."), outside every family."""
    x = np.ones((2, 3), np.float32)

    async def main() -> list[str]:
        client = aio.Client(server.address)
        ws = await client.session("cpu")
        await client.close()
        calls = {
            "session": lambda: client.session("cpu"),
            "compute": lambda: client.compute("Cos", {"X": x}, ["Y"]),
            "feed_blob": lambda: ws.feed_blob("X", x),
            "fetch_blob": lambda: ws.fetch_blob("X"),
            "top_k": lambda: ws.top_k(x, "X", k=1),
            "close": ws.close,
        }
        wrong = []
        for name, call in calls.items():
            try:
                await call()
            except cosserve.ClientClosedError as err:
                assert "the client is closed" in str(err)
            except BaseException as err:  # noqa: BLE001
                wrong.append(f"{name}: {type(err).__name__}: {err}")
            else:
                wrong.append(f"{name}: nothing raised")
        return wrong

    assert asyncio.run(main()) == []


def test_a_closed_session_is_refused_within_the_family(client):
    ws = client.session("cpu")
    ws.close()
    with pytest.raises(CosserveRpcError) as err:
        ws.feed_blob("X", np.ones(2, np.float32))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Worded for one server as for replicas behind a balancer (it spoke of replicas only; issue 21, item 14).
    assert "does not exist on this server: it was closed, expired or never created" in err.value.details()


def test_what_grpc_raises_itself_is_of_the_family(server):
    """A call's timeout grpc cannot add to its clock: grpc raised TypeError("unsupported operand
    type(s) for +: 'float' and 'str'"), sync and asyncio."""
    with Client(server.address) as client, client.session("cpu") as ws:
        with pytest.raises(InvalidTypeError, match="SaveWorkspace: grpc refused the call before sending it") as err:
            ws.save("snap", timeout="5")  # type: ignore[arg-type]
        assert isinstance(err.value.__cause__, TypeError)

    async def main() -> None:
        async with aio.Client(server.address) as client, client.session("cpu") as ws:
            with pytest.raises(InvalidTypeError, match="SaveWorkspace: grpc refused the call before sending it"):
                await ws.save("snap", timeout="5")  # type: ignore[arg-type]

    asyncio.run(main())
    # The client's own timeout is checked when the client is made.
    for make in (Client, aio.Client):
        with pytest.raises(InvalidTypeError, match="timeout is a number of seconds, got '5'"):
            make(server.address, timeout="5")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="timeout must be a positive, finite number of seconds, got 0"):
            make(server.address, timeout=0)


def test_no_server_at_the_address_says_what_to_do():
    with socket.socket() as bound:  # bound, never listening: a connection to it is refused
        bound.bind(("127.0.0.1", 0))
        address = "127.0.0.1:%d" % bound.getsockname()[1]
        with Client(address, timeout=5) as client, pytest.raises(CosserveRpcError) as err:
            client.session("cpu")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Connection refused" in err.value.details()
    assert "Is a cosserve server (`cosserve serve`) running at that address? The address is host:port" in str(err.value)


@pytest.mark.parametrize("url, bare", [("http://127.0.0.1:50051", "'127.0.0.1:50051'"), ("https://example.org:443/", "'example.org:443' with TLS")])
def test_a_url_is_refused_naming_host_port(url, bare):
    """grpc said only "Misformatted domain name", at the first call."""
    for make in (Client, aio.Client):
        with pytest.raises(InvalidArgumentError, match="is a URL; the server address is host:port, here " + re.escape(bare)):
            make(url)
    assert Client("dns:///127.0.0.1:1").target == "dns:///127.0.0.1:1"  # gRPC's own target syntax stays
