"""Example task modules used by the README quickstart and the end-to-end tests."""
