"""The results and workflows measurements (``--only results,workflows``).

* ``results``: the no-op consume rate of one worker process with each result configuration
  — amqptasks: ignore_result (today's consume figure), ``rpc://`` with no reply wanted, the
  SQLite store, the Redis store; Celery: ignore_result and its redis backend — measured like
  the consume group (pre-filled queue, depth marks, every execution counted), each run with
  a fresh store (bench/stores.py).
* ``workflows``: a worker is started, then one client applies ``group`` of N no-ops and
  waits for every result, then ``chord`` of N no-ops with a body that counts them and waits
  for the body's result (each timed from the call to the last result, after a small
  untimed warm-up); then a *fresh* process reads the N results of the group back by id, one
  ``AsyncResult(id).get()`` at a time (p50/p99 per store). Celery runs with its redis
  backend, amqptasks with its Redis store and (a second row) its SQLite store.

Both groups share the rules of bench/measure.py: a fresh vhost per contender, round-robin
repeats, every process stopped in a ``finally``, results checked before a figure counts.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import stores
from .broker import Template, VHost
from .frameworks import QUEUE, Framework, WorkerSpec
from .measure import (
    Ctx,
    Prepared,
    _consume_once,
    _died,
    _Item,
    _start,
    _stop,
    _try,
    _wait_ready,
    prepare_all,
    run_items,
)
from .procs import BenchError, Invalid, Proc, wait_until

__all__ = ["consume_with_results", "workflows"]

STORE_LABELS = {"redis": "Redis", "sqlite": "SQLite"}


def _with_store(
    ctx: Ctx,
    fw: Framework,
    vh: VHost,
    env: dict[str, str],
    spec: WorkerSpec,
    template: Template,
    n: int,
) -> tuple[float, float]:
    """:func:`_consume_once` with a fresh result store of ``spec.store`` for this run."""
    with stores.fresh(spec.store, fw.redis_db, ctx.workdir) as url:
        return _consume_once(ctx, fw, vh, {**env, **fw.backend_env(url)}, spec, template, n)


def consume_with_results(ctx: Ctx, frameworks: list[Framework], quick: bool) -> None:
    fws = [fw for fw in frameworks if fw.results_specs()]
    with ExitStack() as stack:
        prepared = prepare_all(ctx, stack, fws, "results", "rc_none", seed=False)
        items: list[_Item] = []
        for p in prepared:
            templates: dict[str, Template] = {}
            for fig, spec in p.fw.results_specs():
                if quick and not spec.quick:
                    continue
                if spec.seed not in templates:
                    seeded = _try(
                        ctx, fig, p.fw, spec, p.fw.seed, ctx.procs, p.vh, p.env, spec.seed
                    )
                    if seeded is None:
                        continue
                    templates[spec.seed] = seeded
                items.append(
                    _Item(
                        p,
                        fig,
                        spec,
                        ctx.sizes.consume,
                        template=templates[spec.seed],
                        once=_with_store,
                    )
                )
        run_items(ctx, items)


# -- group, chord, read latency ---------------------------------------------------------------


def workflows(ctx: Ctx, frameworks: list[Framework], quick: bool) -> None:
    fws = [fw for fw in frameworks if fw.workflow_specs()]
    with ExitStack() as stack:
        prepared = prepare_all(ctx, stack, fws, "workflows", "wf_group_redis", seed=False)
        for r in range(ctx.sizes.repeats):  # round-robin, like consume
            for p in prepared:
                for spec in p.fw.workflow_specs():
                    if spec.quick or not quick:
                        fig = f"wf_group_{spec.store}"
                        n = ctx.sizes.workflow
                        _try(ctx, fig, p.fw, spec, _workflow_once, ctx, p, spec, r, n)
                        small = ctx.sizes.workflow_small
                        if spec.store == "redis" and 0 < small < n:
                            fig = f"wf_group_{spec.store}_small"
                            _try(ctx, fig, p.fw, spec, _workflow_once, ctx, p, spec, r, small)


def _workflow_once(ctx: Ctx, p: Prepared, spec: WorkerSpec, r: int, n: int) -> None:
    """One worker start with a fresh store: group, then chord of ``n`` (one client), then —
    for a configuration with ``reads``, at the main size — the read-latency client over the
    group's ids. Each figure is recorded on its own (the small size's under ``..._small``);
    returns None so the caller records nothing more."""
    fw, vh = p.fw, p.vh
    small = n != ctx.sizes.workflow
    tag = f"{fw.name} [{spec.label}] #{r + 1}"
    ids = Path(ctx.workdir) / f"ids-{fw.name}-{time.monotonic_ns()}.txt"
    with stores.fresh(spec.store, fw.redis_db, ctx.workdir) as url:
        env = {**p.env, **fw.backend_env(url)}
        vh.purge(QUEUE)
        workers = _start(ctx, spec, env, {})
        try:
            _wait_ready(vh, spec, workers)
            warmup = min(100, n)
            argv = fw.client_argv(
                "workflows", "--n", str(n), "--warmup", str(warmup), "--ids", str(ids)
            )
            # 5x what Celery took when it finished (its client can spin in ResultSet.maybe_throw).
            res = ctx.procs.run(f"{fw.name}-workflows", argv, env, 60 + n / 40)
            _wait_acked(vh, workers)
            _check_drained(vh)
        finally:
            _stop(ctx, workers, spec.stop_grace)
        returned = vh.depth(QUEUE)[0]
        if returned:  # ran (its result was read) but not acked yet when the worker stopped
            what = "; ".join(vh.peek(QUEUE, 3))
            ctx.log(
                f"    note: {tag}: {returned} message(s) returned when the worker stopped: {what}"
            )
        for q in fw.dead_queues:
            dead = vh.depth(q)[0]
            if dead:
                raise Invalid(f"{dead} messages dead-lettered into {q}")
        for key in ("group", "chord"):
            fig = f"wf_{key}_{spec.store}" + ("_small" if small else "")
            ctx.results.add(fig, fw.name, fw.group, spec.label, res[f"{key}_s"])
        ctx.log(
            f"    {tag} group of {n:,} {res['group_s']:.2f} s ({n / res['group_s']:,.0f}/s), "
            f"chord of {n:,} {res['chord_s']:.2f} s ({n / res['chord_s']:,.0f}/s)"
        )
        if spec.reads and not small:
            kind = "store" if fw.group == "amqptasks" else "backend"
            label = f"{STORE_LABELS[spec.store]} {kind}; {n:,} results by id, fresh process"
            fig = f"read_p50_{spec.store}"
            got = _try(ctx, fig, fw, label, _read, ctx, fw, env, ids)
            if got is not None:
                ctx.results.add(fig, fw.name, fw.group, label, got["p50_ms"])
                ctx.results.add(f"read_p99_{spec.store}", fw.name, fw.group, label, got["p99_ms"])
                ctx.log(
                    f"    {tag} AsyncResult(id).get() of {got['n']:,} stored results: "
                    f"p50 {got['p50_ms']:.3f} ms, p99 {got['p99_ms']:.3f} ms"
                )
    ids.unlink(missing_ok=True)


def _read(ctx: Ctx, fw: Framework, env: dict[str, str], ids: Path) -> dict[str, Any]:
    n = ctx.sizes.workflow
    argv = fw.client_argv("read", "--ids", str(ids))
    res = ctx.procs.run(f"{fw.name}-read", argv, env, 60 + n / 50)
    if int(res["n"]) != n:
        raise Invalid(f"read {res['n']} results, expected {n}")
    return res


def _wait_acked(vh: VHost, workers: list[Proc], timeout: float = 60) -> None:
    """Wait (bounded) until the worker acked what it ran, before it is stopped. Both
    frameworks store a result before they ack its message, so the last results reach the
    client a moment before the last acks reach the broker (Celery's solo worker, stopped
    right then, returned a dozen finished messages to the queue). The management stats lag
    ~5 s, so this is best effort: two zero samples 1 s apart; a finished message that still
    comes back when the worker stops is reported as a note, not as a failed run (its result
    was read and checked)."""
    stable = 0

    def settled() -> bool:
        nonlocal stable
        problem = _died(workers)
        if problem:
            raise BenchError(problem)
        q = next((q for q in vh.queues() if q.get("name") == QUEUE), {})
        busy = int(q.get("messages_unacknowledged", 0) or 0) + vh.depth(QUEUE)[0]
        stable = stable + 1 if busy == 0 else 0
        return stable >= 2

    wait_until(settled, timeout, 1.0, "the worker to ack every message")


def _check_drained(vh: VHost) -> None:
    """Every message of the run was taken by the worker (exact: a passive declare)."""
    left = vh.depth(QUEUE)[0]
    if left:
        raise Invalid(
            f"{left} messages still in {QUEUE} after the workflows finished, e.g. "
            + "; ".join(vh.peek(QUEUE, 3))
        )
