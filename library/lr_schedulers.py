"""Learning-rate schedules of sd-scripts' --lr_scheduler, evaluated on the host.

sd-scripts builds its schedulers with transformers' and diffusers' get_*_schedule functions (LambdaLR): a
group's learning rate at scheduler step s is its base lr times a multiplier of s. The scheduler starts at step 0
and accelerate advances it num_processes times per optimizer step, so optimizer step k (0-based) runs with the
multiplier of scheduler step k * num_processes. The multipliers below follow those formulas; `LRScheduler`
writes base lr x multiplier into the optimizer's per-group learning-rate Parameters before each optimizer step.
"""

import argparse
import functools
import math

from .errors import UserError
from .optimizers import Adafactor, parse_literal_args

SUPPORTED_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
    "adafactor",
)


def _warmup(step, num_warmup_steps):
    return step / max(1, num_warmup_steps)


def constant(step):
    return 1.0


def constant_with_warmup(step, *, num_warmup_steps):
    return _warmup(step, num_warmup_steps) if step < num_warmup_steps else 1.0


def linear(step, *, num_warmup_steps, num_training_steps):
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return max(0.0, (num_training_steps - step) / max(1, num_training_steps - num_warmup_steps))


def cosine(step, *, num_warmup_steps, num_training_steps, num_cycles=0.5, min_lr_rate=0.0):
    """Cosine from 1 down to min_lr_rate over num_cycles periods (0.5: half a period, 1 to min once)."""
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    wave = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, wave * (1.0 - min_lr_rate) + min_lr_rate)


def cosine_with_restarts(step, *, num_warmup_steps, num_training_steps, num_cycles=1):
    """num_cycles half-cosines from 1 to 0, each restarting at 1; 0 after the last."""
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    progress = (step - num_warmup_steps) / max(1, num_training_steps - num_warmup_steps)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))


def polynomial(step, *, num_warmup_steps, num_training_steps, lr_init, lr_end=1e-7, power=1.0):
    """Decay from lr_init to lr_end as (remaining fraction)**power; lr_init is the optimizer's default lr,
    so the multiplier is relative to it for every group."""
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    if step > num_training_steps:
        return lr_end / lr_init
    remaining = 1 - (step - num_warmup_steps) / (num_training_steps - num_warmup_steps)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def inverse_sqrt(step, *, num_warmup_steps, timescale):
    if step < num_warmup_steps:
        return _warmup(step, num_warmup_steps)
    return 1.0 / math.sqrt((step + timescale - num_warmup_steps) / timescale)


def warmup_stable_decay(
    step, *, num_warmup_steps, num_stable_steps, num_decay_steps, warmup_type="linear", decay_type="cosine",
    min_lr_ratio=0.0, num_cycles=0.5,
):  # fmt: skip
    """Warm up from min_lr_ratio to 1, hold 1, decay to min_lr_ratio, then stay there."""
    if step < num_warmup_steps:
        progress = step / max(1, num_warmup_steps)
        shape = {
            "linear": progress,
            "cosine": 0.5 * (1.0 - math.cos(math.pi * progress)),
            "1-sqrt": 1.0 - math.sqrt(1.0 - progress),
        }[warmup_type]
        return max(0.0, shape * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < num_warmup_steps + num_stable_steps:
        return 1.0
    if step < num_warmup_steps + num_stable_steps + num_decay_steps:
        progress = (step - num_warmup_steps - num_stable_steps) / max(1, num_decay_steps)
        shape = {
            "linear": 1.0 - progress,
            "cosine": 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)),
            "1-sqrt": 1.0 - math.sqrt(progress),
        }[decay_type]
        return max(0.0, shape * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


def piecewise_constant(step, *, boundaries, multipliers, final_multiplier):
    """multipliers[i] while step < boundaries[i] (boundaries sorted), then final_multiplier."""
    for boundary, multiplier in zip(boundaries, multipliers):
        if step < boundary:
            return multiplier
    return final_multiplier


def parse_step_rules(step_rules):
    """diffusers' step_rules "1:10,0.1:20,0.01": multiplier 1 below step 10, 0.1 below step 20, then 0.01."""
    try:
        *pairs, final = str(step_rules).split(",")
        rules = {}
        for pair in pairs:
            multiplier, boundary = pair.split(":")
            rules[int(boundary)] = float(multiplier)
        final_multiplier = float(final)
    except ValueError:
        raise UserError(
            f"--lr_scheduler_args step_rules={step_rules!r}: expected multiplier:step pairs then a final "
            f"multiplier, e.g. step_rules=\"1:10,0.1:20,0.01\""
        ) from None
    boundaries = sorted(rules)
    return dict(boundaries=boundaries, multipliers=[rules[b] for b in boundaries], final_multiplier=final_multiplier)


class LRScheduler:
    """Sets each parameter group's learning rate, base lr x multiplier, before an optimizer step."""

    def __init__(self, optimizer, multiplier, num_processes=1):
        self.optimizer = optimizer
        self.multiplier = multiplier
        self.num_processes = num_processes

    def lrs_for_step(self, optimizer_step):
        """Group learning rates used by optimizer step `optimizer_step` (0 for the first step)."""
        factor = self.multiplier(optimizer_step * self.num_processes)
        return [base_lr * factor for base_lr in self.optimizer.base_lrs]

    def apply(self, optimizer_step):
        lrs = self.lrs_for_step(optimizer_step)
        self.optimizer.set_learning_rates(lrs)
        return lrs

    def logged_lrs(self, completed_steps):
        """What sd-scripts' lr_scheduler.get_last_lr() reports after `completed_steps` optimizer steps."""
        return self.lrs_for_step(completed_steps)


class AdafactorScheduler:
    """sd-scripts' "adafactor:<lr>" scheduler: Adafactor with relative_step computes its own learning rate, so
    nothing is set; like transformers' AdafactorSchedule it reports initial_lr until the first step, then the
    learning rate each group's first parameter used."""

    def __init__(self, optimizer, initial_lr):
        self.optimizer = optimizer
        self.initial_lr = initial_lr

    def apply(self, optimizer_step):
        return self.logged_lrs(optimizer_step)

    def logged_lrs(self, completed_steps):
        if completed_steps == 0:
            return [self.initial_lr] * len(self.optimizer.base_lrs)
        return self.optimizer.learning_rates()


def create_lr_scheduler(args, optimizer, num_processes=1):
    """The scheduler sd-scripts' get_scheduler_fix builds from `args` (--lr_scheduler and friends)."""
    name = args.lr_scheduler
    if args.lr_scheduler_type:
        raise UserError(
            f"--lr_scheduler_type {args.lr_scheduler_type}: custom scheduler classes are not supported; "
            f"use --lr_scheduler with one of {', '.join(SUPPORTED_SCHEDULERS)}"
        )
    is_relative_step_adafactor = isinstance(optimizer, Adafactor) and optimizer.relative_step
    total_steps = args.max_train_steps * num_processes
    warmup_steps = _steps(args.lr_warmup_steps, total_steps)
    extra = parse_literal_args(args.lr_scheduler_args, "--lr_scheduler_args")

    if name.split(":")[0] == "adafactor":
        if not is_relative_step_adafactor or ":" not in name:
            raise UserError(
                "--lr_scheduler adafactor goes with --optimizer_type Adafactor and relative_step=True, "
                "which selects it by itself; choose another scheduler"
            )
        _refuse_warmup(name, warmup_steps)
        _check_scheduler_args(name, extra, allowed=())
        return AdafactorScheduler(optimizer, float(name.split(":", 1)[1]))
    if is_relative_step_adafactor:
        raise UserError(
            f"--lr_scheduler {name}: Adafactor with relative_step=True computes its own learning rate; "
            f"pass --optimizer_args relative_step=False to use a schedule"
        )
    multiplier = _multiplier(name, args, optimizer, warmup_steps, total_steps, extra)
    return LRScheduler(optimizer, multiplier, num_processes)


def _multiplier(name, args, optimizer, warmup_steps, total_steps, extra):
    num_cycles = args.lr_scheduler_num_cycles
    min_lr_ratio = args.lr_scheduler_min_lr_ratio
    warmup_and_total = dict(num_warmup_steps=warmup_steps, num_training_steps=total_steps)

    if name == "constant":
        _refuse_warmup(name, warmup_steps)
        _check_scheduler_args(name, extra, allowed=())
        return constant
    if name == "constant_with_warmup":
        _check_scheduler_args(name, extra, allowed=())
        return functools.partial(constant_with_warmup, num_warmup_steps=warmup_steps)
    if name == "linear":
        _check_scheduler_args(name, extra, allowed=())
        return functools.partial(linear, **warmup_and_total)
    if name == "cosine":
        _check_scheduler_args(name, extra, allowed=("num_cycles",))
        return functools.partial(cosine, **warmup_and_total, **extra)
    if name == "cosine_with_restarts":
        _check_scheduler_args(name, extra, allowed=())
        return functools.partial(cosine_with_restarts, **warmup_and_total, num_cycles=num_cycles)
    if name == "polynomial":
        _check_scheduler_args(name, extra, allowed=("lr_end",))
        lr_end = extra.get("lr_end", 1e-7)
        if not optimizer.default_lr > lr_end:
            raise UserError(
                f"--lr_scheduler polynomial: lr_end ({lr_end}) must be smaller than --learning_rate "
                f"({optimizer.default_lr})"
            )
        return functools.partial(
            polynomial, **warmup_and_total, lr_init=optimizer.default_lr, lr_end=lr_end,
            power=args.lr_scheduler_power,
        )  # fmt: skip
    if name == "inverse_sqrt":
        _check_scheduler_args(name, extra, allowed=())
        timescale = args.lr_scheduler_timescale or warmup_steps or 10_000
        return functools.partial(inverse_sqrt, num_warmup_steps=warmup_steps, timescale=timescale)
    if name == "cosine_with_min_lr":
        _check_scheduler_args(name, extra, allowed=("min_lr",))
        return functools.partial(
            cosine, **warmup_and_total, num_cycles=num_cycles / 2,
            min_lr_rate=_min_lr_rate(min_lr_ratio, extra.get("min_lr"), optimizer.default_lr),
        )  # fmt: skip
    if name == "warmup_stable_decay":
        _check_scheduler_args(name, extra, allowed=("warmup_type", "decay_type"))
        for key in ("warmup_type", "decay_type"):
            if extra.get(key, "linear") not in ("linear", "cosine", "1-sqrt"):
                raise UserError(f"--lr_scheduler_args {key}={extra[key]!r}: use 'linear', 'cosine' or '1-sqrt'")
        decay_steps = _steps(args.lr_decay_steps, total_steps)
        return functools.partial(
            warmup_stable_decay, num_warmup_steps=warmup_steps,
            num_stable_steps=total_steps - warmup_steps - decay_steps, num_decay_steps=decay_steps,
            num_cycles=num_cycles / 2, min_lr_ratio=min_lr_ratio if min_lr_ratio is not None else 0.0, **extra,
        )  # fmt: skip
    if name == "piecewise_constant":
        _check_scheduler_args(name, extra, allowed=("step_rules",))
        if "step_rules" not in extra:
            raise UserError('--lr_scheduler piecewise_constant needs --lr_scheduler_args step_rules="1:10,0.1"')
        return functools.partial(piecewise_constant, **parse_step_rules(extra["step_rules"]))
    raise UserError(f"--lr_scheduler {name} is not supported; use one of {', '.join(SUPPORTED_SCHEDULERS)}")


def _steps(value, total_steps):
    """sd-scripts' --lr_warmup_steps / --lr_decay_steps: an int is a step count, a float a fraction of training."""
    return int(value * total_steps) if isinstance(value, float) else value


def _refuse_warmup(name, warmup_steps):
    if warmup_steps:
        raise UserError(
            f"--lr_scheduler {name} has no warmup; set --lr_warmup_steps 0 or use constant_with_warmup"
        )


def _check_scheduler_args(name, extra, allowed):
    for key in extra:
        if key not in allowed:
            options = ", ".join(allowed) if allowed else "none"
            raise UserError(
                f"--lr_scheduler_args {key}: not an option of lr_scheduler {name} here (its options: {options})"
            )


def _min_lr_rate(min_lr_ratio, min_lr, default_lr):
    if min_lr_ratio is not None and min_lr is not None:
        raise UserError("--lr_scheduler cosine_with_min_lr: give --lr_scheduler_min_lr_ratio or min_lr, not both")
    if min_lr is not None:
        return min_lr / default_lr
    if min_lr_ratio is None:
        raise UserError("--lr_scheduler cosine_with_min_lr needs --lr_scheduler_min_lr_ratio")
    return min_lr_ratio


def add_optimizer_arguments(parser: argparse.ArgumentParser):
    """sd-scripts' optimizer and scheduler arguments, with its names, types and defaults."""
    parser.add_argument(
        "--optimizer_type",
        type=str,
        default="",
        help="optimizer: AdamW (default), Lion, SGDNesterov, Adafactor (case-insensitive)",
    )
    parser.add_argument("--use_8bit_adam", action="store_true", help="legacy alias of --optimizer_type AdamW8bit")
    parser.add_argument("--use_lion_optimizer", action="store_true", help="legacy alias of --optimizer_type Lion")
    parser.add_argument("--learning_rate", type=float, default=2.0e-6, help="learning rate")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm, 0 to disable")
    parser.add_argument(
        "--optimizer_args", type=str, default=None, nargs="*", help="optimizer options as key=value (Python literals)"
    )
    parser.add_argument("--lr_scheduler_type", type=str, default="", help="custom scheduler class (not supported)")
    parser.add_argument(
        "--lr_scheduler_args", type=str, default=None, nargs="*", help="scheduler options as key=value"
    )
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help=f"learning-rate schedule: {', '.join(SUPPORTED_SCHEDULERS)}",
    )
    parser.add_argument(
        "--lr_warmup_steps",
        type=steps_or_ratio,
        default=0,
        help="warmup steps, or a fraction of the training steps if below 1 (also 'N%%')",
    )
    parser.add_argument(
        "--lr_decay_steps",
        type=steps_or_ratio,
        default=0,
        help="decay steps (warmup_stable_decay), or a fraction of the training steps if below 1",
    )
    parser.add_argument(
        "--lr_scheduler_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts (and min-lr cosines)"
    )
    parser.add_argument("--lr_scheduler_power", type=float, default=1, help="power of the polynomial schedule")
    parser.add_argument("--fused_backward_pass", action="store_true", help="not supported by this trainer")
    parser.add_argument(
        "--lr_scheduler_timescale", type=int, default=None, help="inverse_sqrt timescale (default: warmup steps)"
    )
    parser.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=float,
        default=None,
        help="final lr as a ratio of the initial one (cosine_with_min_lr, warmup_stable_decay)",
    )


def steps_or_ratio(text):
    """"100" -> 100 steps; "0.1" -> ratio 0.1; "10%" -> ratio 0.1 (sd-scripts' int_or_float)."""
    if text.endswith("%"):
        try:
            return float(text[:-1]) / 100.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a valid percentage") from None
    try:
        value = float(text)
        return int(text) if value >= 1 else value
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a step count (int) or a ratio below 1") from None
