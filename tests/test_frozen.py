"""Value types (common/frozen.py): equal, hashed and pickled by value, as frozen
dataclasses were. That they cannot be assigned to is mypy's to check."""

from __future__ import annotations

import copy
import pickle

import pytest

from taskfleet.common.model import LeaseRef, Outcome, TaskError, TaskSpec, TaskState


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_value_types_pickle_with_every_protocol(protocol: int) -> None:
    values = [
        TaskSpec("add", "q", metadata={"k": "v"}, depends_on=("a", "b")),
        LeaseRef("t1", 3),
        Outcome(LeaseRef("t1", 3), TaskState.FAILED, error=TaskError("E", "boom", "tb")),
    ]
    for value in values:
        assert pickle.loads(pickle.dumps(value, protocol)) == value
        assert copy.deepcopy(value) == value


def test_value_types_hash_by_value() -> None:
    refs = {LeaseRef("t1", 3): "held"}

    assert refs[LeaseRef("t1", 3)] == "held"
    assert LeaseRef("t1", 4) not in refs
