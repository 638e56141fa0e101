# SPDX-License-Identifier: Apache-2.0
"""StepTimer's reduction of begin/end events into busy and idle time between steps. Oracle: host
events around known sleeps (a synchronous device: an event completes when it is recorded)."""
import time

from mindie_llm.executor.step_timer import HostEvent, StepTimer


def test_idle_is_the_gap_between_one_step_end_and_the_next_begin():
    t = StepTimer(HostEvent)
    for _ in range(3):
        t.device_begin()
        t.device_begin()                 # a second begin in the same step does not count
        time.sleep(0.02)                 # "device work"
        t.step_end()
        time.sleep(0.01)                 # the host alone: the device waits
    t.step_end()                         # no step open: ignored
    s = t.summary()
    assert s.steps == 3
    assert 55 <= s.busy_ms <= 120, s
    assert 18 <= s.idle_ms <= 60 and 9 <= s.idle_ms_per_step <= 30, s   # two gaps of ~10 ms
    assert 0 < s.idle_pct_of_wall < 50
