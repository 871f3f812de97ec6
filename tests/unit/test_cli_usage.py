"""CLI options checked before anything connects: what they accept, what they refuse (exit 2,
naming the option), and what the dashboard's credential helpers print being accepted by the
config parser, as a user would paste it."""

from __future__ import annotations

import yaml
from click.testing import CliRunner

from amqptasks.cli import main
from amqptasks.config import Settings
from amqptasks.dashboard.auth import verify_password


def _run(*args: str, stdin: str | None = None):
    return CliRunner().invoke(main, list(args), input=stdin)


def test_new_token_prints_a_config_line_the_parser_accepts():
    r = _run("dashboard", "--new-token", "deploy-bot")
    assert r.exit_code == 0, r.output
    token_line, config_line = r.output.strip().splitlines()
    token = token_line.rsplit(" ", 1)[1]
    pasted = yaml.safe_load(config_line.split("config line:", 1)[1])
    settings = Settings.from_mapping({"broker": {"url": "amqp://localhost/"}, **pasted})
    (entry,) = settings.dashboard.api_tokens
    assert entry.startswith("deploy-bot:sha256$")
    assert token not in entry  # only its digest is kept


def test_new_token_refuses_a_name_the_config_line_would_break_on():
    for bad in ("a:b", "", "two words", 'q"uote', "x" * 65):
        r = _run("dashboard", "--new-token", bad)
        assert r.exit_code == 2, (bad, r.output)
        assert "--new-token" in r.output and "letters, digits" in r.output


def test_hash_password_prints_a_hash_of_the_password_asked_for():
    r = _run("dashboard", "--hash-password", stdin="s3cret pw\ns3cret pw\n")
    assert r.exit_code == 0, r.output
    stored = r.output.strip().splitlines()[-1]
    assert "s3cret" not in stored
    assert verify_password("s3cret pw", stored) and not verify_password("s3cret", stored)


def test_send_wait_needs_a_positive_number_of_seconds():
    for bad in ("0", "-1", "soon"):
        r = _run("send", "examples.tasks.add", "--wait", bad)
        assert r.exit_code == 2, (bad, r.output)
        assert "--wait" in r.output


def test_worker_events_is_one_on_off_flag():
    r = _run("worker", "--help")
    assert r.exit_code == 0
    assert "-E, --events / --no-events" in r.output
    assert "default: events.enabled in the config" in " ".join(r.output.split())
