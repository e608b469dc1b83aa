"""openpi's policy server protocol over asyncio `websockets`, with inference off the event loop and
micro-batching of concurrent clients.

    server = PolicyServer(policy, "127.0.0.1", 0).start()   # returns once the socket listens
    server.url                                               # ws://127.0.0.1:<port>
    server.stop()
    serve(policy, "0.0.0.0", 8000)                           # blocking (launch/serve.py)

The session is openpi's (docs: ../shared/notes/openpi_serving_protocol.md): the packed metadata on connect,
then one packed result per packed observation, each with "server_timing" {"infer_ms", "prev_total_ms" from
the 2nd request on}; an error sends a TEXT frame (the error line, then the traceback) and closes with 1011,
and only that connection ends. `GET /healthz` answers 200 "OK\\n" over plain HTTP.

Threads: the event loop only moves bytes and answers keepalive pings, so a slow inference never drops a
client (openpi runs inference on the loop; issue #717). Requests are validated on one "prepare" thread
(resizing and tokenizing, no device work), and every forward runs on one inference thread, so the
policy's device is only ever driven from one thread. The batcher collects the prepared requests of all
connections for up to `batch_window_ms` (or until `max_batch`, or until every open connection has one
waiting: each connection has at most one request in flight) and runs them as one `policy.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import signal
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ript_ds.serving.msgpack_numpy import WireError, packb, unpackb
from ript_ds.serving.policy import Policy, PolicyInputError, Prepared

logger = logging.getLogger(__name__)

CLOSE_REASON = "Internal server error. Traceback included in previous frame."
_REQUEST_ERRORS = (WireError, PolicyInputError)  # the client's fault: one clear line before the traceback


@dataclass(frozen=True)
class ServerOptions:
    max_batch: int = 8  # requests per policy.run
    batch_window_ms: float = 5.0  # how long the first request of a batch waits for company
    ping_interval: float | None = 20.0  # websockets' keepalive defaults, as openpi's server uses
    ping_timeout: float | None = 20.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")


_Item = tuple[Prepared, asyncio.Future]


class _Batcher:
    """Prepared requests from every connection -> batches of one `policy.run` each, on one thread."""

    def __init__(self, policy: Policy, options: ServerOptions, open_connections: Callable[[], int]):
        self._policy, self._options, self._open = policy, options, open_connections
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ript-infer")
        self._inflight: list[_Item] = []
        self._stopped = False

    async def submit(self, prepared: Prepared) -> dict:
        if self._stopped:  # nobody would ever resolve the future
            raise RuntimeError("the policy server is stopping")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((prepared, future))
        return await future

    async def run_forever(self) -> None:
        try:
            while True:
                self._inflight = []  # filled in place, so a cancelled collect loses no request
                await self._collect(self._inflight)
                await self._dispatch(self._inflight)
        finally:
            # A stopping server: no handler may wait forever on a future nobody will resolve.
            self._stopped = True
            while not self._queue.empty():
                self._inflight.append(self._queue.get_nowait())
            for _, future in self._inflight:
                if not future.done():
                    future.set_exception(RuntimeError("the policy server is stopping"))
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _collect(self, batch: list[_Item]) -> None:
        batch.append(await self._queue.get())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.batch_window_ms / 1e3
        # Waiting for more than the open connections can send only adds latency (one in flight each).
        while len(batch) < min(self._options.max_batch, self._open()):
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break

    async def _dispatch(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        requests = [prepared for prepared, _ in batch]
        try:
            results = await loop.run_in_executor(self._pool, self._run, requests)
        except Exception as err:
            if len(batch) == 1:
                _resolve(batch[0][1], error=err)
                return
            # A server-side failure in a mixed batch: rerun one by one so only the culprit fails.
            logger.warning("batch of %d failed (%s); rerunning its requests one by one", len(batch), err)
            for item in batch:
                await self._dispatch([item])
            return
        for (_, future), result in zip(batch, results, strict=True):
            _resolve(future, result=result)

    def _run(self, requests: list[Prepared]) -> list[dict]:
        results = self._policy.run(requests)
        if len(results) != len(requests):
            raise RuntimeError(f"policy.run returned {len(results)} results for {len(requests)} requests")
        return results


def _resolve(future: asyncio.Future, result: dict | None = None, error: BaseException | None = None) -> None:
    if future.done():  # its connection went away meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class PolicyServer:
    """One policy behind openpi's websocket protocol. `start()`/`stop()` run it on a background thread (tests,
    benchmarks); `run()` is the coroutine underneath; `serve()` blocks."""

    def __init__(
        self, policy: Policy, host: str = "0.0.0.0", port: int = 8000, options: ServerOptions | None = None
    ):
        self.policy, self.host, self.port = policy, host, port
        self.options = options or ServerOptions()
        self._open = 0
        self._server: Server | None = None
        self._batcher: _Batcher | None = None
        self._prepare_pool: ThreadPoolExecutor | None = None
        self._stop_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    # ------------------------------------------------------------------ lifecycle
    async def run(self, on_ready: Callable[[PolicyServer], None] | None = None) -> None:
        """Listen, call on_ready once the socket accepts connections, serve until stop()."""
        if self._thread is not None and self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("this PolicyServer is already running; stop() it or make another")
        self._loop, self._server = asyncio.get_running_loop(), None
        self._stop_event = asyncio.Event()
        self._batcher = _Batcher(self.policy, self.options, lambda: self._open)
        self._prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="ript-prepare")
        batcher = asyncio.create_task(self._batcher.run_forever())
        try:
            self._server = await ws_serve(
                self._handle,
                self.host,
                self.port,
                compression=None,  # openpi: arrays do not compress, deflate only costs CPU
                max_size=None,  # images arrive in one frame
                process_request=_healthz,
                ping_interval=self.options.ping_interval,
                ping_timeout=self.options.ping_timeout,
            )
            self.port = self._server.sockets[0].getsockname()[1]  # port 0 -> the one the OS chose
            if on_ready is not None:
                on_ready(self)
            await self._stop_event.wait()
        finally:
            # The batcher first: it fails pending requests, so every handler ends and close() can finish.
            batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batcher
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()
            self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    def start(self, timeout_s: float = 60.0) -> PolicyServer:
        """Serve on a background thread; returns once the socket listens (re-raises a bind error)."""
        ready, failure = threading.Event(), []

        def main() -> None:
            try:
                asyncio.run(self.run(on_ready=lambda _: ready.set()))
            except BaseException as err:  # reported to start()'s caller, not lost in the thread
                failure.append(err)
                ready.set()

        self._thread = threading.Thread(target=main, name="ript-policy-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError(f"policy server did not listen within {timeout_s} s")
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close every connection and the socket (callable from any thread)."""
        if self._loop is not None and self._stop_event is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop already finished
                self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def __enter__(self) -> PolicyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ one connection
    async def _handle(self, ws: ServerConnection) -> None:
        self._open += 1
        peer = _peer(ws)
        logger.info("connection open: %s (%d open)", peer, self._open)
        served, outcome = 0, "closed by client"
        try:
            await ws.send(packb(self.policy.metadata))
            served, outcome = await self._session(ws)
        except ConnectionClosed:
            pass
        finally:
            self._open -= 1
            logger.info("connection closed: %s after %d requests, %s", peer, served, outcome)

    async def _session(self, ws: ServerConnection) -> tuple[int, str]:
        """Request/reply until the client leaves or a request fails -> (requests served, how it ended)."""
        served, prev_total = 0, None
        while True:
            # openpi's prev_total_ms spans recv to send, the client's think time included
            start = time.monotonic()
            try:
                message = await ws.recv()
            except ConnectionClosed:
                return served, "closed by client"
            try:
                infer_start = time.monotonic()
                result = await self._answer(message)
                timing = {"infer_ms": (time.monotonic() - infer_start) * 1e3}
                if prev_total is not None:
                    timing["prev_total_ms"] = prev_total * 1e3
                await ws.send(packb({**result, "server_timing": timing}))
            except ConnectionClosed:
                return served, "closed by client"
            except Exception as err:
                await self._fail(ws, err)
                return served, f"error: {type(err).__name__}"
            served += 1
            prev_total = time.monotonic() - start

    async def _answer(self, message: bytes | str) -> dict:
        obs = unpackb(message)
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._prepare_pool, self.policy.prepare, obs)
        return await self._batcher.submit(prepared)

    async def _fail(self, ws: ServerConnection, err: Exception) -> None:
        text = "".join(traceback.format_exception(err))
        if isinstance(err, _REQUEST_ERRORS):
            text = f"{type(err).__name__}: {err}\n\n{text}"
            logger.warning("bad request from %s: %s: %s", _peer(ws), type(err).__name__, err)
        else:
            logger.error("request from %s failed", _peer(ws), exc_info=err)
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)  # a str is a TEXT frame: openpi's client raises it as RuntimeError
            await ws.close(CloseCode.INTERNAL_ERROR, CLOSE_REASON)


def _healthz(connection: ServerConnection, request) -> object | None:
    """websockets' process_request hook: plain HTTP for health checks, a WebSocket for every other path."""
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)


def serve(
    policy: Policy,
    host: str = "0.0.0.0",
    port: int = 8000,
    options: ServerOptions | None = None,
    on_ready: Callable[[PolicyServer], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM. on_ready(server) runs once the socket listens (server.port is bound)."""
    server = PolicyServer(policy, host, port, options)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not available off the main thread or on some platforms: KeyboardInterrupt still ends it.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, server.stop)
        await server.run(on_ready)

    asyncio.run(main())
