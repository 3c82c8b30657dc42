"""A ``callable:`` result handler for the fault suite: appends each event to a JSON-lines file."""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any


def record_event(event: dict[str, Any]) -> None:
    """Append the event to ``$KIE_TEST_EVENT_LOG`` (locked: several worker processes write)."""
    with open(os.environ["KIE_TEST_EVENT_LOG"], "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(event) + "\n")
