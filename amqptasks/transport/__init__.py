"""Broker I/O: the only package that imports pika (sync publisher) and aio-pika (asyncio)."""
