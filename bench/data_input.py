"""What reading DATA costs, per kind of body: the relay's reader in blocks beside the same
reader a line at a time, in one run.

    .venv/bin/python bench/data_input.py [--mb 1] [--segment 65536]

Each body is fed to a stream in segments (as a socket delivers it) and read by
relay.receive.data.DataReader, once as the relay reads (the body in blocks) and once a
line at a time (``blocks=False``: every line on its own through the same rules, as the
reader worked before it read blocks); the figures are CPU seconds per MB of body.
Besides a usual body, the kinds are what a client could send to make reading costly:
floods of short lines, of bare line breaks and of dot-stuffed lines.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.receive.data import DataReader, Limits

LIMITS = Limits(max_message_size=40 * 1024 * 1024, max_line_length=998,
                max_header_size=64 * 1024, max_header_fields=1000, max_received_headers=100)
KINDS = {
    "usual (78-byte lines, CRLF)": b"x" * 76 + b"\r\n",
    "text, every line ends in a dot": b"This is a sentence.\r\n",
    "empty lines": b"\r\n",
    "bare LF": b"\n",
    "short lines ending in a dot": b"x.\r\n",
    "lone dots after bare LF": b".\n",
    "dot-stuffed, bare LF": b".x\n",
}


class _Sink:
    async def headers(self, section: bytes) -> None:
        pass

    async def body(self, data: bytes) -> None:
        pass


async def _read(body: bytes, segment: int, blocks: bool) -> float:
    stream = asyncio.StreamReader(limit=LIMITS.max_line_length + 1)
    wire = b"Subject: bench\r\n\r\n" + body + b"\r\n.\r\n"

    async def feed() -> None:
        for start in range(0, len(wire), segment):
            stream.feed_data(wire[start:start + segment])
            await asyncio.sleep(0)
        stream.feed_eof()

    feeding = asyncio.ensure_future(feed())
    started = time.process_time()
    received = await DataReader(LIMITS, blocks=blocks).read(stream, _Sink())
    spent = time.process_time() - started
    await feeding
    if received.refusal is not None:
        raise SystemExit(f"refused: {received.refusal}")
    return spent


def table(mb: float = 1.0, segment: int = 64 * 1024) -> None:
    """Print the figures (bench/compare.py prints them too, as part of ``make bench``)."""
    print(f"# reading DATA: CPU seconds per MB of body, {mb:g} MB of each kind, fed in "
          f"{segment}-byte segments")
    print(f"{'body':34} {'in blocks':>10} {'by line':>10} {'ratio':>7}")
    for name, unit in KINDS.items():
        body = unit * max(1, int(mb * 1_000_000) // len(unit))
        size = len(body) / 1_000_000
        blocks = asyncio.run(_read(body, segment, True)) / size
        lines = asyncio.run(_read(body, segment, False)) / size
        print(f"{name:34} {blocks:10.3f} {lines:10.3f} {lines / max(blocks, 1e-9):6.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0, help="body size of each kind")
    parser.add_argument("--segment", type=int, default=64 * 1024,
                        help="bytes the stream is fed at a time")
    args = parser.parse_args()
    table(args.mb, args.segment)
