"""The weight average's horizon (`train.ema_epochs`): the plain mean of every step until the
horizon is reached, an exponential average over about that many steps after it, so that the
knob acts at dtrain's run lengths (a fixed decay with a slow warm-up never reached its value)."""

from __future__ import annotations

import pytest
import torch

from dtrain.train.ema import WeightAverage, horizon_steps


def averaged(values: list[float], horizon: float) -> float:
    net = torch.nn.Linear(1, 1, bias=False)
    average = WeightAverage(net, horizon)
    for step, value in enumerate(values, start=1):  # the trainer's step count after each step
        net.weight.data.fill_(value)
        average.update(net, step)
    return average.net.weight.item()


def test_before_the_horizon_the_average_is_the_plain_mean_of_every_step():
    assert averaged([1.0, 2.0, 3.0, 6.0], horizon=10) == pytest.approx(3.0)


def test_after_the_horizon_older_steps_fade_at_one_over_the_horizon():
    # horizon 2: decay 1/2 once reached; steps 1-2 mean 1.5, then 0.5*1.5 + 0.5*5 = 3.25
    assert averaged([1.0, 2.0, 5.0], horizon=2) == pytest.approx(3.25)
    # a longer horizon keeps more of the past: the knob acts
    assert averaged([1.0, 2.0, 5.0, 5.0], horizon=3) < averaged([1.0, 2.0, 5.0, 5.0], horizon=2)


def test_the_horizon_is_in_epochs_and_the_decay_reached_is_reported():
    assert horizon_steps(3.0, 33) == 99
    assert horizon_steps(0.01, 10) == 1  # never below one step
    average = WeightAverage(torch.nn.Linear(1, 1), horizon_steps(3.0, 33))
    assert average.decay_at(50) == pytest.approx(49 / 50)  # still the plain mean
    assert average.decay_at(1320) == pytest.approx(1 - 1 / 99)  # the main job's last step
