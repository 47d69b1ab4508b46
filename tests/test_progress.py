"""The progress line: its text, and drawing in place on a TTY versus plain lines elsewhere."""

from __future__ import annotations

import io

from sekft.progress import (
    ProgressLine,
    format_bytes,
    format_duration,
    format_eval_progress,
    format_progress,
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration_picks_the_largest_sensible_units():
    assert [format_duration(s) for s in (0, 45, 245, 7380)] == ["0s", "45s", "4m05s", "2h03m"]


def test_format_duration_of_an_unknown_eta_is_a_question_mark():
    assert format_duration(float("inf")) == "?"


def test_format_bytes_switches_to_gigabytes_at_one_gigabyte():
    assert format_bytes(300 * 2**20) == "300 MB"
    assert format_bytes(3 * 2**29) == "1.5 GB"


def test_format_progress_shows_step_loss_speed_eta_and_memory():
    line = format_progress(12, 300, 1.23456, 1234.4, 245, 2**30)
    assert line == "step 12/300  loss 1.2346  1234 tok/s  ETA 4m05s  mem 1.0 GB"


def test_format_eval_progress_shows_episodes_each_runs_passes_and_eta():
    line = format_eval_progress(7, 20, {"adapter": (3, 5), "base": (1, 2)}, 0, 130)
    assert line == "episode 7/20  adapter pass 3/5  base pass 1/2  ETA 2m10s"


def test_format_eval_progress_counts_scenario_errors_apart():
    assert format_eval_progress(0, 4, {}, 0, float("inf")) == "episode 0/4  ETA ?"
    line = format_eval_progress(3, 4, {"model": (1, 1)}, 2, 10)
    assert line == "episode 3/4  model pass 1/1  2 scenario errors  ETA 10s"


def test_progress_line_redraws_in_place_on_a_tty():
    out = _Tty()
    progress = ProgressLine(out)
    progress.update("a")
    progress.update("b")
    progress.close()
    assert out.getvalue() == "\r\x1b[2Ka\r\x1b[2Kb\n"


def test_progress_line_prints_plain_lines_when_not_a_tty():
    out = io.StringIO()
    progress = ProgressLine(out)
    progress.update("a")
    progress.message("saved")
    progress.update("b")
    progress.close()
    assert out.getvalue() == "a\nsaved\nb\n"


def test_progress_message_clears_the_live_line_first_on_a_tty():
    out = _Tty()
    progress = ProgressLine(out)
    progress.update("a")
    progress.message("saved")
    assert out.getvalue() == "\r\x1b[2Ka\r\x1b[2Ksaved\n"


def test_progress_line_with_a_report_callback_sends_lines_and_fields_there():
    out, seen = _Tty(), []
    progress = ProgressLine(out, report=lambda line, **fields: seen.append((line, fields)))
    progress.update("step 1/2", {"loss": 0.5})
    progress.message("saved")
    progress.close()
    assert seen == [("step 1/2", {"loss": 0.5}), ("saved", {})]
    assert out.getvalue() == ""
