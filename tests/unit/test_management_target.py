"""Where the dashboard reads the broker's management API, and with which credentials: a
broker reached over TLS never has its password sent over plain HTTP."""

from __future__ import annotations

from amqptasks.dashboard.broker_api import management_target


def test_the_default_management_url_follows_the_broker_url():
    assert management_target("amqp://app:pw@rabbit.example:5672/prod", None) == (
        "http://rabbit.example:15672",
        "app",
        "pw",
        "prod",
    )


def test_an_amqps_broker_gets_the_tls_management_listener():
    base, user, password, vhost = management_target("amqps://app:s%40fe@rabbit.example/", None)
    assert base == "https://rabbit.example:15671"
    assert (user, password, vhost) == ("app", "s@fe", "/")


def test_an_explicit_management_url_wins_with_its_own_credentials():
    target = management_target(
        "amqps://app:pw@rabbit.example/", "https://mon:secret@mgmt.example:8443/rmq/"
    )
    assert target == ("https://mgmt.example:8443/rmq", "mon", "secret", "/")
