"""Per-mailbox pacing, driven by an explicit clock."""

from __future__ import annotations

import bisect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.queue.governor import DAY, SLOT_RETRY, UNKNOWN_QUOTA_PAUSE, Governor, Limits

MBX = "relay@contoso.com"


def send(g: Governor, at: float, recipients: int = 1, mailbox: str = MBX) -> None:
    """One complete send: the caller asked first, as the queue manager does."""
    assert g.ready_at(mailbox, recipients, at) == at
    g.settle(g.admit(mailbox, recipients, at), at, sent=True)


def test_an_unused_mailbox_may_send_now() -> None:
    g = Governor()
    assert g.ready_at(MBX, 1, 5.0) == 5.0
    assert g.snapshot(MBX, 5.0) == {"in_flight": 0, "limit": 3, "sent_last_minute": 0,
                                    "recipients_last_24h": 0, "paused_until": None}


def test_session_slots() -> None:
    g = Governor()
    admitted = [g.admit(MBX, 1, 0.0) for _ in range(3)]
    assert g.ready_at(MBX, 1, 1.0) == 1.0 + SLOT_RETRY
    g.settle(admitted[0], 2.0, sent=True)
    assert g.ready_at(MBX, 1, 2.0) == 2.0


def test_messages_per_rolling_minute() -> None:
    g = Governor()
    for i in range(30):
        send(g, float(i))
    assert g.ready_at(MBX, 1, 29.5) == 60.0     # when the first send leaves the window
    assert g.ready_at(MBX, 1, 59.9) == 60.0
    send(g, 60.0)
    assert g.ready_at(MBX, 1, 60.5) == 61.0     # rolling, not per calendar minute
    assert g.ready_at(MBX, 1, 61.0) == 61.0


def test_recipients_per_rolling_day() -> None:
    g = Governor()
    send(g, 0.0, 6000)
    send(g, 3600.0, 3000)
    now = 7200.0
    assert g.ready_at(MBX, 1000, now) == now            # exactly the limit fits
    assert g.ready_at(MBX, 1001, now) == DAY            # once the 6,000 leave the window
    assert g.ready_at(MBX, 8000, now) == 3600.0 + DAY   # needs both sends gone
    assert g.ready_at(MBX, 1001, DAY) == DAY
    assert g.snapshot(MBX, DAY)["recipients_last_24h"] == 3000


def test_a_message_over_the_daily_limit_is_left_to_exchange() -> None:
    g = Governor()
    send(g, 0.0, 5000)
    assert g.ready_at(MBX, 10_001, 10.0) == 10.0


def test_limits_combine_to_the_latest_blocker() -> None:
    g = Governor(Limits(max_sessions=1, messages_per_minute=2, recipients_per_day=100))
    first, second = g.admit(MBX, 90, 0.0), g.admit(MBX, 5, 1.0)
    # Slot busy (1 s), minute full (until 60), day full for 10 recipients: until both
    # sends leave it, as they share a minute bucket, which leaves with its latest send.
    assert g.ready_at(MBX, 1, 2.0) == 60.0
    assert g.ready_at(MBX, 10, 2.0) == 1.0 + DAY
    assert g.ready_at(MBX, 1, 60.0) == 60.0 + SLOT_RETRY  # only the slot is left
    g.settle(first, 60.0, sent=True)          # both slots free; Exchange took both at 60,
    g.settle(second, 60.0, sent=True)         # so the minute is full again until 120
    assert g.ready_at(MBX, 1, 61.0) == 120.0
    assert g.ready_at(MBX, 1, 120.0) == 120.0


def test_a_hold_keeps_all_of_the_mailboxs_mail_back_until_it_ends() -> None:
    """Graph's 429 with Retry-After: the whole mailbox waits, then sends as before; a
    shorter hold does not cut a longer one short."""
    g = Governor()
    g.hold("m@x", 100.0, 30.0)
    g.hold("m@x", 101.0, 5.0)
    assert g.ready_at("m@x", 1, 100.0) == 130.0
    assert g.ready_at("other@x", 1, 100.0) == 100.0
    assert g.ready_at("m@x", 1, 130.0) == 130.0
    assert g.snapshot("m@x", 131.0)["paused_until"] is None


def test_throttle_lowers_concurrency_then_recovers_step_by_step() -> None:
    g = Governor(Limits(throttle_cooldown=600.0))
    g.throttled(MBX, 0.0)
    g.throttled(MBX, 10.0)
    assert g.snapshot(MBX, 10.0)["limit"] == 1
    g.admit(MBX, 1, 10.0)
    assert g.ready_at(MBX, 1, 20.0) == 20.0 + SLOT_RETRY
    assert g.snapshot(MBX, 609.0)["limit"] == 1
    assert g.snapshot(MBX, 610.0)["limit"] == 2
    assert g.ready_at(MBX, 1, 610.0) == 610.0
    assert g.snapshot(MBX, 1210.0)["limit"] == 3
    assert g.snapshot(MBX, 99_999.0)["limit"] == 3


def test_throttle_recovery_catches_up_after_a_quiet_spell() -> None:
    g = Governor(Limits(throttle_cooldown=600.0))
    g.throttled(MBX, 0.0)
    g.throttled(MBX, 0.0)
    assert g.snapshot(MBX, 1300.0)["limit"] == 3


def test_throttle_never_goes_below_one_session() -> None:
    g = Governor()
    for _ in range(10):
        g.throttled(MBX, 0.0)
    assert g.snapshot(MBX, 0.0)["limit"] == 1
    assert g.snapshot(MBX, 600.0)["limit"] == 2      # one step per cooldown, not ten


def test_zero_cooldown_means_no_throttling() -> None:
    g = Governor(Limits(throttle_cooldown=0.0))
    g.throttled(MBX, 5.0)
    assert g.snapshot(MBX, 5.0)["limit"] == 3


def test_quota_pause_until_own_sends_expire() -> None:
    g = Governor()
    send(g, 0.0, 4000)
    send(g, 100.0, 6000)
    g.quota_exceeded(MBX, 200.0)
    assert g.snapshot(MBX, 200.0)["paused_until"] == DAY
    assert g.ready_at(MBX, 1, 200.0) == DAY
    assert g.ready_at(MBX, 20_000, 200.0) == DAY     # a pause holds every message
    assert g.ready_at(MBX, 1, DAY) == DAY
    assert g.snapshot(MBX, DAY)["paused_until"] is None


@pytest.mark.parametrize(("recorded", "expected"), [
    (None, 10.0 + UNKNOWN_QUOTA_PAUSE),          # nothing of ours: someone else's quota
    (50, 10.0 + UNKNOWN_QUOTA_PAUSE),            # ours do not explain it: look again soon
])
def test_quota_used_by_other_senders(recorded: int | None, expected: float) -> None:
    g = Governor()
    if recorded is not None:
        send(g, 0.0, recorded)
    g.quota_exceeded(MBX, 10.0)
    assert g.ready_at(MBX, 1, 10.0) == expected
    assert g.ready_at(MBX, 1, expected) == expected


def test_mailboxes_are_independent() -> None:
    g = Governor(Limits(messages_per_minute=1))
    send(g, 0.0, mailbox="a@x")
    g.quota_exceeded("a@x", 0.0)
    g.throttled("a@x", 0.0)
    assert g.ready_at("b@x", 1, 1.0) == 1.0
    assert g.snapshot("b@x", 1.0)["limit"] == 3


def test_snapshot_values() -> None:
    g = Governor()
    send(g, 0.0, 7)
    g.admit(MBX, 3, 30.0)
    g.throttled(MBX, 30.0)
    assert g.snapshot(MBX, 40.0) == {"in_flight": 1, "limit": 2, "sent_last_minute": 2,
                                     "recipients_last_24h": 10, "paused_until": None}
    assert g.snapshot(MBX, 61.0)["sent_last_minute"] == 1


def test_settling_twice_does_not_go_negative() -> None:
    g = Governor()
    admitted = g.admit(MBX, 1, 0.0)
    g.settle(admitted, 0.0, sent=False)
    g.settle(admitted, 0.0, sent=False)
    assert g.snapshot(MBX, 0.0)["in_flight"] == 0


def test_memory_stays_bounded() -> None:
    g = Governor()
    n = 100_000
    for i in range(n):           # one send a second, ignoring ready_at on purpose
        g.settle(g.admit(MBX, 1, float(i)), float(i), sent=True)
    box = g._boxes[MBX]
    assert len(box.minute) <= 30
    assert len(box.day) <= DAY / 60 + 1
    # Counted per minute bucket: at most one bucket's worth over the exact figure.
    got = g.snapshot(MBX, n - 1.0)["recipients_last_24h"]
    assert DAY <= got <= DAY + 60


def test_idle_mailboxes_are_forgotten() -> None:
    g = Governor()
    send(g, 0.0, mailbox="old@x")
    g.admit("busy@x", 1, 0.0)
    g.quota_exceeded("busy@x", 0.0)
    send(g, 2 * DAY, mailbox="new@x")
    assert set(g._boxes) == {"busy@x", "new@x"}


def test_update_applies_to_recorded_sends() -> None:
    g = Governor()
    for i in range(20):
        send(g, float(i))
    g.update(Limits(messages_per_minute=10, max_sessions=1))
    assert g.ready_at(MBX, 1, 20.0) == 19.0 - 9 + 60.0   # the 10th latest send leaves
    assert g.snapshot(MBX, 20.0)["limit"] == 1
    g.update(Limits(messages_per_minute=50))
    assert g.ready_at(MBX, 1, 20.0) == 20.0


def test_windows_and_pause_survive_export_and_restore() -> None:
    """What a restart keeps (through JSON, as the queue saves it in the spool)."""
    import json

    g = Governor(Limits(messages_per_minute=2))
    send(g, 0.0, 6000)
    send(g, 3600.0, 3000)
    send(g, 3620.0, 10)
    g.quota_exceeded(MBX, 3630.0)
    g.admit("other@contoso.com", 1, 3630.0)         # in flight: not part of a restart
    g.throttled("other@contoso.com", 3630.0)
    saved = json.loads(json.dumps(g.export(3630.0)))

    h = Governor(Limits(messages_per_minute=2))
    assert h.restore(saved, 3640.0) == 2
    assert h.snapshot(MBX, 3640.0) == g.snapshot(MBX, 3640.0)
    assert h.ready_at(MBX, 1, 3640.0) == g.ready_at(MBX, 1, 3640.0) > 3640.0
    other = h.snapshot("other@contoso.com", 3640.0)
    assert (other["in_flight"], other["limit"], other["sent_last_minute"]) == (0, 3, 1)
    # A day later everything saved has expired: nothing is restored that no longer counts.
    assert Governor().restore(saved, 3630.0 + DAY) == 0


@pytest.mark.parametrize("saved", [None, [], {"mailboxes": [1, 2]},
                                   {"mailboxes": {"x": {"day": "junk"}}},
                                   {"mailboxes": {MBX: {"day": [[1, 2]], "minute": []}}}])
def test_restore_skips_what_it_cannot_read(saved: object) -> None:
    g = Governor()
    assert g.restore(saved, 10.0) == 0
    assert g.ready_at(MBX, 1, 10.0) == 10.0


def test_an_attempt_that_never_reached_exchange_is_forgotten() -> None:
    """No token (Entra ID down): retries must not use up the mailbox's minute and day."""
    g = Governor(Limits(messages_per_minute=2, recipients_per_day=100))
    send(g, 0.0, 40)
    for at in (10.0, 11.0, 12.0):                 # three attempts that failed before Exchange
        g.settle(g.admit(MBX, 50, at), at, sent=False)
    snap = g.snapshot(MBX, 13.0)
    assert (snap["sent_last_minute"], snap["recipients_last_24h"]) == (1, 40)
    assert g.ready_at(MBX, 60, 13.0) == 13.0


def test_a_damaged_saved_state_pauses_nothing_for_ever() -> None:
    gov = Governor(Limits(max_sessions=3, messages_per_minute=30, recipients_per_day=10_000))
    now = 1_000_000.0
    saved = {"mailboxes": {
        "inf@contoso.com": {"day": [], "minute": [], "paused_until": "inf"},
        "far@contoso.com": {"day": [], "minute": [], "paused_until": now + 10 * 86_400},
        "nan@contoso.com": {"day": [[float("nan"), 5]], "minute": [], "paused_until": 0},
        "neg@contoso.com": {"day": [[now - 60, -500]], "minute": [], "paused_until": 0},
        "ok@contoso.com": {"day": [[now - 60, 5]], "minute": [], "paused_until": now + 60}}}
    assert gov.restore(saved, now) == 1
    for mailbox in ("inf@contoso.com", "far@contoso.com", "nan@contoso.com",
                    "neg@contoso.com"):
        assert gov.ready_at(mailbox, 1, now) == now
    assert gov.ready_at("ok@contoso.com", 1, now) == now + 60


def test_an_admission_counts_at_once_and_moves_to_when_exchange_counted_it() -> None:
    g = Governor(Limits(messages_per_minute=2))
    first = g.admit(MBX, 1, 0.0)
    second = g.admit(MBX, 1, 0.0)
    # Both count before either is sent: one pass of the queue cannot admit a third.
    assert g.ready_at(MBX, 1, 0.0, sessions=False) == 60.0
    g.settle(first, 5.0, sent=True)          # it waited for a session; Exchange took it at 5
    g.settle(second, 1.0, sent=False)        # no token: it used none of the limits
    assert g.snapshot(MBX, 6.0)["in_flight"] == 0
    assert g.ready_at(MBX, 1, 6.0) == 6.0
    g.admit(MBX, 1, 6.0)
    # Exchange counts the first at 5, not at 0: the minute starts again from there.
    assert g.ready_at(MBX, 1, 6.0, sessions=False) == 65.0


def test_messages_waiting_for_the_window_each_get_their_own_place() -> None:
    g = Governor(Limits(messages_per_minute=3))
    for at in (0.0, 10.0, 20.0):
        send(g, at)
    places = [g.ready_at(MBX, 1, 30.0, sessions=False, ahead=n) for n in range(7)]
    # As each send becomes a minute old, then a minute after the places they free.
    assert places == [60.0, 70.0, 80.0, 120.0, 130.0, 140.0, 180.0]
    h = Governor(Limits(messages_per_minute=3))
    send(h, 0.0)
    # Two places are free now; the third waiting one takes the first send's place.
    assert [h.ready_at(MBX, 1, 5.0, sessions=False, ahead=n) for n in range(4)] == [
        5.0, 5.0, 60.0, 65.0]


def test_a_lowered_session_limit_holds_even_where_the_pool_queues_for_slots() -> None:
    g = Governor(Limits(messages_per_minute=1000))
    for _ in range(3):
        g.admit(MBX, 1, 0.0)
    # At the configured limit the pool queues the next one: the governor lets it through.
    assert g.ready_at(MBX, 1, 0.0, sessions=False) == 0.0
    g.throttled(MBX, 0.0)                   # 432 4.3.2: one session fewer for a while
    assert g.ready_at(MBX, 1, 0.0, sessions=False) == SLOT_RETRY


def test_an_attempt_longer_than_a_minute_still_counts_from_when_exchange_took_it() -> None:
    g = Governor(Limits(messages_per_minute=1))
    slow = g.admit(MBX, 1, 0.0)
    g.settle(slow, 90.0, sent=True)         # a large message: the upload took 90 s
    assert g.ready_at(MBX, 1, 91.0, sessions=False) == 150.0


@given(st.lists(st.tuples(st.floats(0, 50), st.floats(0, 20)), min_size=1, max_size=40))
def test_the_minute_window_stays_what_a_sorted_list_would_be(
        attempts: list[tuple[float, float]]) -> None:
    """Attempts admitted in time order and ending in any order, at times that may be
    earlier than later admissions (a wall clock set back): the window, kept from its
    newest end, holds exactly the send times a sorted list of them would."""
    g = Governor(Limits(max_sessions=100, messages_per_minute=1000))
    expected: list[float] = []
    admitted = [(g.admit(MBX, 1, at), at + took)
                for at, took in sorted(attempts)]
    for at, _ in sorted(attempts):
        bisect.insort(expected, at)
    for admission, ended in sorted(admitted, key=lambda pair: pair[1]):
        now = ended
        g.settle(admission, now, sent=True)
        expected.remove(admission.at)
        bisect.insort(expected, max(now, admission.at))
        window = list(g._box(MBX, now).minute)
        expected = [t for t in expected if t + 60 > now]
        assert window == expected


def test_an_attempt_that_outlived_its_minute_is_not_counted_twice() -> None:
    g = Governor(Limits(max_sessions=10, messages_per_minute=5))
    slow = g.admit(MBX, 1, 0.0)
    send(g, 30.0)
    g.settle(slow, 75.0, sent=True)     # its admission time expired meanwhile
    assert list(g._box(MBX, 75.0).minute) == [30.0, 75.0]
