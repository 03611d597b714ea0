"""Fault injection for the tests of ``tests/test_faults.py``; nothing here changes a result.

``FISHERSCAN_TEST_DELAY=<seconds>`` makes ``score`` and ``tune`` sleep that long after every batch or step, so a
test can ``kill -9`` a real run reliably in the middle (a tiny model is otherwise done before the signal lands).
Unset (the default) it costs one dictionary look-up per batch.
"""

from __future__ import annotations

import os
import time

DELAY_VARIABLE = "FISHERSCAN_TEST_DELAY"


def injected_delay() -> None:
    """Sleep ``$FISHERSCAN_TEST_DELAY`` seconds when it is set (tests only)."""
    value = os.environ.get(DELAY_VARIABLE)
    if value:
        time.sleep(float(value))
