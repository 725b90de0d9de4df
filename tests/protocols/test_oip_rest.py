"""The Open Inference Protocol over HTTP/REST on a real server, spoken by tritonclient.http and curl.

tritonclient[http] from PyPI runs unmodified in a venv of its own (tests/toolenv.py), as
tritonclient[grpc] does in test_oip.py; curl is Debian's. Numbers are checked against numpy
formulas, and the same requests sent over gRPC must get the same numbers and the codes that
status.HTTP_STATUS maps to. The hostile bodies are written byte by byte on a socket from this
process: no client library would send them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosserve.inference import grpc_service_pb2 as pb
from cosserve.server.compute.registry import REGISTRY
from cosserve.server.edge.app import RunningServer
from cosserve.server.edge.rest import MAX_BODY_BYTES
from cosserve.server.edge.status import HTTP_STATUS
from tests import toolenv
from tests.certs import CertSet, issue, make_authority, make_certs
from tests.conftest import start_process, start_server

TRITONCLIENT_HTTP = ["tritonclient[http]==2.73.0"]
TOKEN = "rest-test-token"
CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="needs curl (.ci/run installs it)")

RNG = np.random.default_rng(22)
X = RNG.standard_normal((5, 7)).astype(np.float32)
Y = RNG.standard_normal((5, 7)).astype(np.float32)

# Runs in tritonclient's venv: reads {"url", "headers", "actions"} from stdin, prints one JSON
# result per action. Arrays travel as {"datatype", "shape", "data" (a flat list)}.
CLIENT_SCRIPT = r'''
import json, sys
import numpy as np
import tritonclient.http as tc
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

job = json.load(sys.stdin)
client = tc.InferenceServerClient(job["url"], ssl=job.get("ssl", False),
                                  ssl_options={"ca_certs": job["ca"]} if job.get("ca") else None)
headers = job.get("headers") or None

def array(spec):
    dtype = np.dtype(triton_to_np_dtype(spec["datatype"]))
    return np.array(spec["data"], dtype=np.float64 if dtype.kind == "f" else dtype).astype(dtype).reshape(spec["shape"])

def run(action):
    do = action["do"]
    try:
        if do == "infer":
            inputs = []
            for name, spec in action["inputs"].items():
                item = tc.InferInput(name, spec["shape"], spec["datatype"])
                item.set_data_from_numpy(array(spec), binary_data=action.get("binary_in", True))
                inputs.append(item)
            names = action.get("outputs")
            outputs = None if names is None else [tc.InferRequestedOutput(n, binary_data=action.get("binary_out", True)) for n in names]
            result = client.infer(action["model"], inputs, outputs=outputs, parameters=action.get("parameters"),
                                  request_id=action.get("id", ""), headers=headers, model_version=action.get("version", ""))
            response = result.get_response()
            return {"id": response.get("id"), "model_version": response["model_version"],
                    "binary": [("parameters" in o) for o in response["outputs"]],
                    "outputs": {o["name"]: {"datatype": o["datatype"], "shape": list(result.as_numpy(o["name"]).shape),
                                            "data": result.as_numpy(o["name"]).astype(np.float64).reshape(-1).tolist()}
                                for o in response["outputs"]}}
        if do == "live":
            return client.is_server_live(headers=headers)
        if do == "ready":
            return client.is_server_ready(headers=headers)
        if do == "model_ready":
            return client.is_model_ready(action["model"], action.get("version", ""), headers=headers)
        if do == "server_metadata":
            return client.get_server_metadata(headers=headers)
        if do == "model_metadata":
            return client.get_model_metadata(action["model"], action.get("version", ""), headers=headers)
        if do == "model_config":
            return client.get_model_config(action["model"], action.get("version", ""), headers=headers)
        if do == "statistics":
            return client.get_inference_statistics(action.get("model", ""), headers=headers)
        raise ValueError(do)
    except InferenceServerException as e:
        return {"error": {"status": e.status(), "message": e.message()}}

print(json.dumps([run(a) for a in job["actions"]]))
'''


@pytest.fixture(scope="module")
def triton_http() -> str:
    return str(toolenv.python("tritonclient", TRITONCLIENT_HTTP))


@pytest.fixture(scope="module")
def rest_server() -> Iterator[RunningServer]:
    running = start_server(max_connection_idle_s=1.0)  # a stalled body is cut off after 1 s
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(tmp_path_factory.mktemp("certs"))


def url(server: RunningServer) -> str:
    return f"127.0.0.1:{server.http_port}"


def tritonclient(python: str, target: str, actions: list[dict[str, Any]], headers: dict[str, str] | None = None,
                 ca: str | None = None) -> list[Any]:
    job = json.dumps({"url": target, "headers": headers or {}, "actions": actions, "ssl": ca is not None, "ca": ca})
    done = subprocess.run([python, "-c", CLIENT_SCRIPT], input=job, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def spec(a: np.ndarray) -> dict[str, Any]:
    names = {"float16": "FP16", "float32": "FP32", "float64": "FP64", "int32": "INT32", "int64": "INT64"}
    return {"datatype": names[a.dtype.name], "shape": list(a.shape), "data": a.astype(np.float64).reshape(-1).tolist()}


def infer(model: str, parameters: dict[str, Any] | None = None, outputs: list[str] | None = None, **inputs: np.ndarray) -> dict[str, Any]:
    return {"do": "infer", "model": model, "inputs": {k: spec(v) for k, v in inputs.items()}, "parameters": parameters, "outputs": outputs}


def value(output: dict[str, Any]) -> np.ndarray:
    return np.array(output["data"], np.float64).reshape(output["shape"])


def cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return (x * y).sum(1) / np.sqrt(np.maximum((x * x).sum(1), 1e-12) * np.maximum((y * y).sum(1), 1e-12))


def http(server: RunningServer, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib (status, headers, body), errors included."""
    request = urllib.request.Request(f"http://{url(server)}{path}", data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, {k.lower(): v for k, v in answer.headers.items()}, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def raw_exchange(server: RunningServer, data: bytes, *, wait_s: float = 10.0, shut: bool = True) -> bytes:
    """Write `data` on a fresh connection (then half-close it) and read what comes back."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=wait_s) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def status_of(answer: bytes) -> int:
    assert answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:200]
    return int(answer.split(b" ", 2)[1])


# ---- tritonclient.http ----------------------------------------------------------------------


def test_infer_json_and_binary_match_numpy_and_grpc(triton_http: str, rest_server: RunningServer) -> None:
    x64 = X.astype(np.float64)
    cases = [
        ("Cos", {"X": X}, "Y", np.cos(x64), 1e-6),
        ("CosineSimilarity", {"X": X, "Y": Y}, "S", cosine(X, Y), 1e-6),
        ("DotProduct", {"X": x64, "Y": x64}, "P", (x64 * x64).sum(1), 1e-12),
        ("SquaredL2Distance", {"X": X.astype(np.float16), "Y": Y.astype(np.float16)}, "L",
         0.5 * ((X.astype(np.float16).astype(np.float64) - Y.astype(np.float16)) ** 2).sum(1), 1e-2),
    ]
    actions = []
    for binary in (True, False):  # the binary tensor data extension, then JSON lists both ways
        for op, ins, out, _, _ in cases:
            action = infer(op, outputs=[out], **ins)
            action.update(binary_in=binary, binary_out=binary, id=f"{op}-{binary}")
            actions.append(action)
    actions.append(infer("CosineSimilarity", X=X, Y=Y))  # no outputs named: every output, binary
    results = tritonclient(triton_http, url(rest_server), actions)
    with grpc.insecure_channel(rest_server.address) as channel:
        grpc_infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", pb.ModelInferRequest.SerializeToString,
                                         pb.ModelInferResponse.FromString)
        for i, binary in enumerate((True, False)):
            for (op, ins, out, want, tol), got in zip(cases, results[i * len(cases) : (i + 1) * len(cases)]):
                assert "error" not in got, got
                assert got["binary"] == [binary] and got["id"] == f"{op}-{binary}" and got["model_version"] == "1"
                np.testing.assert_allclose(value(got["outputs"][out]), want, rtol=tol, atol=tol, err_msg=op)
                request = pb.ModelInferRequest(model_name=op)
                for name, a in ins.items():
                    request.inputs.add(name=name, datatype=spec(a)["datatype"], shape=a.shape)
                    request.raw_input_contents.append(a.tobytes())
                reply = grpc_infer(request, timeout=30)
                over_grpc = np.frombuffer(reply.raw_output_contents[0], dtype=next(iter(ins.values())).dtype)
                np.testing.assert_array_equal(value(got["outputs"][out]).reshape(-1), over_grpc.astype(np.float64), err_msg=op)
    every = results[-1]
    assert every["binary"] == [True]
    np.testing.assert_allclose(value(every["outputs"]["S"]), cosine(X, Y), rtol=1e-6, atol=1e-6)


def test_parameters_versions_and_errors(triton_http: str, rest_server: RunningServer) -> None:
    q = RNG.standard_normal((3, 4)).astype(np.float32)
    c = RNG.standard_normal((9, 4)).astype(np.float32)
    results = tritonclient(triton_http, url(rest_server), [
        infer("CosineTopK", {"k": 3}, Q=q, C=c),
        {**infer("Cos", X=X), "version": "1"},
        {**infer("Cos", X=X), "version": "2"},
        infer("CosineSimilarity", X=X, Y=Y[:, :3]),
        infer("CosineSimilarty", X=X, Y=Y),
        infer("Cos", {"no_such": 1}, X=X),
        infer("Cos", X=np.arange(3, dtype=np.int32)),
    ])
    topk, v1, v2, bad_shape, typo, unknown_arg, bad_dtype = results
    sims = np.array([cosine(np.repeat(q[i : i + 1], len(c), 0), c) for i in range(len(q))])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :3]
    assert topk["outputs"]["Indices"]["datatype"] == "INT64"
    np.testing.assert_array_equal(value(topk["outputs"]["Indices"]), order)
    np.testing.assert_allclose(value(topk["outputs"]["Scores"]), np.take_along_axis(sims, order, 1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(value(v1["outputs"]["Y"]), np.cos(X.astype(np.float64)), rtol=1e-6, atol=1e-7)
    assert v2["error"]["status"] == "404"
    assert bad_shape["error"]["status"] == "400" and "CosineSimilarity" in bad_shape["error"]["message"]
    assert typo["error"]["status"] == "404" and "did you mean 'CosineSimilarity'" in typo["error"]["message"]
    assert unknown_arg["error"]["status"] == "400" and "no_such" in unknown_arg["error"]["message"]
    assert bad_dtype["error"]["status"] == "400"


def test_health_metadata_config_and_statistics(triton_http: str) -> None:
    running = start_server()  # its own server: statistics start at zero
    try:
        names = sorted(REGISTRY)
        results = tritonclient(triton_http, url(running), [
            {"do": "live"}, {"do": "ready"}, {"do": "server_metadata"},
            {"do": "model_ready", "model": "Cos"}, {"do": "model_ready", "model": "Cos", "version": "1"},
            {"do": "model_ready", "model": "Cos", "version": "2"}, {"do": "model_ready", "model": "Sin"},
            {"do": "model_metadata", "model": "Sin"}, {"do": "model_config", "model": "Sin"},
            infer("Cos", X=X), infer("Cos", X=X), infer("Cos", X=np.arange(3, dtype=np.int32)),
            {"do": "statistics", "model": "Cos"}, {"do": "statistics"}, {"do": "statistics", "model": "Coss"},
            *[{"do": "model_metadata", "model": n} for n in names], *[{"do": "model_config", "model": n} for n in names],
        ])
    finally:
        running.stop(0)
    live, ready, server_metadata, cos, cos1, cos2, sin, sin_meta, sin_config = results[:9]
    cos_stats, every_stats, unknown_stats = results[12:15]
    metadata, configs = results[15 : 15 + len(names)], results[15 + len(names) :]
    assert (live, ready, cos, cos1, cos2, sin) == (True, True, True, True, False, False)
    assert server_metadata["name"] == "cosserve"
    assert {"parameters", "statistics", "model_configuration", "binary_tensor_data"} == set(server_metadata["extensions"])
    assert sin_meta["error"]["status"] == "404" and sin_config["error"]["status"] == "404"
    (stats,) = cos_stats["model_stats"]
    assert stats["name"] == "Cos" and stats["inference_count"] == 2
    assert stats["inference_stats"]["success"]["count"] == 2 and stats["inference_stats"]["fail"]["count"] == 1
    assert stats["inference_stats"]["success"]["ns"] > 0
    assert [s["name"] for s in every_stats["model_stats"]] == names
    assert unknown_stats["error"]["status"] == "404"
    for name, meta, config in zip(names, metadata, configs):
        schema = REGISTRY[name].schema
        assert meta["name"] == name and meta["versions"] == ["1"] and meta["platform"] == "cosserve"
        assert [i["name"] for i in meta["inputs"]] == [i.name for i in schema.inputs]
        assert all(t["shape"] == [-1] for t in meta["inputs"] + meta["outputs"])  # numbers, not protobuf's strings
        assert config["name"] == name and config["max_batch_size"] == 0
        assert [i["name"] for i in config["input"]] == [i.name for i in schema.inputs]
        assert [o["name"] for o in config["output"]] == list(schema.outputs)
        for tensors, meta_tensors in ((config["input"], meta["inputs"]), (config["output"], meta["outputs"])):
            for tensor, meta_tensor in zip(tensors, meta_tensors, strict=True):
                assert tensor["data_type"] == "TYPE_" + meta_tensor["datatype"] and tensor["dims"] == [-1]


def test_auth_is_a_bearer_header_and_health_stays_open(triton_http: str) -> None:
    running = start_server(auth_token=TOKEN)
    try:
        target = url(running)
        anonymous = tritonclient(triton_http, target, [{"do": "live"}, {"do": "ready"}, {"do": "server_metadata"}, infer("Cos", X=X)])
        wrong = tritonclient(triton_http, target, [infer("Cos", X=X)], headers={"Authorization": "Bearer nope"})
        keyed = tritonclient(triton_http, target, [infer("Cos", X=X), {"do": "model_config", "model": "Cos"}],
                             headers={"Authorization": f"Bearer {TOKEN}"})
        status, headers, body = http(running, "POST", "/v2/models/Cos/infer", b"x" * 1000)
    finally:
        running.stop(0)
    assert anonymous[:2] == [True, True]
    assert anonymous[2]["error"]["status"] == "401" and anonymous[3]["error"]["status"] == "401"
    assert "bearer token" in anonymous[3]["error"]["message"]
    assert wrong[0]["error"]["status"] == "401"
    np.testing.assert_allclose(value(keyed[0]["outputs"]["Y"]), np.cos(X.astype(np.float64)), rtol=1e-6, atol=1e-7)
    assert keyed[1]["name"] == "Cos"
    # Refused before its body is parsed: garbage from a caller without a key is never looked at.
    assert status == 401 and headers["www-authenticate"].startswith("Bearer") and "error" in json.loads(body)


def test_tls_uses_the_grpc_ports_files(triton_http: str, certs: CertSet) -> None:
    running = start_server(tls_cert=str(certs.server.cert), tls_key=str(certs.server.key))
    try:
        (result,) = tritonclient(triton_http, url(running), [infer("Cos", X=X)], ca=str(certs.ca.pem))
        plain = raw_exchange(running, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n", wait_s=5)
    finally:
        running.stop(0)
    np.testing.assert_allclose(value(result["outputs"]["Y"]), np.cos(X.astype(np.float64)), rtol=1e-6, atol=1e-7)
    assert not plain.startswith(b"HTTP/1.1 200")  # no plaintext answers on a TLS port


# ---- curl ------------------------------------------------------------------------------------


def curl(*args: str) -> tuple[int, str, dict[str, str]]:
    """(HTTP status, body, response headers) of one curl call."""
    assert CURL is not None
    done = subprocess.run([CURL, "-sS", "--max-time", "30", "-D", "-", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    while head.startswith("HTTP/1.1 100"):  # curl's Expect: 100-continue
        head, _, body = body.partition("\n\n")
    lines = head.splitlines()
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), body, headers


@needs_curl
def test_curl_every_endpoint(rest_server: RunningServer) -> None:
    base = f"http://{url(rest_server)}"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/Cos/ready", "/v2/models/Cos/versions/1/ready"):
        assert curl(base + path)[0] == 200, path
    status, body, headers = curl(base + "/v2", "-H", "x-request-id: curl-id-1")
    assert status == 200 and json.loads(body)["name"] == "cosserve" and headers["x-request-id"] == "curl-id-1"
    assert json.loads(curl(base + "/v2/models/CosineSimilarity")[1])["inputs"][1]["name"] == "Y"
    assert json.loads(curl(base + "/v2/models/CosineSimilarity/versions/1/config")[1])["output"][0]["data_type"] == "TYPE_FP32"
    assert json.loads(curl(base + "/v2/models/Cos/stats")[1])["model_stats"][0]["name"] == "Cos"
    assert len(json.loads(curl(base + "/v2/models/stats")[1])["model_stats"]) == len(REGISTRY)
    request = {"id": "a", "inputs": [{"name": "X", "shape": [2, 3], "datatype": "FP64", "data": [[0, 1, 2], [3, 4, 5]]}]}
    status, body, headers = curl(base + "/v2/models/Cos/infer", "-H", "Content-Type: application/json", "-d", json.dumps(request))
    answer = json.loads(body)
    assert status == 200 and answer["id"] == "a" and headers["content-type"].startswith("application/json")
    (output,) = answer["outputs"]
    assert output["datatype"] == "FP64" and output["shape"] == [2, 3]
    np.testing.assert_allclose(output["data"], np.cos(np.arange(6.0)), rtol=1e-15)
    # A big JSON body makes curl wait for 100-continue; it is answered and the body read.
    big = RNG.standard_normal(4096)
    request = {"inputs": [{"name": "X", "shape": [4096], "datatype": "FP64", "data": big.tolist()}]}
    status, body, _ = curl(base + "/v2/models/Cos/infer", "-d", json.dumps(request))
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], np.cos(big), rtol=1e-15)
    status, body, headers = curl(base + "/v2/models/Cos/infer", "-d", "{")
    assert status == 400 and "not JSON" in json.loads(body)["error"] and headers["x-request-id"]
    assert curl(base + "/v2/models/Coss")[0] == 404
    assert curl(base + "/v2/no/such/path")[0] == 404
    assert curl("-X", "DELETE", base + "/v2/models/Cos")[0] == 405


# ---- hostile bodies ------------------------------------------------------------------------


def _post(path: str, body: bytes, *headers: str, close: bool = True) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: cosserve", f"Content-Length: {len(body)}", *headers, *(["Connection: close"] * close)]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


HOSTILE_JSON = [
    b"{", b"[]", b"null", b'"text"', b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000,
    b'{"inputs": 5}', b'{"inputs": [5]}', b'{"inputs": [{"name": 5}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": "2", "data": [1, 2]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [-2], "data": [1, 2]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [true], "data": [1]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [99999999999999999999999], "data": [1]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [4611686018427387904, 4], "data": [1]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [2], "data": [[1], [2, 3]]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [2], "data": [null, {}]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}',
    b'{"inputs": [{"name": "X", "datatype": "INT32", "shape": [1], "data": [1.5]}]}',
    b'{"inputs": [{"name": "X", "datatype": "INT8", "shape": [1], "data": [300]}]}',
    b'{"inputs": [{"name": "X", "datatype": "INT64", "shape": [1], "data": [123456789012345678901234567890]}]}',
    b'{"inputs": [{"name": "X", "datatype": "STRING", "shape": [1], "data": ["a"]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1]}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"binary_data_size": 4}}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"k": [1]}}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"k": 1e999999}}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"binary_data_output": 1}}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": {"k": 99999999999999999999}}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{"name": "Y", "parameters": {"classification": 3}}]}',
    b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}], "outputs": [{"name": "Z"}]}',
    b'{"id": 7, "inputs": []}',
    b'{"inputs": [' + b'{"name": "X"},' * 10_000 + b'{"name": "X"}]}',
]


@pytest.mark.parametrize("body", HOSTILE_JSON, ids=range(len(HOSTILE_JSON)))
def test_malformed_json_and_wrong_types_are_400(rest_server: RunningServer, body: bytes) -> None:
    status, headers, answer = http(rest_server, "POST", "/v2/models/Cos/infer", body, {"Content-Type": "application/json"})
    assert status == 400, answer
    assert json.loads(answer)["error"] and len(answer) < 2000 and headers["x-request-id"]


def test_binary_extension_lengths_that_lie_are_400(rest_server: RunningServer) -> None:
    header = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}).encode()
    data = np.array([0.5, 1.5], np.float32).tobytes()
    status, headers, body = http(rest_server, "POST", "/v2/models/Cos/infer", header + data,
                                 {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and headers["content-type"] == "application/json"  # no output asked for binary
    np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], np.cos([0.5, 1.5]), rtol=1e-6)
    for length, payload in (
        (str(len(header) + 100), header + data),  # past the body's end
        (str(len(header) - 1), header + data),  # inside the JSON
        ("-1", header + data), ("abc", header + data), ("9" * 40, header + data),
        (str(len(header)), header + data[:5]),  # fewer bytes than binary_data_size
        (str(len(header)), header + data + b"tail"),  # bytes nobody claims
        (str(len(header)), header + data[:4] + b"\x00"),
    ):
        status, _, body = http(rest_server, "POST", "/v2/models/Cos/infer", payload, {"Inference-Header-Content-Length": length})
        assert status == 400, (length, body)
    status, _, body = http(rest_server, "POST", "/v2/models/Cos/infer", header + data, {"Content-Encoding": "gzip"})
    assert status == 400 and "Content-Encoding" in json.loads(body)["error"]


def test_a_declared_length_that_lies_or_is_huge_is_refused_without_reading(
    rest_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    # 1 GiB declared: refused at once, before a byte of it is read.
    started = time.monotonic()
    answer = raw_exchange(rest_server, b"POST /v2/models/Cos/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n{",
                          shut=False)
    assert status_of(answer) == 413 and time.monotonic() - started < 5
    assert str(MAX_BODY_BYTES) in answer.decode(errors="replace")
    # The same with Expect: 100-continue: no 100 is sent, only the refusal.
    answer = raw_exchange(rest_server, b"POST /v2/models/Cos/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n"
                                       b"Expect: 100-continue\r\n\r\n", shut=False)
    assert status_of(answer) == 413 and b"100 Continue" not in answer
    # A body within the limit is asked for with 100 Continue, and answered.
    body = json.dumps({"inputs": [{"name": "X", "shape": [1], "datatype": "FP32", "data": [0]}]}).encode()
    with socket.create_connection(("127.0.0.1", rest_server.http_port), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/Cos/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert status_of(answer) == 200 and answer.endswith(b'"data":[1.0]}]}')
    # Chunked, with no declared length: cut off at the limit.
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b"[" * (1 << 20))
    answer = raw_exchange(rest_server, b"POST /v2/models/Cos/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          + chunk * ((MAX_BODY_BYTES >> 20) + 2) + b"0\r\n\r\n")
    assert status_of(answer) == 413
    # A length longer than what is sent, then the sender half-closes: a 400 from aiohttp or no answer, never a 500.
    answer = raw_exchange(rest_server, _post("/v2/models/Cos/infer", b'{"inputs": []}')[:-5])
    assert answer == b"" or status_of(answer) < 500
    # A length shorter than what is sent: what follows is not HTTP, answered 400 by aiohttp.
    data = _post("/v2/models/Cos/infer", b"{}", close=False).replace(b"Content-Length: 2", b"Content-Length: 1")
    assert status_of(raw_exchange(rest_server, data, shut=False, wait_s=3)) == 400
    assert status_of(raw_exchange(rest_server, b"GARBAGE\r\n\r\n", shut=False, wait_s=3)) == 400
    assert http(rest_server, "GET", "/v2/health/live")[0] == 200  # and the server serves on
    assert not [r for r in caplog.records if r.levelno >= 40], "a client's bytes made the server log an error"


def test_a_slow_sender_is_cut_off_and_blocks_nobody(rest_server: RunningServer) -> None:
    body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode()
    with socket.create_connection(("127.0.0.1", rest_server.http_port), timeout=10) as slow:
        slow.sendall(_post("/v2/models/Cos/infer", body)[: -len(body) + 3])  # headers and 3 bytes of body
        started = time.monotonic()
        for _ in range(5):  # others are served meanwhile
            assert http(rest_server, "GET", "/v2/health/ready")[0] == 200
        reply = b""
        while chunk := slow.recv(65536):
            reply += chunk
    waited = time.monotonic() - started
    assert status_of(reply) == 408 and 0.5 < waited < 8, (reply, waited)
    # Headers that never end: the connection is closed after --max-connection-idle-s (1 s here).
    with socket.create_connection(("127.0.0.1", rest_server.http_port), timeout=10) as slow:
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\nHo")
        started = time.monotonic()
        with pytest.raises(OSError):
            for _ in range(40):
                slow.sendall(b"x")
                time.sleep(0.25)
    assert time.monotonic() - started < 8


def test_codes_match_grpc_through_the_one_table(rest_server: RunningServer) -> None:
    """The same bad requests over both bindings: the HTTP status is HTTP_STATUS of the gRPC code."""
    bad = [
        ("CosineSimilarity", [("X", X), ("Y", Y[:, :2])]),  # INVALID_ARGUMENT
        ("Nothing", [("X", X)]),  # NOT_FOUND
    ]
    with grpc.insecure_channel(rest_server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", pb.ModelInferRequest.SerializeToString,
                                   pb.ModelInferResponse.FromString)
        for model, inputs in bad:
            request = pb.ModelInferRequest(model_name=model)
            for name, a in inputs:
                request.inputs.add(name=name, datatype="FP32", shape=a.shape)
                request.raw_input_contents.append(a.tobytes())
            with pytest.raises(grpc.RpcError) as raised:
                call(request, timeout=10)
            body = json.dumps({"inputs": [{"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
                                          for n, a in inputs]}).encode()
            status, _, answer = http(rest_server, "POST", f"/v2/models/{model}/infer", body)
            assert status == HTTP_STATUS[raised.value.code()], model
            assert json.loads(answer)["error"] == raised.value.details()


def test_request_ids_metrics_and_off(rest_server: RunningServer) -> None:
    status, headers, _ = http(rest_server, "GET", "/v2/models/Cos", headers={"x-request-id": "mine-1"})
    assert status == 200 and headers["x-request-id"] == "mine-1"
    for given in ("x" * 200, "not plain"):
        status, headers, _ = http(rest_server, "GET", "/v2/models/Cos", headers={"x-request-id": given})
        assert status == 200 and headers["x-request-id"] != given and len(headers["x-request-id"]) == 16  # a new one
    running = start_server(metrics_port=0)  # no metrics
    assert running.http_port is not None
    running.stop(0)
    from cosserve.server.settings import OFF

    off = start_server(http_port=OFF)
    try:
        assert off.http_port is None
    finally:
        off.stop(0)


def test_rest_calls_show_in_the_metrics() -> None:
    # A free port for the metrics: bind, read it, close (then the server binds it).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = start_server(metrics_port=port)
    try:
        body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode()
        assert http(running, "POST", "/v2/models/Cos/infer", body)[0] == 200
        assert http(running, "POST", "/v2/models/Cos/infer", b"{")[0] == 400
        huge = b"POST /v2/models/Cos/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n{"
        assert status_of(raw_exchange(running, huge, shut=False)) == 413
        with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10) as answer:
            text = answer.read().decode()
    finally:
        running.stop(0)
    assert 'cosserve_rpcs_total{code="OK",method="REST ModelInfer"} 1.0' in text
    assert 'cosserve_rpcs_total{code="INVALID_ARGUMENT",method="REST ModelInfer"} 1.0' in text
    assert 'cosserve_tensor_bytes_total{direction="in",method="REST ModelInfer"} 4.0' in text
    assert 'cosserve_rpcs_total{code="RESOURCE_EXHAUSTED",method="REST ModelInfer"} 1.0' in text


def test_a_malformed_chunked_body_is_400(rest_server: RunningServer) -> None:
    answer = raw_exchange(rest_server, b"POST /v2/models/Cos/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"5\r\n{\"inp\r\nzz\r\n", shut=False, wait_s=3)
    assert status_of(answer) == 400


@needs_curl
def test_mutual_tls_over_rest(certs: CertSet) -> None:
    running = start_server(tls_cert=str(certs.server.cert), tls_key=str(certs.server.key), tls_client_ca=str(certs.ca.pem))
    base = f"https://localhost:{running.http_port}"
    request = json.dumps({"inputs": [{"name": "X", "shape": [2], "datatype": "FP32", "data": [0, 1]}]})
    try:
        status, body, _ = curl("--cacert", str(certs.ca.pem), "--cert", str(certs.client.cert), "--key", str(certs.client.key),
                               base + "/v2/models/Cos/infer", "-d", request)
        refused = subprocess.run([CURL or "curl", "-sS", "--max-time", "10", "--cacert", str(certs.ca.pem), base + "/v2/health/live"],
                                 capture_output=True, text=True, timeout=30)
        foreign = subprocess.run([CURL or "curl", "-sS", "--max-time", "10", "--cacert", str(certs.ca.pem),
                                  "--cert", str(certs.foreign_client.cert), "--key", str(certs.foreign_client.key),
                                  base + "/v2/health/live"], capture_output=True, text=True, timeout=30)
    finally:
        running.stop(0)
    assert status == 200
    np.testing.assert_allclose(json.loads(body)["outputs"][0]["data"], np.cos([0.0, 1.0]), rtol=1e-6)
    assert refused.returncode != 0 and foreign.returncode != 0  # no certificate, or one another CA signed: no handshake


@needs_curl
@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])  # with SNI, and without (an IP address sends none)
def test_rotated_certificate_is_used_by_new_rest_connections(tmp_path: Path, host: str) -> None:
    first = make_certs(tmp_path / "first")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_bytes(first.server.cert_pem)
    key.write_bytes(first.server.key_pem)
    running = start_server(tls_cert=str(cert), tls_key=str(key))

    def live(ca: Path) -> int:
        done = subprocess.run([CURL or "curl", "-sS", "--max-time", "10", "--cacert", str(ca), "-o", "/dev/null", "-w", "%{http_code}",
                               f"https://{host}:{running.http_port}/v2/health/live"], capture_output=True, text=True, timeout=30)
        return int(done.stdout or 0) if done.returncode == 0 else -done.returncode

    try:
        assert live(first.ca.pem) == 200
        new_ca = make_authority(tmp_path, "new-ca")
        new_server = issue(new_ca, tmp_path, "new-server", server=True)
        for path, data in ((cert, new_server.cert_pem), (key, new_server.key_pem)):
            path.with_suffix(".new").write_bytes(data)
            os.replace(path.with_suffix(".new"), path)
        assert live(new_ca.pem) == 200
        assert live(first.ca.pem) < 0  # the old CA no longer verifies the server
    finally:
        running.stop(0)


def test_requests_past_the_concurrency_limit_are_429() -> None:
    running = start_server(max_concurrent_rpcs=1, max_connection_idle_s=3.0)
    body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [1]}]}).encode()
    try:
        with socket.create_connection(("127.0.0.1", running.http_port), timeout=10) as slow:
            slow.sendall(_post("/v2/models/Cos/infer", body)[:-5])  # in flight, its body unfinished
            time.sleep(0.3)
            status, headers, answer = http(running, "GET", "/v2/models/Cos")
            assert status == 429 and "--max-concurrent-rpcs" in json.loads(answer)["error"]
            slow.sendall(body[-5:])  # the body ends, the request is answered, the slot is free
            assert status_of(slow.recv(65536)) == 200
        assert http(running, "GET", "/v2/models/Cos")[0] == 200
    finally:
        running.stop(0)


# ---- the translation alone, fuzzed --------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_DATATYPES = st.sampled_from(["FP32", "FP16", "BF16", "FP64", "INT8", "INT32", "INT64", "UINT8", "BOOL", "STRING", ""])
_INPUT = st.fixed_dictionaries(
    {"name": st.sampled_from(["X", "Y", "Z"]) | _JSON, "datatype": _DATATYPES | _JSON,
     "shape": st.lists(st.integers(-2, 5), max_size=3) | _JSON},
    optional={"data": st.lists(st.integers(-300, 300) | st.floats() | st.booleans(), max_size=12) | _JSON,
              "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "p"]), st.integers(-1, 16) | _JSON, max_size=2)},
)
_DOCUMENT = st.fixed_dictionaries(
    {"inputs": st.lists(_INPUT, max_size=3) | _JSON},
    optional={"id": _JSON, "parameters": st.dictionaries(st.text(max_size=8), _JSON, max_size=3),
              "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["Y", "S"]) | _JSON},
                                                        optional={"parameters": _JSON}), max_size=2)},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_DOCUMENT | _JSON, tail=st.binary(max_size=16), header_length=st.none() | st.integers(-1, 400))
def test_any_json_is_a_request_or_invalid_argument(document: Any, tail: bytes, header_length: int | None) -> None:
    """Whatever the JSON and the bytes after it, the translation and the decoding after it raise
    only domain errors (a status code), never anything that would be a 500."""
    import torch

    from cosserve.server.errors import CosserveError
    from cosserve.server.protocols import oip, oip_rest

    body = json.dumps(document).encode() + tail
    try:
        length = oip_rest.parse_header_length(None if header_length is None else str(header_length), len(body))
        request, reply = oip_rest.infer_request("Cos", "", body, length)
        decoded = oip.decode_request(oip.model("Cos"), request, torch.device("cpu"))
    except CosserveError:
        return
    assert list(decoded.inputs) == ["X"] and decoded.inputs["X"].dtype in oip.DATATYPES.values()


def test_sigterm_lets_a_rest_request_in_flight_finish() -> None:
    """`cosserve serve` in its own process: on SIGTERM the REST port stops listening at once, and a
    request already in flight gets --grace-s to finish, as a gRPC call does; then exit 0."""
    log: list[str] = []
    proc, _ = start_process("--grace-s", "5", log=log)
    try:
        deadline = time.monotonic() + 10
        while not (found := [m for line in log if (m := re.search(r"HTTP/REST at http://127\.0\.0\.1:(\d+)/", line))]):
            assert time.monotonic() < deadline, log
            time.sleep(0.05)
        port = int(found[0].group(1))
        body = json.dumps({"inputs": [{"name": "X", "datatype": "FP32", "shape": [1], "data": [0]}]}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(_post("/v2/models/Cos/infer", body)[:-3])
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(OSError):  # no new connection is taken
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            slow.sendall(body[-3:])
            answer = b""
            while chunk := slow.recv(65536):
                answer += chunk
        assert status_of(answer) == 200 and answer.endswith(b'"data":[1.0]}]}')
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
