"""Bubble formulas and the idle-fraction measurement on hand-made timelines."""
import pytest

from engine.pipeline.bubble import TimedAction, bubble_fraction, theoretical_bubble
from engine.pipeline.schedules import Action


def test_theoretical_bubble_hand_values():
    assert theoretical_bubble(4, 8) == pytest.approx(3 / 11)
    assert theoretical_bubble(4, 8, vpp=2) == pytest.approx(3 / 19)
    assert theoretical_bubble(1, 5) == 0.0
    with pytest.raises(ValueError):
        theoretical_bubble(0, 4)


def test_bubble_fraction_uses_common_window_and_ignores_comm():
    f, b, send = Action("F", 0, 0), Action("B", 0, 0), Action("SEND_F", 0, 0)
    stage0 = [TimedAction(f, 0.0, 1.0), TimedAction(send, 1.0, 2.0), TimedAction(b, 3.0, 4.0)]
    stage1 = [TimedAction(Action("F", 0, 1), 1.0, 2.0), TimedAction(Action("B", 0, 1), 2.0, 3.0)]
    # window [0, 4]: stage 0 busy 2 of 4, stage 1 busy 2 of 4
    assert bubble_fraction([stage0, stage1]) == [0.5, 0.5]
    assert bubble_fraction([stage1], window=(1.0, 3.0)) == [0.0]
