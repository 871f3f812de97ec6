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


# Results and workflows: tasks that keep their result (what ``results.backend`` names).


@app.task(name="bench.rnoop")
def rnoop() -> None:
    """A no-op whose result (None) is kept: a group member, a chord member, a stored record."""
    count()


@app.task(name="bench.size")
def size(results: list[object]) -> int:
    """A chord body: how many member results it was given (the harness checks it is N)."""
    return len(results)
