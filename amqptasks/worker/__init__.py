"""The worker process: consume, run, settle each delivery exactly once (see :mod:`.core`)."""

from .core import POOLS, Worker, WorkerOptions, default_hostname

__all__ = ["POOLS", "Worker", "WorkerOptions", "default_hostname"]
