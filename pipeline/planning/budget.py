"""Time budgets: ``BUDGET=20m`` / ``2h`` / ``90m`` / ``1h30m`` / ``45s`` / seconds, and a clock that
survives a kill (the time spent so far is kept in a state file and counted again on re-run)."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

from pipeline.core.errors import ConfigError
from pipeline.core.io import atomic_write_text

_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([hms])", re.IGNORECASE)
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_budget(text: str | float | int) -> float:
    """Seconds of a budget such as ``20m``, ``2h``, ``1h30m``, ``90`` (seconds); errors name the value."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        raw = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d+)?", raw):
            seconds = float(raw)
        elif raw and re.fullmatch(r"(?:\d+(?:\.\d+)?[hms])+", raw):
            seconds = sum(float(v) * _UNITS[u.lower()] for v, u in _PART.findall(raw))
        else:
            raise ConfigError(f"BUDGET={text!r}: expected a duration such as 20m, 2h, 1h30m or 90s")
    if not seconds > 0:
        raise ConfigError(f"BUDGET={text!r}: the budget must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{seconds / 60:.1f}m"
    return f"{seconds:.0f}s"


class BudgetClock:
    """Wall time spent on a budget, kept in ``state_file`` (``spent_s``, per stage) so that a
    killed run continues with what was left.  While a stage runs, a background thread writes
    the time spent every ``every`` seconds."""

    def __init__(self, state_file: str | Path, total_s: float, every: float = 5.0):
        self.path = Path(state_file)
        self.total = float(total_s)
        self.every = every
        state = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.spent_before = float(state.get("spent_s", 0.0))
        self.stages: dict[str, float] = {k: float(v) for k, v in state.get("stages", {}).items()}
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def spent(self) -> float:
        return self.spent_before + time.monotonic() - self.started

    def remaining(self) -> float:
        return self.total - self.spent()

    def add_stage(self, name: str, seconds: float) -> None:
        with self._lock:
            self.stages[name] = self.stages.get(name, 0.0) + float(seconds)
        self.save()

    def save(self) -> None:
        with self._lock:
            state = {"total_s": self.total, "spent_s": round(self.spent(), 3), "stages": self.stages}
            atomic_write_text(self.path, json.dumps(state, indent=2))

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self.save()

    def close(self) -> None:
        self._stop.set()
        self.save()
