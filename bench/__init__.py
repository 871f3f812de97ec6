"""Benchmarks: amqptasks against Celery, Dramatiq and raw AMQP clients on one broker.

Run ``./dev bench [--quick]`` (or ``python -m bench --help``); see docs/benchmarks.md.
"""
