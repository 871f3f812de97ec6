"""The contenders: how to set each one up on a vhost, seed a message, run its workers and
clients, and which configurations of it are measured.

All share: one durable queue ``bench``, persistent messages, JSON bodies, manual acks after
the task ran unless a configuration says otherwise, prefetch 256 per worker process, worker
logging at WARNING (per-task INFO lines would measure the logger).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from amqptasks.protocol import new_id as amqptasks_new_id

from .broker import Template, VHost
from .procs import BenchError, Procs
from .stores import AMQPTASKS_DB, CELERY_DB

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".amqptasks" / "bench"
QUEUE = "bench"
PREFETCH = 256


@dataclass
class WorkerSpec:
    """One measured worker configuration: the OS processes to launch for it."""

    framework: str
    label: str
    processes: int  # worker processes, as the figures count them
    argvs: list[list[str]]
    env: dict[str, str] = field(default_factory=dict)
    consumers: int = 1  # consumers on the queue once every process is ready
    prefetch_total: int = PREFETCH
    note: str = ""
    quick: bool = True  # also measured in --quick mode
    #: Seconds between SIGTERM and SIGKILL. Celery's solo worker notices SIGTERM only ~9 s
    #: later (its event loop's poll timeout); its work is settled by then (acks_late acks
    #: right after each task), so it gets 3 s.
    stop_grace: float = 20.0
    #: Results and workflows groups: the result store this configuration runs with ("" =
    #: none configured, "rpc", "sqlite", "redis"; a fresh one per run, see bench/stores.py),
    #: the bench task its pre-filled messages call, and whether the read-latency client
    #: reads back the results its group run stored.
    store: str = ""
    seed: str = "noop"
    reads: bool = False
    #: A cost variant of a plain configuration ("events", "metrics"): measured in the consume
    #: group under its own figure (``consume1_events``...), so it never competes for the
    #: contender's best no-op figure and its cost is set against the plain one.
    variant: str = ""
    #: Environment for the clients (latency, delay().get()) run against this configuration:
    #: a caller must know the result store its workers use, and a raw caller's variant
    #: (confirmed or not) is a client setting, not a worker one.
    client_env: dict[str, str] = field(default_factory=dict)


@dataclass
class PublishSpec:
    figure: str  # pub_loop_confirmed | pub_bulk | pub_loop_unconfirmed
    label: str
    args: list[str]


class Framework:
    name = ""
    group = ""  # amqptasks | celery | dramatiq | raw
    client = ""  # module run with ``python -m`` for client modes
    dead_queues: tuple[str, ...] = ()
    has_rpc = True
    has_countdown = True

    def __init__(self, python: str) -> None:
        self.python = python

    def new_id(self) -> str:
        """A task id as this framework's own client makes one (Celery, Dramatiq and a raw
        client: a random UUID)."""
        return str(uuid.uuid4())

    # -- per vhost ------------------------------------------------------------------------------
    def env(self, vh: VHost, workdir: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQPTASKS_", "BENCH_"))}
        env.update(
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            BENCH_URL=vh.url,
            BENCH_QUEUE=QUEUE,
        )
        env.pop("VIRTUAL_ENV", None)
        return env

    def setup(self, procs: Procs, vh: VHost, workdir: Path) -> dict[str, str]:
        """Prepare ``vh`` (topology) and return the environment for workers and clients."""
        return self.env(vh, workdir)

    def client_argv(self, mode: str, *args: str) -> list[str]:
        return [self.python, "-m", self.client, mode, *args]

    def seed(self, procs: Procs, vh: VHost, env: dict[str, str], task: str = "noop") -> Template:
        """Publish one message calling bench task ``task`` through the framework's own API
        (which also declares what it declares) and take it back as the template for
        pre-filling."""
        argv = self.client_argv("seed", "--task", task)
        procs.run(f"{self.name}-seed", argv, env, timeout=60)
        return vh.take_template(QUEUE, self.new_id)

    # -- configurations -------------------------------------------------------------------------
    def consume_specs(self, processes: int) -> list[WorkerSpec]:
        raise NotImplementedError

    def latency_specs(self) -> list[WorkerSpec]:
        """Configurations for publish→start latency, delay().get() and idle memory: every
        plain configuration of the one-process consume group (a contender's lowest-latency
        configuration is not always its fastest: Dramatiq's ``--threads 1``), each
        contender's best picked the same way, by median."""
        return [s for s in self.consume_specs(1) if not s.variant]

    def rss_specs(self) -> list[WorkerSpec]:
        """Configurations run through ``--rss-tasks`` tasks with memory sampled: a peer's
        first configuration (its defaults, closest to how it is deployed)."""
        return self.latency_specs()[:1]

    def countdown_spec(self) -> WorkerSpec:
        return self.latency_specs()[0]

    def publish_specs(self) -> list[PublishSpec]:
        raise NotImplementedError

    # -- results and workflows (bench/measure_results.py) --------------------------------
    #: The Redis database this framework's store uses (bench/stores.py).
    redis_db = 0

    def results_specs(self) -> list[tuple[str, WorkerSpec]]:
        """(figure, configuration) pairs of the consume-with-results group."""
        return []

    def workflow_specs(self) -> list[WorkerSpec]:
        """Configurations for group/chord of N and the read-latency client."""
        return []

    def backend_env(self, url: str | None) -> dict[str, str]:
        """Environment that points workers and clients at result store ``url``."""
        return {}

    def versions(self) -> dict[str, str]:
        return {}


def _dist_versions(names: list[str]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = "?"
    return out


def _venv_versions(python: str, names: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        f"names = {names!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: out[n] = '?'\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run(
            [python, "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
        result: dict[str, str] = json.loads(done.stdout)
        return result
    except (subprocess.SubprocessError, OSError, ValueError):
        return dict.fromkeys(names, "?")


# -- amqptasks ---------------------------------------------------------------------------------


def amqptasks_exe() -> str:
    exe = Path(sys.executable).with_name("amqptasks")
    return str(exe) if exe.exists() else (shutil.which("amqptasks") or "amqptasks")


class AmqpTasks(Framework):
    name = "amqptasks"
    group = "amqptasks"
    client = "bench.peers.amq_client"
    dead_queues = (f"{QUEUE}.dlq",)

    def new_id(self) -> str:
        return amqptasks_new_id()  # time-ordered (docs/protocol.md)

    def setup(
        self, procs: Procs, vh: VHost, workdir: Path, queues: list[str] | None = None
    ) -> dict[str, str]:
        """The config (every queue of ``queues``, default the one bench queue; routes to the
        first) and ``topology apply`` on ``vh``."""
        queues = queues or [QUEUE]
        env = self.env(vh, workdir)
        config = {
            "broker": {"url": vh.url, "publish_timeout": 30},
            "imports": ["bench.peers.amq_tasks"],
            "queues": {q: {} for q in queues},
            "routes": {"bench.*": {"queue": queues[0]}},
            "worker": {"concurrency": 8, "prefetch_multiplier": 32, "pool": "asyncio"},
            "results": {"ignore_result": False},
            "serialization": {"accept": ["application/json"]},
        }
        path = workdir / f"amqptasks-{vh.name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        env["AMQPTASKS_CONFIG"] = str(path)
        p = procs.start("amqptasks-topology", [amqptasks_exe(), "topology", "apply"], env)
        try:
            code = p.popen.wait(60)
        finally:
            procs.stop(p)
        if code != 0:
            raise BenchError(f"amqptasks topology apply exited {code}:\n{p.output()}")
        return env

    def _spec(
        self,
        processes: int,
        pool: str,
        c: int,
        mult: int,
        *,
        quick: bool = True,
        events: bool = False,
        metrics: bool = False,
        store: str = "",
        seed: str = "noop",
        reads: bool = False,
        what: str = "",
    ) -> WorkerSpec:
        argvs = [
            [
                amqptasks_exe(),
                "worker",
                "-Q",
                QUEUE,
                "--pool",
                pool,
                "-c",
                str(c),
                "--prefetch-multiplier",
                str(mult),
                "-l",
                "WARNING",
                "-n",
                f"bench{i}@localhost",
                "--events" if events else "--no-events",
                *(["--metrics-port", "0"] if metrics else []),
            ]
            for i in range(processes)
        ]
        label = (
            f"{pool} pool, -c {c}, prefetch {c * mult}"
            + (", events on" if events else "")
            + (", metrics on" if metrics else "")
        )
        variant = "events" if events else "metrics" if metrics else ""
        if processes > 1:
            label = f"{processes} × ({label})"
        if what:
            label = f"{what}; {label}"
        return WorkerSpec(
            self.name,
            label,
            processes,
            argvs,
            consumers=processes,
            prefetch_total=c * mult * processes,
            quick=quick,
            store=store,
            seed=seed,
            reads=reads,
            variant=variant,
        )

    def consume_specs(self, processes: int) -> list[WorkerSpec]:
        # No "asyncio -c 256": the asyncio pool runs a sync no-op inline on the loop, so its
        # -c changes nothing here (same prefetch, same code path): one configuration drawn
        # twice would only give our best two draws.
        specs = [self._spec(processes, "asyncio", 8, 32), self._spec(processes, "threads", 8, 32)]
        if processes == 1:
            specs += [
                # What publishing task and worker events costs (docs/events.md): the same
                # configurations with --events (no listener bound: the worker's own cost).
                self._spec(1, "asyncio", 8, 32, events=True),
                self._spec(1, "threads", 8, 32, events=True),
                # What --metrics-port costs (docs/metrics.md): the runtime histogram and the
                # dead-letter counts on the delivery path; the rest is read at scrape time.
                self._spec(1, "asyncio", 8, 32, metrics=True, quick=False),
                self._spec(1, "threads", 8, 32, metrics=True, quick=False),
            ]
        return specs

    def latency_specs(self) -> list[WorkerSpec]:
        # The consume group's configurations run with the default store (SQLite: the worker
        # writes each result durably before it replies), so their delay().get() pays a write
        # that raw pika's round trip does not; the rpc:// row is the like-for-like one (a
        # reply, nothing kept). Both are reported, labelled by store.
        specs = super().latency_specs()
        for s in specs:
            s.label = f"SQLite store (default); {s.label}"
        return [*specs, self._spec(1, "asyncio", 8, 32, store="rpc", what="rpc:// store")]

    def rss_specs(self) -> list[WorkerSpec]:
        # Every pool: memory must stay flat whichever one a user picks (the processes pool:
        # two children on two cores, prefetch 256 like the others).
        return [
            self._spec(1, "threads", 8, 32),
            self._spec(1, "asyncio", 8, 32),
            self._spec(1, "processes", 2, 128),
        ]

    def countdown_spec(self) -> WorkerSpec:
        return self._spec(1, "threads", 8, 32)

    def scale_spec(self, processes: int, queues: list[str]) -> WorkerSpec:
        """The scale group's worker: ``processes`` × (asyncio pool, -c 8, prefetch 256),
        each consuming every one of ``queues``."""
        spec = self._spec(processes, "asyncio", 8, 32)
        for argv in spec.argvs:
            argv[argv.index("-Q") + 1] = ",".join(queues)
        spec.label = f"{processes} × {len(queues)} queue(s); {spec.label}"
        return spec

    redis_db = AMQPTASKS_DB

    def results_specs(self) -> list[tuple[str, WorkerSpec]]:
        # "none" is today's consume figure: bench.noop ignores its result (a store is
        # configured and unused, as with the default backend); the others run bench.rnoop,
        # which keeps its result, with the message published without reply_to.
        kinds = (
            ("rc_none", "sqlite", "noop", "ignore_result (SQLite store configured, unused)"),
            ("rc_rpc", "rpc", "rnoop", "rpc://, no reply wanted"),
            ("rc_sqlite", "sqlite", "rnoop", "SQLite store"),
            ("rc_redis", "redis", "rnoop", "Redis store"),
        )
        # The consume group's best configuration (the threads pool is slower for no-ops; a
        # store's writes are batched on their own thread either way; -c 256 would be the
        # same configuration again: the asyncio pool runs sync tasks inline).
        pools = (("asyncio", 8, 32, True),)
        return [
            (fig, self._spec(1, pool, c, m, quick=q, store=store, seed=seed, what=what))
            for fig, store, seed, what in kinds
            for pool, c, m, q in pools
        ]

    def workflow_specs(self) -> list[WorkerSpec]:
        return [
            self._spec(1, pool, 8, 32, quick=q, store=store, reads=q, what=what)
            for store, what in (("redis", "Redis store"), ("sqlite", "SQLite store"))
            for pool, q in (("asyncio", True), ("threads", False))
        ]

    def backend_env(self, url: str | None) -> dict[str, str]:
        return {"AMQPTASKS_RESULT_BACKEND": url} if url else {}

    def publish_specs(self) -> list[PublishSpec]:
        return [
            PublishSpec("pub_loop_confirmed", "noop.delay() loop, confirmed", ["--style", "loop"]),
            PublishSpec(
                "pub_bulk",
                "App.send_many() (= task.delay_many), window 1000, all confirmed",
                ["--style", "bulk", "--window", "1000"],
            ),
        ]

    def versions(self) -> dict[str, str]:
        return _dist_versions(
            ["amqptasks", "aio-pika", "aiormq", "pamqp", "pika", "orjson", "redis"]
        )


# -- Celery ------------------------------------------------------------------------------------


class Celery(Framework):
    name = "celery"
    group = "celery"
    client = "bench.peers.celery_client"

    def _spec(
        self,
        processes: int,
        pool: str,
        *,
        c: int = 1,
        acks_late: bool = True,
        instances: int = 1,
        quick: bool = True,
        note: str = "",
        store: str = "",
        seed: str = "noop",
        reads: bool = False,
        what: str = "",
    ) -> WorkerSpec:
        mult = max(1, PREFETCH // c)
        argvs = []
        for i in range(instances):
            argv = [
                self.python,
                "-m",
                "celery",
                "-A",
                "bench.peers.celery_tasks",
                "worker",
                "-P",
                pool,
                "-Q",
                QUEUE,
                "-l",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"bench{i}@%h",
            ]
            if pool != "solo":
                argv += ["-c", str(c)]
            argvs.append(argv)
        ack = "acks_late" if acks_late else "early ack (default)"
        label = f"{pool}{'' if pool == 'solo' else f' -c {c}'}, {ack}, prefetch {mult * c}"
        if instances > 1:
            label = f"{instances} × ({label})"
        if what:
            label = f"{what}; {label}"
        return WorkerSpec(
            self.name,
            label,
            processes,
            argvs,
            env={
                "BENCH_ACKS_LATE": "1" if acks_late else "0",
                "BENCH_PREFETCH_MULTIPLIER": str(mult),
            },
            consumers=instances,
            prefetch_total=mult * c * instances,
            note=note,
            quick=quick,
            stop_grace=3.0,
            store=store,
            seed=seed,
            reads=reads,
        )

    def consume_specs(self, processes: int) -> list[WorkerSpec]:
        if processes == 1:
            return [
                self._spec(1, "solo"),
                self._spec(1, "solo", acks_late=False),
                self._spec(1, "threads", c=4, quick=False),
                self._spec(1, "prefork", c=1, quick=False, note="2 OS processes: parent + 1 child"),
            ]
        return [
            self._spec(2, "solo", instances=2),
            self._spec(2, "solo", acks_late=False, instances=2, quick=False),
            self._spec(2, "prefork", c=2, quick=False, note="3 OS processes: parent + 2 children"),
        ]

    redis_db = CELERY_DB

    def results_specs(self) -> list[tuple[str, WorkerSpec]]:
        kinds = (
            ("rc_none", "", "noop", "ignore_result"),
            ("rc_redis", "redis", "rnoop", "redis backend"),
        )
        pools = (("solo", 1, True), ("threads", 8, False))
        return [
            (fig, self._spec(1, pool, c=c, quick=q, store=store, seed=seed, what=what))
            for fig, store, seed, what in kinds
            for pool, c, q in pools
        ]

    def workflow_specs(self) -> list[WorkerSpec]:
        # Celery's chord with the redis backend joins in Redis (each member's result is
        # appended and counted by one Lua script; the member that completes it calls the
        # body), not with the polling celery.chord_unlock task.
        return [
            self._spec(1, "solo", store="redis", reads=True, what="redis backend"),
            self._spec(1, "threads", c=8, store="redis", quick=False, what="redis backend"),
        ]

    def backend_env(self, url: str | None) -> dict[str, str]:
        return {"BENCH_CELERY_BACKEND": url} if url else {}

    def publish_specs(self) -> list[PublishSpec]:
        return [
            PublishSpec(
                "pub_loop_confirmed",
                "apply_async() loop, confirm_publish",
                ["--confirm"],
            ),
            PublishSpec("pub_loop_unconfirmed", "apply_async() loop (default, unconfirmed)", []),
        ]

    def versions(self) -> dict[str, str]:
        return _venv_versions(self.python, ["celery", "kombu", "amqp", "redis"])


# -- Dramatiq ----------------------------------------------------------------------------------


class Dramatiq(Framework):
    name = "dramatiq"
    group = "dramatiq"
    client = "bench.peers.dramatiq_client"
    dead_queues = (f"{QUEUE}.XQ",)
    has_rpc = False  # results need Redis or Memcached

    def _spec(
        self, processes: int, threads: int, prefetch: int | None, *, quick: bool = True
    ) -> WorkerSpec:
        argv = [
            self.python,
            "-m",
            "dramatiq",
            "bench.peers.dramatiq_tasks",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
            "--worker-shutdown-timeout",
            "10000",
        ]
        env = {"dramatiq_queue_prefetch": str(prefetch)} if prefetch else {}
        per = prefetch or threads * 2
        label = f"--processes {processes} --threads {threads}, prefetch {per}"
        if not prefetch:
            label += " (default)"
        return WorkerSpec(
            self.name,
            label,
            processes,
            [argv],
            env=env,
            consumers=processes,
            prefetch_total=per * processes,
            note="+1 supervisor process",
            quick=quick,
        )

    def consume_specs(self, processes: int) -> list[WorkerSpec]:
        return [
            self._spec(processes, 8, PREFETCH),
            self._spec(processes, 8, None, quick=False),
            self._spec(processes, 2, PREFETCH, quick=False),
            self._spec(processes, 1, PREFETCH),
        ]

    def publish_specs(self) -> list[PublishSpec]:
        return [
            PublishSpec("pub_loop_confirmed", "send() loop, confirm_delivery=True", ["--confirm"]),
            PublishSpec("pub_loop_unconfirmed", "send() loop (default, unconfirmed)", []),
        ]

    def versions(self) -> dict[str, str]:
        return _venv_versions(self.python, ["dramatiq", "pika"])


# -- raw clients (the ceiling) ----------------------------------------------------------------


class RawPika(Framework):
    name = "raw-pika"
    group = "raw"
    client = "bench.peers.raw_pika"
    has_countdown = False

    def setup(self, procs: Procs, vh: VHost, workdir: Path) -> dict[str, str]:
        vh.declare(QUEUE)
        return self.env(vh, workdir)

    def consume_specs(self, processes: int) -> list[WorkerSpec]:
        # The ceiling for amqptasks is a batched one ("batched" in the label: the consume
        # target picks among those): every 64 deliveries on a BlockingConnection, and once
        # per event-loop turn on an AsyncioConnection (exactly the worker's own pattern).
        kinds = (
            ("BlockingConnection", "manual ack", {"BENCH_ACK_EVERY": "1"}, True),
            (
                "BlockingConnection",
                "acks batched (multiple=True every 64)",
                {"BENCH_ACK_EVERY": "64"},
                processes == 1,
            ),
            (
                "AsyncioConnection",
                "acks batched (multiple=True once per loop turn)",
                {"BENCH_ACK_STYLE": "turn"},
                processes == 1,
            ),
        )
        specs = []
        for conn, what, env, quick in kinds:
            label = f"{conn}, basic_consume, {what}, prefetch {PREFETCH}"
            if processes > 1:
                label = f"{processes} × ({label})"
            specs.append(
                WorkerSpec(
                    self.name,
                    label,
                    processes,
                    [self.client_argv("consume") for _ in range(processes)],
                    env={"BENCH_PREFETCH": str(PREFETCH), **env},
                    consumers=processes,
                    prefetch_total=PREFETCH * processes,
                    quick=quick,
                )
            )
        return specs

    def same_messages_spec(self) -> WorkerSpec:
        """The batched AsyncioConnection consumer again, reading amqptasks' own messages
        from amqptasks' queue (``consume1_same``). Why a second ceiling: raw pika's own
        message is small enough (62-byte body, 57 bytes of properties) that RabbitMQ keeps
        both parts as Erlang heap binaries (≤ 64 bytes); a real task message is larger —
        amqptasks' or Celery's — and the broker then spends about twice the CPU per
        message (docs/benchmarks.md, Method), so a consumer of it is broker-bound well
        below raw pika's own rate. This row is what raw pika does with the same bytes."""
        spec = self.consume_specs(1)[-1]
        spec.label = f"{spec.label}, amqptasks' messages and queue"
        spec.variant = "same"
        return spec

    def latency_specs(self) -> list[WorkerSpec]:
        # Raw pika's round trip publishes unconfirmed (the fastest a caller can be, and the
        # figure the target is set against); a second row has the caller confirm its publish
        # as amqptasks' delay() always does, so the cost of that promise is visible.
        specs = super().latency_specs()
        confirmed = copy.deepcopy(specs[0])
        confirmed.label = f"{confirmed.label}; the caller publishes with confirm_delivery"
        confirmed.client_env = {"BENCH_RPC_CONFIRM": "1"}
        confirmed.quick = False
        return [*specs, confirmed]

    def publish_specs(self) -> list[PublishSpec]:
        return [
            PublishSpec(
                "pub_loop_confirmed", "basic_publish loop, confirm_delivery", ["--confirm"]
            ),
            PublishSpec(
                "pub_bulk",
                "SelectConnection, confirm_delivery, window 1000, all confirmed",
                ["--style", "pipelined", "--window", "1000"],
            ),
            PublishSpec("pub_loop_unconfirmed", "basic_publish loop, unconfirmed", []),
        ]

    def versions(self) -> dict[str, str]:
        return _dist_versions(["pika"])


class RawAioPika(RawPika):
    name = "raw-aio-pika"
    client = "bench.peers.raw_aiopika"
    has_rpc = False

    def seed(self, procs: Procs, vh: VHost, env: dict[str, str], task: str = "noop") -> Template:
        procs.run("raw-seed", [self.python, "-m", "bench.peers.raw_pika", "seed"], env, timeout=60)
        return vh.take_template(QUEUE, self.new_id)

    def consume_specs(self, processes: int) -> list[WorkerSpec]:
        specs = super().consume_specs(processes)[:1]
        for s in specs:
            s.label = s.label.replace("BlockingConnection, basic_consume", "connect, queue.consume")
            s.quick = False
        return specs

    def latency_specs(self) -> list[WorkerSpec]:
        return []

    def publish_specs(self) -> list[PublishSpec]:
        return [
            PublishSpec(
                "pub_bulk",
                "publisher_confirms, window 1000, all confirmed",
                ["--style", "pipelined", "--window", "1000"],
            )
        ]

    def versions(self) -> dict[str, str]:
        return _dist_versions(["aio-pika"])


def venv_python(name: str) -> Path:
    return STATE / f"venv-{name}" / "bin" / "python"


def _imports(python: Path, module: str) -> bool:
    done = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, timeout=60)
    return done.returncode == 0


def ensure_venv(
    name: str,
    requirement: str,
    module: str,
    log: Any,
    refresh: bool = False,
    *,
    venv: Path | None = None,
) -> str:
    """The peer's virtualenv under .amqptasks/bench/ (created with ``python3 -m venv`` and
    ``pip install REQUIREMENT`` — the latest release — unless it already imports ``module``,
    e.g. ``"celery, redis"``, and ``refresh`` is false). ``venv`` puts it elsewhere (the Celery
    ingest tests keep theirs in .amqptasks/venvs/). A virtualenv that exists but lacks
    something the requirement gained later (the Celery one before it needed ``redis``) gets
    it installed in place first, so a run that uses it meanwhile is not pulled from under."""
    python = venv / "bin" / "python" if venv is not None else venv_python(name)
    venv = python.parents[1]
    logfile = STATE / f"install-{name}.log"
    STATE.mkdir(parents=True, exist_ok=True)
    if python.exists() and not refresh:
        if _imports(python, module):
            return str(python)
        log(f"{venv} cannot import {module}: installing {requirement} ...")
        with logfile.open("w") as out:
            _pip(out, [str(python), "-m", "pip", "install", "-q", requirement], logfile, True)
        if _imports(python, module):
            return str(python)
    log(f"creating {venv} and installing {requirement} (latest) ...")
    base = shutil.which("python3") or sys.executable
    steps = [
        [base, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [str(python), "-m", "pip", "install", "-q", requirement],
    ]
    with logfile.open("w") as out:
        for step in steps:
            _pip(out, step, logfile)
    return str(python)


def _pip(out: Any, step: list[str], logfile: Path, tolerate: bool = False) -> None:
    """Run one install step with its output in ``logfile`` (BenchError when it fails, unless
    ``tolerate``: the caller then starts over from a fresh virtualenv)."""
    try:
        code = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=900).returncode
    except subprocess.TimeoutExpired:
        code = -1
    if code != 0 and not tolerate:
        raise BenchError(f"{' '.join(step)} failed (exit {code}); see {logfile}")
