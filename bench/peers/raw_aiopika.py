"""Raw aio-pika, the asyncio ceiling: ``python -m bench.peers.raw_aiopika MODE [options]``.

``consume``: one connection, ``set_qos($BENCH_PREFETCH)``, ``queue.iterator()``,
``json.loads``, manual ack. ``publish --style pipelined``: confirmed publishes with at most
``--window`` outstanding (the ceiling for amqptasks' pipelined publishing).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aio_pika

from bench.peers.common import QUEUE, URL, arg_parser, count, emit

BODY = json.dumps({"task": "noop"}).encode()


async def consume() -> None:
    conn = await aio_pika.connect(URL)
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=int(os.environ.get("BENCH_PREFETCH", "256")))
    queue = await ch.declare_queue(QUEUE, durable=True, passive=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        json.loads(message.body)
        count()
        await message.ack()

    await queue.consume(on_message)
    await stop.wait()
    await conn.close()


async def publish(n: int, warmup: int, window: int) -> float:
    conn = await aio_pika.connect(URL)
    ch = await conn.channel(publisher_confirms=True)
    await ch.declare_queue(QUEUE, durable=True)
    ex = ch.default_exchange
    sem = asyncio.Semaphore(window)

    async def one() -> None:
        try:
            await ex.publish(
                aio_pika.Message(
                    BODY,
                    content_type="application/json",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                QUEUE,
                mandatory=True,
            )
        finally:
            sem.release()

    async def batch(k: int) -> None:
        tasks = []
        for _ in range(k):
            await sem.acquire()
            tasks.append(asyncio.ensure_future(one()))
        await asyncio.gather(*tasks)

    await batch(warmup)
    t0 = time.perf_counter()
    await batch(n)
    rate = n / (time.perf_counter() - t0)
    await conn.close()
    return rate


def main() -> None:
    args = arg_parser(__doc__).parse_args()
    if args.mode == "consume":
        asyncio.run(consume())
    elif args.mode == "publish":
        emit(rate=asyncio.run(publish(args.n, args.warmup, args.window)))
    else:
        raise SystemExit(f"unknown mode {args.mode!r}")


if __name__ == "__main__":
    main()
