"""A client of any openpi-protocol policy server (ours, launch/serve.py, or openpi's serve_policy.py):
what `launch/eval.py --policy-server HOST:PORT` rolls LIBERO out with.

Synchronous (websockets.sync): one connection per env slot, so concurrent slots reach the server at once
and a micro-batching server can batch them. The wire format is openpi's (serving/msgpack_numpy.py).
"""

from __future__ import annotations

from typing import Any

from ript_ds.serving.msgpack_numpy import WireError, packb, unpackb


class ServerError(RuntimeError):
    """The server refused a request (its traceback text frame) or went away."""


def parse_address(text: str) -> tuple[str, int]:
    """ "HOST:PORT" (or ws://HOST:PORT) -> (host, port); ValueError with one line otherwise."""
    address = text.removeprefix("ws://").rstrip("/")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"policy server address {text!r} must look like HOST:PORT, e.g. 127.0.0.1:8000")
    return host, int(port)


class RemotePolicy:
    """One connection to an openpi-protocol server: `metadata` from its first frame, `infer(obs)`."""

    def __init__(self, host: str, port: int, open_timeout: float = 30.0, timeout: float | None = 600.0):
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        self.address, self.timeout = f"{host}:{port}", timeout
        try:
            self._ws = connect(
                f"ws://{host}:{port}", compression=None, max_size=None, open_timeout=open_timeout
            )
        # OSError: nothing listens; WebSocketException: something else answers (a plain HTTP server,
        # an HTTP error status, a bad handshake); TimeoutError: it accepts but never completes the handshake.
        except (OSError, WebSocketException) as err:
            raise ServerError(f"cannot reach a policy server at ws://{self.address}: {_why(err)}") from None
        metadata = self._receive("its metadata frame")
        if not isinstance(metadata, dict):
            self.close()
            raise ServerError(
                f"{self.address} is no openpi policy server: its first frame is not a metadata map"
            )
        self.metadata: dict[str, Any] = metadata

    def infer(self, obs: dict) -> dict:
        from websockets.exceptions import WebSocketException

        try:
            self._ws.send(packb(obs))
        except (OSError, WebSocketException) as err:
            raise ServerError(f"policy server {self.address} went away: {_why(err)}") from None
        reply = self._receive("a reply")
        if not isinstance(reply, dict) or "actions" not in reply:
            raise ServerError(f"policy server {self.address} replied without 'actions'")
        return reply

    def _receive(self, what: str) -> Any:
        from websockets.exceptions import WebSocketException

        try:
            frame = self._ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise ServerError(f"policy server {self.address} sent no {what} in {self.timeout:g} s") from None
        except (OSError, WebSocketException) as err:
            raise ServerError(f"policy server {self.address} closed the connection: {_why(err)}") from None
        if isinstance(frame, str):  # openpi: the traceback as text, then close 1011
            raise ServerError(f"policy server {self.address} failed the request: {_last_line(frame)}")
        try:
            return unpackb(frame)
        except WireError as err:
            raise ServerError(
                f"policy server {self.address} sent {what} that is not openpi msgpack: {err}"
            ) from None

    def close(self) -> None:
        self._ws.close()


def _why(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _last_line(traceback_text: str) -> str:
    """The server's traceback frame, as one line: its last non-empty line (the exception)."""
    lines = [line.strip() for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(empty error frame)"

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
