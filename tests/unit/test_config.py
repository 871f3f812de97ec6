"""Loading config/amqptasks.yaml: the shipped file, the lookup order, and error messages that name
the file and the exact key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from amqptasks.config import (
    DEFAULT_BROKER_URL,
    DEFAULT_CONFIG_PATH,
    RevokeSettings,
    Settings,
    load_config,
    redact_url,
)
from amqptasks.errors import ConfigError
from amqptasks.protocol import CONTENT_TYPE_JSON, CONTENT_TYPE_PICKLE
from amqptasks.rate import OFF, RateLimit
from amqptasks.routing import Route
from amqptasks.topology import DLX_EXCHANGE

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "amqptasks.yaml"

# A small valid config the error cases start from.
BASE = """\
exchanges:
  tasks: {type: topic}
queues:
  web_tasks: {bindings: [{exchange: tasks, routing_key: "web.#"}]}
"""


def write(tmp_path: Path, text: str, name: str = "amqptasks.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# -- the shipped config -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped() -> Settings:
    return load_config(SHIPPED, env={})


def test_shipped_config_declares_queues_with_their_dead_letter_queues(shipped: Settings) -> None:
    topology = shipped.topology
    assert [q.name for q in topology.work_queues()] == ["default", "web_tasks", "queue_add"]
    assert [q.name for q in topology.queues if q.role == "dead-letter"] == [
        "default.dlq",
        "web_tasks.dlq",
        "queue_add.dlq",
    ]
    exchanges = {e.name: e.type for e in topology.exchanges}
    assert exchanges["tasks"] == "topic"
    assert exchanges["direct_tasks"] == "direct"
    assert exchanges[DLX_EXCHANGE] == "direct"
    for queue in ("default", "web_tasks", "queue_add"):
        assert topology.reaches(DLX_EXCHANGE, queue) == (f"{queue}.dlq",)


def test_shipped_config_routes(shipped: Settings) -> None:
    assert shipped.source == str(SHIPPED)
    assert shipped.routes == {
        "examples.tasks.add": Route("tasks", "task.add"),
        "examples.web.*": Route("tasks", "web.render"),
    }
    assert shipped.default_route == Route("tasks", "task.default")
    router = shipped.router()
    assert router.route("examples.tasks.add") == Route("tasks", "task.add")
    assert router.route("examples.web.sendmail") == Route("tasks", "web.render")
    assert router.route("examples.tasks.other") == Route("tasks", "task.default")
    assert shipped.topology.reaches("tasks", "task.add") == ("default",)
    assert shipped.topology.reaches("tasks", "web.render") == ("web_tasks",)
    assert shipped.topology.reaches("direct_tasks", "queue_add") == ("queue_add",)


def test_shipped_config_other_sections(shipped: Settings) -> None:
    assert shipped.broker.url == "amqp://guest:guest@localhost:5672/%2F"
    assert shipped.broker.publish_timeout == 10.0
    assert isinstance(shipped.broker.publish_timeout, float)
    assert shipped.imports == ("examples.tasks", "examples.web")
    assert (shipped.worker.concurrency, shipped.worker.prefetch_multiplier) == (8, 4)
    assert shipped.worker.prefetch == 32
    assert shipped.worker.pool == "threads"
    assert shipped.results.ignore_result is False
    assert shipped.accept == frozenset({CONTENT_TYPE_JSON})


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    settings = load_config(write(tmp_path, ""), env={})
    assert settings.broker.url == DEFAULT_BROKER_URL
    assert settings.routes == {}
    assert settings.default_route is None
    assert DLX_EXCHANGE in {e.name for e in settings.topology.exchanges}
    assert settings.topology.work_queues() == ()
    assert settings.accept == frozenset({CONTENT_TYPE_JSON})


def test_pickle_can_be_accepted_explicitly(tmp_path: Path) -> None:
    path = write(
        tmp_path, "serialization: {accept: [application/json, application/x-python-serialize]}"
    )
    assert load_config(path, env={}).accept == frozenset({CONTENT_TYPE_JSON, CONTENT_TYPE_PICKLE})


# -- errors name the file and the key path ------------------------------------------------------
BAD = [
    # (id, yaml, key path, part of the problem)
    (
        "undeclared-binding-exchange",
        """\
        exchanges: {tasks: {type: topic}}
        queues:
          default: {bindings: [{exchange: tasks, routing_key: "task.#"}]}
          web_tasks: {bindings: [{exchange: web, routing_key: "web.#"}]}
        """,
        "queues.web_tasks.bindings[0].exchange",
        "exchange 'web' is not declared under 'exchanges' (declared: tasks)",
    ),
    (
        "unknown-top-level-key",
        BASE + "brokers: {url: 'amqp://localhost'}\n",
        "brokers",
        "unknown key (allowed here: broker, imports",
    ),
    (
        "unknown-broker-key",
        BASE + "broker: {uri: 'amqp://localhost'}\n",
        "broker.uri",
        "unknown key",
    ),
    (
        "unknown-exchange-key",
        "exchanges: {tasks: {kind: topic}}\n",
        "exchanges.tasks.kind",
        "unknown key (allowed here: type)",
    ),
    (
        "unknown-queue-key",
        "exchanges: {tasks: {}}\nqueues: {web_tasks: {durable: true}}\n",
        "queues.web_tasks.durable",
        "unknown key (allowed here: bindings, type, max_priority",
    ),
    (
        "unknown-binding-key",
        "exchanges: {tasks: {}}\n"
        "queues: {web_tasks: {bindings: [{exchange: tasks, routingkey: 'web.#'}]}}\n",
        "queues.web_tasks.bindings[0].routingkey",
        "unknown key (allowed here: exchange, routing_key)",
    ),
    (
        "unknown-route-key",
        BASE + "routes: {send: {exchange: tasks, routing_key: web.x, priority: 3}}\n",
        "routes.send.priority",
        "unknown key",
    ),
    ("unknown-worker-key", BASE + "worker: {threads: 4}\n", "worker.threads", "unknown key"),
    (
        "binding-without-exchange",
        "exchanges: {tasks: {}}\nqueues: {web_tasks: {bindings: [{routing_key: 'web.#'}]}}\n",
        "queues.web_tasks.bindings[0].exchange",
        "is required",
    ),
    (
        "bindings-not-a-list",
        "exchanges: {tasks: {}}\nqueues: {web_tasks: {bindings: {exchange: tasks}}}\n",
        "queues.web_tasks.bindings",
        "expected a list, got a mapping",
    ),
    (
        "binding-routing-key-not-a-string",
        "exchanges: {tasks: {}}\n"
        "queues: {web_tasks: {bindings: [{exchange: tasks, routing_key: [web]}]}}\n",
        "queues.web_tasks.bindings[0].routing_key",
        "expected a routing key string, got a list",
    ),
    (
        "exchange-type",
        "exchanges: {tasks: {type: headers}}\n",
        "exchanges.tasks.type",
        "expected one of direct, topic, fanout, got a string 'headers'",
    ),
    (
        "queue-type",
        "queues: {web_tasks: {type: stream}}\n",
        "queues.web_tasks.type",
        "expected one of classic, quorum",
    ),
    (
        "max-priority-range",
        "queues: {web_tasks: {max_priority: 300}}\n",
        "queues.web_tasks.max_priority",
        "expected an integer from 1 to 255, got an integer 300",
    ),
    (
        "max-priority-on-quorum",
        "queues: {web_tasks: {type: quorum, max_priority: 5}}\n",
        "queues.web_tasks.max_priority",
        "quorum queues do not support priorities",
    ),
    (
        "reserved-queue-name",
        "queues: {web_tasks.dlq: {}}\n",
        "queues.web_tasks.dlq",
        "is reserved",
    ),
    ("reserved-exchange-name", "exchanges: {amq.tasks: {}}\n", "exchanges.amq.tasks", "reserved"),
    (
        "reserved-events-exchange",
        "exchanges: {amqptasks.events: {}}\n",
        "exchanges.amqptasks.events",
        "the name 'amqptasks.events' is reserved",
    ),
    (
        "reserved-control-exchange",
        "exchanges: {amqptasks.control: {type: fanout}}\n",
        "exchanges.amqptasks.control",
        "is reserved",
    ),
    (
        "events-enabled-string",
        BASE + "events: {enabled: 'yes'}\n",
        "events.enabled",
        "expected true or false, got a string 'yes'",
    ),
    (
        "events-heartbeat-zero",
        BASE + "events: {heartbeat_interval: 0}\n",
        "events.heartbeat_interval",
        "expected a positive number, got a number 0.0",
    ),
    ("events-unknown-key", BASE + "events: {enable: true}\n", "events.enable", "unknown key"),
    (
        "bad-queue-name",
        "queues: {'web tasks': {}}\n",
        "queues.web tasks",
        "expected a queue name",
    ),
    (
        "concurrency-string",
        BASE + "worker: {concurrency: eight}\n",
        "worker.concurrency",
        "expected a positive integer, got a string 'eight'",
    ),
    (
        "concurrency-zero",
        BASE + "worker: {concurrency: 0}\n",
        "worker.concurrency",
        "expected a positive integer, got an integer 0",
    ),
    (
        "concurrency-boolean",
        BASE + "worker: {concurrency: true}\n",
        "worker.concurrency",
        "got a boolean True",
    ),
    (
        "prefetch-float",
        BASE + "worker: {prefetch_multiplier: 1.5}\n",
        "worker.prefetch_multiplier",
        "got a number 1.5",
    ),
    (
        "pool",
        BASE + "worker: {pool: gevent}\n",
        "worker.pool",
        "expected one of threads, asyncio",
    ),
    (
        "publish-timeout",
        BASE + "broker: {publish_timeout: -1}\n",
        "broker.publish_timeout",
        "expected a positive number of seconds",
    ),
    (
        "ignore-result-string",
        BASE + "results: {ignore_result: 'no'}\n",
        "results.ignore_result",
        "expected true or false, got a string 'no'",
    ),
    (
        "accept-unknown",
        BASE + "serialization: {accept: [application/msgpack]}\n",
        "serialization.accept[0]",
        "expected one of application/json, application/x-python-serialize",
    ),
    (
        "accept-empty",
        BASE + "serialization: {accept: []}\n",
        "serialization.accept",
        "must list at least one content type",
    ),
    ("imports-empty-name", BASE + "imports: [examples.tasks, '']\n", "imports[1]", "module name"),
    ("imports-not-a-list", BASE + "imports: examples.tasks\n", "imports", "expected a list"),
    (
        "url-scheme",
        BASE + "broker: {url: 'http://localhost:15672/'}\n",
        "broker.url",
        "expected an amqp:// or amqps:// URL, got 'http://localhost:15672/'",
    ),
    ("url-no-host", BASE + "broker: {url: 'amqp:///vhost'}\n", "broker.url", "amqp:// or amqps://"),
    ("url-not-a-string", BASE + "broker: {url: 5672}\n", "broker.url", "got an integer 5672"),
    (
        "route-reaches-no-queue",
        BASE + "routes: {examples.tasks.add: {exchange: tasks, routing_key: task.add}}\n",
        "routes.examples.tasks.add.routing_key",
        "routing key 'task.add' on exchange 'tasks' reaches no declared queue",
    ),
    (
        "route-undeclared-exchange",
        BASE + "routes: {send: {exchange: mail, routing_key: web.x}}\n",
        "routes.send.exchange",
        "exchange 'mail' is not declared",
    ),
    (
        "route-without-routing-key",
        BASE + "routes: {send: {exchange: tasks}}\n",
        "routes.send.routing_key",
        "is required",
    ),
    (
        "route-without-exchange",
        BASE + "routes: {send: {routing_key: web.x}}\n",
        "routes.send.exchange",
        "is required (or give 'queue')",
    ),
    (
        "route-undeclared-queue",
        BASE + "routes: {send: {queue: mail}}\n",
        "routes.send.queue",
        "queue 'mail' is not declared under 'queues'",
    ),
    (
        "route-queue-and-exchange",
        BASE + "routes: {send: {queue: web_tasks, exchange: tasks}}\n",
        "routes.send",
        "give either 'queue' or 'exchange' + 'routing_key', not both",
    ),
    (
        "default-route-reaches-no-queue",
        BASE + "default_route: {exchange: tasks, routing_key: task.default}\n",
        "default_route.routing_key",
        "reaches no declared queue",
    ),
    (
        "default-exchange-to-missing-queue",
        BASE + "default_route: {exchange: '', routing_key: nowhere}\n",
        "default_route.routing_key",
        "reaches no declared queue",
    ),
    ("section-not-a-mapping", BASE + "worker: [8]\n", "worker", "expected a mapping, got a list"),
    ("top-level-list", "- broker\n- queues\n", "<top level>", "expected a mapping, got a list"),
    ("non-string-key", "queues: {1: {}}\n", "queues", "keys must be strings, got 1"),
    (
        "rate-limit-spelling",
        BASE + "tasks: {t: {rate_limit: 10/sec}}\n",
        "tasks.t.rate_limit",
        "expected a rate such as '10/s', '100/m' or '2/h' (or 0 for none), got '10/sec'",
    ),
    (
        "rate-limit-mapping-rate",
        BASE + "tasks: {t: {rate_limit: {rate: '-1/s', scope: fleet}}}\n",
        "tasks.t.rate_limit.rate",
        "got '-1/s'",
    ),
    (
        "rate-limit-mapping-needs-rate",
        BASE + "tasks: {t: {rate_limit: {scope: fleet}}}\n",
        "tasks.t.rate_limit.rate",
        "is required",
    ),
    (
        "rate-limit-scope",
        BASE + "tasks: {t: {rate_limit: {rate: 10/s, scope: cluster}}}\n",
        "tasks.t.rate_limit.scope",
        "expected one of worker, fleet, got a string 'cluster'",
    ),
    (
        "rate-limit-burst",
        BASE + "tasks: {t: {rate_limit: {rate: 10/s, burst: 0}}}\n",
        "tasks.t.rate_limit.burst",
        "expected a positive integer, got an integer 0",
    ),
    (
        "rate-limit-unknown-key",
        BASE + "tasks: {t: {rate_limit: {rate: 10/s, per: fleet}}}\n",
        "tasks.t.rate_limit.per",
        "unknown key (allowed here: rate, scope, burst)",
    ),
    (
        "rate-limit-a-list",
        BASE + "tasks: {t: {rate_limit: [10, s]}}\n",
        "tasks.t.rate_limit",
        "got list",
    ),
    (
        "revoke-expires-too-long",
        BASE + "revoke: {expires: 5000000}\n",
        "revoke.expires",
        "expected seconds > 0 and at most 4194303 (48.5 days, the longest delay)",
    ),
    ("revoke-max-ids", BASE + "revoke: {max_ids: 0}\n", "revoke.max_ids", "positive integer"),
    ("revoke-unknown", BASE + "revoke: {expire: 5}\n", "revoke.expire", "unknown key"),
    (
        "reserved-revocations-queue",
        BASE + "  amqptasks.revocations: {}\n",
        "queues.amqptasks.revocations",
        "is reserved",
    ),
    (
        "reserved-rate-limit-queue",
        BASE + "  amqptasks.ratelimit.x: {}\n",
        "queues.amqptasks.ratelimit.x",
        "is reserved",
    ),
]


@pytest.mark.parametrize(("text", "key", "problem"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_config_error_names_file_and_key_path(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path = write(tmp_path, text, name="bad-config.yaml")

    with pytest.raises(ConfigError) as info:
        load_config(path, env={})

    err = info.value
    assert (err.path, err.key) == (str(path), key)
    assert str(err).startswith(f"{path}: {key}: ")
    assert problem in str(err)
    assert "\n" not in str(err)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        exchanges:
          tasks: {type: topic}
        queues:
          default: {bindings: [{exchange: tasks, routing_key: "task.#"}]
        worker: {}
        """,
        name="broken.yaml",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}: invalid YAML at line ")
    assert "line 5," in message


def test_tab_indentation_is_invalid_yaml_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "tabs.yaml"
    path.write_text("broker:\n\turl: amqp://localhost\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tabs\.yaml: invalid YAML at line 2, column 1"):
        load_config(path, env={})


# -- duplicate keys: YAML lets the last one win silently; we refuse them, at every level --------
@pytest.mark.parametrize(
    ("text", "key", "line", "first"),
    [
        (
            BASE + "worker: {concurrency: 2}\nresults: {}\nworker: {concurrency: 4}\n",
            "worker",
            7,
            5,
        ),
        (
            BASE + "worker:\n  concurrency: 2\n  pool: threads\n  concurrency: 4\n",
            "worker.concurrency",
            8,
            6,
        ),
        (
            "exchanges:\n  tasks: {type: topic}\nqueues:\n"
            "  web_tasks:\n    bindings:\n      - {exchange: tasks, routing_key: a, exchange: x}\n",
            "queues.web_tasks.bindings[0].exchange",
            6,
            6,
        ),
        (
            BASE + "routes:\n  'a.*': {queue: web_tasks}\n  a.*: {queue: web_tasks}\n",
            "routes.a.*",
            7,
            6,
        ),
        (BASE.replace("queues:", "queues:\n  web_tasks: {}"), "queues.web_tasks", 5, 4),
    ],
)
def test_duplicate_keys_are_refused_with_line_and_key_path(
    tmp_path: Path, text: str, key: str, line: int, first: int
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == f"{path}: {key}: duplicate key at line {line} (first at line {first})"
    assert info.value.key == key


def test_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    # '<<' is YAML's "these, then my own": an explicit key after a merge overrides it.
    path = write(
        tmp_path,
        """\
        exchanges:
          tasks: {type: topic}
        queues:
          web_tasks: &q {bindings: [{exchange: tasks, routing_key: "web.#"}], max_length: 5}
          other:
            <<: *q
            max_length: 10
        """,
    )
    topology = load_config(path, env={}).topology
    assert topology.queue("other").args["x-max-length"] == 10
    assert topology.reaches("tasks", "web.x") == ("web_tasks", "other")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"{path}: file not found (pass --config PATH or set AMQPTASKS_CONFIG)"
    )


def test_from_mapping_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^<mapping>: worker\.pool: "):
        Settings.from_mapping({"worker": {"pool": "gevent"}})


# -- environment --------------------------------------------------------------------------------
def test_broker_url_from_the_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "broker: {url: 'amqp://file-host/'}\n")
    url = "amqps://app:s3cret@rabbit.example:5671/prod"

    assert load_config(path, env={}).broker.url == "amqp://file-host/"
    assert load_config(path, env={"AMQPTASKS_BROKER_URL": url}).broker.url == url


def test_empty_broker_url_variable_is_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "broker: {url: 'amqp://file-host/'}\n")
    assert load_config(path, env={"AMQPTASKS_BROKER_URL": ""}).broker.url == "amqp://file-host/"


def test_bad_broker_url_from_the_environment_names_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"AMQPTASKS_BROKER_URL": "redis://localhost"})
    assert info.value.key == "$AMQPTASKS_BROKER_URL"


def test_result_backend_from_the_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "results: {backend: 'sqlite:///file.db'}\n")
    assert load_config(path, env={}).results.backend == "sqlite:///file.db"
    env = {"AMQPTASKS_RESULT_BACKEND": "redis://127.0.0.1:6379/3"}
    assert load_config(path, env=env).results.backend == "redis://127.0.0.1:6379/3"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"AMQPTASKS_RESULT_BACKEND": "mysql://db/"})
    assert info.value.key == "$AMQPTASKS_RESULT_BACKEND"


def test_config_path_from_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, BASE, name="from-env.yaml")
    settings = load_config(env={"AMQPTASKS_CONFIG": str(path)})
    assert settings.source == str(path)
    assert settings.topology.queue("web_tasks") is not None


def test_missing_config_from_the_environment_names_that_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=r"missing\.yaml: file not found"):
        load_config(env={"AMQPTASKS_CONFIG": str(path)})


def test_explicit_path_beats_the_environment(tmp_path: Path) -> None:
    explicit = write(tmp_path, BASE, name="explicit.yaml")
    settings = load_config(explicit, env={"AMQPTASKS_CONFIG": str(tmp_path / "other.yaml")})
    assert settings.source == str(explicit)


def test_default_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", BASE)
    monkeypatch.chdir(tmp_path)
    settings = load_config(env={})
    assert settings.source == str(DEFAULT_CONFIG_PATH)
    assert settings.topology.queue("web_tasks") is not None


# -- URLs and passwords -------------------------------------------------------------------------
# redact_url hides the password and nothing else: a typo anywhere else (scheme, '//', user, host,
# port, path) must stay visible in the error that reports it.
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://guest:guest@localhost:5672/%2F", "amqp://guest:***@localhost:5672/%2F"),
        ("amqps://app:p%40ss@rabbit:5671/prod", "amqps://app:***@rabbit:5671/prod"),
        ("amqp://app:p@ss@rabbit/", "amqp://app:***@rabbit/"),  # the last '@' ends it
        ("amqp://app:pa:ss@rabbit/", "amqp://app:***@rabbit/"),
        ("amqp://app:@rabbit/", "amqp://app:***@rabbit/"),
        ("amqp://:s3cret@rabbit/", "amqp://:***@rabbit/"),
        ("amqp://app@rabbit/", "amqp://app@rabbit/"),
        ("amqp://localhost", "amqp://localhost"),
        ("amqp://a@b@rabbit/", "amqp://a@b@rabbit/"),  # a user name alone is not a secret
        ("amqp://app@rabbit/a@b", "amqp://app@rabbit/a@b"),
        # An '@' in the path may end a password holding '/': hidden up to it (both read alike).
        ("amqp://app:s3cret@rabbit/v@host", "amqp://app:***@host"),
        ("amqp://app:s3@cr/et@rabbit:5672/vh", "amqp://app:***@rabbit:5672/vh"),
        ("redis://:s3cr@t/cret@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("amqp://rabbit/?x=a@b", "amqp://rabbit/?x=a@b"),
        ("amqp://app:s3cret@[::1/", "amqp://app:***@[::1/"),
        ("amqp://app:s3cret@rabbit:notaport/", "amqp://app:***@rabbit:notaport/"),
        ("AMQP://App:s3cret@Rabbit:5672/V", "AMQP://App:***@Rabbit:5672/V"),
        # Malformed: every character but the password's stays, so the typo can be seen.
        ("amqps//guest:s3cret@localhost:5671/", "amqps//guest:***@localhost:5671/"),
        ("amqps:/guest:s3cret@localhost:5671/", "amqps:/guest:***@localhost:5671/"),
        ("amqps:guest:s3cret@localhost:5671/", "amqps:guest:***@localhost:5671/"),
        ("amqp:///guest:s3cret@localhost/", "amqp:///guest:***@localhost/"),
        ("amqq://guest:s3cret@localhost/", "amqq://guest:***@localhost/"),
        ("http://app:s3cret@rabbit/", "http://app:***@rabbit/"),
        ("app:s3cret@rabbit:5672", "app:***@rabbit:5672"),
        ("app:p@ss@rabbit", "app:***@rabbit"),
        ("amqp://app:s3cret@/vhost", "amqp://app:***@/vhost"),
        (" amqp://app:s3cret@rabbit/", " amqp://app:***@rabbit/"),
        # An unencoded '/', '?' or '#' in a password ends the authority early: up to the last
        # '@' is hidden rather than risk showing the rest of the password.
        ("amqp://app:s3/cret@rabbit/", "amqp://app:***@rabbit/"),
        ("amqp://app:s3?cret@rabbit/", "amqp://app:***@rabbit/"),
        ("amqp://app:s3#cret@rabbit/", "amqp://app:***@rabbit/"),
        ("redis://rabbit:6379/0?password=s3cret&db=1", "redis://rabbit:6379/0?password=***&db=1"),
        ("redis://rabbit/0?Password=s3cret", "redis://rabbit/0?Password=***"),
        ("redis://:s3cret@rabbit/0?passwd=s3cret", "redis://:***@rabbit/0?passwd=***"),
        ("", ""),
    ],
)
def test_redact_url_hides_the_password_and_nothing_else(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "cret" not in shown


def test_redact_url_keeps_every_other_character() -> None:
    for url, password in [
        ("amqps//guest:pw1@localhost:5671/", "pw1"),
        ("amqp://u:pw2@h:5672/%2F?heartbeat=5", "pw2"),
        ("u:p@w3@h", "p@w3"),
    ]:
        assert redact_url(url).replace("***", password) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://app:s3cret@rabbit/",
        "amqp://app:s3cret@/vhost",
        "amqp://app:s3cret@[::1/",
        # Without '//' urlsplit finds no netloc: the credentials are in the path.
        pytest.param("app:s3cret@rabbit:5672", id="no-scheme"),
        pytest.param("amqp:/app:s3cret@rabbit/", id="one-slash"),
    ],
)
def test_bad_url_error_never_shows_the_password(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, BASE + f"broker: {{url: '{url}'}}\n")
    for env in ({}, {"AMQPTASKS_BROKER_URL": url}):
        with pytest.raises(ConfigError) as info:
            load_config(path, env=env)
        assert "s3cret" not in str(info.value)
        assert "amqp:// or amqps:// URL" in str(info.value)


def test_url_typo_stays_visible_in_the_error(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "broker: {url: 'amqps//guest:s3cret@localhost:5671/'}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"{path}: broker.url: expected an amqp:// or amqps:// URL, "
        "got 'amqps//guest:***@localhost:5671/'"
    )


def test_settings_repr_and_str_hide_the_password(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "broker: {url: 'amqp://app:s3cret@rabbit:5672/prod'}\n")
    settings = load_config(path, env={})
    assert settings.broker.url == "amqp://app:s3cret@rabbit:5672/prod"  # the real URL is kept
    for text in (repr(settings), str(settings), repr(settings.broker), str(settings.broker)):
        assert "s3cret" not in text
        assert "amqp://app:***@rabbit:5672/prod" in text
    assert repr(settings.broker) == (
        "BrokerSettings(url='amqp://app:***@rabbit:5672/prod', publish_timeout=10.0, "
        "heartbeat=30, consumer_timeout=1800.0, reconnect_max_delay=30.0)"
    )


# urlsplit checks the port only when .port is read; a bad one must fail here, not at connect.
@pytest.mark.parametrize("url", ["amqp://app:s3cret@rabbit:notaport/", "amqp://rabbit:99999/"])
def test_bad_port_is_a_config_error(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, BASE + f"broker: {{url: '{url}'}}\n")
    with pytest.raises(ConfigError, match=r"broker\.url") as info:
        load_config(path, env={})
    assert "s3cret" not in str(info.value)
    assert "\n" not in str(info.value)
    assert url.replace("s3cret", "***") in str(info.value)  # which URL, typo visible


@pytest.mark.parametrize("url", ["amqp://rabbit:5672/", "amqps://app:pw@rabbit:5671/prod"])
def test_good_port_is_accepted(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, BASE + f"broker: {{url: '{url}'}}\n")
    assert load_config(path, env={}).broker.url == url


# topology.queue() also finds '<q>.dlq' and the delay queues; a route there would publish tasks
# straight into a dead-letter (or delay) queue.
@pytest.mark.parametrize(
    "route",
    [
        "{queue: web_tasks.dlq}",
        "{exchange: '', routing_key: web_tasks.dlq}",
        "{queue: amqptasks.delay.0}",
        "{exchange: '', routing_key: amqptasks.delay.0}",
    ],
)
def test_route_to_a_dead_letter_queue_is_refused(tmp_path: Path, route: str) -> None:
    path = write(tmp_path, BASE + f"routes: {{send: {route}}}\n")
    with pytest.raises(ConfigError, match=r"routes\.send") as info:
        load_config(path, env={})
    assert "routes must target a work queue" in str(info.value)
    assert "\n" not in str(info.value)


def test_default_route_to_a_dead_letter_queue_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "default_route: {queue: web_tasks.dlq}\n")
    with pytest.raises(ConfigError, match=r"default_route\.queue: .*dead-letter queue"):
        load_config(path, env={})


@pytest.mark.parametrize("route", ["{queue: web_tasks}", "{exchange: '', routing_key: web_tasks}"])
def test_route_to_a_work_queue_is_accepted(tmp_path: Path, route: str) -> None:
    path = write(tmp_path, BASE + f"routes: {{send: {route}}}\n")
    assert load_config(path, env={}).routes["send"].routing_key == "web_tasks"


def test_events_section_defaults_and_values(tmp_path: Path) -> None:
    default = load_config(write(tmp_path, BASE), env={}).events
    assert (default.enabled, default.send_sent, default.heartbeat_interval) == (False, False, 2.0)
    text = BASE + "events: {enabled: true, send_sent: true, heartbeat_interval: 0.5}\n"
    events = load_config(write(tmp_path, text), env={}).events
    assert (events.enabled, events.send_sent, events.heartbeat_interval) == (True, True, 0.5)


def test_rate_limits_and_revoke_settings_from_yaml(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + """\
revoke: {expires: 3600, max_ids: 10}
tasks:
  a: {rate_limit: 100/m}
  b: {rate_limit: {rate: 10/s, scope: fleet, burst: 5}}
  c: {rate_limit: 0}
  "d.*": {rate_limit: 2.5}
""",
    )
    s = load_config(path, env={})
    assert (s.revoke.expires, s.revoke.max_ids) == (3600.0, 10)
    a, b, c, d = (s.task_policy(n).rate_limit for n in ("a", "b", "c", "d.x"))
    assert a == RateLimit(100 / 60) and a.text == "100/m" and a.scope == "worker"
    assert b == RateLimit(10.0, "fleet", 5) and str(b) == "10/s per fleet, burst 5"
    assert c == OFF and not c.active  # explicitly off: overrides a decorator's None
    assert d == RateLimit(2.5) and d.text == "150/m"
    assert s.task_policy("other").rate_limit is None
    assert load_config(write(tmp_path, BASE, "plain.yaml"), env={}).revoke == RevokeSettings()
