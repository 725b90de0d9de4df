"""The client's exception: a failed call, with the gRPC status code and the server's message."""

from __future__ import annotations

import grpc

__all__ = ["CosserveRpcError"]


class CosserveRpcError(Exception):
    """A cosserve call failed; `.code()` is a grpc.StatusCode and `.details()` the message."""

    def __init__(self, code: grpc.StatusCode, details: str, method: str = "") -> None:
        super().__init__(f"{method}: {code.name}: {details}" if method else f"{code.name}: {details}")
        self._code = code
        self._details = details
        self.method = method

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details
