"""System parts a test needs (node, iproute2, root, ...).

On a developer's machine a missing part skips the test and says what to
install. In CI (`.ci/run` sets ``TASKFLEET_REQUIRE_SYSTEM=1``) the same
absence fails the test, so a broken install step can never pass as a skip.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_ENV = "TASKFLEET_REQUIRE_SYSTEM"


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def missing(reason: str) -> None:
    """Skip the test for a missing system part, or fail it where parts are required."""
    if required():
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set, so this cannot be skipped)")
    pytest.skip(reason)
