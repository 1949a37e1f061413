"""Where saffron keeps what it builds or fetches: ``$SAFFRON_HOME`` (default ``~/.cache/saffron``)."""

from __future__ import annotations

import os
from pathlib import Path


def saffron_home() -> Path:
    root = Path(os.environ.get("SAFFRON_HOME") or Path.home() / ".cache" / "saffron").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
