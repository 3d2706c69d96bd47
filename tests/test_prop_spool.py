"""Properties of spool record parsing: Entry.from_json takes any bytes.

A metadata file may be damaged by a disk, an editor or another version of the relay.
Whatever it holds, ``Entry.from_json`` returns an Entry the relay can use (and write back
unchanged), or raises ValueError with the reason, which the queue answers by setting the
message aside in corrupt/; never TypeError, KeyError or anything else, which would make
the queue trip over the same file on every scan.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from relay.core.reply import Reply
from relay.spool.records import Entry, State
from tests.conftest import wait_until
from tests.test_queue_durability import MESSAGE, ScriptedDeliverer, _deferred, scripted_queue

pytestmark = pytest.mark.fuzz

VALID: dict[str, Any] = json.loads(Entry(
    id="4F2A9C01B3D7", profile="system", mail_from="app@contoso.com",
    rcpt_tos=["a@example.com", "b@example.com"], size=1234, received_at=1_700_000_000.5,
    mail_options=["BODY=8BITMIME"], client="127.0.0.1", user="alice",
    return_path="bounce@app.example.com", original_from="billing@contoso.com",
    mailbox="relay@contoso.com", attempts=2,
    next_attempt=1_700_000_100.0, last_reply=Reply(451, "4.3.2 busy"), delivered=["a@example.com"],
    failed={"c@example.com": Reply(550, "5.1.1 unknown")}).to_json())
NAME = f"{VALID['id']}.json"

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
              st.integers(min_value=2**63 - 2, max_value=2**70), st.text(max_size=12),
              st.sampled_from(["", "\x00", "a\r\nb@x", "\ud800", "../../etc", "4F2A9C01B3D7",
                               "1e999", "NaN"])),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.text(max_size=8), children, max_size=3)),
    max_leaves=10)


@st.composite
def mutated_entries(draw: st.DrawFn) -> bytes:
    data: dict[str, Any] = json.loads(json.dumps(VALID))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*sorted(data), "unknown"]))
        action = draw(st.sampled_from(["replace", "replace", "delete", "inner"]))
        if action == "delete":
            data.pop(key, None)
        elif action == "inner" and isinstance(data.get(key), list) and data[key]:
            data[key][draw(st.integers(0, len(data[key]) - 1))] = draw(json_values)
        elif action == "inner" and isinstance(data.get(key), dict) and data[key]:
            data[key][draw(st.sampled_from(sorted(data[key])))] = draw(json_values)
        else:
            data[key] = draw(json_values)
    text = json.dumps(data, allow_nan=True)
    if draw(st.integers(0, 9)) == 0:                 # a torn or damaged write
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=3))
    return text.encode("utf-8", "surrogatepass")


def check(raw: bytes, name: str | None) -> None:
    try:
        entry = Entry.from_json(raw, name)
    except ValueError as exc:
        assert str(exc)
        return
    # What it returned is usable: the types the dataclass says, usable addresses, and it
    # is written back as a record that reads the same.
    assert isinstance(entry.id, str) and (name is None or name == f"{entry.id}.json")
    assert entry.rcpt_tos and all(isinstance(r, str) for r in entry.rcpt_tos)
    assert all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in (entry.size, entry.attempts))
    assert all(isinstance(t, float) and math.isfinite(t)
               for t in (entry.received_at, entry.next_attempt))
    for address in (entry.mail_from, *entry.rcpt_tos, *entry.delivered, *entry.failed,
                    entry.return_path or "", entry.mailbox or "", entry.profile,
                    entry.original_from or ""):
        address.encode("utf-8")         # it goes out in MAIL FROM, RCPT TO and the log
    replies = [*entry.failed.values(), *([entry.last_reply] if entry.last_reply else [])]
    assert all(isinstance(r, Reply) and isinstance(r.code, int) for r in replies)
    for reply in replies:
        str(reply).encode("utf-8")      # it goes into the log, DSNs and queue show
    assert Entry.from_json(entry.to_json(), name) == entry


@given(mutated_entries(), st.booleans())
@example(json.dumps({**VALID, "rcpt_tos": "a@example.com"}).encode(), True)
@example(json.dumps({**VALID, "attempts": "x"}).encode(), True)
@example(json.dumps({**VALID, "failed": ["x"]}).encode(), True)
@example(json.dumps({**VALID, "failed": {"c@example.com": 550}}).encode(), True)
@example(json.dumps({**VALID, "last_reply": "no code at all"}).encode(), True)
@example(json.dumps({**VALID, "received_at": 1e999}).encode(), True)
def test_mutated_record(raw: bytes, named: bool) -> None:
    check(raw, NAME if named else None)


@given(st.one_of(st.binary(max_size=60), json_values.map(lambda v: json.dumps(v).encode())))
@example(b"")
@example(b"[]")
@example(b'"\\ud800"')
@example(b"[" * 100_000)
def test_arbitrary_bytes(raw: bytes) -> None:
    check(raw, None)


async def test_queue_sets_an_unparsable_record_aside(tmp_path: Path) -> None:
    """What from_json refuses, the real queue moves to corrupt/ with its data, and goes on
    delivering the rest."""
    deliverer = ScriptedDeliverer()
    queue, spool = scripted_queue(tmp_path, deliverer, window=2)
    bad = _deferred(spool, 1.0)
    meta = spool.root / "deferred" / f"{bad.id}.json"
    record = json.loads(meta.read_bytes())
    record["rcpt_tos"] = "a@example.com"           # a string where a list belongs
    meta.write_text(json.dumps(record))
    good = _deferred(spool, time.time() - 5)
    await queue.start()
    try:
        await wait_until(lambda: deliverer.calls == [(good.id, ["a@example.com"])])
        await wait_until(lambda: (spool.root / "corrupt" / f"{bad.id}.json").exists())
    finally:
        await queue.stop(1)
    assert (spool.root / "corrupt" / f"{bad.id}.eml").read_bytes() == MESSAGE
    assert not spool.holds(State.DEFERRED, bad.id)
