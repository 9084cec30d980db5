"""The rolling window of the monitoring gauges: sized by alerts or by minutes."""

import numpy as np
import pytest

from service.stream.window import RollingWindow, WindowSize, parse_window


@pytest.mark.parametrize("text, size", [("1000", WindowSize(alerts=1000)), (250, WindowSize(alerts=250)),
                                        ("30m", WindowSize(minutes=30)), ("1.5 min", WindowSize(minutes=1.5)),
                                        ("10minutes", WindowSize(minutes=10))])
def test_window_sizes_parse(text, size):
    assert parse_window(text) == size


@pytest.mark.parametrize("text", ["", "0", "-5", "12.5", "10h", "many", "0m"])
def test_bad_window_sizes_are_refused_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="window"):
        parse_window(text)


def test_a_window_by_alerts_keeps_the_latest_rows():
    window = RollingWindow(WindowSize(alerts=3))
    window.extend([0.1, 0.2])
    window.extend([0.3, 0.4, 0.5])
    assert window.values()[:, 0].tolist() == [0.3, 0.4, 0.5]
    assert len(window) == 3


def test_a_window_by_minutes_drops_rows_older_than_it():
    now = [0.0]
    window = RollingWindow(WindowSize(minutes=2), columns=2, clock=lambda: now[0])
    window.extend([(0.1, 0.2)])
    now[0] = 90.0
    window.extend([(0.3, float("nan"))])
    assert len(window) == 2
    now[0] = 150.0  # the first row is now 150 s old, past the 120 s window
    values = window.values()
    assert values.shape == (1, 2) and values[0, 0] == 0.3 and np.isnan(values[0, 1])
    now[0] = 1000.0
    assert window.values().shape == (0, 2)


def test_rows_of_the_wrong_width_are_refused():
    window = RollingWindow(WindowSize(alerts=10), columns=2)
    with pytest.raises(ValueError, match="2 values"):
        window.extend([0.5])
