"""Code the harness runs in subprocesses: task modules and clients for each framework.

Modules here import only the standard library plus their own framework, because the Celery
and Dramatiq ones run with those frameworks' virtualenvs.
"""
