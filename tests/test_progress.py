"""Progress of long loops: bars on a terminal, log lines in files and log collectors."""
from __future__ import annotations

import io
import logging
import sys
from itertools import count

import pytest
from tqdm import tqdm

from tests.conftest import Terminal, quick_overrides
from training.cli import main as reid_main
from training.progress import LoggedProgress, progress


def test_a_terminal_gets_a_bar_and_a_file_gets_log_lines(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(progress(range(3), desc="x", unit="batch"), tqdm)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress(range(3), desc="x", unit="batch"), LoggedProgress)
    monkeypatch.setitem(sys.modules, "ipykernel", sys)  # a Jupyter kernel: its output shows bars, though no terminal
    assert isinstance(progress(range(3), desc="x", unit="batch"), tqdm)


def test_log_lines_come_at_most_once_an_interval_with_rate_time_left_and_figures(caplog):
    ticks = count(0, 10)  # each step takes 10 s
    steps = LoggedProgress(range(10), desc="epoch 1/2", unit="batch", interval=30, clock=lambda: next(ticks))
    with caplog.at_level(logging.INFO, logger="training.progress"), steps:
        seen = []
        for i in steps:
            seen.append(i)
            steps.set_postfix(loss=f"{1.0 / (i + 1):.3f}", refresh=False)
    assert seen == list(range(10))  # nothing lost or added by the wrapper
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "epoch 1/2: 3/10 batches, 0.1 batch/s, about 70 s left, loss=0.333",
        "epoch 1/2: 6/10 batches, 0.1 batch/s, about 40 s left, loss=0.167",
        "epoch 1/2: 9/10 batches, 0.1 batch/s, about 10 s left, loss=0.111",
    ]


def test_a_loop_of_unknown_length_logs_what_it_did():
    steps = LoggedProgress(iter("abc"), desc="identities", unit="id", interval=0, clock=count().__next__)
    assert steps._line(3, 2.0) == "identities: 3 ids, 1.5 id/s"


@pytest.mark.slow
def test_training_writes_no_carriage_returns_where_stderr_is_no_terminal(synthetic_root, tmp_path, capsys):
    """``docker logs`` and log files kept every redraw of the epoch's bar on one line."""
    assert reid_main(["train", *quick_overrides(synthetic_root, tmp_path, **{"train.num_epochs": 1})]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
