"""Rich progress bars for every long loop. Off a terminal (nohup, CI logs) a bar cannot redraw, so it
prints a plain status line at most once a minute instead of staying silent."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Progress(Progress):
    log_every_s: float = 60.0

    def add_task(self, description: str, *args: Any, **fields: Any) -> TaskID:  # type: ignore[override]
        fields.setdefault("rate", "")  # the rate column reads it; callers without a rate leave it blank
        return super().add_task(description, *args, **fields)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        if self.disable or self.console.is_terminal:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        last = task.fields.get("_logged", 0.0)
        if now - last >= self.log_every_s or (task.total is not None and task.completed >= task.total):
            task.fields["_logged"] = now
            left = task.time_remaining
            eta = f", ~{left / 60:.0f} min left" if left else ""
            total = f"/{task.total:.0f}" if task.total is not None else ""
            rate = task.fields.get("rate", "")
            self.console.print(
                f"{task.description}: {task.completed:.0f}{total} {rate} ({task.elapsed or 0:.0f} s{eta})",
                highlight=False,
            )


def progress_bar(disable: bool = False) -> Progress:
    return _Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=disable,
        transient=False,
    )
