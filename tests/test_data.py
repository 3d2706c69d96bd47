"""relay.receive.data on its own: the DATA reader fed from a stream, and the memory budget."""

from __future__ import annotations

import asyncio

import pytest

from relay.core.message import CHUNK
from relay.receive.budget import MemoryBudget
from relay.receive.data import DataReader, Limits, Received

LIMITS = Limits(max_message_size=10_000_000, max_line_length=1000, max_header_size=4096,
                max_header_fields=20, max_received_headers=3)


class Recorder:
    """The sink: what the reader handed on, in order."""

    def __init__(self) -> None:
        self.head: bytes | None = None
        self.parts: list[bytes] = []

    async def headers(self, section: bytes) -> None:
        assert self.head is None and not self.parts
        self.head = section

    async def body(self, data: bytes) -> None:
        assert self.head is not None
        self.parts.append(data)


async def read(raw: bytes, limits: Limits = LIMITS) -> tuple[Received, Recorder, bytes]:
    """Run the reader over ``raw``; returns its result, the sink, and what was left unread."""
    stream = asyncio.StreamReader(limit=limits.max_line_length + 1)
    stream.feed_data(raw)
    stream.feed_eof()
    sink = Recorder()
    result = await DataReader(limits).read(stream, sink)
    return result, sink, await stream.read()


async def test_headers_then_body_then_the_rest_of_the_session() -> None:
    result, sink, rest = await read(b"A: 1\r\nB: 2\r\n\r\nbody\r\n..dot\r\n.\r\nQUIT\r\n")
    assert result.refusal is None and sink.head == b"A: 1\r\nB: 2\r\n"
    assert b"".join(sink.parts) + result.tail == b"\r\nbody\r\n.dot\r\n"
    assert rest == b"QUIT\r\n"                       # pipelined commands stay for the session
    assert result.size == len(b"A: 1\r\nB: 2\r\n\r\nbody\r\n..dot\r\n")


async def test_an_empty_message_and_a_message_without_body() -> None:
    result, sink, _ = await read(b".\r\n")
    assert (sink.head, result.tail, result.size) == (b"", b"", 0)
    result, sink, _ = await read(b"A: 1\r\n.\r\n")
    assert (sink.head, result.tail) == (b"A: 1\r\n", b"")


async def test_a_line_that_is_not_a_field_starts_the_body() -> None:
    result, sink, _ = await read(b"A: 1\r\nnot a field\r\nB: 2\r\n.\r\n")
    assert sink.head == b"A: 1\r\n"
    assert result.tail == b"not a field\r\nB: 2\r\n"


async def test_line_breaks_are_canonical_and_split_headers_where_exchange_would() -> None:
    result, sink, _ = await read(b"A: 1\rB: 2\nC: 3\r\n\nx\ry\r\n.\r\n")
    assert sink.head == b"A: 1\r\nB: 2\r\nC: 3\r\n"
    assert result.tail == b"\r\nx\r\ny\r\n"


async def test_dot_lines_next_to_a_bare_lf_are_content() -> None:
    result, _, rest = await read(b"A: 1\r\n\r\nx\n.\r\n.\n\r\n.\r\nNEXT\r\n")
    assert result.tail == b"\r\nx\r\n.\r\n.\r\n\r\n"
    assert rest == b"NEXT\r\n"


@pytest.mark.parametrize(("raw", "refusal"), [
    (b"A: 1\r\n\r\n" + b"x" * 1001 + b"\r\n", "500 5.5.2 Line too long (limit 1000 octets)"),
    (b"A: 1\r\n\r\n" + b"x" * 5000 + b"\r\n", "500 5.5.2 Line too long (limit 1000 octets)"),
    (b"A: " + b"x" * 900 + b"\r\n" + (b" " + b"y" * 900 + b"\r\n") * 5,
     "552 5.3.4 Header section too large (limit 4096 octets)"),
    (b"A: 1\r\n" * 21, "552 5.3.4 Too many header fields (limit 20)"),
    (b"Received: x\r\n" * 4, "554 5.4.6 Too many hops (4 Received header fields): a mail loop?"),
    (b"A: 1\r\n\r\n\0\r\n", "554 5.6.0 Message contains a NUL byte"),
])
async def test_refusals_drain_to_the_end_and_keep_nothing(raw: bytes, refusal: str) -> None:
    result, _, rest = await read(raw + b"more\r\n.\r\nQUIT\r\n")
    assert result.refusal is not None and str(result.refusal).startswith(refusal)
    assert result.tail == b"" and rest == b"QUIT\r\n"


async def test_the_size_limit_counts_what_the_client_sent() -> None:
    limits = Limits(100, 1000, 4096, 20, 3)
    result, _, _ = await read(b"A: 1\r\n\r\n" + b"x" * 95 + b"\r\n.\r\n", limits)
    assert str(result.refusal) == "552 5.3.4 Message size exceeds fixed maximum message size"


async def test_a_large_body_is_handed_on_in_chunks() -> None:
    line = b"z" * 998 + b"\r\n"
    result, sink, _ = await read(b"A: 1\r\n\r\n" + line * 2000 + b".\r\n")
    # Each part within the chunk size (the memory a DATA reserves), and not much below.
    assert all(CHUNK - 64 * 1024 <= len(p) <= CHUNK for p in sink.parts)
    assert len(sink.parts) >= 7
    assert b"".join(sink.parts) + result.tail == b"\r\n" + line * 2000
    assert not result.eight_bit


async def test_eight_bit_is_noticed() -> None:
    result, _, _ = await read("A: 1\r\n\r\nGrüße\r\n.\r\n".encode())
    assert result.eight_bit


async def test_the_budget_is_first_come_first_served_and_bounded() -> None:
    budget = MemoryBudget(100)
    order: list[str] = []

    async def take(name: str, amount: int, hold: float) -> None:
        async with budget.share(amount, wait=5) as got:
            assert got and budget.used <= budget.limit
            order.append(name)
            await asyncio.sleep(hold)

    first = asyncio.create_task(take("first", 60, 0.05))
    await asyncio.sleep(0)
    await asyncio.gather(first, take("second", 60, 0), take("third", 30, 0))
    assert order == ["first", "second", "third"] and budget.used == 0


async def test_a_wait_that_runs_out_or_is_cancelled_leaves_the_budget_whole() -> None:
    budget = MemoryBudget(10)
    async with budget.share(10, wait=1) as got:
        assert got
        async with budget.share(5, wait=0.05) as late:
            assert late is False
        waiting = asyncio.create_task(budget.share(5, wait=5).__aenter__())
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert budget.used == 0 and budget._waiters == []
    async with budget.share(50, wait=1) as got:           # more than the whole budget
        assert got and budget.used == 10
