"""Result handles and the collector that routes replies to them; remote errors as local types."""

from __future__ import annotations

import gc
import sys
import threading

import pytest

from amqptasks.errors import (
    AmqpTasksError,
    ConfigError,
    ResultsDisabled,
    ResultTimeout,
    TaskError,
)
from amqptasks.protocol import FAILURE, SUCCESS, Reply, encode_reply
from amqptasks.results import PENDING, AsyncResult, ResultCollector, remote_error
from amqptasks.results.rpc import OWN_ERRORS


def success(result: object, task_id: str = "id-1") -> bytes:
    return encode_reply(Reply(task_id, SUCCESS, "examples.tasks.add", result=result))


def failure(error_type: str, message: str = "boom", traceback: str | None = "Traceback") -> bytes:
    return encode_reply(
        Reply(
            "id-1",
            FAILURE,
            "examples.tasks.add",
            error_type=error_type,
            error_message=message,
            traceback=traceback,
        )
    )


# -- ResultCollector ----------------------------------------------------------------------------
def test_reply_reaches_a_live_handle() -> None:
    collector = ResultCollector()
    result = AsyncResult("id-1", "examples.tasks.add", collector.expect("corr-1"))
    assert result.status == PENDING
    assert not result.ready()
    assert collector.pending() == 1

    assert collector.deliver("corr-1", success(5)) is True

    assert result.ready()
    assert result.status == SUCCESS
    assert result.successful()
    assert result.get(timeout=0) == 5
    assert collector.pending() == 0
    assert repr(result) == "<AsyncResult examples.tasks.add[id-1] SUCCESS>"


def test_a_reply_is_delivered_once() -> None:
    collector = ResultCollector()
    result = AsyncResult("id-1", "t", collector.expect("corr-1"))
    assert collector.deliver("corr-1", success(1)) is True
    assert collector.deliver("corr-1", success(2)) is False  # a redelivered duplicate
    assert result.get(timeout=0) == 1


def test_a_lost_reply_connection_sends_the_waiter_to_the_store_at_once(tmp_path) -> None:
    """The connection that carried replies closed while a task ran (its reply is gone with
    it): get() does not wait out its timeout for a reply that cannot come, it waits on the
    store, where the worker wrote the result first."""
    from datetime import datetime, timezone

    from amqptasks.results import ResultBackend, ResultMeta, store_from_url

    store = store_from_url(f"sqlite:///{tmp_path / 'r.db'}")
    collector = ResultCollector()
    result = AsyncResult(
        "id-1", "t", collector.expect("id-1"), backend=ResultBackend(collector, store, "x")
    )
    done = threading.Event()
    got: list[object] = []

    def wait() -> None:
        got.append(result.get(timeout=None))  # before: forever, the reply being lost
        done.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    collector.lost()  # the publisher's connection closed
    now = datetime.now(timezone.utc)
    store.save([ResultMeta(id="id-1", status=SUCCESS, task="t", result=7, date_done=now)])
    assert done.wait(10) and got == [7]
    waiter.join(5)
    store.close()


def test_without_a_store_a_lost_wake_keeps_waiting_for_a_reply_still_due() -> None:
    """rpc:// only: the reply may have been due on another connection (the app's asyncio
    publisher) that is still open, so the waiter goes on waiting for it."""
    collector = ResultCollector()
    result = AsyncResult("id-1", "t", collector.expect("corr-1"))
    collector.lost()
    done = threading.Event()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: (got.append(result.get(10)), done.set()))
    waiter.start()
    assert not done.wait(0.2)  # still waiting: a lost wake is not an answer
    assert collector.deliver("corr-1", success(3)) is True
    assert done.wait(10) and got == [3]
    waiter.join(5)


def test_reply_for_a_dropped_handle_is_discarded() -> None:
    collector = ResultCollector()
    result = AsyncResult("id-1", "t", collector.expect("corr-1"))
    del result
    gc.collect()

    assert collector.pending() == 0
    assert collector.deliver("corr-1", success(5)) is False


def test_only_the_dropped_handle_is_forgotten() -> None:
    collector = ResultCollector()
    kept = AsyncResult("id-1", "t", collector.expect("kept"))
    AsyncResult("id-2", "t", collector.expect("dropped"))
    gc.collect()

    assert collector.pending() == 1
    assert collector.deliver("dropped", success(1)) is False
    assert collector.deliver("kept", success(2)) is True
    assert kept.get(timeout=0) == 2


@pytest.mark.parametrize("correlation_id", [None, "unknown"])
def test_reply_nobody_waits_for_is_discarded(correlation_id: str | None) -> None:
    collector = ResultCollector()
    handle = collector.expect("corr-1")
    assert collector.deliver(correlation_id, success(5)) is False
    assert handle.reply is None
    assert collector.pending() == 1


def test_malformed_reply_still_wakes_the_caller() -> None:
    collector = ResultCollector()
    result = AsyncResult("id-1", "t", collector.expect("corr-1"))

    assert collector.deliver("corr-1", b"not json") is True

    assert result.status == FAILURE
    with pytest.raises(TaskError, match="malformed reply") as info:
        result.get(timeout=0)
    assert info.value.exc_type == "DecodeError"


def test_get_waits_for_a_reply_from_another_thread() -> None:
    collector = ResultCollector()
    result = AsyncResult("id-1", "t", collector.expect("corr-1"))
    timer = threading.Timer(0.05, collector.deliver, ("corr-1", success([1, 2])))
    timer.start()
    try:
        assert result.get(timeout=10) == [1, 2]
    finally:
        timer.join()


# -- AsyncResult --------------------------------------------------------------------------------
def test_get_times_out() -> None:
    result = AsyncResult("id-1", "examples.tasks.add", ResultCollector().expect("corr-1"))
    with pytest.raises(ResultTimeout, match=r"'examples\.tasks\.add' id id-1 within 0\.01s"):
        result.get(timeout=0.01)
    assert result.status == PENDING


def test_get_without_results_raises_results_disabled() -> None:
    result = AsyncResult("id-1", "examples.tasks.add", None, ignored=True)
    with pytest.raises(ResultsDisabled, match="ignores results"):
        result.get(timeout=0)
    assert result.status == PENDING
    assert not result.ready()


def test_failed_task_raises_its_remote_error() -> None:
    collector = ResultCollector()
    result = AsyncResult("id-1", "t", collector.expect("corr-1"))
    collector.deliver("corr-1", failure("ZeroDivisionError", "division by zero", "Traceback ..."))

    assert result.status == FAILURE
    assert not result.successful()
    with pytest.raises(ZeroDivisionError, match="division by zero") as info:
        result.get(timeout=0)
    assert isinstance(info.value, TaskError)
    assert info.value.remote_traceback == "Traceback ..."


def test_get_without_propagate_returns_the_error() -> None:
    collector = ResultCollector()
    result = AsyncResult("id-1", "t", collector.expect("corr-1"))
    collector.deliver("corr-1", failure("ValueError", "bad op"))

    err = result.get(timeout=0, propagate=False)
    assert isinstance(err, ValueError)
    assert isinstance(err, TaskError)
    assert str(err) == "bad op"


def test_unserialisable_result_arrives_as_encode_error() -> None:
    collector = ResultCollector()
    result = AsyncResult("id-1", "t", collector.expect("corr-1"))
    collector.deliver("corr-1", success({1, 2}))

    with pytest.raises(TaskError, match="not JSON-serialisable") as info:
        result.get(timeout=0)
    assert type(info.value).__name__ == "EncodeError"


# -- remote_error -------------------------------------------------------------------------------
def error_reply(error_type: str | None, message: str = "boom") -> Reply:
    return Reply("id-1", FAILURE, "t", error_type=error_type, error_message=message, traceback="tb")


@pytest.mark.parametrize(
    "builtin",
    [ZeroDivisionError, KeyError, OSError, ValueError, TimeoutError, RuntimeError, LookupError],
)
def test_builtin_remote_errors_are_also_the_builtin(builtin: type[Exception]) -> None:
    err = remote_error(error_reply(builtin.__name__, "remote text"))

    assert type(err).__name__ == builtin.__name__
    assert type(err) is not builtin
    assert isinstance(err, builtin)
    assert isinstance(err, TaskError)
    assert isinstance(err, AmqpTasksError)
    assert err.exc_type == builtin.__name__
    assert err.message == "remote text"
    assert str(err) == "remote text"
    assert err.remote_traceback == "tb"
    with pytest.raises(builtin):
        raise err


@pytest.mark.parametrize("own", sorted(OWN_ERRORS.values(), key=lambda c: c.__name__))
def test_our_own_outcome_errors_are_also_our_class(own: type[Exception]) -> None:
    """A revoked task's get() is caught by ``except TaskRevoked`` (and so on for each outcome
    a worker reports under one of our names), still a TaskError with the remote text."""
    err = remote_error(error_reply(own.__name__, "remote text"))
    assert isinstance(err, own) and isinstance(err, TaskError)
    assert (err.exc_type, str(err), err.remote_traceback) == (own.__name__, "remote text", "tb")
    with pytest.raises(own):
        raise err


def test_a_remote_type_named_like_another_of_our_errors_is_a_plain_task_error() -> None:
    err = remote_error(error_reply("ConfigError"))  # not an outcome a worker reports
    assert type(err).__name__ == "ConfigError" and not isinstance(err, ConfigError)
    assert isinstance(err, TaskError)


@pytest.mark.parametrize(
    "builtin",
    [
        pytest.param(UnicodeDecodeError, id="UnicodeDecodeError"),
        pytest.param(UnicodeEncodeError, id="UnicodeEncodeError"),
    ],
)
def test_builtins_with_special_constructors_do_not_break_get(
    builtin: type[Exception],
) -> None:
    err = remote_error(error_reply(builtin.__name__))
    assert isinstance(err, TaskError)
    assert err.exc_type == builtin.__name__


# Names, not classes: ExceptionGroup is no builtin on Python 3.10 (and is then not mixed in).
@pytest.mark.parametrize(
    "name", ["UnicodeDecodeError", "UnicodeEncodeError", "UnicodeTranslateError", "ExceptionGroup"]
)
def test_get_raises_a_task_error_named_after_a_builtin_with_a_special_constructor(
    name: str,
) -> None:
    collector = ResultCollector()
    result = AsyncResult("id-1", "t", collector.expect("corr-1"))
    collector.deliver("corr-1", failure(name, "remote text"))

    with pytest.raises(TaskError) as info:
        result.get(timeout=0)
    assert type(info.value).__name__ == name
    assert type(info.value).__bases__ == (TaskError,)
    assert info.value.exc_type == name
    assert str(info.value) == "remote text"
    assert info.value.remote_traceback == "Traceback"


@pytest.mark.parametrize(
    ("error_type", "class_name"),
    [
        ("Evil", "Evil"),
        ("myapp.errors.PaymentDeclined", "TaskError"),
        ("os.system", "TaskError"),
        ("__import__('os').system('id')", "TaskError"),
        ("print", "print"),  # a builtin that is not an exception type is not mixed in
        ("Exception", "Exception"),  # never widened to catch-all
        ("SystemExit", "SystemExit"),  # BaseException-only types are not mixed in
        (None, "TaskError"),
    ],
)
def test_other_names_are_carried_never_imported(error_type: str | None, class_name: str) -> None:
    before = set(sys.modules)
    err = remote_error(error_reply(error_type))

    assert set(sys.modules) == before
    assert type(err).__name__ == class_name
    assert type(err).__module__ == "amqptasks.remote"
    assert type(err).__bases__ == (TaskError,)
    assert err.exc_type == (error_type or "TaskError")
    assert str(err) == "boom"


def test_a_handle_without_reply_or_store_says_why_it_cannot_wait() -> None:
    from amqptasks.errors import ResultsUnavailable
    from amqptasks.results import ResultBackend

    result = AsyncResult("id-1", backend=ResultBackend(ResultCollector(), None, "rpc://"))
    with pytest.raises(ResultsUnavailable, match="rpc://"):
        result.get(timeout=0)


def test_revoke_from_a_handle_goes_through_the_apps_control_with_its_ids() -> None:
    """AsyncResult.revoke() / GroupResult.revoke() (Celery's) call the application's
    control.revoke with their own id(s); a handle with nothing to revoke through says so."""
    from amqptasks.errors import ResultsUnavailable
    from amqptasks.results import GroupResult, ResultBackend

    calls: list[tuple[list[str], dict[str, object]]] = []

    def revoke(ids: list[str], **options: object) -> str:
        calls.append((ids, options))
        return "answers"

    backend = ResultBackend(ResultCollector(), None, "rpc://", revoke=revoke)
    one, two = AsyncResult("a", backend=backend), AsyncResult("b", backend=backend)
    assert one.revoke(terminate=True, expires=60) == "answers"
    assert GroupResult("g", [one, two], backend=backend).revoke() == "answers"
    assert calls == [
        (["a"], {"terminate": True, "expires": 60, "timeout": 1.0}),
        (["a", "b"], {"terminate": False, "expires": None, "timeout": 1.0}),
    ]
    with pytest.raises(ResultsUnavailable, match="a: this handle has no application"):
        AsyncResult("a").revoke()
    with pytest.raises(ResultsUnavailable, match="group g"):
        GroupResult("g", [one]).revoke()
