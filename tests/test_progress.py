"""progress.py: a bar on a terminal, periodic plain lines in logs and pipes."""

from __future__ import annotations

import io

from collabvit.lite.progress import progress_bar, progress_line


def test_progress_line_reads_like_a_log_entry():
    assert progress_line("edge pass", 40, 160, 31.0, "batch") == (
        "edge pass: 40/160 batch (25 %), 0:31 elapsed, ~1:33 left"
    )
    assert progress_line("sweep", 3, None, 3725.0, "pass") == "sweep: 3 pass, 1:02:05 elapsed"


def test_off_a_terminal_progress_is_printed_as_lines():
    log = io.StringIO()  # not a terminal, like a pipe or a log file
    items = list(progress_bar(range(3), "work", unit="item", interval=0.0, stream=log))
    assert items == [0, 1, 2]
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("work: 1/3 item (33 %), 0:00 elapsed")
    assert lines[-1].endswith("(done)") and "3/3 item (100 %)" in lines[-1]
    assert "\r" not in log.getvalue()


def test_short_work_and_quiet_runs_print_nothing():
    log = io.StringIO()
    assert list(progress_bar(range(3), "work", stream=log)) == [0, 1, 2]  # under 30 s
    assert list(progress_bar(range(3), "work", enabled=False, stream=log)) == [0, 1, 2]
    assert log.getvalue() == ""
