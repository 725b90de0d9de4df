"""The Open Inference Protocol servicer (inference.GRPCInferenceService): messages to core calls and back.

Registered beside cosserve's own service on the same port, behind the same interceptors (auth,
limits, metrics, request ids, the error table). The REST binding (rest.py) serves the same
instance: its `infer`, `statistics` and `server_metadata`. The model view, the decoding of requests and the
statistics are in server/protocols/oip.py; the op runs as Compute runs it (engine.compute on the
Workers pool).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from grpc import aio

from cosserve import __version__, limits
from cosserve.inference import grpc_service_pb2 as pb
from cosserve.server.compute import engine
from cosserve.server.compute.workers import Workers
from cosserve.server.edge.interceptors import HANDLER_KINDS
from cosserve.server.edge.metrics import Metrics
from cosserve.server.edge.status import bounded
from cosserve.server.errors import CosserveError
from cosserve.server.protocols import oip
from cosserve.server.settings import Settings
from cosserve.server.state.workspace import resolve_device

__all__ = ["SERVICE_NAME", "InferenceServicer", "add_to_server"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name

# Room in a reply for everything but the outputs' bytes, as Compute leaves it.
_MAX_REPLY_BYTES = limits.MAX_MESSAGE_BYTES - 64 * 1024


class InferenceServicer:
    """Every RPC of inference.GRPCInferenceService that cosserve serves, as coroutines on the
    server's event loop. Domain errors are mapped to status codes by interceptors.ErrorInterceptor."""

    def __init__(self, settings: Settings, workers: Workers, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.workers = workers
        self.metrics = metrics
        self.statistics = oip.Statistics()
        self._observe_op = metrics.observe_op if metrics is not None else None

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        # A draining server refuses new calls outright, so one that answers is ready.
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=oip.is_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext) -> pb.ServerMetadataResponse:
        return self.server_metadata()

    def server_metadata(self) -> pb.ServerMetadataResponse:
        """The server's name, version and protocol extensions, for either binding."""
        return pb.ServerMetadataResponse(name="cosserve", version=__version__, extensions=oip.EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext) -> pb.ModelMetadataResponse:
        return oip.model_metadata(request.name, request.version)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: aio.ServicerContext) -> pb.ModelConfigResponse:
        return oip.model_config(request.name, request.version)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        return await self.infer(request, "ModelInfer")

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # One request at a time, answered in order: a stream holds one request's tensors at most.
        async for request in requests:
            try:
                response = await self.infer(request, "ModelStreamInfer")
            except CosserveError as err:
                # As Triton does: the request's error in its answer, and the stream goes on.
                yield pb.ModelStreamInferResponse(error_message=bounded(str(err)))
                continue
            yield pb.ModelStreamInferResponse(infer_response=response)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: aio.ServicerContext) -> pb.ModelStatisticsResponse:
        return self.statistics.message(request.name, request.version)

    async def infer(self, request: pb.ModelInferRequest, method: str) -> pb.ModelInferResponse:
        """One inference, run as Compute runs its op, with its times counted for its model (a
        request for an unknown model has no model to count it for). Both bindings call it: gRPC's
        ModelInfer and ModelStreamInfer, and REST's infer (server/edge/rest.py), `method` naming
        which in the tensor-byte metrics."""
        started = time.perf_counter_ns()
        name = request.model_name
        found = oip.model(name, request.model_version)  # NOT_FOUND before anything is counted
        try:
            device = resolve_device("", self.settings.device)
            decoded = oip.decode_request(found, request, device)
            submitted = time.perf_counter_ns()
            outputs, run_started, run_finished = await self.workers.run(
                decoded.nbytes, oip.timed, engine.compute, decoded.call, decoded.inputs, _MAX_REPLY_BYTES, self._observe_op
            )
            response = oip.encode_response(request, decoded, outputs)
        except Exception:
            self.statistics.failed(name, time.perf_counter_ns() - started)
            raise
        finished = time.perf_counter_ns()
        self.statistics.succeeded(
            name,
            total_ns=finished - started,
            queue_ns=run_started - submitted,
            input_ns=submitted - started,
            infer_ns=run_finished - run_started,
            output_ns=finished - run_finished,
        )
        if self.metrics is not None:
            self.metrics.count_bytes("in", method, decoded.nbytes)
            self.metrics.count_bytes("out", method, sum(len(b) for b in response.raw_output_contents))
        return response


def add_to_server(servicer: InferenceServicer, server: aio.Server) -> None:
    """Register every RPC of the service descriptor on `server`, with protobuf (de)serializers;
    interceptors.ErrorInterceptor answers bytes that do not parse with INVALID_ARGUMENT."""
    handlers = {}
    for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        _, factory = HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = factory(
            getattr(servicer, method.name),
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
