"""@task's checks and the retry schedule it declares, in-process."""

from __future__ import annotations

import pytest

from taskfleet.worker.registry import REGISTRY, Retry, TaskDefinition, task


def _noop() -> None:
    return None


def test_a_task_backoff_doubles_up_to_its_cap() -> None:
    definition = TaskDefinition("t", _noop, backoff_s=1.0, backoff_max_s=3.0)
    assert [definition.retry_delay_s(n) for n in range(1, 5)] == [1.0, 2.0, 3.0, 3.0]
    # Without a backoff of its own, the master's applies.
    assert TaskDefinition("t", _noop).retry_delay_s(3) == 0.0


def test_retry_on_must_name_exception_classes() -> None:
    with pytest.raises(TypeError, match="retry_on"):
        task(retry_on=("ConnectionError",))(_noop)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backoff_s"):
        task(backoff_s=-1)(_noop)
    assert "_noop" not in REGISTRY


@pytest.mark.parametrize("attempts", [0, 2**31])
def test_max_attempts_must_fit_the_int32_an_outcome_carries(attempts: int) -> None:
    with pytest.raises(ValueError, match="max_attempts must be 1 to 2147483647"):
        task(max_attempts=attempts)(_noop)
    assert "_noop" not in REGISTRY


@pytest.mark.parametrize("delay_s", [-1.0, 1e300, float("inf"), float("nan")])
def test_retry_refuses_a_delay_no_duration_holds(delay_s: float) -> None:
    with pytest.raises(ValueError, match="delay_s"):
        Retry(delay_s)
    assert Retry(2.5).delay_s == 2.5
