"""What one attempt decides for its message, checked as a pure function: a record, the
upstream's replies and an explicit time in, the decisions out (relay.queue.settle)."""

from __future__ import annotations

import copy

import pytest

from relay.core.message import DeliveryResult
from relay.core.reply import Reply
from relay.queue.settle import EXPIRED, TENANT_LIMIT_RETRY, RetryPolicy, backoff, settle
from relay.spool.records import Entry

DAY = 86_400.0
POLICY = RetryPolicy(retry_initial=60.0, retry_max=3600.0, max_lifetime=5 * DAY)
RECEIVED = 1_700_000_000.0
OK, SLOW, GONE = "ok@example.com", "slow@example.com", "gone@example.com"
LOW = min          # draw: the jitter at its lowest, so delays are exact


def entry(*rcpts: str, **kw: object) -> Entry:
    return Entry(id="SETTLE000001", profile="system", mail_from="app@contoso.com",
                 rcpt_tos=list(rcpts), size=10, received_at=RECEIVED,
                 mailbox="relay@contoso.com", **kw)  # type: ignore[arg-type]


def result(accepted: list[str], refused: dict[str, str] | None = None,
           reply: str = "250 2.0.0 Ok") -> DeliveryResult:
    return DeliveryResult(Reply.parse(reply), accepted,
                          {r: Reply.parse(t) for r, t in (refused or {}).items()})


def test_every_recipient_accepted_is_done() -> None:
    s = settle(entry(OK, SLOW), [OK, SLOW], result([OK, SLOW]), RECEIVED + 1, POLICY, LOW)
    assert s.done and s.delivered == (OK, SLOW) and s.failed == {} and s.pending == ()
    assert s.entry.delivered == [OK, SLOW] and s.entry.failed == {}
    assert s.entry.attempts == 1 and s.entry.last_reply == Reply(250, "2.0.0 Ok")
    assert not (s.throttle or s.pause or s.alerts or s.expired)


def test_the_record_given_is_not_changed() -> None:
    before = entry(OK, GONE, SLOW)
    kept = copy.deepcopy(before)
    settle(before, [OK, GONE, SLOW], result([OK], {GONE: "550 5.1.1 User unknown",
                                                   SLOW: "451 4.4.0 later"}),
           RECEIVED + 1, POLICY, LOW)
    assert before == kept


def test_a_temporary_refusal_stays_pending_and_waits_its_backoff() -> None:
    s = settle(entry(OK, SLOW), [OK, SLOW], result([OK], {SLOW: "451 4.4.0 later"}),
               RECEIVED + 1, POLICY, LOW)
    assert not s.done and s.pending == (SLOW,) and s.delivered == (OK,)
    assert s.entry.delivered == [OK] and s.entry.failed == {}
    assert s.retry_in == 0.8 * 60               # the first step, jitter at its lowest


def test_the_tenants_external_limit_holds_the_recipient_an_hour_and_never_fails_it() -> None:
    external = "partner@fabrikam.example"
    s = settle(entry(OK, external), [OK, external],
               result([OK], {external: "550 5.7.233 Tenant has exceeded its external "
                                       "recipient rate limit"}), RECEIVED + 1, POLICY, LOW)
    assert s.pending == (external,) and s.failed == {} and s.delivered == (OK,)
    assert s.retry_in == TENANT_LIMIT_RETRY and len(s.alerts) == 1
    # At the end of its lifetime it fails like any other waiting recipient, with the reply.
    late = settle(s.entry, [external], result([], {external: "550 5.7.233 limit"},
                                              reply="550 5.7.233 limit"),
                  RECEIVED + 5 * DAY, POLICY, LOW)
    assert late.expired and late.failed[external].code == 550


def test_the_delay_doubles_with_each_attempt_up_to_retry_max() -> None:
    def delay(attempts_before: int) -> float:
        e = entry(SLOW, attempts=attempts_before)
        return settle(e, [SLOW], result([], reply="451 4.4.0 later"), RECEIVED + 1,
                      POLICY, max).retry_in

    assert [delay(n) for n in range(4)] == pytest.approx([72, 144, 288, 576])
    assert delay(30) == 3600                    # capped: never over retry_max
    assert backoff(3, 60, 3600, LOW) == 0.8 * 240


def test_a_permanent_refusal_fails_that_recipient_only() -> None:
    s = settle(entry(OK, GONE, SLOW), [OK, GONE, SLOW],
               result([OK], {GONE: "550 5.1.1 User unknown", SLOW: "451 4.4.0 later"}),
               RECEIVED + 1, POLICY, LOW)
    assert s.failed == {GONE: Reply.parse("550 5.1.1 User unknown")}      # the report names only it
    assert s.pending == (SLOW,) and s.delivered == (OK,)
    assert s.entry.failed == {GONE: Reply.parse("550 5.1.1 User unknown")}


def test_earlier_failures_are_kept_but_not_reported_again() -> None:
    before = entry(GONE, SLOW, attempts=1, failed={GONE: Reply(550, "5.1.1 User unknown")})
    s = settle(before, [SLOW], result([], {SLOW: "550 5.1.10 RecipientNotFound"},
                                      reply="550 5.1.10 RecipientNotFound"),
               RECEIVED + 60, POLICY, LOW)
    assert s.failed == {SLOW: Reply.parse("550 5.1.10 RecipientNotFound")}
    assert s.entry.failed == {GONE: Reply.parse("550 5.1.1 User unknown"),
                              SLOW: Reply.parse("550 5.1.10 RecipientNotFound")}
    assert s.done and s.entry.attempts == 2


def test_the_lifetime_ends_the_retries_with_each_recipients_own_reply() -> None:
    # SLOW was refused for now; BUSY got no reply of its own and the overall one was a
    # 250 (for OK): it fails as expired, not with someone else's acceptance.
    busy = "busy@example.com"
    s = settle(entry(OK, SLOW, busy), [OK, SLOW, busy],
               result([OK], {SLOW: "451 4.4.0 later"}), RECEIVED + 5 * DAY, POLICY, LOW)
    assert s.done and s.pending == ()
    assert s.failed == {SLOW: Reply.parse("451 4.4.0 later"), busy: EXPIRED}
    assert s.expired == "gave up after 5 days and 1 attempts"
    assert s.delivered == (OK,)


def test_a_second_before_the_lifetime_it_is_still_retried() -> None:
    s = settle(entry(SLOW), [SLOW], result([], reply="451 4.4.0 later"),
               RECEIVED + 5 * DAY - 1, POLICY, LOW)
    assert s.pending == (SLOW,) and s.expired is None and s.failed == {}


def test_a_login_problem_is_never_a_failure_and_alerts_once() -> None:
    refused = "535 5.7.3 Authentication unsuccessful"
    s = settle(entry(OK, SLOW, attempts=40), [OK, SLOW], result([], reply=refused),
               RECEIVED + DAY, POLICY, LOW)
    assert s.failed == {} and s.pending == (OK, SLOW)
    assert [str(a.reply) for a in s.alerts] == [refused]       # one, for two recipients
    assert "New-ServicePrincipal" in s.alerts[0].explanation


def test_mailbox_reactions() -> None:
    throttled = settle(entry(SLOW), [SLOW], result(
        [], reply="432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"),
        RECEIVED + 1, POLICY, LOW)
    assert throttled.throttle and not throttled.pause and throttled.pending == (SLOW,)
    quota = settle(entry(SLOW), [SLOW], result(
        [], reply="554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException"),
        RECEIVED + 1, POLICY, LOW)
    assert quota.pause and quota.pending == (SLOW,) and quota.failed == {}   # not bounced
