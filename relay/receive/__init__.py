"""The SMTP receiving side, where legacy applications connect (Postfix's smtpd).

- :mod:`relay.receive.server`: :class:`Receiver`, the connection gate, submissions, drain;
- :mod:`relay.receive.listeners`: binding the listeners, and changing them on reload;
- :mod:`relay.receive.session`: :class:`RelaySMTP`, one connection;
- :mod:`relay.receive.setuponce`: aiosmtpd's per-connection AUTH lookup, once per class;
- :mod:`relay.receive.auth`: AUTH PLAIN and LOGIN against local accounts;
- :mod:`relay.receive.passwords`: checking those passwords, cached;
- :mod:`relay.receive.guard`: failed-AUTH penalties and lockouts, the refusal log;
- :mod:`relay.receive.clocks`: a connection's line and session deadlines;
- :mod:`relay.receive.handler`: :class:`RelayHandler`, the MAIL/RCPT/DATA decisions;
- :mod:`relay.receive.data`: DATA as it arrives (line model, limits);
- :mod:`relay.receive.budget`: the memory all DATA in progress may hold at once;
- :mod:`relay.receive.incoming`: one message streaming to the spool;
- :mod:`relay.receive.addresses`: checks of client and envelope addresses;
- :mod:`relay.receive.replies`: the replies the relay gives, as values;
- :mod:`relay.receive.tls`: the server's TLS context, renewable on reload.
"""
