"""The progress bar of ``normlab bench`` on stderr: ``rich.progress`` on a terminal when rich is
installed (the ``bench`` extra), else a counter (one line per step in a log)."""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


class _Null:
    def describe(self, text: str) -> None:
        pass

    def advance(self) -> None:
        pass


class _Plain(_Null):
    """``[3/36 12s] layer_norm rows float32 4096x1024 fwd``, rewritten in place on a terminal,
    one line per step otherwise (logs)."""

    def __init__(self, total: int, stream=None):
        self.total, self.done, self.stream = total, 0, stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0, self.width = time.perf_counter(), 0

    def describe(self, text: str) -> None:
        line = f"[{self.done + 1}/{self.total} {time.perf_counter() - self.t0:.0f}s] {text}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.tty:
            line = f"[{self.done}/{self.total} {time.perf_counter() - self.t0:.0f}s] done"
            self.stream.write("\r" + line.ljust(self.width) + "\n")
            self.stream.flush()


class _Rich(_Null):
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text)

    def advance(self) -> None:
        self.progress.advance(self.task)


@contextlib.contextmanager
def progress_bar(total: int, enabled: bool = True) -> Iterator[_Null]:
    """A bar over ``total`` steps with ``describe(text)`` and ``advance()``; a no-op when not
    ``enabled``. Not on a terminal (a log), the plain counter: one line per step."""
    if not enabled:
        yield _Null()
        return
    rich = None
    if getattr(sys.stderr, "isatty", lambda: False)():  # in a log rich draws only at the end
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            rich = True
        except ImportError:
            pass
    if not rich:
        bar = _Plain(total)
        try:
            yield bar
        finally:
            bar.close()
        return
    columns = (TextColumn("{task.description:<58}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield _Rich(progress, progress.add_task("normlab bench", total=total))
