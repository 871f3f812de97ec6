"""Web-facing tasks: every ``examples.web.*`` task is routed ``web.render`` to ``web_tasks``."""

from __future__ import annotations

import asyncio

from examples.app import app


@app.task
async def sendmail(to: str) -> str:
    """An ``async def`` task: runs on the worker's event loop, not in a thread."""
    await asyncio.sleep(0.01)
    return f"mail sent to {to}"
