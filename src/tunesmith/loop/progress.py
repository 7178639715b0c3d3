"""The training progress line: epoch, bar, steps, loss, learning rate, speed and times, fitted to the
terminal's width (rich)."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.measure import Measurement
from rich.progress import Progress, ProgressColumn, Task, TimeElapsedColumn, TimeRemainingColumn
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


class _FittedLine:
    """One progress line laid out for the width it is given. As separate columns, rich's table cuts every
    text column alike when a line is too wide (at 80 columns the times came out as "0:0… ETA 0:0…"); here the
    times are never cut: the bar shrinks first, then the metrics are dropped whole, last first."""

    MIN_BAR, MAX_BAR = 5, 40

    def __init__(self, epoch: Text, steps: Text, metrics: list[Text], times: Text, bar: Callable[[int], ProgressBar]):
        self.epoch, self.steps, self.metrics, self.times, self.bar = epoch, steps, metrics, times, bar

    def _width(self, metrics: list[Text]) -> int:  # without the bar; cells are one space apart
        cells = [self.epoch, self.steps, *metrics, self.times]
        return sum(cell.cell_len for cell in cells) + len(cells) - 1

    def __rich_measure__(self, console: Console, options) -> Measurement:
        return Measurement(self._width([]), self._width(self.metrics) + 1 + self.MAX_BAR)

    def __rich_console__(self, console: Console, options):
        metrics = list(self.metrics)
        while metrics and self._width(metrics) + 1 + self.MIN_BAR > options.max_width:
            metrics.pop()
        bar_width = min(self.MAX_BAR, options.max_width - self._width(metrics) - 1)
        bar = [self.bar(bar_width)] if bar_width >= self.MIN_BAR else []  # under ~40 columns: no bar
        cells = [self.epoch, *bar, self.steps, *metrics, self.times]
        grid = Table.grid(padding=(0, 1))
        for _ in cells:
            grid.add_column(no_wrap=True)
        grid.add_row(*cells)
        yield grid


class _TrainingLineColumn(ProgressColumn):
    """`epoch 0.42 ━━━━ 12/100 loss 0.6931 lr 4.9e-05 212/s 0:01:02<0:05:00` (speed in samples/s; elapsed<remaining
    as tqdm writes it, 4 columns shorter than "ETA"). loss, lr and speed are the task's fields set at each logging
    step: before the first there is nothing to show, so nothing is (not a made-up "loss 0.0000")."""

    def __init__(self) -> None:
        super().__init__()
        self._elapsed, self._remaining = TimeElapsedColumn(), TimeRemainingColumn()

    def render(self, task: Task) -> _FittedLine:
        fields = task.fields
        metrics = []  # short of width, dropped from the end: speed first (the ETA tells it), loss last
        if fields.get("loss") is not None:
            metrics.append(Text(f"loss {fields['loss']:.4f}"))
        if fields.get("lr") is not None:
            metrics.append(Text(f"lr {fields['lr']:.1e}"))
        if fields.get("sps") is not None:
            sps = fields["sps"]
            metrics.append(Text(f"{sps:.0f}/s" if sps >= 10 else f"{sps:.1f}/s"))
        total = None if task.total is None else max(0, task.total)

        def bar(width: int) -> ProgressBar:  # as rich's BarColumn draws it, at the width the line leaves
            return ProgressBar(total=total, completed=max(0, task.completed), width=width, pulse=not task.started,
                               animation_time=task.get_time())

        return _FittedLine(
            Text(f"epoch {fields.get('epoch', 0.0):.2f}", style="bold"),
            Text(f"{task.completed:.0f}" + ("" if total is None else f"/{total:.0f}")),
            metrics,
            Text.assemble(self._elapsed(task), "<", self._remaining(task)),
            bar,
        )


def progress_line(console: Console | None, disable: bool) -> Progress:
    return Progress(_TrainingLineColumn(), console=console, disable=disable, transient=False)
