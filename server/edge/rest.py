"""The Open Inference Protocol over HTTP/REST (KServe v2's REST binding, as Triton serves it), on --http-port.

aiohttp on the server's one event loop, beside grpc.aio: the same InferenceServicer core
(inference_servicer.py: statistics, the Workers pool, metrics), the same identities, TLS files,
request ids, metrics and error table as the gRPC port. What gRPC's interceptors do for a call,
`_Edge.middleware` does for a request: request id, authentication, the concurrency limit,
metrics, and every error as `{"error": "..."}` with the HTTP status of its gRPC code
(status.HTTP_STATUS). The JSON and binary tensor data are translated in
server/protocols/oip_rest.py.

A body is bounded before it is read: a declared Content-Length over MAX_BODY_BYTES is refused
(413) without reading a byte, also when the client waits for `Expect: 100-continue`; a chunked
one stops at the limit; a sender that stalls mid-body is cut off after BODY_IDLE_S.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import http_exceptions, web

from cosserve import limits
from cosserve.server.edge import observability
from cosserve.server.edge.inference_servicer import InferenceServicer
from cosserve.server.edge.metrics import Metrics
from cosserve.server.edge.status import HTTP_STATUS, bounded, status_of
from cosserve.server.edge.tls import TlsWatcher
from cosserve.server.errors import InvalidArgument, Unauthenticated
from cosserve.server.protocols import oip, oip_rest
from cosserve.server.settings import Settings, TlsFiles
from cosserve.server.state import identity
from cosserve.server.state.identity import Identities

__all__ = ["BODY_IDLE_S", "MAX_BODY_BYTES", "RestServer", "error_response", "tls_context"]

log = logging.getLogger("cosserve.server")

# The largest body: gRPC's largest message, so a tensor either binding takes the other takes too.
MAX_BODY_BYTES = limits.MAX_MESSAGE_BYTES
# A sender that sends no byte of its body for this long is answered 408 and cut off (or sooner,
# with a shorter --max-connection-idle-s).
BODY_IDLE_S = 10.0
# After an answer sent before the body was read (413, 401), the rest of the body is read and
# dropped for at most this long, so the client sees the answer, then the connection is closed.
_LINGER_S = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Paths anyone may ask, as gRPC's health service is open: a probe carries no key.
_OPEN = frozenset({"ServerLive", "ServerReady"})
# The gRPC service a REST path stands for, in its spans' rpc.service.
_SERVICE = "inference.GRPCInferenceService"
# A certificate's attribute names as RFC 4514 writes them (grpc's x509_subject, OpenSSL's RFC 2253).
_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
    "localityName": "L", "stateOrProvinceName": "ST", "streetAddress": "STREET", "domainComponent": "DC",
    "userId": "UID",
}


class _MalformedHttpNoise(logging.Filter):
    """Drops aiohttp's log line, with traceback, for bytes that are not HTTP: it writes one for
    each (answering 400 and closing the connection), so anyone could fill the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, http_exceptions.HttpProcessingError)


_MALFORMED_HTTP_NOISE = _MalformedHttpNoise()


def error_response(status: int, message: str, request_id: str) -> web.Response:
    """`{"error": message}` with `status`, the message bounded as gRPC's status details are."""
    response = web.json_response({"error": bounded(message)}, status=status)
    response.headers[observability.REQUEST_ID_KEY] = request_id
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="cosserve"'
    return response


def _subject(request: web.Request) -> str | None:
    """The verified client certificate's subject in RFC 4514 text (as grpc gives it), or None."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
    certificate = ssl_object.getpeercert() if ssl_object is not None else None
    if not certificate:
        return None
    parts = []
    for rdn in reversed(certificate.get("subject", ())):
        attributes = []
        for name, value in rdn:
            escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
            if escaped[:1] in (" ", "#"):
                escaped = "\\" + escaped
            if escaped.endswith(" "):
                escaped = escaped[:-1] + "\\ "
            attributes.append(f"{_SHORT_NAMES.get(name, name)}={escaped}")
        parts.append("+".join(attributes))
    return ",".join(parts) or None


class _Edge:
    """What the gRPC interceptors do, for a REST request."""

    def __init__(self, settings: Settings, identities: Identities | None, metrics: Metrics | None) -> None:
        self.identities = identities
        self.metrics = metrics
        self.max_in_flight = settings.max_concurrent_rpcs
        self.in_flight = 0
        self.draining = False  # set by RestServer.stop: new requests are refused, those in flight finish

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rpc = _rpc_name(request)
        # The server span of the request, as the gRPC door's TracingInterceptor opens one per call
        # (a shared no-op while traces are off); a `traceparent` header continues the caller's trace.
        attributes = {"http.request.method": request.method, "url.path": request.path[:200]}
        with observability.call_span("http", _SERVICE, rpc, request.headers.items(), attributes) as span:
            response = await self._answer(request, handler, rpc)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:  # OpenTelemetry's HTTP convention: only 5xx are the server's errors
                span.set_error(str(response.status))
        return response

    async def _answer(self, request: web.Request, handler: Handler, rpc: str) -> web.StreamResponse:
        """The request's response, with the request id, authentication, limits, metrics and the
        error table applied."""
        request_id = observability.request_id_of((k.lower(), v) for k, v in request.headers.items())
        # Set in the request's own task: its log lines, and the work it hands to Workers, carry it.
        observability.REQUEST_ID.set(request_id)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        response: web.StreamResponse
        self.in_flight += 1
        try:
            if self.draining:
                code = grpc.StatusCode.UNAVAILABLE
                response = error_response(HTTP_STATUS[code], "the server is shutting down; retry on another", request_id)
                response.force_close()
            elif self.in_flight > self.max_in_flight:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                response = error_response(
                    HTTP_STATUS[code], f"more than {self.max_in_flight} requests at once (--max-concurrent-rpcs); retry later", request_id
                )
            else:
                self.authenticate(request, rpc)
                response = await handler(request)
        except web.HTTPException as err:  # aiohttp's own answers: no such path (404), method (405)
            code = grpc.StatusCode.NOT_FOUND if err.status == 404 else grpc.StatusCode.INVALID_ARGUMENT
            response = error_response(err.status, f"{request.method} {request.path[:200]}: {err.reason}", request_id)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except _BodyRefused as err:  # answered, then the connection closed: its body was not read to its end
            code = err.code
            response = error_response(err.http_status, str(err), request_id)
            response.force_close()
        except Exception as err:  # noqa: BLE001  (a domain error's status, else our bug: 500)
            found = status_of(err)
            if found is not None:
                code = found
                response = error_response(HTTP_STATUS[code], str(err), request_id)
            else:
                error_id = secrets.token_hex(6)
                log.error("internal error %s in REST %s", error_id, rpc, exc_info=err)
                code = grpc.StatusCode.INTERNAL
                message = f"internal error {error_id} in request {request_id}; the server log has the details"
                response = error_response(HTTP_STATUS[code], message, request_id)
            del err
        finally:
            self.in_flight -= 1
            if self.metrics is not None:
                self.metrics.observe(f"REST {rpc}", code.name, time.perf_counter() - started)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("REST %s %s %.1f ms", rpc, code.name, (time.perf_counter() - started) * 1e3)
        response.headers[observability.REQUEST_ID_KEY] = request_id
        return response

    def authenticate(self, request: web.Request, rpc: str) -> None:
        """Sets identity.CALLER, or raises Unauthenticated, as interceptors.AuthInterceptor does."""
        if self.identities is None or rpc in _OPEN:
            return
        headers = [("authorization", v) for v in request.headers.getall("Authorization", ())]
        caller = self.identities.caller(headers, _subject(request))
        if caller is None:
            raise Unauthenticated("missing or wrong bearer token in the 'Authorization' header")
        identity.CALLER.set(caller)


def _rpc_name(request: web.Request) -> str:
    """The gRPC method a route stands for ("ModelInfer"), for metrics and log lines."""
    route = request.match_info.route
    name = route.name if route is not None else None
    return name.split(".", 1)[0] if name else "unknown"


async def _read_body(request: web.Request, idle_s: float) -> bytes:
    """The whole body, refused past MAX_BODY_BYTES before it is read (or, without a declared
    length, as soon as it passes it), and cut off when it stalls for `idle_s`."""
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise InvalidArgument("compressed request bodies (Content-Encoding) are not served; send it uncompressed")
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        raise _TooLarge(declared)
    body = bytearray()
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await request.content.readany()
        except TimeoutError:
            raise _Stalled(idle_s) from None
        except ConnectionError:  # the sender closed before its body's end
            raise _ClientGone() from None
        except http_exceptions.HttpProcessingError as err:  # a chunked body that is not well-formed
            raise InvalidArgument(f"the body is not well-formed HTTP: {err.message}") from None
        if not chunk:
            return bytes(body)
        if len(body) + len(chunk) > MAX_BODY_BYTES:
            raise _TooLarge(None)
        body += chunk


class _BodyRefused(Exception):
    """A body not read to its end: answered with `http_status`, counted as `code`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class _TooLarge(_BodyRefused):
    def __init__(self, declared: int | None) -> None:
        what = f"a body of {declared} bytes" if declared is not None else "a body"
        super().__init__(f"{what} is more than the {MAX_BODY_BYTES} bytes a request may have")


class _Stalled(_BodyRefused):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408

    def __init__(self, idle_s: float) -> None:
        super().__init__(f"the body stalled: no byte for {idle_s:g} s")


class _ClientGone(_BodyRefused):
    """The sender closed before its body's end: the answer goes nowhere."""

    code = grpc.StatusCode.CANCELLED
    http_status = HTTP_STATUS[grpc.StatusCode.CANCELLED]

    def __init__(self) -> None:
        super().__init__("the client closed the connection")


class RestServer:
    """The REST binding's aiohttp application and its listening site."""

    def __init__(self, settings: Settings, servicer: InferenceServicer, identities: Identities | None, metrics: Metrics | None) -> None:
        self.settings = settings
        self.servicer = servicer
        self.edge = _Edge(settings, identities, metrics)
        logging.getLogger("aiohttp.server").addFilter(_MALFORMED_HTTP_NOISE)  # added once
        self.body_idle_s = min(BODY_IDLE_S, settings.max_connection_idle_s or BODY_IDLE_S)
        self.app = web.Application(middlewares=[self.edge.middleware], client_max_size=MAX_BODY_BYTES, handler_args={
            "auto_decompress": False,  # a compressed body is refused, never inflated
            # Also closes a connection whose headers never end (0, "never" for gRPC, is an hour here).
            "keepalive_timeout": settings.max_connection_idle_s or 3630.0,
            "lingering_time": _LINGER_S,
        })
        self._add_routes()
        self._runner: web.AppRunner | None = None
        self.port = 0

    def _add_routes(self) -> None:
        get = self.app.router.add_get
        get("/v2/health/live", self.live, name="ServerLive", allow_head=False)
        get("/v2/health/ready", self.ready, name="ServerReady", allow_head=False)
        get("/v2", self.server_metadata, name="ServerMetadata", allow_head=False)
        get("/v2/models/stats", self.statistics, name="ModelStatistics", allow_head=False)
        for suffix, versioned in (("", ""), ("/versions/{version}", ".version")):
            model = "/v2/models/{model}" + suffix
            get(model, self.model_metadata, name="ModelMetadata" + versioned, allow_head=False)
            get(model + "/ready", self.model_ready, name="ModelReady" + versioned, allow_head=False)
            get(model + "/config", self.model_config, name="ModelConfig" + versioned, allow_head=False)
            get(model + "/stats", self.statistics, name="ModelStatistics.model" + versioned, allow_head=False)
            self.app.router.add_route(
                "POST", model + "/infer", self.infer, name="ModelInfer" + versioned, expect_handler=self._expect
            )

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        """Listen on host:port (0: a free one); return the bound port."""
        # What is still in flight after stop's grace is cancelled at once (aiohttp reads 0 as "wait
        # for ever", hence a hundredth of a second).
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None, shutdown_timeout=0.01)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=tls, reuse_port=False)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server  # aiohttp keeps the asyncio server; its socket has the bound port
        sockets = getattr(server, "sockets", None) or ()
        self.port = int(sockets[0].getsockname()[1]) if sockets else port
        return self.port

    async def stop(self, grace: float | None) -> None:
        """As grpc.aio's stop(grace): stop listening and refuse new requests at once (503), give
        those in flight `grace` seconds (their bodies still arriving), then close every connection.
        aiohttp's own shutdown would stop reading bodies at once, so the wait is here."""
        if self._runner is None:
            return
        runner, self._runner = self._runner, None
        for site in list(runner.sites):
            await site.stop()
        self.edge.draining = True
        deadline = time.monotonic() + (grace or 0)
        while self.edge.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await runner.cleanup()

    # ---- the endpoints (Triton's paths) ----

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: a body over the limit is refused before the client sends it."""
        declared = request.content_length
        if declared is not None and declared > MAX_BODY_BYTES:
            # Answered here, before the middleware (aiohttp asks this first): no metrics for it.
            refused = _TooLarge(declared)
            request_id = observability.request_id_of((k.lower(), v) for k, v in request.headers.items())
            response = error_response(refused.http_status, str(refused), request_id)
            response.force_close()
            return response
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
            # As aiohttp's own handler does: the interim answer is not the response's bytes.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        # A draining server has stopped listening, so one that answers is ready.
        return web.json_response({"ready": True})

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(oip_rest.as_json(self.servicer.server_metadata()))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        found = oip.model(name, version)  # NotFound (404) for a model that is not ready
        return web.json_response({"name": found.name, "ready": True})

    async def model_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(oip_rest.as_json(oip.model_metadata(*_model(request))))

    async def model_config(self, request: web.Request) -> web.Response:
        # Triton's REST answer is the ModelConfig itself, not gRPC's response around it.
        return web.json_response(oip_rest.as_json(oip.model_config(*_model(request)).config))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return web.json_response(oip_rest.as_json(self.servicer.statistics.message(name, version)))

    async def infer(self, request: web.Request) -> web.StreamResponse:
        name, version = _model(request)
        body = await _read_body(request, self.body_idle_s)
        header_length = oip_rest.parse_header_length(request.headers.get(oip_rest.HEADER_LENGTH), len(body))
        message, reply = oip_rest.infer_request(name, version, body, header_length)
        del body  # the inputs are views of their own bytes in `message` from here on
        response = await self.servicer.infer(message, "REST ModelInfer")
        content, json_length = oip_rest.infer_reply(response, reply)
        if json_length is None:
            return web.Response(body=content, content_type="application/json")
        answer = web.Response(body=content, content_type="application/octet-stream")
        answer.headers[oip_rest.HEADER_LENGTH] = str(json_length)
        return answer


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def tls_context(settings: Settings) -> ssl.SSLContext:
    """The REST port's TLS, from the gRPC port's files (--tls-cert, --tls-key, --tls-client-ca);
    files that change are reread at the next handshake, as gRPC rereads them."""
    watcher = TlsWatcher(settings)

    def context_of(files: TlsFiles) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
        if files.client_ca is not None:
            context.load_verify_locations(cadata=files.client_ca.decode("ascii", errors="replace"))
            context.verify_mode = ssl.CERT_REQUIRED
        context.sni_callback = rotate
        return context

    def rotate(ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        # Asked at every handshake, on the context the site was started with: the handshake moves
        # to the newest context.
        files = watcher.changed()
        if files is not None:
            current[0] = context_of(files)
        if current[0] is not context:
            ssl_object.context = current[0]

    current: list[ssl.SSLContext] = []
    current.append(context_of(watcher.current))
    return current[0]
