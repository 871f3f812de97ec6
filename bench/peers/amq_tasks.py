"""amqptasks task module for the benchmarks (loaded by ``amqptasks worker`` via ``imports``)."""

from __future__ import annotations

from amqptasks import App
from bench.peers.common import count, record_latency

app = App.from_config()


@app.task(name="bench.noop", ignore_result=True)
def noop() -> None:
    count()


@app.task(name="bench.stamp", ignore_result=True)
def stamp(sent: float, keep: bool = True) -> None:
    if keep:
        record_latency(sent)


@app.task(name="bench.echo")
def echo(value: int) -> int:
    return value


@app.task(name="bench.later", ignore_result=True)
def later() -> None:
    count()
