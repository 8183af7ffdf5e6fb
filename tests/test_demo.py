"""The demo's progress lines: time left at the rate so far."""

from step_kernels.demo import eta


def test_eta_is_the_time_left_at_the_rate_so_far():
    assert eta(30.0, 200, 2400) == "5:30"  # 0.15 s per step, 2200 steps to go
    assert eta(12.0, 2400, 2400) == "0:00"
    assert eta(0.0, 0, 10) == "0:00"
