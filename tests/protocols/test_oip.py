"""The Open Inference Protocol (KServe v2 / Triton) on a real server, spoken by the real tritonclient.

tritonclient[grpc] from PyPI runs unmodified in a venv of its own (tests/toolenv.py: it pins
protobuf and ml-dtypes below ours, and its stubs register the protobuf package `inference`, as
ours do, so it never shares a process with cosserve's). Each test hands a small script a list of
actions as JSON and compares what it prints with numpy formulas and with cosserve's own Compute.
The hostile bytes are sent from this process, through grpc with cosserve's own stubs.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import time
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest

from cosserve import Client, CosserveRpcError
from cosserve.inference import grpc_service_pb2 as pb
from cosserve.server.compute.registry import REGISTRY
from cosserve.server.edge.app import RunningServer
from tests import toolenv
from tests.conftest import start_server, start_server_with_metrics
from tests.op_db import OP_DB

TRITONCLIENT = ["tritonclient[grpc]==2.73.0"]
SERVICE = "/inference.GRPCInferenceService/"
TOKEN = "oip-test-token"

# Runs in tritonclient's venv: reads {"address", "headers", "actions"} from stdin, prints one JSON
# result per action. Arrays travel as {"datatype", "shape", "data" (a flat list)}.
CLIENT_SCRIPT = r'''
import json, queue, sys
import ml_dtypes
import numpy as np
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

job = json.load(sys.stdin)
client = tc.InferenceServerClient(job["address"])
headers = job.get("headers") or None

def array(spec):
    dtype = ml_dtypes.bfloat16 if spec["datatype"] == "BF16" else triton_to_np_dtype(spec["datatype"])
    return np.array(spec["data"], dtype=np.float64 if spec["datatype"] in ("FP16", "BF16") else dtype).astype(dtype).reshape(spec["shape"])

def listed(a):
    return {"datatype": tc.np_to_triton_dtype(a.dtype), "shape": list(a.shape), "data": a.astype(np.float64).reshape(-1).tolist() if a.dtype.kind == "f" or a.dtype == ml_dtypes.bfloat16 else a.reshape(-1).tolist()}

def error(e):
    return {"error": {"status": str(e.status()), "message": e.message()}}

def inputs_of(action):
    made = []
    for name, spec in action["inputs"].items():
        item = tc.InferInput(name, spec["shape"], spec["datatype"])
        item.set_data_from_numpy(array(spec))
        made.append(item)
    return made

def outputs_of(action):
    names = action.get("outputs")
    return None if names is None else [tc.InferRequestedOutput(n) for n in names]

def result_of(result, action):
    response = result.get_response()
    names = [o.name for o in response.outputs]
    return {"names": names, "id": response.id, "model_version": response.model_version,
            "outputs": {n: listed(result.as_numpy(n)) for n in names}}

def run(action):
    do = action["do"]
    try:
        if do == "infer":
            result = client.infer(action["model"], inputs_of(action), outputs=outputs_of(action),
                                  parameters=action.get("parameters"), request_id=action.get("id", ""), headers=headers)
            return result_of(result, action)
        if do == "typed":  # contents instead of raw bytes: the request built from tritonclient's own stubs
            stub = service_pb2_grpc.GRPCInferenceServiceStub(client._channel)
            request = service_pb2.ModelInferRequest(model_name=action["model"])
            for name, spec in action["inputs"].items():
                item = request.inputs.add(name=name, datatype=spec["datatype"], shape=spec["shape"])
                getattr(item.contents, spec["field"]).extend(spec["data"])
            response = stub.ModelInfer(request, metadata=list((headers or {}).items()))
            return {"outputs": {o.name: {"datatype": o.datatype, "shape": list(o.shape),
                                         "data": np.frombuffer(raw, triton_to_np_dtype(o.datatype)).astype(np.float64).tolist()}
                                for o, raw in zip(response.outputs, response.raw_output_contents)},
                    "contents_set": [o.HasField("contents") for o in response.outputs]}
        if do == "live":
            return client.is_server_live(headers=headers)
        if do == "ready":
            return client.is_server_ready(headers=headers)
        if do == "model_ready":
            return client.is_model_ready(action["model"], action.get("version", ""), headers=headers)
        if do == "server_metadata":
            return client.get_server_metadata(headers=headers, as_json=True)
        if do == "model_metadata":
            return client.get_model_metadata(action["model"], action.get("version", ""), headers=headers, as_json=True)
        if do == "statistics":
            return client.get_inference_statistics(action.get("model", ""), headers=headers, as_json=True)
        if do == "stream":
            answers = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
            try:
                for request in action["requests"]:
                    client.async_stream_infer(request["model"], inputs_of(request), outputs=outputs_of(request),
                                              parameters=request.get("parameters"), request_id=request.get("id", ""))
                got = []
                for request in action["requests"]:
                    result, err = answers.get(timeout=30)
                    got.append({"error": {"message": err.message()}} if err is not None else result_of(result, request))
                return got
            finally:
                client.stop_stream()
        raise ValueError(do)
    except InferenceServerException as e:
        return error(e)

print(json.dumps([run(a) for a in job["actions"]]))
'''


@pytest.fixture(scope="module")
def triton_python() -> str:
    return str(toolenv.python("tritonclient", TRITONCLIENT))


def tritonclient(python: str, address: str, actions: list[dict[str, Any]], headers: dict[str, str] | None = None) -> list[Any]:
    """Run `actions` through tritonclient against `address`; its result for each, in order."""
    job = json.dumps({"address": address, "headers": headers or {}, "actions": actions})
    done = subprocess.run([python, "-c", CLIENT_SCRIPT], input=job, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def spec(a: np.ndarray, datatype: str | None = None) -> dict[str, Any]:
    names = {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "float64": "FP64", "int32": "INT32", "int64": "INT64"}
    return {"datatype": datatype or names[a.dtype.name], "shape": list(a.shape), "data": a.astype(np.float64).reshape(-1).tolist()}


def infer(model: str, parameters: dict[str, Any] | None = None, outputs: list[str] | None = None, **inputs: np.ndarray) -> dict[str, Any]:
    return {"do": "infer", "model": model, "inputs": {k: spec(v) for k, v in inputs.items()}, "parameters": parameters, "outputs": outputs}


def value(output: dict[str, Any]) -> np.ndarray:
    return np.array(output["data"], np.float64).reshape(output["shape"])


def cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x.astype(np.float64), y.astype(np.float64)
    nx = np.sqrt(np.maximum((x * x).sum(1), 1e-12))
    ny = np.sqrt(np.maximum((y * y).sum(1), 1e-12))
    return (x * y).sum(1) / (nx * ny)


RNG = np.random.default_rng(11)
X = RNG.standard_normal((6, 5)).astype(np.float32)
Y = RNG.standard_normal((6, 5)).astype(np.float32)


# ---- the contract -------------------------------------------------------------------------

# Both sides describe their messages from a FileDescriptorProto: the same code in either
# protobuf version (FieldDescriptor.label is gone from newer ones).
DESCRIBE_MESSAGES = r'''
def describe(file_descriptor):
    from google.protobuf import descriptor_pb2
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    out = {}
    def walk(prefix, messages):
        for m in messages:
            name = f"{prefix}.{m.name}"
            out[name] = {f.name: [f.number, f.type, f.label, f.type_name] for f in m.field}
            walk(name, m.nested_type)
    walk(proto.package, proto.message_type)
    methods = {m.name: [m.input_type, m.output_type, m.client_streaming, m.server_streaming] for s in proto.service for m in s.method}
    return {"messages": out, "methods": methods}
'''
DESCRIBE = DESCRIBE_MESSAGES + """
import json
from tritonclient.grpc import service_pb2
print(json.dumps(describe(service_pb2.DESCRIPTOR)))
"""


def _describe_ours() -> dict[str, Any]:
    scope: dict[str, Any] = {}
    exec(DESCRIBE_MESSAGES, scope)
    return json.loads(json.dumps(scope["describe"](pb.DESCRIPTOR)))


def test_every_message_and_rpc_is_tritons(triton_python: str) -> None:
    """Each message and RPC of our .proto has Triton's full name, fields, numbers, types and
    streaming, read from the descriptors tritonclient itself ships."""
    done = subprocess.run([triton_python, "-c", DESCRIBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout)
    ours = _describe_ours()
    assert ours["messages"], "no messages"
    for name, fields in ours["messages"].items():
        assert theirs["messages"].get(name) == fields, name
    for name, signature in ours["methods"].items():
        assert theirs["methods"][name] == signature, name
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {m.name for m in service.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelStreamInfer",
        "ModelStatistics",
    }


# ---- inference ------------------------------------------------------------------------------


def test_infer_matches_numpy_and_compute(triton_python: str, server: RunningServer, client: Client) -> None:
    x16, y16 = X.astype(np.float16), Y.astype(np.float16)
    x64, y64 = X.astype(np.float64), Y.astype(np.float64)
    xbf = X.astype(ml_dtypes.bfloat16)
    cases = [
        ("Cos", {"X": X}, "Y", np.cos(X.astype(np.float64)), 1e-6),
        ("CosineSimilarity", {"X": X, "Y": Y}, "S", cosine(X, Y), 1e-6),
        ("DotProduct", {"X": X, "Y": Y}, "P", (X.astype(np.float64) * Y).sum(1), 1e-5),
        ("SquaredL2Distance", {"X": X, "Y": Y}, "L", 0.5 * ((X.astype(np.float64) - Y) ** 2).sum(1), 1e-5),
        ("CosineSimilarity", {"X": x16, "Y": y16}, "S", cosine(x16, y16), 2e-3),
        ("DotProduct", {"X": x64, "Y": y64}, "P", (x64 * y64).sum(1), 1e-12),
        ("Cos", {"X": xbf}, "Y", np.cos(xbf.astype(np.float64)), 1e-2),
    ]
    results = tritonclient(triton_python, server.address, [infer(op, **ins) for op, ins, _, _, _ in cases])
    for (op, ins, out, want, tol), got in zip(cases, results):
        assert "error" not in got, got
        dtype = next(iter(ins.values())).dtype
        compute = client.compute(op, ins, [out])[out]
        tensor = got["outputs"][out]
        assert tensor["datatype"] == {"float16": "FP16", "bfloat16": "BF16", "float32": "FP32", "float64": "FP64"}[dtype.name]
        np.testing.assert_allclose(value(tensor), want, rtol=tol, atol=tol, err_msg=op)
        np.testing.assert_array_equal(value(tensor), np.asarray(compute, np.float64), err_msg=f"{op}: Compute differs")
        assert got["model_version"] == "1"


def test_parameters_are_the_operators_arguments(triton_python: str, server: RunningServer, client: Client) -> None:
    q = RNG.standard_normal((3, 4)).astype(np.float32)
    c = RNG.standard_normal((9, 4)).astype(np.float32)
    s = np.array([0.9, -0.3, 0.4, 0.1], np.float32)
    labels = np.array([1, -1, -1, -1], np.int32)
    results = tritonclient(triton_python, server.address, [
        infer("CosineTopK", {"k": 4}, Q=q, C=c),
        infer("CosineEmbeddingCriterion", {"margin": 0.25}, S=s, Y=labels),
        infer("CosineEmbeddingCriterion", {"margin": 1}, S=s, Y=labels),  # an int64 parameter for a float argument
        infer("CosineEmbeddingCriterion", {"margin": "wide"}, S=s, Y=labels),
        infer("CosineEmbeddingCriterion", {"no_such": True}, S=s, Y=labels),
    ])
    topk, margin, int_margin, bad_type, unknown = results
    sims = np.array([cosine(np.repeat(q[i : i + 1], len(c), 0), c) for i in range(len(q))])
    order = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    assert topk["names"] == ["Scores", "Indices"]
    assert topk["outputs"]["Indices"]["datatype"] == "INT64"
    np.testing.assert_array_equal(value(topk["outputs"]["Indices"]), order)
    np.testing.assert_allclose(value(topk["outputs"]["Scores"]), np.take_along_axis(sims, order, 1), rtol=1e-6, atol=1e-6)
    mine = client.compute("CosineTopK", {"Q": q, "C": c}, ["Scores", "Indices"], k=4)
    np.testing.assert_array_equal(value(topk["outputs"]["Indices"]), np.asarray(mine["Indices"]))
    for got, m in ((margin, 0.25), (int_margin, 1.0)):
        want = np.where(labels == 1, 1 - s.astype(np.float64), np.maximum(0, s.astype(np.float64) - m))
        np.testing.assert_allclose(value(got["outputs"]["loss"]), want, rtol=1e-6, atol=1e-7)
    assert bad_type["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "margin" in bad_type["error"]["message"]
    assert unknown["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "no_such" in unknown["error"]["message"]


def test_typed_contents_and_requested_outputs(triton_python: str, server: RunningServer) -> None:
    g = RNG.standard_normal(6).astype(np.float32)
    x64 = X.astype(np.float64)
    results = tritonclient(triton_python, server.address, [
        {"do": "typed", "model": "CosineSimilarity", "inputs": {
            "X": {"datatype": "FP32", "shape": [6, 5], "field": "fp32_contents", "data": X.reshape(-1).tolist()},
            "Y": {"datatype": "FP32", "shape": [6, 5], "field": "fp32_contents", "data": Y.reshape(-1).tolist()}}},
        {"do": "typed", "model": "DotProduct", "inputs": {
            "X": {"datatype": "FP64", "shape": [6, 5], "field": "fp64_contents", "data": x64.reshape(-1).tolist()},
            "Y": {"datatype": "FP64", "shape": [6, 5], "field": "fp64_contents", "data": x64.reshape(-1).tolist()}}},
        infer("DotProductGradient", outputs=["dY"], X=X, Y=Y, dP=g),
        infer("DotProductGradient", outputs=["dY", "dX"], X=X, Y=Y, dP=g),
        infer("DotProductGradient", outputs=["dZ"], X=X, Y=Y, dP=g),
    ])
    typed, typed64, only_dy, both, unknown = results
    np.testing.assert_allclose(value(typed["outputs"]["S"]), cosine(X, Y), rtol=1e-6, atol=1e-6)
    assert typed["contents_set"] == [False]  # outputs always come back raw
    np.testing.assert_allclose(value(typed64["outputs"]["P"]), (x64 * x64).sum(1), rtol=1e-12)
    # DotProduct's gradient: dX = dP * Y, dY = dP * X.
    assert only_dy["names"] == ["dY"]
    np.testing.assert_allclose(value(only_dy["outputs"]["dY"]), g[:, None].astype(np.float64) * X, rtol=1e-6, atol=1e-6)
    assert both["names"] == ["dY", "dX"]
    np.testing.assert_allclose(value(both["outputs"]["dX"]), g[:, None].astype(np.float64) * Y, rtol=1e-6, atol=1e-6)
    assert unknown["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "dZ" in unknown["error"]["message"]


def test_errors_have_the_codes_compute_gives(triton_python: str, server: RunningServer, client: Client) -> None:
    cases = [
        ("CosineSimilarity", {"X": X, "Y": Y[:, :3]}, ["S"]),  # wrong shape
        ("Cos", {"X": np.arange(4, dtype=np.int32)}, ["Y"]),  # wrong dtype
        ("CosineSimilarity", {"X": X, "Y": Y.astype(np.float64)}, ["S"]),  # floating dtypes differ
    ]
    results = tritonclient(
        triton_python, server.address,
        [infer(op, **ins) for op, ins, _ in cases] + [infer("CosineSimilarty", X=X, Y=Y), infer("Nothing", X=X)],
    )
    for (op, ins, outs), got in zip(cases, results):
        with pytest.raises(CosserveRpcError) as raised:
            client.compute(op, ins, outs)
        assert got["error"]["status"] == f"StatusCode.{raised.value.code().name}", (op, got)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert op in got["error"]["message"]
    typo, nothing = results[-2:]
    assert typo["error"]["status"] == "StatusCode.NOT_FOUND"
    assert "did you mean 'CosineSimilarity'" in typo["error"]["message"]
    assert nothing["error"]["status"] == "StatusCode.NOT_FOUND"


def test_stream_infer_answers_in_order_with_errors_inline(triton_python: str, server: RunningServer) -> None:
    requests = [infer("Cos", X=X), infer("CosineSimilarity", X=X, Y=Y[:, :2]), infer("CosineSimilarity", X=X, Y=Y), infer("Coss", X=X)]
    for i, r in enumerate(requests):
        r["id"] = f"r{i}"
    (answers,) = tritonclient(triton_python, server.address, [{"do": "stream", "requests": requests}])
    first, bad_shape, third, unknown = answers
    np.testing.assert_allclose(value(first["outputs"]["Y"]), np.cos(X.astype(np.float64)), rtol=1e-6, atol=1e-7)
    assert first["id"] == "r0" and third["id"] == "r2"
    assert "CosineSimilarity" in bad_shape["error"]["message"]
    np.testing.assert_allclose(value(third["outputs"]["S"]), cosine(X, Y), rtol=1e-6, atol=1e-6)
    assert "did you mean 'Cos'" in unknown["error"]["message"]


# ---- metadata, readiness, statistics --------------------------------------------------------


def test_metadata_and_readiness(triton_python: str, server: RunningServer) -> None:
    actions = [
        {"do": "live"}, {"do": "ready"}, {"do": "server_metadata"},
        {"do": "model_ready", "model": "Cos"}, {"do": "model_ready", "model": "Cos", "version": "1"},
        {"do": "model_ready", "model": "Cos", "version": "2"}, {"do": "model_ready", "model": "Sin"},
        {"do": "model_metadata", "model": "Sin"}, {"do": "model_metadata", "model": "Cos", "version": "7"},
    ] + [{"do": "model_metadata", "model": name} for name in sorted(REGISTRY)]
    live, ready, server_metadata, cos, cos1, cos2, sin, sin_meta, cos7, *metadata = tritonclient(triton_python, server.address, actions)
    assert (live, ready, cos, cos1, cos2, sin) == (True, True, True, True, False, False)
    assert server_metadata["name"] == "cosserve"
    assert set(server_metadata["extensions"]) == {"parameters", "statistics"}
    assert sin_meta["error"]["status"] == "StatusCode.NOT_FOUND"
    assert cos7["error"]["status"] == "StatusCode.NOT_FOUND"
    for name, meta in zip(sorted(REGISTRY), metadata):
        schema = REGISTRY[name].schema
        assert meta["name"] == name and meta["versions"] == ["1"]
        assert [i["name"] for i in meta["inputs"]] == [i.name for i in schema.inputs]
        assert [o["name"] for o in meta["outputs"]] == list(schema.outputs)
        for tensor in meta["inputs"] + meta["outputs"]:
            assert tensor["shape"] == ["-1"]  # int64 in protobuf's JSON
            assert tensor["datatype"] in ("FP32", "INT32", "INT64")


def test_metadata_datatypes_are_what_the_ops_return(server: RunningServer) -> None:
    """For every op with a sample in tests/op_db.py: a float32 infer's outputs have the datatypes
    ModelMetadata lists (checked here with our own stubs, no tritonclient needed)."""
    with grpc.insecure_channel(server.address) as channel:
        meta_call = channel.unary_unary(SERVICE + "ModelMetadata", pb.ModelMetadataRequest.SerializeToString, pb.ModelMetadataResponse.FromString)
        infer_call = channel.unary_unary(SERVICE + "ModelInfer", pb.ModelInferRequest.SerializeToString, pb.ModelInferResponse.FromString)
        for entry in OP_DB.values():
            meta = meta_call(pb.ModelMetadataRequest(name=entry.name), timeout=10)
            sample = entry.samples(np.random.default_rng(0))[0]
            request = pb.ModelInferRequest(model_name=entry.name)
            for spec_, array in zip(REGISTRY[entry.name].schema.inputs, sample.inputs):
                a = array.astype(np.float32) if array.dtype.kind == "f" else array.astype(np.int32)
                request.inputs.add(name=spec_.name, datatype="FP32" if a.dtype == np.float32 else "INT32", shape=a.shape)
                request.raw_input_contents.append(a.tobytes())
            for k, v in sample.args.items():
                p = request.parameters[k]
                if isinstance(v, bool):
                    p.bool_param = v
                elif isinstance(v, int):
                    p.int64_param = v
                else:
                    p.double_param = float(v)
            reply = infer_call(request, timeout=30)
            assert [(o.name, o.datatype) for o in reply.outputs] == [(o.name, o.datatype) for o in meta.outputs], entry.name


def test_statistics_count_successes_and_failures(triton_python: str) -> None:
    running = start_server()  # its own server: counts start at zero
    try:
        results = tritonclient(triton_python, running.address, [
            infer("Cos", X=X), infer("Cos", X=X), infer("Cos", X=X), infer("Cos", X=np.arange(3, dtype=np.int32)),
            infer("Coss", X=X),
            {"do": "statistics", "model": "Cos"}, {"do": "statistics"}, {"do": "statistics", "model": "Coss"},
        ])
    finally:
        running.stop(0)
    cos, every, unknown = results[-3:]
    (stats,) = cos["model_stats"]
    assert stats["name"] == "Cos" and stats["version"] == "1"
    inference = stats["inference_stats"]
    assert int(stats["inference_count"]) == int(stats["execution_count"]) == 3
    assert int(inference["success"]["count"]) == 3 and int(inference["fail"]["count"]) == 1
    assert int(inference["success"]["ns"]) > 0
    for part in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(inference[part]["count"]) == 3, part
    assert int(inference["compute_infer"]["ns"]) <= int(inference["success"]["ns"])
    assert abs(int(stats["last_inference"]) / 1000 - time.time()) < 120
    assert [m["name"] for m in every["model_stats"]] == sorted(REGISTRY)
    assert all("inference_count" not in m for m in every["model_stats"] if m["name"] != "Cos")  # zero: left out of JSON
    assert unknown["error"]["status"] == "StatusCode.NOT_FOUND"


# ---- auth -----------------------------------------------------------------------------------


def test_auth_token_guards_the_inference_service(triton_python: str) -> None:
    running = start_server(auth_token=TOKEN)
    try:
        actions = [{"do": "live"}, infer("Cos", X=X), {"do": "model_metadata", "model": "Cos"}]
        refused = tritonclient(triton_python, running.address, actions)
        wrong = tritonclient(triton_python, running.address, actions[1:2], headers={"authorization": "Bearer nope"})
        accepted = tritonclient(triton_python, running.address, actions, headers={"authorization": f"Bearer {TOKEN}"})
    finally:
        running.stop(0)
    for got in refused[1:] + wrong:
        assert got["error"]["status"] == "StatusCode.UNAUTHENTICATED", got
    # is_server_live raises too, which the script reports as an error
    assert isinstance(refused[0], dict) and refused[0]["error"]["status"] == "StatusCode.UNAUTHENTICATED"
    live, cos, meta = accepted
    assert live is True and meta["name"] == "Cos"
    np.testing.assert_allclose(value(cos["outputs"]["Y"]), np.cos(X.astype(np.float64)), rtol=1e-6, atol=1e-7)


def test_metrics_request_ids_and_message_limits_cover_inference_calls() -> None:
    import urllib.request

    from cosserve import limits
    from cosserve.server.edge.observability import REQUEST_ID_KEY

    running = start_server_with_metrics()
    try:
        with grpc.insecure_channel(running.address, options=[("grpc.max_send_message_length", -1)]) as channel:
            live = channel.unary_unary(SERVICE + "ServerLive", pb.ServerLiveRequest.SerializeToString, pb.ServerLiveResponse.FromString)
            assert live(pb.ServerLiveRequest(), timeout=10).live
            infer_call = channel.unary_unary(SERVICE + "ModelInfer", pb.ModelInferRequest.SerializeToString, pb.ModelInferResponse.FromString)
            _, call = infer_call.with_call(_cos_request(X), timeout=30, metadata=((REQUEST_ID_KEY, "oip-req-1"),))
            assert (REQUEST_ID_KEY, "oip-req-1") in tuple(call.trailing_metadata())
            # A request past the server's message limit is refused by grpc before it is read whole.
            huge = np.zeros(limits.MAX_MESSAGE_BYTES // 4 + 1024, np.float32)
            with pytest.raises(grpc.RpcError) as raised:
                infer_call(_cos_request(huge), timeout=30)
            assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        running.stop(0)
    assert 'cosserve_rpcs_total{code="OK",method="ServerLive"} 1.0' in text
    assert 'cosserve_rpcs_total{code="OK",method="ModelInfer"} 1.0' in text
    assert 'cosserve_op_seconds_count{device="cpu",op="Cos"} 1.0' in text
    assert f'cosserve_tensor_bytes_total{{direction="in",method="ModelInfer"}} {float(X.nbytes)}' in text


# ---- hostile bytes ----------------------------------------------------------------------------


def _cos_request(x: np.ndarray, shape: list[int] | None = None, data: bytes | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="Cos")
    request.inputs.add(name="X", datatype="FP32", shape=list(x.shape) if shape is None else shape)
    request.raw_input_contents.append(x.tobytes() if data is None else data)
    return request


def _infer_raw(channel: grpc.Channel, request: pb.ModelInferRequest | bytes) -> pb.ModelInferResponse:
    call = channel.unary_unary(SERVICE + "ModelInfer", None if isinstance(request, bytes) else pb.ModelInferRequest.SerializeToString, pb.ModelInferResponse.FromString)
    return call(request, timeout=30)


def _code(channel: grpc.Channel, request: pb.ModelInferRequest | bytes) -> tuple[grpc.StatusCode, str]:
    try:
        _infer_raw(channel, request)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_hostile_requests_are_precise_refusals(server: RunningServer) -> None:
    garbage = [b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)) * 4]
    with grpc.insecure_channel(server.address) as channel:
        for method in ("ModelInfer", "ModelMetadata", "ModelReady", "ModelStatistics", "ServerMetadata"):
            call = channel.unary_unary(SERVICE + method)
            for body in garbage:
                with pytest.raises(grpc.RpcError) as raised:
                    call(body, timeout=10)
                assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, body[:8])
        stream = channel.stream_stream(SERVICE + "ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as raised:
            list(stream(iter([_cos_request(X).SerializeToString(), garbage[0]]), timeout=10))
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        def bad(**changes: Any) -> pb.ModelInferRequest:
            request = _cos_request(X)
            for key, value_ in changes.items():
                if key == "datatype":
                    request.inputs[0].datatype = value_
                elif key == "shape":
                    request.inputs[0].shape[:] = value_
                elif key == "raw":
                    request.raw_input_contents[:] = value_
                elif key == "contents":
                    del request.raw_input_contents[:]
                    request.inputs[0].contents.fp32_contents.extend(value_)
            return request

        cases = {
            "short raw": bad(raw=[X.tobytes()[:-1]]),
            "long raw": bad(raw=[X.tobytes() + b"\0"]),
            "two raw for one input": bad(raw=[X.tobytes(), X.tobytes()]),
            "huge shape": bad(shape=[1 << 31, 1 << 31]),
            "shape past 2**63 bytes": bad(shape=[1 << 40, 1 << 40]),
            "negative dim": bad(shape=[-1, 30]),
            "huge shape, typed": bad(shape=[1 << 40], contents=[1.0]),
            "unknown datatype": bad(datatype="BYTES"),
            "UINT16": bad(datatype="UINT16"),
            "FP16 as contents": bad(datatype="FP16", contents=[1.0] * 30),
        }
        mixed = _cos_request(X)
        mixed.inputs[0].contents.fp32_contents.append(1.0)
        cases["contents and raw"] = mixed
        shm = _cos_request(X)
        shm.inputs[0].parameters["shared_memory_region"].string_param = "/dev/shm/x"
        cases["shared memory"] = shm
        missing = pb.ModelInferRequest(model_name="CosineSimilarity")
        missing.inputs.add(name="X", datatype="FP32", shape=[1, 1])
        missing.raw_input_contents.append(b"\0" * 4)
        cases["missing input"] = missing
        twice = _cos_request(X)
        twice.inputs.add(name="X", datatype="FP32", shape=[6, 5])
        twice.raw_input_contents.append(X.tobytes())
        cases["input twice"] = twice
        empty_param = _cos_request(X)
        empty_param.parameters["x"].Clear()
        empty_param.parameters["x"].SetInParent()
        cases["parameter without value"] = empty_param
        started = time.perf_counter()
        for name, request in cases.items():
            code, details = _code(channel, request)
            assert code is grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
            assert 0 < len(details) < 2048, name
        assert time.perf_counter() - started < 20  # refused from the header, nothing allocated
        # An output that would pass one reply's limit is refused before the op runs.
        big = pb.ModelInferRequest(model_name="CosineSimilarityMatrix")
        a = np.ones((8192, 1), np.float32)  # S would be 8192 x 8192 float32: 256 MiB
        for input_name in ("Q", "C"):
            big.inputs.add(name=input_name, datatype="FP32", shape=[8192, 1])
            big.raw_input_contents.append(a.tobytes())
        code, details = _code(channel, big)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, details
        # And the server still answers.
        reply = _infer_raw(channel, _cos_request(X))
        np.testing.assert_allclose(np.frombuffer(reply.raw_output_contents[0], np.float32), np.cos(X).reshape(-1), rtol=1e-6)


def test_reflection_lists_the_inference_service(server: RunningServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "inference.GRPCInferenceService" in names and "cosserve.v1.Cosserve" in names


def test_stubs_stay_out_of_the_client_package() -> None:
    """`import cosserve` must not load the inference stubs: a program that uses tritonclient
    beside cosserve's client would clash in protobuf's descriptor pool."""
    code = "import sys, cosserve, cosserve.client; print('cosserve.inference.grpc_service_pb2' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_readme_example_runs_with_tritonclient(triton_python: str, server: RunningServer) -> None:
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Open Inference Protocol (KServe v2 / Triton)") :]
    (example,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    code = example.replace('"127.0.0.1:50051"', repr(server.address))
    code += "\nimport json\nprint(json.dumps({'s': s.tolist(), 'x': x.tolist(), 'y': y.tolist(), 'indices': indices.tolist()}))\n"
    done = subprocess.run([triton_python, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    x, y = np.array(got["x"]), np.array(got["y"])
    np.testing.assert_allclose(got["s"], cosine(x, y), rtol=1e-5, atol=1e-6)
    sims = np.array([cosine(np.repeat(x[i : i + 1], len(y), 0), y) for i in range(len(x))])
    np.testing.assert_array_equal(got["indices"], np.argsort(-sims, axis=1, kind="stable")[:, :2])


FUZZ_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_fuzzed_infer_requests_get_precise_codes(server: RunningServer) -> None:
    """Hypothesis builds ModelInferRequests from near-valid parts (real and misspelt models and
    inputs, every datatype and some that are not, shapes with huge and negative dimensions, raw
    bytes of any length, typed contents, parameters of every kind): every answer is OK or a
    precise refusal, never UNKNOWN or INTERNAL, with bounded details; the server then still
    computes Cos right."""
    import os

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    models = sorted(REGISTRY) + ["", "cos", "Cos ", "x" * 300]
    names = ["X", "Y", "S", "Q", "C", "dY", "dP", "", "é" * 40]
    datatypes = ["FP32", "FP64", "FP16", "BF16", "INT32", "INT64", "INT8", "INT16", "UINT8", "BOOL", "BYTES", "UINT64", "", "fp32"]
    dims = st.one_of(st.integers(0, 6), st.sampled_from([-1, -(1 << 62), 1 << 31, 1 << 40, (1 << 63) - 1]))
    parameter = st.one_of(
        st.builds(lambda v: pb.InferParameter(bool_param=v), st.booleans()),
        st.builds(lambda v: pb.InferParameter(int64_param=v), st.integers(-(1 << 63), (1 << 63) - 1)),
        st.builds(lambda v: pb.InferParameter(double_param=v), st.floats(allow_nan=True)),
        st.builds(lambda v: pb.InferParameter(string_param=v), st.text(max_size=20)),
        st.builds(lambda v: pb.InferParameter(uint64_param=v), st.integers(0, (1 << 64) - 1)),
        st.just(pb.InferParameter()),
    )
    tensor = st.tuples(st.sampled_from(names), st.sampled_from(datatypes), st.lists(dims, max_size=3),
                       st.one_of(st.none(), st.binary(max_size=200)), st.lists(st.floats(width=32), max_size=12))
    @st.composite
    def request_strategy(draw: Any) -> Any:
        model_name = draw(st.sampled_from(models))
        tensors = draw(st.lists(tensor, max_size=3))
        schema = REGISTRY.get(model_name)
        if schema is not None and draw(st.booleans()):
            # Mostly the op's own inputs, by name and in order, so the requests get past the
            # names to the headers, the bytes and the op's checks.
            own = [i.name for i in schema.schema.inputs]
            tensors = [(n, *draw(tensor)[1:]) for n in own]
            if draw(st.booleans()):
                tensors = [(n, "FP32", [2, 3], np.ones((2, 3), np.float32).tobytes(), []) for n in own]
                spoilt = draw(st.integers(0, len(own) - 1))
                tensors[spoilt] = (own[spoilt], *draw(tensor)[1:])
        version = draw(st.sampled_from(["", "1", "2"]))
        parameters = draw(st.dictionaries(st.sampled_from(["k", "margin", "replicate", "nope", "priority"]), parameter, max_size=2))
        outputs = draw(st.lists(st.sampled_from(names), max_size=3))
        return model_name, version, tensors, parameters, outputs

    def build(parts: Any) -> pb.ModelInferRequest:
        model_name, version, tensors, parameters, outputs = parts
        request = pb.ModelInferRequest(model_name=model_name, model_version=version)
        for key, value_ in parameters.items():
            request.parameters[key].CopyFrom(value_)
        for name, datatype, shape, raw, contents in tensors:
            item = request.inputs.add(name=name, datatype=datatype, shape=shape)
            if raw is not None:
                request.raw_input_contents.append(raw)
            elif datatype in ("FP64",):
                item.contents.fp64_contents.extend(contents)
            elif datatype in ("INT32", "INT8", "INT16"):
                item.contents.int_contents.extend(int(c) if np.isfinite(c) and abs(c) < 2**31 else 0 for c in contents)
            else:
                item.contents.fp32_contents.extend(contents)
        for name in outputs:
            request.outputs.add(name=name)
        return request

    examples = int(os.environ.get("COSSERVE_FUZZ_EXAMPLES", "300"))
    with grpc.insecure_channel(server.address) as channel:

        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(request_strategy())
        def one(parts: Any) -> None:
            code, details = _code(channel, build(parts))
            assert code in FUZZ_OK, (code, details)
            assert len(details.encode()) < 2048

        one()
        reply = _infer_raw(channel, _cos_request(X))
    np.testing.assert_allclose(np.frombuffer(reply.raw_output_contents[0], np.float32), np.cos(X).reshape(-1), rtol=1e-6)


README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_says_perf_analyzer_works_only_once_model_config_is_served(server):
    """perf_analyzer asks for ModelConfig first; the README said it worked while ModelConfig was
    UNIMPLEMENTED (issue 21, item 9)."""
    with grpc.insecure_channel(server.address) as channel:
        try:
            channel.unary_unary(SERVICE + "ModelConfig")(b"", timeout=10)  # an empty ModelConfigRequest
            served = True
        except grpc.RpcError as err:
            served = err.code() != grpc.StatusCode.UNIMPLEMENTED  # NOT_FOUND for model '' is served
    sentences = [s for s in re.split(r"(?<=\.)\s+", " ".join(README.read_text().split())) if "perf_analyzer" in s]
    assert sentences, "the README no longer names perf_analyzer"
    if not served:
        assert all("does not work yet" in s and "UNIMPLEMENTED" in s for s in sentences), sentences
