"""The one backoff function, used by task retries and by reconnects."""

from __future__ import annotations

import random


def backoff_s(
    attempt: int, *, base_s: float = 0.5, cap_s: float = 60.0, rng: random.Random | None = None
) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, jittered.

    The draw between half and all of the exponential bound spreads retries of
    tasks that failed together, so a flaky dependency is not hit in waves, while
    keeping each delay near its nominal size.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    bound = min(cap_s, base_s * 2.0 ** (attempt - 1))
    draw: float = (rng or random).uniform(0.5, 1.0)
    return bound * draw
