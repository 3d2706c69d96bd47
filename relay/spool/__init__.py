"""The spool: accepted messages on disk, in directories named for their state.

- relay.spool.records: :class:`State` and :class:`Entry`, a message's metadata record;
- relay.spool.store: :class:`Spool`, the directories and the protocol of moves, blocking;
- relay.spool.recovery: what a start does after a stop or a crash;
- relay.spool.locks: one relay per spool, operator commands one at a time; SpoolError;
- relay.spool.facade: :class:`AsyncSpool`, the one face the event loop (the queue) uses;
- relay.spool.writer: :class:`DataWriter`, a message's bytes as they arrive;
- relay.spool.disk: the crash-safe system calls underneath;
- relay.spool.ctl: the operator's ``queue`` commands.

Once the relay answers 250 the message is the relay's responsibility, so it must be on
disk, durably, before that answer. The layout follows Postfix: a queue is a directory,
and an operator can see (and repair) what is where with ``ls``::

    tmp/        being written; never acknowledged, discarded on start
    data/       <id>.eml: the message bytes, written once, never changed
    incoming/   <id>.json: accepted, waiting for the first delivery attempt
    active/     <id>.json: a delivery attempt is in progress
    deferred/   <id>.json: waiting; the file's modification time is the next attempt
    hold/       <id>.json: put on hold by the operator
    failed/     <id>.json: dead letters (bounced or expired), kept for inspection
    corrupt/    files the relay could not read, moved aside instead of deleted

A message's state is the directory its metadata file is in; moving between states is one
atomic rename. As in Postfix, a deferred file's modification time is its due time, so the
queue manager finds due messages by listing the directory, without opening files or
keeping the queue in memory, and every file is found by its id alone.

Durability: a new message's bytes are written to ``tmp/`` as they arrive from the client
(DataWriter, so a large message never sits in memory), its metadata follows; both are
fsynced and renamed into place (Spool.add), and the directories are fsynced
(Spool.sync_dirs) before AsyncSpool.accept returns. Directory fsyncs of concurrent
arrivals are shared (group commit), so durability does not cap throughput. The take of
a message into active/ for an attempt is not synced at all: recovery returns active/ to
incoming/, so either side of a rename that a power cut undid is safe. Whatever fails
on the way (a full disk, a client that goes away) removes its own files from tmp/ at once:
nothing is left to fill the disk until the next start. A directory sync that fails takes
the placed files out again (Spool.withdraw): the client is told 4xx and sends the message
again, so no copy may stay behind. Every metadata file read back is validated
(Entry.from_json): a damaged one is set aside in corrupt/ instead of being tripped over.

State changes. The relay and ``queue`` commands run by an operator (other processes) work
on the same spool at once, so the protocol keeps one invariant: at every instant, for
every message, exactly one ``<state>/<id>.json`` exists, and its data exists with it.

* A state change is one ``rename(src/<id>.json, dst/<id>.json)``. The rename is also the
  lock: of two processes moving the same message, the second one's rename fails with
  ENOENT, changing nothing, and that party reports it (operator) or moves on (relay).
* Nothing is written to a message's name after that rename: a second step (say, new
  content renamed over ``dst/<id>.json``) could recreate the file in a directory that the
  other process has already moved the message out of, leaving it in two states.
* New content is therefore written *before* the move, by the one party that owns the
  source state: to ``tmp/``, fsynced, given its due time as mtime when it is going to
  deferred/, and renamed over ``src/<id>.json`` in place. (One exception, for a full
  disk: the record of an upstream's 250 is written over the file in active/ itself, see
  Spool.record_delivered.) active/ is owned by the relay's queue (operator commands leave
  it alone); hold/ and failed/ by operator commands, which serialize among themselves
  with Spool.operator_lock. In the shared states, incoming/ and deferred/, content is
  never rewritten; only the mtime changes (``utime`` is atomic and fails, too, if the
  file has gone).
* Deleting a message starts by unlinking its metadata (the claim: it fails if the message
  was taken meanwhile); only then its data is unlinked.

A crash (kill -9, power loss) between any two of these system calls leaves a state that
recovery (relay.spool.recovery) resolves deterministically: a temporary file in tmp/ is
discarded; a rewritten file still in its source state stays there (from active/ it goes
back to incoming/ with the attempt's outcome recorded, so delivered recipients are not
sent again); data whose metadata was unlinked is an orphan and goes, completing the delete.
"""
