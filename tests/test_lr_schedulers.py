import argparse
import math

import mindspore as ms
import numpy as np
import pytest
from mindspore import Parameter, Tensor

from library.errors import UserError
from library.lr_schedulers import (
    AdafactorScheduler,
    LRScheduler,
    add_optimizer_arguments,
    constant,
    constant_with_warmup,
    cosine,
    cosine_with_restarts,
    create_lr_scheduler,
    inverse_sqrt,
    linear,
    piecewise_constant,
    parse_step_rules,
    polynomial,
    steps_or_ratio,
    warmup_stable_decay,
)
from library.optimizers import AdamW, create_optimizer_from_args


def table(function, steps, **options):
    return [function(step, **options) for step in steps]


# Multipliers against values worked out by hand from the transformers / diffusers formulas.


def test_constant_and_constant_with_warmup():
    assert table(constant, [0, 5, 1000]) == [1.0, 1.0, 1.0]
    assert table(constant_with_warmup, range(6), num_warmup_steps=4) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_linear():
    values = table(linear, [0, 1, 2, 6, 10, 12], num_warmup_steps=2, num_training_steps=10)
    assert values == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


def test_cosine():
    assert table(cosine, [0, 1, 2, 4], num_warmup_steps=0, num_training_steps=4) == pytest.approx(
        [1.0, 0.5 * (1 + math.sqrt(0.5)), 0.5, 0.0]
    )
    # num_cycles=1 (from --lr_scheduler_args) goes down and back up.
    assert table(cosine, [2, 4], num_warmup_steps=0, num_training_steps=4, num_cycles=1) == pytest.approx([0.0, 1.0])


def test_cosine_with_restarts():
    values = table(cosine_with_restarts, [0, 2, 4, 6, 8], num_warmup_steps=0, num_training_steps=8, num_cycles=2)
    assert values == pytest.approx([1.0, 0.5, 1.0, 0.5, 0.0])


def test_polynomial_is_relative_to_the_default_lr():
    options = dict(num_warmup_steps=2, num_training_steps=6, lr_init=1e-3, lr_end=1e-7, power=2.0)
    # step 4: half the decay left -> (1e-3 - 1e-7) * 0.25 + 1e-7 = 2.50075e-4, i.e. 0.250075 of lr_init.
    assert table(polynomial, [1, 2, 4, 6, 7], **options) == pytest.approx([0.5, 1.0, 0.250075, 1e-4, 1e-4])


def test_inverse_sqrt():
    assert table(inverse_sqrt, [2, 4, 12], num_warmup_steps=4, timescale=4) == pytest.approx(
        [0.5, 1.0, 1 / math.sqrt(3)]
    )


def test_cosine_with_min_lr_rate():
    values = table(cosine, [0, 5, 10], num_warmup_steps=0, num_training_steps=10, min_lr_rate=0.1)
    assert values == pytest.approx([1.0, 0.55, 0.1])


def test_warmup_stable_decay():
    steps = dict(num_warmup_steps=2, num_stable_steps=4, num_decay_steps=4)
    assert table(warmup_stable_decay, [0, 1, 2, 5, 6, 8, 10, 12], **steps) == pytest.approx(
        [0.0, 0.5, 1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    )
    assert table(warmup_stable_decay, [1, 8, 12], **steps, min_lr_ratio=0.2) == pytest.approx([0.6, 0.6, 0.2])
    assert warmup_stable_decay(8, **steps, decay_type="1-sqrt") == pytest.approx(1 - math.sqrt(0.5))
    assert warmup_stable_decay(1, **steps, warmup_type="cosine") == pytest.approx(0.5)


def test_piecewise_constant_thresholds_are_absolute_steps():
    rules = parse_step_rules("1:10,0.1:20,0.01")
    assert table(piecewise_constant, [0, 9, 10, 19, 20, 100], **rules) == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


# The scheduler built from sd-scripts arguments.


def parse(*argv, max_train_steps=10):
    parser = argparse.ArgumentParser()
    add_optimizer_arguments(parser)
    args = parser.parse_args(list(argv))
    args.max_train_steps = max_train_steps
    return args


def two_group_adamw(default_lr=1e-3):
    weights = [Parameter(Tensor(np.ones(2, np.float32)), name=f"w{i}") for i in range(2)]
    return AdamW([{"params": [weights[0]], "lr": 1e-2}, {"params": [weights[1]]}], lr=default_lr)


def test_sd_scripts_argument_defaults():
    args = vars(parse())
    del args["max_train_steps"]
    assert args == {
        "optimizer_type": "",
        "use_8bit_adam": False,
        "use_lion_optimizer": False,
        "learning_rate": 2e-6,
        "max_grad_norm": 1.0,
        "optimizer_args": None,
        "lr_scheduler_type": "",
        "lr_scheduler_args": None,
        "lr_scheduler": "constant",
        "lr_warmup_steps": 0,
        "lr_decay_steps": 0,
        "lr_scheduler_num_cycles": 1,
        "lr_scheduler_power": 1,
        "fused_backward_pass": False,
        "lr_scheduler_timescale": None,
        "lr_scheduler_min_lr_ratio": None,
    }


def test_steps_or_ratio():
    assert [steps_or_ratio(text) for text in ["100", "1", "0.05", "5%", "0"]] == [100, 1, 0.05, 0.05, 0]
    assert isinstance(steps_or_ratio("100"), int) and isinstance(steps_or_ratio("0.5"), float)
    for bad in ["1.5", "abc", "x%"]:
        with pytest.raises(argparse.ArgumentTypeError):
            steps_or_ratio(bad)


def test_scheduler_sets_each_group_lr_before_each_step():
    optimizer = two_group_adamw()
    scheduler = create_lr_scheduler(parse("--lr_scheduler", "linear", "--lr_warmup_steps", "2"), optimizer)
    assert scheduler.apply(0) == [0.0, 0.0]  # torch's first warmup step runs at lr 0
    assert scheduler.apply(1) == pytest.approx([5e-3, 5e-4])
    assert optimizer.learning_rates() == pytest.approx([5e-3, 5e-4])
    scheduler.apply(6)  # linear: (10 - 6) / 8 of the base
    assert optimizer.learning_rates() == pytest.approx([5e-3, 5e-4])
    assert scheduler.logged_lrs(10) == [0.0, 0.0]


def test_warmup_ratio_is_a_fraction_of_the_training_steps():
    args = parse("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "0.1", max_train_steps=50)
    scheduler = create_lr_scheduler(args, two_group_adamw())
    assert scheduler.lrs_for_step(1) == pytest.approx([2e-3, 2e-4])  # warmup int(0.1 * 50) = 5 steps
    assert scheduler.lrs_for_step(5) == pytest.approx([1e-2, 1e-3])


def test_several_processes_advance_the_schedule_per_process():
    # accelerate steps the scheduler once per process per optimizer step, over max_train_steps * processes.
    scheduler = create_lr_scheduler(parse("--lr_scheduler", "linear"), two_group_adamw(), num_processes=2)
    assert scheduler.lrs_for_step(1) == pytest.approx([9e-3, 9e-4])  # scheduler step 2 of 20: (20 - 2) / 20
    assert scheduler.lrs_for_step(10) == [0.0, 0.0]


@pytest.mark.parametrize(
    "command_line, step, multiplier",
    [
        # 10 training steps. Half a period further than cosine's default: back at 0 by step 5.
        ("--lr_scheduler cosine --lr_scheduler_args num_cycles=1", 5, 0.0),
        # Two restarts: step 5 starts the second cycle.
        ("--lr_scheduler cosine_with_restarts --lr_scheduler_num_cycles 2", 5, 1.0),
        # ((1e-3 - 1e-4) * 0.5**2 + 1e-4) / 1e-3
        ("--lr_scheduler polynomial --lr_scheduler_power 2 --lr_scheduler_args lr_end=1e-4", 5, 0.325),
        # 1 / sqrt((8 + 8 - 2) / 8)
        ("--lr_scheduler inverse_sqrt --lr_warmup_steps 2 --lr_scheduler_timescale 8", 8, (8 / 14) ** 0.5),
        ("--lr_scheduler cosine_with_min_lr --lr_scheduler_min_lr_ratio 0.1", 10, 0.1),
        # min_lr 2e-4 over the default lr 1e-3
        ("--lr_scheduler cosine_with_min_lr --lr_scheduler_args min_lr=2e-4", 10, 0.2),
        # decay over the last int(0.4 * 10) = 4 steps, half-way at step 8
        ("--lr_scheduler warmup_stable_decay --lr_decay_steps 0.4", 8, 0.5),
        ("--lr_scheduler warmup_stable_decay --lr_decay_steps 4 --lr_scheduler_args decay_type='linear'", 7, 0.75),
        ("--lr_scheduler piecewise_constant --lr_scheduler_args step_rules='1:3,0.5'", 3, 0.5),
    ],
)
def test_scheduler_options_from_arguments(command_line, step, multiplier):
    # The default lr 1e-3 is the second group's base lr, so its lr is the multiplier times 1e-3.
    scheduler = create_lr_scheduler(parse(*command_line.split()), two_group_adamw())
    assert scheduler.lrs_for_step(step)[1] == pytest.approx(multiplier * 1e-3)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--lr_scheduler", "reduce_lr_on_plateau"], "reduce_lr_on_plateau"),
        (["--lr_scheduler", "cosine_warmup_with_min_lr"], "cosine_warmup_with_min_lr"),
        (["--lr_scheduler_type", "CosineAnnealingLR"], "CosineAnnealingLR"),
        (["--lr_scheduler", "constant", "--lr_warmup_steps", "10"], "lr_warmup_steps"),
        (["--lr_scheduler", "linear", "--lr_scheduler_args", "last_epoch=3"], "last_epoch"),
        (["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_args", "num_cycles=3"], "num_cycles"),
        (["--lr_scheduler", "cosine_with_min_lr"], "lr_scheduler_min_lr_ratio"),
        (["--lr_scheduler", "polynomial", "--lr_scheduler_args", "lr_end=0.1"], "lr_end"),
        (["--lr_scheduler", "piecewise_constant"], "step_rules"),
        (["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:x,0.5'"], "step_rules"),
        (["--lr_scheduler", "warmup_stable_decay", "--lr_scheduler_args", "decay_type='exp'"], "decay_type"),
        (["--lr_scheduler", "adafactor"], "adafactor"),
    ],
)
def test_unsupported_scheduler_settings_are_refused_by_name(argv, fragment):
    with pytest.raises(UserError) as error:
        create_lr_scheduler(parse(*argv), two_group_adamw())
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("mode", ["pynative", "graph"])
def test_adafactor_relative_step_gets_the_adafactor_scheduler_and_reports_its_lr(mode):
    args = parse("--optimizer_type", "Adafactor", "--learning_rate", "1e-4")
    args.unet_lr = args.text_encoder_lr = None
    weights = [Parameter(Tensor(np.full((2, 2), value, np.float32)), name=f"w{value}") for value in (3.0, 1e-4)]
    groups = [{"params": [weights[0]]}, {"params": [weights[1]]}]
    optimizer, _, _ = create_optimizer_from_args(args, groups)
    scheduler = create_lr_scheduler(args, optimizer)
    assert isinstance(scheduler, AdafactorScheduler)
    assert scheduler.logged_lrs(0) == [1e-4, 1e-4]

    step = optimizer if mode == "pynative" else ms.jit(optimizer.construct)
    step(tuple(Tensor(np.ones((2, 2), np.float32)) for _ in weights))
    # Step 1: relative step min(1e-2, 1/sqrt(1)) = 1e-2 times max(eps 1e-3, RMS of the weight before the step).
    assert scheduler.logged_lrs(1) == pytest.approx([1e-2 * 3.0, 1e-2 * 1e-3])


def test_relative_step_adafactor_refuses_other_schedules():
    args = parse("--optimizer_type", "Adafactor")
    weight = Parameter(Tensor(np.ones(2, np.float32)), name="w")
    optimizer, _, _ = create_optimizer_from_args(args, [{"params": [weight]}])
    args.lr_scheduler = "cosine"
    with pytest.raises(UserError, match="relative_step"):
        create_lr_scheduler(args, optimizer)
    assert isinstance(create_lr_scheduler(parse(), two_group_adamw()), LRScheduler)
