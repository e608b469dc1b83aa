"""A client of any openpi-protocol policy server (ours, launch/serve.py, or openpi's serve_policy.py):
what `launch/eval.py --policy-server HOST:PORT` rolls LIBERO out with.

Synchronous (websockets.sync): one connection per env slot, so concurrent slots reach the server at once
and a micro-batching server can batch them. The wire format is openpi's (serving/msgpack_numpy.py).
"""

from __future__ import annotations

from typing import Any

from ript_ds.serving.msgpack_numpy import packb, unpackb


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

    def __init__(self, host: str, port: int, open_timeout: float = 30.0):
        from websockets.sync.client import connect

        self.address = f"{host}:{port}"
        try:
            self._ws = connect(
                f"ws://{host}:{port}", compression=None, max_size=None, open_timeout=open_timeout
            )
        except OSError as err:
            raise ServerError(f"cannot reach a policy server at {self.address}: {err}") from None
        self.metadata: dict[str, Any] = unpackb(self._ws.recv())

    def infer(self, obs: dict) -> dict:
        from websockets.exceptions import ConnectionClosed

        try:
            self._ws.send(packb(obs))
            reply = self._ws.recv()
        except ConnectionClosed as err:
            raise ServerError(f"policy server {self.address} closed the connection: {err}") from None
        if isinstance(reply, str):  # openpi: the traceback as text, then close 1011
            raise ServerError(f"policy server {self.address} failed the request:\n{reply}")
        return unpackb(reply)

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> RemotePolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
