"""The operations side: what shows an operator how the relay is doing, and the tools they run.

Of a running relay, read through :class:`relay.ops.view.RelayView` (ops never imports the
relay that owns it): the HTTP endpoint (:mod:`~relay.ops.http`) with its readiness
(:mod:`~relay.ops.readiness`, from each profile's health in :mod:`~relay.ops.profilehealth`)
and metrics (:mod:`~relay.ops.metrics` counts events, :mod:`~relay.ops.gauges` reads state,
:mod:`~relay.ops.exposition` names the format), and systemd's notifications
(:mod:`~relay.ops.notify`). For the command line: the setup checklist
(:mod:`~relay.ops.doctor`, :mod:`~relay.ops.doctoradvice`, :mod:`~relay.ops.doctorreport`),
the container's probe (:mod:`~relay.ops.healthcheck`), the queue commands
(:mod:`~relay.ops.queueadmin`), whether the spool can be written (:mod:`~relay.ops.spoolaccess`,
for ``check``), the test message (:mod:`~relay.ops.testmessage`) and what ``init``
writes (:mod:`~relay.ops.install`).
"""
