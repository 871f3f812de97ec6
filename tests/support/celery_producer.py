"""A Celery 5 producer, unmodified Celery code, run in its own virtualenv by the Celery ingest
tests: ``python celery_producer.py '{"call": ..., ...}'`` with $CELERY_BROKER_URL.

It routes ``tasks.*`` to the amqptasks topology (exchange ``tasks``, routing key
``task.celery``, bound to queue ``default``), reads results with the ``rpc://`` backend, and
prints one line ``RESULT {json}``: the task id, and with ``"wait"`` the result or the error
Celery's ``AsyncResult.get()`` raised. The task bodies here never run: amqptasks runs them.
"""

from __future__ import annotations

import json
import os
import sys
import time

from celery import Celery

app = Celery("producer", broker=os.environ["CELERY_BROKER_URL"], backend="rpc://")
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_routes={
        "tasks.*": {"exchange": "tasks", "exchange_type": "topic", "routing_key": "task.celery"}
    },
    broker_connection_retry_on_startup=True,
)


def _elsewhere(*_args, **_kwargs):
    raise RuntimeError("this task runs on amqptasks, not here")


add = app.task(name="tasks.add")(_elsewhere)
fail = app.task(name="tasks.fail")(_elsewhere)
spin = app.task(name="tasks.spin")(_elsewhere)
missing = app.task(name="tasks.missing")(_elsewhere)
mended = app.task(name="tasks.mended")(_elsewhere)


def main() -> None:
    spec = json.loads(sys.argv[1])
    call = spec["call"]
    started = time.time()
    if call == "delay":  # add.delay(2, 3), literally
        result = add.delay(*spec["args"])
    elif call == "chain":  # add.s(2, 2) | add.s(4)
        result = (add.s(*spec["first"]) | add.s(*spec["then"])).apply_async()
    elif call == "links":  # add(2, 2) linked to add.s(10); fail("x") linked to add.si(0, 0)
        add.apply_async((2, 2), link=add.s(10))
        result = fail.apply_async(("x",), link_error=add.si(0, 0))
    elif call == "group":  # group(add.s(1, 1), add.s(2, 2)), results in order
        from celery import group

        result = group(add.s(1, 1), add.s(2, 2)).apply_async()
    else:
        task = app.tasks[call]
        result = task.apply_async(
            spec.get("args", ()), spec.get("kwargs"), **spec.get("options", {})
        )
    out = {"id": result.id, "sent": started}  # a group's id for a group
    if spec.get("wait"):
        try:
            out["result"] = result.get(timeout=spec["wait"])
        except Exception as exc:  # what Celery's AsyncResult.get() raised
            out["error"] = {
                "type": type(exc).__name__,
                "module": type(exc).__module__,
                "message": str(exc),
                "builtin_value_error": isinstance(exc, ValueError),
            }
        out["elapsed"] = time.time() - started
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
