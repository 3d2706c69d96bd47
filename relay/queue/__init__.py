"""The queue manager (Postfix's qmgr): takes spooled messages through delivery attempts until
each recipient is delivered or reported on.

- relay.queue.scheduler: :class:`Queue`, the dispatcher (window, buffer of due retries,
  turns between new mail and retries, pacing) and the entry point for new messages;
- relay.queue.waiting: what waits for the dispatcher's next pass (new mail handed over
  in memory, due retries) and when the disk is scanned;
- relay.queue.attempt: one attempt's life cycle, from active/ to its next state;
- relay.queue.settle: what an attempt decides per recipient, as a pure function;
- relay.queue.waiters: the answer to a client that waits for the first attempt;
- relay.queue.bounce and relay.queue.dsn: delivery reports, when and how;
- relay.queue.governor and relay.queue.pacing: per-mailbox pacing within Exchange
  Online's limits, and its state kept across restarts;
- relay.queue.report: the one log line and the counters per attempt.

The queue reads and writes the spool only through relay.spool.facade.AsyncSpool, and
takes every time it decides on from one injected clock.
"""
