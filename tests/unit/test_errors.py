"""The exception tree's public surface: ``amqptasks.errors.__all__``."""

from __future__ import annotations

from amqptasks import errors


def test_all_is_sorted_without_duplicates() -> None:
    assert errors.__all__ == sorted(set(errors.__all__))


def test_every_exported_name_exists() -> None:
    missing = [name for name in errors.__all__ if not hasattr(errors, name)]
    assert missing == []
