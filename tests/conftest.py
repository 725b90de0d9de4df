"""Fixtures: a real cosserve server on 127.0.0.1, a free port, and clients talking gRPC to it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")

from cosserve import Client  # noqa: E402
from cosserve.server.app import RunningServer, build_server  # noqa: E402
from cosserve.server.settings import Settings  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]


def start_server(**overrides: object) -> RunningServer:
    """Start the production server (same interceptors and limits) on a free loopback port."""
    settings = dataclasses.replace(Settings(host="127.0.0.1", port=0, max_workers=8), **overrides)
    return build_server(settings)


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    running = start_server()
    yield running
    running.stop(0)


@pytest.fixture(scope="session")
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address) as c:
        yield c


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def ws(client: Client, device: str):
    """A fresh session on each device (CUDA only where there is one)."""
    with client.session(device) as session:
        yield session


@pytest.fixture
def cpu_ws(client: Client):
    with client.session("cpu") as session:
        yield session
