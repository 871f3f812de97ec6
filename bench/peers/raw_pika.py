"""Raw pika, the ceiling: ``python -m bench.peers.raw_pika MODE [options]``.

``consume`` is a plain ``BlockingConnection`` consumer — ``basic_qos($BENCH_PREFETCH)``,
``basic_consume``, ``json.loads`` of the body, manual ``basic_ack`` (or batched acks with
``$BENCH_ACK_EVERY``; or, with ``$BENCH_ACK_STYLE=turn``, an ``AsyncioConnection`` acking
``multiple=True`` once per event-loop turn, as amqptasks' worker does) — that also answers
``reply_to`` and records ``sent`` stamps, so it serves every figure. Clients: ``seed``,
``publish`` (``--confirm``: a confirm-mode channel, one publish confirmed at a time;
``--style pipelined``: pika's ``SelectConnection`` keeping up to ``--window`` confirms
outstanding — the raw ceiling for a bulk publish), ``latency``, ``rpc`` (direct reply-to).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import time
from typing import Any

import pika

from bench.peers.common import (
    PLACEHOLDER_ID,
    QUEUE,
    URL,
    arg_parser,
    count,
    emit,
    latency_loop,
    record_latency,
    round_trips,
    timed,
)

PERSISTENT_JSON = pika.BasicProperties(content_type="application/json", delivery_mode=2)


def body(**fields: Any) -> bytes:
    return json.dumps({"task": "noop", **fields}).encode()


def handle(ch: Any, props: Any, data: bytes) -> None:
    """What every raw consumer does with a delivery: decode the JSON body, then record a
    latency stamp, answer ``reply_to``, or count a no-op."""
    obj = json.loads(data)
    if "sent" in obj:
        if obj.get("keep"):
            record_latency(obj["sent"])
    elif props.reply_to:
        ch.basic_publish(
            "",
            props.reply_to,
            json.dumps({"result": obj.get("value")}).encode(),
            pika.BasicProperties(correlation_id=props.correlation_id),
        )
    else:
        count()


def consume() -> None:
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=int(os.environ.get("BENCH_PREFETCH", "256")))
    # $BENCH_ACK_EVERY > 1: acks batched with multiple=True every that many deliveries, and
    # whatever is left every 20 ms (what a batching worker does; 1 = one ack per message).
    every = int(os.environ.get("BENCH_ACK_EVERY", "1"))
    state = {"last": 0, "acked": 0}

    def on_message(ch: Any, method: Any, props: Any, data: bytes) -> None:
        handle(ch, props, data)
        tag = method.delivery_tag
        if every <= 1:
            ch.basic_ack(tag)
            return
        state["last"] = tag
        if tag - state["acked"] >= every:
            ch.basic_ack(tag, multiple=True)
            state["acked"] = tag

    def flush() -> None:
        if state["last"] > state["acked"]:
            ch.basic_ack(state["last"], multiple=True)
            state["acked"] = state["last"]
        conn.call_later(0.02, flush)

    def stop(_sig: int, _frame: Any) -> None:
        conn.add_callback_threadsafe(ch.stop_consuming)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if every > 1:
        conn.call_later(0.02, flush)
    ch.basic_consume(QUEUE, on_message)
    ch.start_consuming()
    conn.close()


def consume_per_turn() -> None:
    """amqptasks' own ack pattern, raw: pika's ``AsyncioConnection`` on an asyncio loop, each
    delivery handled in the frame callback, and one ``basic.ack multiple=True`` up to the
    last tag per event-loop turn (scheduled with ``call_soon`` by the turn's first
    delivery) — the ceiling for a worker that acks the way ours does."""
    import asyncio

    from pika.adapters.asyncio_connection import AsyncioConnection

    loop = asyncio.new_event_loop()
    prefetch = int(os.environ.get("BENCH_PREFETCH", "256"))
    state = {"last": 0, "scheduled": False}

    def flush(ch: Any) -> None:
        state["scheduled"] = False
        if ch.is_open:
            ch.basic_ack(state["last"], multiple=True)

    def on_message(ch: Any, method: Any, props: Any, data: bytes) -> None:
        handle(ch, props, data)
        state["last"] = method.delivery_tag
        if not state["scheduled"]:
            state["scheduled"] = True
            loop.call_soon(flush, ch)

    def on_channel(ch: Any) -> None:
        ch.basic_qos(
            prefetch_count=prefetch, callback=lambda _f: ch.basic_consume(QUEUE, on_message)
        )

    conn = AsyncioConnection(
        pika.URLParameters(URL),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=lambda _c, exc: loop.stop(),
        on_close_callback=lambda _c, _reason: loop.stop(),
        custom_ioloop=loop,
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, conn.close)
    loop.run_forever()


def pipelined(n: int, warmup: int, window: int) -> float:
    """Publish ``warmup + n`` persistent messages (mandatory) on a confirm-mode channel of a
    ``SelectConnection``, keeping up to ``window`` unconfirmed; the rate of the last ``n``,
    timed from the ``warmup``-th confirm to the last one (every one confirmed, none
    returned)."""
    total = n + warmup
    data = body()
    state: dict[str, Any] = {"sent": 0, "confirmed": 0, "t0": None, "t1": None, "error": None}
    order: collections.deque[int] = collections.deque()
    outstanding: set[int] = set()

    def fail(conn: Any, why: str) -> None:
        state["error"] = why
        conn.close()

    def fill(ch: Any) -> None:
        while state["sent"] < total and state["sent"] - state["confirmed"] < window:
            ch.basic_publish("", QUEUE, data, PERSISTENT_JSON, mandatory=True)
            state["sent"] += 1
            order.append(state["sent"])
            outstanding.add(state["sent"])

    def on_confirm(ch: Any, frame: Any) -> None:
        method = frame.method
        if isinstance(method, pika.spec.Basic.Nack):
            fail(ch.connection, f"publish {method.delivery_tag} nacked")
            return
        tag = method.delivery_tag
        if method.multiple:
            while order and order[0] <= tag:
                t = order.popleft()
                if t in outstanding:
                    outstanding.discard(t)
                    state["confirmed"] += 1
        elif tag in outstanding:
            outstanding.discard(tag)
            state["confirmed"] += 1
        if state["t0"] is None and state["confirmed"] >= warmup:
            state["t0"] = time.perf_counter()
        if state["confirmed"] >= total:
            state["t1"] = time.perf_counter()
            ch.connection.close()
        else:
            fill(ch)

    def on_channel(ch: Any) -> None:
        ch.add_on_return_callback(lambda c, *_: fail(c.connection, "a publish was returned"))
        ch.confirm_delivery(
            lambda frame: on_confirm(ch, frame),
            callback=lambda _f: ch.queue_declare(QUEUE, durable=True, callback=lambda _f: fill(ch)),
        )

    conn = pika.SelectConnection(
        pika.URLParameters(URL),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=lambda c, exc: (state.update(error=repr(exc)), c.ioloop.stop()),
        on_close_callback=lambda c, _reason: c.ioloop.stop(),
    )
    conn.ioloop.call_later(600, lambda: fail(conn, "not all confirmed within 600 s"))
    conn.ioloop.start()
    if state["error"] or state["t1"] is None:
        raise SystemExit(f"pipelined publish failed: {state['error'] or 'connection closed'}")
    return float(n / (state["t1"] - state["t0"]))


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    if args.mode == "consume":
        if os.environ.get("BENCH_ACK_STYLE") == "turn":
            consume_per_turn()
        else:
            consume()
        return
    if args.mode == "publish" and args.style == "pipelined":
        emit(rate=pipelined(args.n, args.warmup, args.window))
        return
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    ch.queue_declare(QUEUE, durable=True)
    if args.mode == "seed":
        props = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=PLACEHOLDER_ID
        )
        ch.basic_publish("", QUEUE, body(id=PLACEHOLDER_ID), props)
        emit(ok=True)
    elif args.mode == "publish":
        if args.confirm:
            ch.confirm_delivery()

        def publish(_i: int) -> None:
            ch.basic_publish("", QUEUE, body(), PERSISTENT_JSON, mandatory=args.confirm)

        emit(rate=timed(args.n, args.warmup, publish))
    elif args.mode == "latency":
        latency_loop(
            args.n,
            args.warmup,
            args.interval,
            lambda sent, keep: ch.basic_publish(
                "", QUEUE, body(sent=sent, keep=keep), PERSISTENT_JSON
            ),
        )
        emit(ok=True)
    elif args.mode == "rpc":
        # $BENCH_RPC_CONFIRM=1: each call's publish is confirmed before its reply is awaited
        # (amqptasks' delay() always confirms); unset, the raw round trip's fastest form.
        confirm = os.environ.get("BENCH_RPC_CONFIRM") == "1"
        if confirm:
            ch.confirm_delivery()
        replies: list[bytes] = []
        ch.basic_consume(
            "amq.rabbitmq.reply-to", lambda _c, _m, _p, b: replies.append(b), auto_ack=True
        )

        def call(i: int) -> None:
            props = pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                reply_to="amq.rabbitmq.reply-to",
                correlation_id=str(i),
            )
            ch.basic_publish("", QUEUE, body(value=i), props, mandatory=confirm)
            deadline = time.monotonic() + 10
            while not replies:
                if time.monotonic() > deadline:
                    raise TimeoutError("no reply within 10 s")
                conn.process_data_events(time_limit=1)
            replies.clear()

        emit(**round_trips(args.n, args.warmup, call, args.min_seconds))
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")
    conn.close()


if __name__ == "__main__":
    main()
