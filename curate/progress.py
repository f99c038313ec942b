"""One progress style for every long loop, readable on a terminal and in a CI log.

On a terminal: rich progress bars on stderr. Off a terminal (a pipe, a log file, CI): plain lines, one when a
task finishes and one every CURATE_PROGRESS_EVERY seconds (default 30) while it runs, so a log shows that a
long stage is alive without carriage-return bars. Third-party tqdm bars (model2vec's distillation, datasets,
transformers) are silenced off a terminal: they would write one ever-growing line. CURATE_PROGRESS=0: quiet.

Every tick is also where a worker thread notices Ctrl-C (`STOP`): Prefect's thread runner cannot interrupt a
running task, and `curate select` went on for ~2 minutes after Ctrl-C, finishing every queued scoring shard.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

#: Width for tables printed to a pipe (rich would assume 80 columns and cut names); COLUMNS overrides it.
PIPE_WIDTH = 160


def make_console(*, stderr: bool = False) -> Console:
    """A rich Console that, off a terminal, is wide enough that tables keep whole names."""
    con = Console(stderr=stderr)
    if not con.is_terminal and "COLUMNS" not in os.environ:
        con.width = PIPE_WIDTH
    return con


console = make_console(stderr=True)


def quiet_third_party() -> None:
    """Off a terminal, silence tqdm bars, whether tqdm is imported already or later."""
    if console.is_terminal:
        return
    os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is first imported
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    std = sys.modules.get("tqdm.std")
    # look in the class's own dict: `std.tqdm.__init__` of a partialmethod is a fresh function on every access,
    # so a marker set on it is never seen and each call would wrap again (RecursionError after many calls).
    # tqdm's own env handling already makes __init__ a partialmethod (no keywords): ours is the one with disable.
    init = std.tqdm.__dict__.get("__init__") if std is not None else None
    if std is not None and not (isinstance(init, functools.partialmethod) and init.keywords.get("disable") is True):
        # imported before us: the env var came too late, so default `disable` to True the way tqdm's env does
        std.tqdm.__init__ = functools.partialmethod(std.tqdm.__init__, disable=True)


def _every() -> float:
    try:
        return float(os.environ.get("CURATE_PROGRESS_EVERY", "30"))
    except ValueError:
        return 30.0


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else (
        f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s")


#: set on Ctrl-C (`curate.cli`): every progress tick and every stage start then raises `Interrupted`
STOP = threading.Event()


class Interrupted(Exception):
    """A worker stopping at its next batch because Ctrl-C was pressed; the main thread reports the interrupt."""


def check_stop() -> None:
    if STOP.is_set():
        raise Interrupted("interrupted (Ctrl-C)")


def catches(sig: int) -> bool:
    """Whether curate may handle `sig` here: only in the main thread, and a signal inherited as ignored (a job a
    script started in the background: `cmd &` ignores SIGINT; `nohup`) stays ignored."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(sig) not in (
        signal.SIG_IGN, None)


class StoppableProgress(Progress):
    """rich's Progress whose update / advance raise `Interrupted` once `STOP` is set."""

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        check_stop()
        super().update(task_id, **kwargs)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        check_stop()
        super().advance(task_id, advance)


class PlainProgress(StoppableProgress):
    """rich's Progress API (add_task / update / advance) writing plain log lines instead of a live bar."""

    def __init__(self, out: Console, every: float):
        super().__init__(TextColumn(""), console=out, disable=True)
        self._out, self._every = out, every
        self._last: dict[TaskID, float] = {}
        self._done: set[TaskID] = set()

    def _line(self, task: Task, final: bool) -> str:
        done = f"{task.completed:,.0f}"
        unit = "" if task.total else " rows"
        if task.total:
            done += f"/{task.total:,.0f} ({100 * task.completed / task.total:.0f}%)"
        elapsed = task.finished_time if final and task.finished_time is not None else task.elapsed or 0.0
        text = f"{task.description}: {done}{unit}, {_clock(elapsed)}"
        if not final and task.total and task.speed and task.time_remaining is not None:
            text += f", about {_clock(task.time_remaining)} left"
        return text

    def _tick(self, task_id: TaskID) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None or task_id in self._done:
            return
        now = time.monotonic()
        if task.finished:
            self._done.add(task_id)
            self._out.print(self._line(task, True), highlight=False, markup=False, soft_wrap=True)
        elif now - self._last.setdefault(task_id, now) >= self._every:
            self._last[task_id] = now
            self._out.print(self._line(task, False), highlight=False, markup=False, soft_wrap=True)

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._tick(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._tick(task_id)

    def stop(self) -> None:
        """Tasks left open (no total, or cut short) get their last line now."""
        with self._lock:
            open_tasks = [t for t in self._tasks.values() if t.id not in self._done and t.started]
        for task in open_tasks:
            self._done.add(task.id)
            self._out.print(self._line(task, True), highlight=False, markup=False, soft_wrap=True)
        super().stop()


def progress() -> Progress:
    """Bars on a terminal, plain periodic lines off one (both on stderr); nothing when CURATE_PROGRESS=0."""
    quiet_third_party()
    if os.environ.get("CURATE_PROGRESS", "1") == "0":
        return StoppableProgress(console=console, disable=True)
    if not console.is_terminal:
        return PlainProgress(console, _every())
    return StoppableProgress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


quiet_third_party()
