"""openpi's wire format (openpi_client.msgpack_numpy): msgpack with numpy arrays as tagged maps.

An ndarray travels as {b"__ndarray__": True, b"data": bytes, b"dtype": dtype.str, b"shape": shape} (the
keys msgpack bin), a numpy scalar as {b"__npgeneric__": True, b"data": item, b"dtype": str}; object,
void and complex dtypes are refused, as openpi refuses them. Unpacked arrays are read-only views of the
message: copy before writing into one.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = ("V", "O", "c")


class WireError(ValueError):
    """Bytes that are not an openpi message (one line: what was wrong)."""


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind in _REFUSED_KINDS:
        raise WireError(f"unsupported dtype {obj.dtype} (openpi refuses object, void and complex arrays)")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        try:
            return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
        except (TypeError, ValueError) as err:
            raise WireError(f"malformed ndarray ({err})") from None
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode)


def unpackb(data: bytes) -> Any:
    """-> the message; WireError for bytes that are not msgpack or hold a malformed array."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"expected a binary frame, got {type(data).__name__}")
    try:
        return msgpack.unpackb(data, object_hook=_decode)
    except WireError:
        raise
    except Exception as err:  # msgpack raises several unrelated types on garbage
        raise WireError(f"not a msgpack message ({type(err).__name__}: {err})") from None
