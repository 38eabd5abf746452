"""Pigtail, a replicated task queue whose every change is an event in the node's log.

- :mod:`~potboiler.pigtail.events`: the events, every change of a queue or a task, and their JSON form.
- :mod:`~potboiler.pigtail.machine`: the pure state machine: queue and task states built from events,
  the checks made before appending one, and what a task looks like.
- :mod:`~potboiler.pigtail.codec`: how events travel in log entries, and their stamps.
- :mod:`~potboiler.pigtail.state`: the states applied from the log, in the service's own store.
- :mod:`~potboiler.pigtail.scheduler`: which task to hand out next, and the listings, without replaying
  every task.
- :mod:`~potboiler.pigtail.engine`: the operations of one node: check, append, wait until applied, answer.
- :mod:`~potboiler.pigtail.validate`: the checks of what clients send.
- :mod:`~potboiler.pigtail.restbody`: parsing the REST writes' raw JSON bodies.
- :mod:`~potboiler.pigtail.views`: a task as clients see it, as a typed message and as REST JSON.
- :mod:`~potboiler.pigtail.paging`: pages of a task listing.
- :mod:`~potboiler.pigtail.servicer`: the gRPC servicers, thin over the engine.
- :mod:`~potboiler.pigtail.worksession`: one worker's WorkTasks stream.
- :mod:`~potboiler.pigtail.service`: Pigtail as a node service (what the node's registry creates).
"""
