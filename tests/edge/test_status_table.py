"""The one table from domain errors to status codes: every error class has a code, and a subclass
takes its parent's."""

from __future__ import annotations

import grpc

from cosserve.server import errors
from cosserve.server.edge.status import STATUS_CODES, status_of


def _domain_errors() -> list[type[errors.CosserveError]]:
    found, todo = [], [errors.CosserveError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_domain_error_class_has_a_status_code():
    missing = [cls.__name__ for cls in _domain_errors() if cls is not errors.CosserveError and status_of(cls("x")) is None]
    assert not missing, f"domain errors without a status code in status.STATUS_CODES: {missing}"
    assert status_of(errors.CosserveError("x")) is None  # the base alone is no code: INTERNAL
    assert status_of(ValueError("x")) is None


def test_a_subclass_of_a_domain_error_takes_its_parents_code():
    class BlobNameTooLong(errors.InvalidArgument):
        pass

    class Deeper(BlobNameTooLong):
        pass

    assert status_of(Deeper("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert set(STATUS_CODES) <= set(_domain_errors())


def test_every_code_has_an_http_status_for_the_rest_binding():
    """The REST binding answers every code the table can give (and any grpc code) with an HTTP
    status: a missing one would turn a client's mistake into a 500."""
    from cosserve.server.edge.status import HTTP_STATUS

    assert set(HTTP_STATUS) == set(grpc.StatusCode)
    assert all(400 <= HTTP_STATUS[code] < 500 for code in STATUS_CODES.values())
    assert HTTP_STATUS[grpc.StatusCode.INTERNAL] == 500 and HTTP_STATUS[grpc.StatusCode.OK] == 200
