"""linft.output's progress without a terminal: plain lines with done/total, rate and ETA; nothing when disabled."""

import re
import sys

from linft import output
from linft.output import PLAIN_EVERY_FRACTION, progress_bar, say_line

LINE = re.compile(r"^work: (\d+)/40 step \((\d+)%\), [\d,.]+ step/s, (ETA \d+:\d\d|ETA \?|in \d+:\d\d)$")


def test_progress_without_a_terminal_prints_plain_lines(capsys):
    # pytest's captured stderr is not a terminal, like a Slurm log or `| tee`
    assert not output.is_terminal(sys.stderr)
    with progress_bar(40, "work", unit="step") as update:
        for _ in range(40):
            update(1)
    lines = capsys.readouterr().err.splitlines()
    assert all(LINE.match(line) for line in lines), lines
    done = [int(LINE.match(line).group(1)) for line in lines]
    # a line at every PLAIN_EVERY_FRACTION of the work (the 30-second rule may only add lines, on a stalled
    # machine), then one line at the end with the time it took
    marks = [round(40 * PLAIN_EVERY_FRACTION * k) for k in range(1, round(1 / PLAIN_EVERY_FRACTION))]
    assert set(marks) <= set(done[:-1]) and done == sorted(done)
    assert all("ETA" in line for line in lines[:-1])
    assert done[-1] == 40 and " in " in lines[-1] and "(100%)" in lines[-1]


def test_progress_of_a_resumed_loop_starts_at_initial(capsys):
    with progress_bar(40, "work", unit="step", initial=30) as update:
        for _ in range(10):
            update(1)
    done = [int(LINE.match(line).group(1)) for line in capsys.readouterr().err.splitlines()]
    assert done[0] > 30 and done[-1] == 40


def test_disabled_progress_is_silent(capsys):
    with progress_bar(40, "work", enabled=False) as update:
        for _ in range(40):
            update(1)
    assert capsys.readouterr() == ("", "")


def test_say_line_without_a_terminal_is_the_plain_line(capsys):
    say_line("step 3 of 9: news")
    assert capsys.readouterr().err == "step 3 of 9: news\n"  # no terminal control characters in a log file
