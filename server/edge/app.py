"""Building and running the gRPC server: `build_server` for tests and embedding, `serve` for main.

The server is grpc.aio on one event loop, run on a thread of its own: calls are coroutines, so an
idle or stalled stream costs memory, never a thread; work too large for the loop goes to the
bounded Workers pool, scoring to the Scorer's thread (see docs/architecture.md).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import signal
import sys
import threading
import time
import warnings
from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from cosserve import datasets, limits
from cosserve.limits import readable_bytes
from cosserve.server import settings as settings_mod
from cosserve.server import tracing
from cosserve.server.compute.scorer import Scorer
from cosserve.server.compute.workers import Workers
from cosserve.server.edge import cosserve_servicer, inference_servicer, listen, observability, rest, tls
from cosserve.server.edge.cosserve_servicer import SERVICE_NAME, CosserveServicer
from cosserve.server.edge.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    RequestIdInterceptor,
    TracingInterceptor,
)
from cosserve.server.edge.metrics import Metrics
from cosserve.server.errors import CosserveError
from cosserve.server.memory import dtype_name
from cosserve.server.settings import Settings
from cosserve.server.state.corpora import Corpora
from cosserve.server.state.durability import Durability
from cosserve.server.state.identity import Identities
from cosserve.server.state.sessions import SessionStore
from cosserve.server.state.workspace import resolve_device

__all__ = ["RunningServer", "build_server", "run", "serve"]

log = logging.getLogger("cosserve.server")

# Name prefixes of the threads that run calls' work (Workers, Scorer).
_WORK_THREADS = ("cosserve-work", "cosserve-score")
# How long the idle threads of the stopped work pools get to end (they take milliseconds).
_IDLE_THREADS_EXIT_S = 1.0
# The longest wait between two looks for idle sessions: an expired session's memory is freed
# within this of its expiry, with no call needed (a shorter timeout looks twice per timeout).
_EXPIRY_PERIOD_S = 0.5


# gRPC reflection v1 (current grpcurl asks for it first), beside v1alpha. grpcio-reflection ships
# only v1alpha (1.85 still), and v1 is v1alpha renamed: the same messages, field for field, so
# v1alpha's servicer answers v1 calls, and v1's file (v1alpha's, package renamed) joins the
# descriptor pool so that v1 can be described too.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_reflection_v1(services: tuple[str, ...], server: aio.Server) -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_REFLECTION_V1_FILE)
    except KeyError:  # the first server of this process
        v1alpha, v1 = reflection_pb2.DESCRIPTOR.package, REFLECTION_V1.rpartition(".")[0]
        proto = descriptor_pb2.FileDescriptorProto()
        reflection_pb2.DESCRIPTOR.CopyToProto(proto)
        proto.name, proto.package = _REFLECTION_V1_FILE, v1
        proto.ClearField("options")  # v1alpha's language package names
        for message in proto.message_type:
            for field in message.field:
                if field.type_name:  # set only on message fields: assigning sets it
                    field.type_name = field.type_name.replace(f".{v1alpha}.", f".{v1}.")
        for method in proto.service[0].method:
            method.input_type = method.input_type.replace(f".{v1alpha}.", f".{v1}.")
            method.output_type = method.output_type.replace(f".{v1alpha}.", f".{v1}.")
        pool.AddSerializedFile(proto.SerializeToString())
    handler = grpc.stream_stream_rpc_method_handler(
        reflection.aio.ReflectionServicer(services).ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),))


def _grpc_options(settings: Settings) -> list[tuple[str, int]]:
    options = [
        *limits.GRPC_OPTIONS,
        # grpc sets SO_REUSEPORT by default: a second server on a port in use would share it, and
        # clients would land on either process. Off, a port in use is refused.
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        # Ping idle connections so that a peer that vanished without closing is noticed and its
        # calls are cancelled, freeing what they hold.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        # A peer may ping at most every 10 s without data; two pings sooner and it gets GOAWAY
        # (ENHANCE_YOUR_CALM), so pings cannot be a flood that costs nothing.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]
    # A connection with no call (one that finished the handshake and went quiet included) is
    # closed after --max-connection-idle-s; any connection after --max-connection-age-s, its
    # calls given --grace-s. 0 leaves grpc's default: never.
    if settings.max_connection_idle_s:
        options.append(("grpc.max_connection_idle_ms", max(1, round(settings.max_connection_idle_s * 1000))))
    if settings.max_connection_age_s:
        options.append(("grpc.max_connection_age_ms", max(1, round(settings.max_connection_age_s * 1000))))
        options.append(("grpc.max_connection_age_grace_ms", round(settings.grace_s * 1000)))
    return options


@dataclasses.dataclass
class RunningServer:
    """A started server: the bound address, its sessions, and the loop thread that runs it."""

    port: int
    address: str
    store: SessionStore
    workers: Workers
    scorer: Scorer
    metrics: Metrics | None
    metrics_port: int
    identities: Identities | None
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _server: aio.Server
    _health: health_aio.HealthServicer
    _durability: Durability | None = None
    _stopped: bool = False
    # The Open Inference Protocol over HTTP/REST (--http-port), None when off.
    http_port: int | None = None
    _rest: rest.RestServer | None = None

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING and new calls refused at once; in-flight calls get `grace` seconds,
        then are cancelled. Work still running on a thread is abandoned, never waited for."""
        if self._stopped:
            return
        self._stopped = True
        done = asyncio.run_coroutine_threadsafe(self._shutdown(grace), self._loop)
        try:
            done.result(timeout=(grace or 0) + 5)
        except futures.TimeoutError:
            log.warning("the server did not stop within its grace period")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if self._durability is not None:
            # Calls have drained and the loop has stopped: nothing changes a session now but work
            # abandoned on a thread, whose client has been told it failed.
            self._durability.close()
        self.workers.shutdown()
        self.scorer.shutdown()
        if self.metrics is not None:
            self.metrics.stop()

    async def _shutdown(self, grace: float | None) -> None:
        await self._health.enter_graceful_shutdown()
        if self._rest is None:
            await self._server.stop(grace)
        else:  # both doors stop listening at once; their requests in flight get the same grace
            await asyncio.gather(self._server.stop(grace), self._rest.stop(grace))


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def build_server(settings: Settings) -> RunningServer:
    """Create, bind and start a server on its own loop thread (port 0 binds a free port; see `.port`)."""
    # Inputs are decoded as read-only views of the request bytes; ops never write in place.
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    resolve_device(settings.device)  # a bad --device fails here, not in every client's call
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="cosserve-loop", daemon=True)
    thread.start()
    try:
        return asyncio.run_coroutine_threadsafe(_start(settings, loop, thread), loop).result(timeout=60)
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        raise


async def _start(settings: Settings, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> RunningServer:
    # Mapped before serving, each file's header read and checked: a bad one is one start-up line.
    corpora = Corpora(settings.max_published_bytes)
    for spec in settings.corpus:
        try:
            corpus = corpora.add_file(spec, functools.partial(datasets.open_source, what="corpus"))
        except ValueError as err:
            raise settings_mod.SettingError("corpus", spec, str(err)) from None
        log.info("corpus @%s: %s %s from %s", corpus.name, dtype_name(corpus.tensor.dtype), tuple(corpus.tensor.shape), corpus.source)
    store = SessionStore(settings, corpora)
    metrics = Metrics(store) if settings.metrics_port else None
    identities = Identities.from_settings(settings)
    interceptors: list[aio.ServerInterceptor] = [RequestIdInterceptor()]
    if tracing.enabled():  # first: the call's span holds every other interceptor's work
        interceptors.insert(0, TracingInterceptor())
    if metrics is not None:
        interceptors.append(MetricsInterceptor(metrics.observe))
    if identities is not None:
        interceptors.append(AuthInterceptor(identities, reflection_open=settings.reflection_open))
    interceptors.append(ErrorInterceptor())
    server = aio.server(
        interceptors=interceptors,
        options=_grpc_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    workers = Workers(settings.max_workers, settings.inline_op_bytes)
    scorer = Scorer(
        limits.INLINE_BYTES,
        settings.score_pass_queries,
        settings.score_max_queue_delay_s,
        metrics.observe_pass if metrics is not None else None,
    )
    cosserve_servicer.add_to_server(CosserveServicer(store, settings, workers, scorer, metrics), server)
    # The Open Inference Protocol (KServe v2 / Triton) on the same port, behind the same interceptors.
    inference = inference_servicer.InferenceServicer(settings, workers, metrics)
    inference_servicer.add_to_server(inference, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    services = (
        SERVICE_NAME,
        inference_servicer.SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
        REFLECTION_V1,
    )
    reflection.enable_server_reflection(services, server)
    _add_reflection_v1(services, server)
    # Every session of --state-dir is back before the first call can name one (and before anything
    # listens, so a state directory that cannot be read leaves nothing running).
    durability = Durability(settings, store)
    await asyncio.to_thread(durability.restore)
    host = settings.host
    # A bad host or a port in use (ours or --metrics-port) is one SettingError here, before grpc
    # would log its own error and raise RuntimeError.
    listen.check_listen(settings)
    bind = f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"
    try:
        credentials = tls.server_credentials(settings) if settings.tls_cert else None
        port = server.add_insecure_port(bind) if credentials is None else server.add_secure_port(bind, credentials)
    except RuntimeError as err:  # taken since check_listen looked
        raise settings_mod.SettingError("port", settings.port, f"cannot listen on {bind}") from err
    if port == 0:
        raise OSError(f"could not bind {bind}")
    # Metrics first: if its port was taken since check_listen looked, nothing has started yet.
    metrics_port = metrics.start(host, settings.metrics_port) if metrics else 0
    # The REST binding of the same InferenceServicer, on the same loop, before the gRPC port serves.
    rest_server = None
    http_port = None
    if settings.http_port != settings_mod.OFF:
        rest_server = rest.RestServer(settings, inference, identities, metrics)
        try:
            http_port = await rest_server.start(host, settings.http_port, rest.tls_context(settings) if settings.tls_cert else None)
        except OSError as err:  # taken since check_listen looked
            if metrics is not None:
                metrics.stop()
            raise settings_mod.SettingError("http_port", settings.http_port, f"cannot listen on {host}: {err.strerror or err}") from None
    await server.start()
    for service in ("", SERVICE_NAME, inference_servicer.SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    loop.create_task(_expire_idle(store))
    loop.create_task(durability.run())
    return RunningServer(
        port, address, store, workers, scorer, metrics, metrics_port, identities, loop, thread, server, health, durability,
        http_port=http_port, _rest=rest_server,
    )


async def _expire_idle(store: SessionStore) -> None:
    timeout = store.settings.session_idle_timeout_s
    if timeout <= 0:
        return  # sessions never expire
    period = min(_EXPIRY_PERIOD_S, max(timeout / 2, 0.01))
    while True:
        await asyncio.sleep(period)
        expired = store.expire_idle()
        if expired:
            log.info("closed %d idle session(s)", expired)


def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain in-flight calls; 0 after SIGTERM, 130 after SIGINT
    (Ctrl-C), as the `cosserve` command exits after it."""
    running = build_server(settings)
    # The handlers go in before the address is announced: a SIGTERM sent as soon as a process
    # manager reads it (a test, an orchestrator) drains the server instead of killing it mid-start.
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        log.info("received %s; draining for up to %.0f s", signal.Signals(signum).name, settings.grace_s)
        received.append(signum)
        stop.set()

    def on_hangup(signum: int, frame: object) -> None:
        # Identities.reload logs what it did; a bad file keeps the keys already loaded.
        log.info("received SIGHUP; rereading the API keys")
        if running.identities is not None:
            running.identities.reload()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    log.info("cosserve listening on %s (default device %s)", running.address, settings.device)
    memory, source = settings_mod.memory_limit()
    total = readable_bytes(settings.max_total_bytes) if settings.max_total_bytes else "no limit"
    log.info(
        "sessions may hold %s in all (--max-total-bytes), %s each (--max-session-bytes); this process may use %s (%s)",
        total, readable_bytes(settings.max_session_bytes), readable_bytes(memory), source,
    )  # fmt: skip
    if running.metrics_port:
        log.info("metrics at http://%s:%d/metrics", settings.host, running.metrics_port)
    if running.http_port is not None:
        scheme = "https" if settings.tls_cert else "http"
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        log.info("Open Inference Protocol over HTTP/REST at %s://%s:%d/v2", scheme, host, running.http_port)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    running.stop(settings.grace_s)
    tracing.shutdown()  # the last spans (the drain, the final snapshots) before any os._exit
    log.info("cosserve stopped")
    status = 128 + signal.SIGINT if received[:1] == [signal.SIGINT] else 0
    running_threads = _threads_still_working()
    if running_threads:
        # Work still computing on a worker or scoring thread cannot be interrupted, and the
        # interpreter would wait for it at exit: leave now, its clients have already been told.
        log.info("abandoning work still running on %s", ", ".join(running_threads))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _threads_still_working() -> list[str]:
    """The work pools' threads that are still computing, after their pools were shut down.

    Threads of the work pools inherit the loop thread's daemon flag, but concurrent.futures still
    joins them at exit. A shut-down pool's idle threads end at once; one still alive a moment
    later is computing for a call that is over."""
    threads = [t for t in threading.enumerate() if t.name.startswith(_WORK_THREADS)]
    deadline = time.monotonic() + _IDLE_THREADS_EXIT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in threads if t.is_alive()]


def run(ns: argparse.Namespace) -> int:
    """`cosserve serve` with parsed flags: 2 with one line naming the flag or the variable for a bad
    setting, a host it cannot listen on or a port in use."""
    try:
        settings = settings_mod.from_args(ns)
        try:
            resolve_device(settings.device)
        except CosserveError as err:
            raise settings_mod.SettingError("device", settings.device, str(err)) from None
    except settings_mod.SettingError as err:
        print(f"cosserve serve: {settings_mod.with_source(err, ns)}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    # OTEL_* variables: traces stay off without an endpoint, and a missing SDK is one log line.
    tracing.configure()
    try:
        return serve(settings)
    except settings_mod.SettingError as err:
        print(f"cosserve serve: {settings_mod.with_source(err, ns)}", file=sys.stderr)
        return 2
    except OSError as err:  # a file or a port that changed between the checks and their use
        print(f"cosserve serve: {err}", file=sys.stderr)
        return 2


def _configure_logging(settings: Settings) -> None:
    observability.configure_logging(settings.log_level, settings.log_format)
