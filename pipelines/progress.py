"""Live progress of a run in a terminal: a rich table, one row per stage, redrawn in place.

Outside a terminal the engine prints plain lines instead (see ``raypipe run``).
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipelines.record import StageEntry

_STYLE = {
    "pending": "dim",
    "running": "yellow",
    "succeeded": "green",
    "failed": "bold red",
    "skipped": "dim",
}


class LiveTable:
    """A rich ``Live`` table of stages: state, elapsed time, and the latest message (epoch and
    loss, trial count, env steps and return, rows done...). Use as a context manager; pass
    ``stage`` as the engine's ``display`` and ``line`` as its printer."""

    def __init__(self, stages: list[str], console: Console | None = None):
        self.console = console or Console()
        self.rows: dict[str, dict[str, Any]] = {name: {"status": "pending"} for name in stages}
        self.live = Live(get_renderable=self._table, console=self.console, refresh_per_second=4)

    def __enter__(self) -> LiveTable:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.live.__exit__(*exc)

    def line(self, text: str) -> None:
        """Prints a line above the table (the run id, the report path)."""
        self.console.print(text, markup=False, highlight=False)

    def stage(self, name: str, entry: StageEntry, message: str) -> None:
        """Updates a stage's row from its run-record entry and the engine's message."""
        row = self.rows.setdefault(name, {})
        row.update(
            status=str(entry.status),
            cached=entry.cache_hit,
            start=entry.start,
            seconds=entry.seconds
            or (entry.end - entry.start if entry.end and entry.start else None),
            message=message,
        )
        if row["status"] == "failed":
            self.console.print(f"{name}: {message}", style="red", markup=False)

    def _table(self) -> Table:
        table = Table(expand=False, box=None, pad_edge=False)
        for column in ("stage", "state", "elapsed", "latest"):
            table.add_column(column, no_wrap=column != "latest")
        now = time.time()
        for name, row in self.rows.items():
            status = row.get("status", "pending")
            if status == "running" and row.get("start"):
                elapsed = now - row["start"]
            else:
                elapsed = row.get("seconds")
            state = "cached" if row.get("cached") else status
            table.add_row(
                name,
                f"[{_STYLE.get(status, '')}]{state}[/]",
                f"{elapsed:.1f}s" if isinstance(elapsed, int | float) else "",
                row.get("message", ""),
            )
        return table
