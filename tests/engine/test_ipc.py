"""The engine socket's framing: whole messages out of any split of the bytes."""

from __future__ import annotations

import socket

from tokenloom.engine.ipc import BlockingChannel, FrameDecoder, encode, read_frame
from tokenloom.request import CompletionOutput, RequestOutput

MESSAGES = [
    {"a": 1},
    RequestOutput("r1", None, [], [CompletionOutput(0, "hi", [5, 6])], finished=False),
    list(range(50_000)),  # a long prompt: a frame larger than one read
    "end",
]


def test_messages_survive_every_split_of_the_stream():
    data = b"".join(encode(m) for m in MESSAGES)
    for chunk in (1, 7, 4096, len(data)):
        decoder = FrameDecoder()
        got = []
        for i in range(0, len(data), chunk):
            got.extend(decoder.feed(data[i:i + chunk]))
        assert got == MESSAGES, chunk


def test_a_partial_frame_waits_for_its_rest():
    frame = encode("hello")
    decoder = FrameDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.feed(frame[-1:] + frame[:3]) == ["hello"]
    assert decoder.feed(frame[3:]) == ["hello"]


def test_read_frame_takes_one_message_and_leaves_the_rest():
    a, b = socket.socketpair()
    with a, b:
        channel = BlockingChannel(a)
        channel.send("ready")
        channel.send(MESSAGES[2])
        assert read_frame(b) == "ready"
        assert BlockingChannel(b).receive(timeout_s=5) == [MESSAGES[2]]


def test_receive_waits_at_most_its_timeout_and_sees_the_end():
    a, b = socket.socketpair()
    with b:
        channel = BlockingChannel(b)
        assert channel.receive(timeout_s=0) == []
        a.close()
        try:
            channel.receive(timeout_s=5)
        except EOFError:
            pass
        else:
            raise AssertionError("a closed peer must raise EOFError")
