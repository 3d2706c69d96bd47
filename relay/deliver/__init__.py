"""One delivery attempt to the upstream (Postfix's smtp).

- relay.deliver.deliverer: :class:`Deliverer`, one message through one profile;
- relay.deliver.pool: upstream sessions kept open per mailbox, within Exchange's limits;
  relay.deliver.lease: a session lent out for one message;
- relay.deliver.upstream: :class:`UpstreamClient`, one upstream and its TLS context;
- relay.deliver.session: the SMTP session (STARTTLS, AUTH XOAUTH2, the transaction);
- relay.deliver.data: DATA streamed from the spool, dot-stuffed on the way;
- relay.deliver.failures: what goes wrong on the way, as replies and exceptions;
- relay.deliver.classify: what an upstream's reply means for the queue.

A new transport (Graph, another SMTP service) is a module beside ``session.py`` that
turns its answers into :class:`relay.core.reply.Reply`, so the queue decides as before.
"""
