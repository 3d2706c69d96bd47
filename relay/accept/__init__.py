"""What happens to a message before it is kept (Postfix's cleanup).

- relay.accept.route: :class:`Router`, which mailbox profile a message goes through;
- relay.accept.cleanup: :func:`prepare_headers`, the header work done once per message;
- relay.accept.headers: byte-exact editing of the header section, and its limits;
- relay.accept.names: display names and addresses read the lenient way devices need;
- relay.accept.policy: the profile's sender policy (rewrite, refuse or keep From);
- relay.accept.trace: the Received field the relay adds.

The receiving side calls these while the client waits; none of them touches the network,
and all of them are bounded in time and memory whatever the client sends.
"""
