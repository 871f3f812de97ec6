"""docs/protocol.md section 9 is executable: every example message in it is published with
plain pika (as a foreign client would) to a real worker, and the documented outcome — the
reply's result or error type, the dead-letter reason — must be what happens."""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pika
from broker_fixtures import ROOT, write_config

DOC = ROOT / "docs" / "protocol.md"
SECTION = "## 9. Example messages"
#: One outcome: `result: <JSON>`, `error: <type>` or `dead letter: <reason>`.
OUTCOME = re.compile(r"`(result|error|dead letter): ([^`]+)`")


@dataclass
class Example:
    title: str
    body: bytes
    properties: dict[str, Any] = field(default_factory=dict)
    expect: list[tuple[str, str]] = field(default_factory=list)


def examples() -> list[Example]:
    """The examples of section 9: a ```json block per ### heading, an optional
    ``Properties: `{...}` `` line and an ``Outcome:`` line."""
    text = DOC.read_text("utf-8")
    section = text[text.index(SECTION) + len(SECTION) :]
    section = section[: section.index("\n## ")]
    found = []
    for part in section.split("\n### ")[1:]:
        title, _, rest = part.partition("\n")
        block = re.search(r"```json\n(.*?)\n```", rest, re.S)
        assert block is not None, f"example {title!r} has no ```json block"
        ex = Example(title.strip(), block.group(1).encode())
        props = re.search(r"^Properties: `(\{.*\})`$", rest, re.M)
        if props is not None:
            ex.properties = json.loads(props.group(1))
        line = re.search(r"^Outcome: (.*)$", rest, re.M)
        assert line is not None, f"example {title!r} has no Outcome line"
        ex.expect = OUTCOME.findall(line.group(1))
        assert ex.expect, f"example {title!r}: no outcome in {line.group(1)!r}"
        found.append(ex)
    return found


def test_the_doc_has_its_examples() -> None:
    found = examples()
    assert len(found) >= 15
    kinds = {kind for ex in found for kind, _ in ex.expect}
    assert kinds == {"result", "error", "dead letter"}
    for ex in found:
        # What the doc shows is what gets sent: a JSON body (the minimal form even unparsed).
        json.loads(ex.body)


def test_every_example_has_its_documented_outcome(tmp_path, broker, worker_factory) -> None:
    cfg = write_config(tmp_path, broker)
    worker_factory(cfg, "-Q", "default")
    found = examples()
    by_correlation = {uuid.uuid4().hex: ex for ex in found}
    replies: dict[str, dict[str, Any]] = {}

    conn = broker.connect()
    ch = conn.channel()

    def on_reply(_ch: Any, _method: Any, props: Any, body: bytes) -> None:
        replies[props.correlation_id] = json.loads(body)

    ch.basic_consume("amq.rabbitmq.reply-to", on_reply, auto_ack=True)
    ch.confirm_delivery()
    for correlation_id, ex in by_correlation.items():
        props = pika.BasicProperties(
            correlation_id=correlation_id, reply_to="amq.rabbitmq.reply-to", **ex.properties
        )
        ch.basic_publish("tasks", "task.add", ex.body, props, mandatory=True)

    dead: dict[str, str] = {}

    def outcomes_in() -> bool:
        method, props, _body = ch.basic_get("default.dlq", auto_ack=True)
        while method is not None:
            dead[props.correlation_id] = props.headers["x-amqptasks-reason"]
            method, props, _body = ch.basic_get("default.dlq", auto_ack=True)
        for correlation_id, ex in by_correlation.items():
            for kind, _ in ex.expect:
                if kind == "dead letter" and correlation_id not in dead:
                    return False
                if kind != "dead letter" and correlation_id not in replies:
                    return False
        return True

    deadline = time.monotonic() + 30
    while not outcomes_in() and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)

    wrong = []
    for correlation_id, ex in by_correlation.items():
        reply = replies.get(correlation_id)
        for kind, value in ex.expect:
            if kind == "result":
                got: Any = reply and reply.get("status") == "SUCCESS" and reply.get("result")
                ok = reply is not None and reply["status"] == "SUCCESS"
                ok = ok and reply["result"] == json.loads(value)
            elif kind == "error":
                got = reply and reply.get("error", {}).get("type")
                ok = reply is not None and reply["status"] == "FAILURE" and got == value
            else:
                got = dead.get(correlation_id)
                ok = got == value
            if not ok:
                wrong.append(f"{ex.title!r}: documented `{kind}: {value}`, got {got!r} ({reply})")
    assert not wrong, "\n".join(wrong)
