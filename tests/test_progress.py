"""The training progress line fits the terminal with its times whole, and shows no loss before there is one."""

import io
import re

import pytest
from rich.console import Console

from tunesmith.loop.progress import progress_line as _progress

TIMES = re.compile(r"\d+:\d\d:\d\d<\d+:\d\d:\d\d")  # elapsed<remaining, neither cut to "0:0…"


def _render(width: int, total: int, loss: float, sps: float) -> tuple[str, str]:
    """The line as train_loop leaves it before the first logging step, and after 12 steps and one logging step.
    The console's clock is simulated (5 s a step) so that rich has a speed, hence a remaining time, to show."""
    clock = [0.0]
    console = Console(width=width, record=True, file=io.StringIO(), get_time=lambda: clock[0])
    progress = _progress(console, disable=False)
    task = progress.add_task("train", total=total, completed=0, epoch=0.0)  # the fields train_loop sets at the start
    console.print(progress.get_renderable())
    before = console.export_text()
    for step in range(1, 13):
        clock[0] += 5.0
        progress.update(task, completed=step, epoch=step / 28)
    progress.update(task, loss=loss, lr=4.9e-5, sps=sps)
    console.print(progress.get_renderable())
    return before, console.export_text()


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize(("total", "loss", "sps"), [(100, 0.6931, 212.3), (100_000, 10.6931, 12345.6)])
def test_line_fits_80_columns_with_times_whole(total, loss, sps):
    before, after = _render(80, total, loss, sps)
    for line in _lines(before) + _lines(after):
        assert len(line) <= 80, line
    assert re.search(r"0:00:00<-:--:--", before), before  # no speed yet: the remaining time is unknown, but whole
    assert TIMES.search(after) and "0:01:00<" in after, after
    assert "loss" not in before and "lr" not in before and "/s" not in before, before
    assert f"12/{total}" in after and f"loss {loss:.4f}" in after, after


def test_all_fields_shown_at_80_columns_for_a_typical_run():
    _, after = _render(80, 100, 0.6931, 212.3)
    assert re.search(r"epoch 0\.43 .*12/100 loss 0\.6931 lr 4\.9e-05 212/s 0:01:00<0:07:20", after), after


@pytest.mark.parametrize("width", [60, 40])
def test_narrow_console_drops_metrics_not_times(width):
    before, after = _render(width, 100, 0.6931, 212.3)
    for line in _lines(before) + _lines(after):
        assert len(line) <= width, line
    assert TIMES.search(after) and "12/100" in after, after
    assert "lr 4.9e-05" not in after  # dropped whole (speed before it), never cut mid-number
