"""Messages between the server's process and the engine core's, over one socket pair.

A frame is an 8-byte little-endian length, then a pickle of one message (plain
frozen dataclasses, see ``engine/core.py``)::

    | length (8 B) | pickle ........................ | length | pickle ... |

Both ends are ours and trusted (the core is our own child process, connected
by ``socket.socketpair``), so pickle is the codec: it carries the dataclasses,
``SamplingParams`` and ``RequestOutput`` as they are, and at 64 sequences a
step's outputs pickle in well under a millisecond.
"""

from __future__ import annotations

import pickle
import select
import socket
import struct

_HEADER = struct.Struct("<Q")
_RECV_BYTES = 1 << 20


def encode(message: object) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Bytes in, whole messages out; keeps a partial frame until its rest arrives."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[object]:
        self._buffer += data
        messages = []
        start = 0
        while len(self._buffer) - start >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buffer, start)
            end = start + _HEADER.size + length
            if len(self._buffer) < end:
                break
            messages.append(pickle.loads(memoryview(self._buffer)[start + _HEADER.size:end]))
            start = end
        del self._buffer[:start]
        return messages


class BlockingChannel:
    """The engine core's end: blocking sends, receives that wait at most a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.setblocking(True)
        self._decoder = FrameDecoder()

    def send(self, message: object) -> None:
        self.sock.sendall(encode(message))

    def receive(self, timeout_s: float) -> list[object]:
        """The messages that arrived, waiting up to ``timeout_s`` for the first (0: none).
        Raises EOFError when the other end has closed."""
        messages: list[object] = []
        ready, _, _ = select.select([self.sock], [], [], timeout_s)
        while ready:
            data = self.sock.recv(_RECV_BYTES)
            if not data:
                raise EOFError("the server's end of the engine socket closed")
            messages.extend(self._decoder.feed(data))
            ready, _, _ = select.select([self.sock], [], [], 0)
        return messages


def read_frame(sock: socket.socket) -> object:
    """Exactly one message off a blocking socket, leaving whatever follows it unread
    (the server's start-up handshake, before its event loop takes the socket over)."""
    (length,) = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
    return pickle.loads(_read_exactly(sock, length))


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the engine core's end of the socket closed")
        data += chunk
    return bytes(data)
