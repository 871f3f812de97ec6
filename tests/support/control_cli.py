"""The CLI as the inspect/control/revoke/rate-limit tests run it: ``amqptasks ARGS --config F``
in a subprocess, and ``--json`` answers checked against the public control schema."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from broker_fixtures import run_cli

__all__ = ["CONTROL_VALIDATOR", "answers", "run_cli"]

CONTROL_VALIDATOR = jsonschema.Draft202012Validator(
    json.loads((resources.files("amqptasks") / "schema" / "control-v1.json").read_text("utf-8"))
)


def answers(config: Path, *args: str) -> dict[str, Any]:
    """``amqptasks ARGS --json``: exit 0, each reply valid and ok, ``{worker: result}``."""
    out = run_cli(config, *args, "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    replies = json.loads(out.stdout)
    for name, reply in replies.items():
        problems = [e.message for e in CONTROL_VALIDATOR.iter_errors(reply)]
        assert problems == [], (name, reply, problems)
        assert reply["ok"] and reply["hostname"] == name, reply
    return {name: reply["result"] for name, reply in replies.items()}
