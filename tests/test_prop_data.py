"""The DATA reader's two ways of reading agree: the body in blocks (what the relay does)
gives what a line at a time gives, on any bytes, cut into segments anywhere.

relay.receive.data reads the header section a line at a time and the body in blocks up to
the end sequence the stream finds; the line-at-a-time reading is the reference
(tests/test_data.py and tests/test_prop_headers.py pin its rules). Both must agree on
where the data ends, what is handed on, the size, the refusal and what is left in the
stream for the session's next command.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay.core.reply import Reply
from relay.receive.data import DataReader, Limits
from tests.test_data import Recorder

pytestmark = pytest.mark.fuzz

# Pieces that make the line model's cases likely: every kind of line break, dot lines,
# fields, Received fields (the hop limit), NUL, 8-bit text, the end sequence itself.
TOKENS = [b"\r\n", b"\n", b"\r", b".", b"..", b"x", b"x" * 9, b"A: 1", b"Received: y",
          b" folded", b"\0", "é".encode(), b"\r\n.\r\n", b"\r\n.\n", b"\n.\r\n", b"\r\n\r\n",
          b"x.\r\n", b".\r\n", b".\r"]

limits = st.builds(
    Limits,
    max_message_size=st.sampled_from([40, 300, 10**6]),
    max_line_length=st.sampled_from([8, 30, 1000]),
    max_header_size=st.sampled_from([50, 4096]),
    max_header_fields=st.sampled_from([2, 20]),
    max_received_headers=st.sampled_from([1, 5]),
)


Outcome = tuple[Reply | None, int, bool, bytes | None, bytes | None, bytes]


def run(wire: bytes, cuts: list[int], lim: Limits, *, blocks: bool) -> Outcome:
    """``wire`` fed to a stream in the segments ``cuts`` makes, read by the DATA reader:
    (refusal, size, 8-bit, header section, body, what the stream still holds)."""

    async def main() -> Outcome:
        stream = asyncio.StreamReader(limit=lim.max_line_length + 1)
        sink = Recorder()
        reading = asyncio.ensure_future(DataReader(lim, blocks=blocks).read(stream, sink))
        start = 0
        for cut in [*sorted(set(cuts)), len(wire)]:
            if start < cut <= len(wire):
                stream.feed_data(wire[start:cut])
                start = cut
                await asyncio.sleep(0)
        stream.feed_eof()
        received = await asyncio.wait_for(reading, 10)
        body = b"".join(sink.parts) + received.tail if received.refusal is None else None
        head = sink.head if received.refusal is None else None
        return (received.refusal, received.size, received.eight_bit, head, body,
                await stream.read())

    return asyncio.run(main())


@given(st.lists(st.sampled_from(TOKENS), max_size=60), limits,
       st.lists(st.integers(min_value=0, max_value=400), max_size=8),
       st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b.c>\r\n"]))
@example([b"A: 1", b"\r\n", b"\r\n", b".", b"\r\n"], Limits(10**6, 1000, 4096, 20, 5), [], b"")
@example([b"A: 1", b"\r\n", b"\r\n", b"\r\n.\r\n"], Limits(10**6, 1000, 4096, 20, 5), [9], b"Q")
@example([b"A: 1", b"\r\n\r\n", b"x" * 9, b"x" * 9, b"\r\n"], Limits(40, 8, 50, 2, 1), [12], b"")
@example([b"A: 1", b"\r\n\r\n", b"x.\r\n"], Limits(10**6, 1000, 4096, 20, 5), [], b"")
@example([b"A: 1", b"\r\n\r\n", b"x.\r\n", b".\r"], Limits(10**6, 1000, 4096, 20, 5), [15, 17],
         b"")
@example([b"A: 1", b"\r\n\r\n", b"\r\n\r\n", b"\n", b"x" * 9], Limits(10**6, 30, 4096, 20, 5),
         [8], b"")
def test_blocks_read_what_lines_read(tokens: list[bytes], lim: Limits, cuts: list[int],
                                     rest: bytes) -> None:
    wire = b"".join(tokens) + b"\r\n.\r\n" + rest
    assert run(wire, cuts, lim, blocks=True) == run(wire, cuts, lim, blocks=False)


@given(st.integers(min_value=1, max_value=5), st.integers(min_value=0, max_value=3),
       st.lists(st.integers(min_value=0, max_value=300_000), max_size=6))
def test_large_bodies_agree_across_any_cut(lines_k: int, dots: int, cuts: list[int]) -> None:
    """Bodies of many blocks: dot-stuffed lines among them, cut at arbitrary places."""
    line = b"y" * 78 + b"\r\n"
    body = (line * 500 + b"..stuffed\r\n" * dots) * lines_k * 3
    wire = b"A: 1\r\n\r\n" + body + b".\r\nQUIT\r\n"
    lim = Limits(10**7, 998, 4096, 20, 5)
    blocks = run(wire, cuts, lim, blocks=True)
    assert blocks == run(wire, cuts, lim, blocks=False)
    assert blocks[0] is None and blocks[5] == b"QUIT\r\n"
