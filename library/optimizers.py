"""The optimizers sd-scripts offers through --optimizer_type, as MindSpore cells.

An optimizer here is a Cell whose `construct(grads)` updates `optimizer.parameters` in place, `grads` being a tuple
in the same order; `update` can also update a slice of them, so that a step can run as several smaller compiled
graphs (`split_update`). It runs eagerly or inside a compiled graph (mindone's TrainStep calls it there). Each parameter
group (U-Net, text encoder, LoRA+ ...) has its own learning rate, kept in a scalar Parameter that the host sets
before every optimizer step, because sd-scripts steps its schedulers on the host once per optimizer step.

The update rules follow the torch classes sd-scripts instantiates (torch.optim.AdamW, torch.optim.SGD with
nesterov=True, lion_pytorch.Lion, transformers' Adafactor). The arithmetic is written with `ops` that have both
CPU and Ascend kernels (several mint optimizers have no CPU kernel or do not update on CPU); AdamW uses the fused
AdamWeightDecay kernel with torch's bias correction folded into its inputs.
"""

import ast
import inspect
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from .errors import UserError

SUPPORTED_OPTIMIZERS = ("AdamW", "Lion", "SGDNesterov", "Adafactor", "Prodigy")


class GroupedOptimizer(nn.Cell):
    """Base of the optimizers: parameter groups, one learning-rate Parameter per group, a step counter.

    `param_groups` is a list of dicts with "params" (list of Parameters) and optionally "lr" (float); a group
    without "lr" uses `lr`, as torch does. All state is held in Parameters with stable names, so
    `mindspore.save_checkpoint(optimizer, ...)` and `mindspore.load_param_into_net(optimizer, ...)` save and
    resume it exactly. The model's parameters themselves are not part of that state.
    """

    torch_name = ""  # the class path sd-scripts records in ss_optimizer for the torch equivalent
    updates_each_parameter_alone = True  # False when one parameter's update reads every gradient (Prodigy)

    def __init__(self, param_groups, lr):
        super().__init__(auto_prefix=False)
        _check_param_groups(param_groups)
        self.default_lr = lr
        self.base_lrs = [group.get("lr", lr) for group in param_groups]
        self.group_lrs = ParameterTuple(
            Parameter(Tensor(base_lr or 0.0, ms.float32), name=f"lr_group_{index}", requires_grad=False)
            for index, base_lr in enumerate(self.base_lrs)
        )
        params, param_lrs = [], []
        for group, group_lr in zip(param_groups, self.group_lrs):
            params += group["params"]
            param_lrs += [group_lr] * len(group["params"])
        # Kept out of the Cell's registry: a registered ParameterTuple would let a parent Cell (TrainStep) prefix
        # the model's parameter names with its attribute name, and would put model weights in the optimizer state.
        object.__setattr__(self, "parameters", ParameterTuple(params))
        object.__setattr__(self, "param_lrs", ParameterTuple(param_lrs))
        self.step_count = Parameter(Tensor(0, ms.int32), name="optimizer_step", requires_grad=False)
        self.hyper_map = ops.HyperMap()

    def construct(self, grads):
        return self.update(grads, self.parameters, self.param_lrs, self.per_parameter_state(), True)

    def per_parameter_state(self):
        """The state tuples holding one entry per parameter, in the order `update` takes them."""
        raise NotImplementedError

    def update(self, grads, params, lrs, states, starts_step):
        """Update `params` (all of the optimizer's, or a slice) from their `grads`, with their learning-rate
        Parameters `lrs` and `states` (`per_parameter_state()` sliced alike); `starts_step`: this call is the
        optimizer step's first (it counts the step), later calls of the step update the other parameters."""
        raise NotImplementedError

    def update_parameters_name(self, prefix="", recurse=True):
        """Keep the state names as created: a parent Cell (TrainStep) would otherwise prefix them with its attribute
        name, and a --save_state checkpoint would not load into an optimizer that is not yet attached."""

    def set_learning_rates(self, lrs):
        """Set each group's learning rate for the coming optimizer steps (host side, between steps)."""
        if len(lrs) != len(self.group_lrs):
            raise ValueError(f"expected {len(self.group_lrs)} learning rates, got {len(lrs)}")
        for group_lr, lr in zip(self.group_lrs, lrs):
            ops.assign(group_lr, Tensor(lr, ms.float32))

    def learning_rates(self):
        return [float(group_lr.asnumpy()) for group_lr in self.group_lrs]

    def _zeros_like_parameters(self, state_name):
        return [
            Parameter(
                Tensor(np.zeros(param.shape, np.float32)),
                name=f"{state_name}.{param.name}",
                requires_grad=False,
            )
            for param in self.parameters
        ]

    def _advance_step(self, starts_step=True):
        """Count this optimizer step (once, at its first call) and return its number (1 on the first step)."""
        if starts_step:
            ops.assign_add(self.step_count, Tensor(1, ms.int32))
        return self.step_count.astype(ms.float32)


def _check_param_groups(param_groups):
    if not param_groups:
        raise ValueError("an optimizer needs at least one parameter group")
    seen = set()
    for group in param_groups:
        unknown = set(group) - {"params", "lr"}
        if unknown:
            raise ValueError(f"parameter group keys must be 'params' and 'lr', got {sorted(unknown)}")
        if not group["params"]:
            raise ValueError("a parameter group has no parameters")
        for param in group["params"]:
            if not isinstance(param, Parameter):
                raise ValueError(f"parameter groups must hold Parameters, got {type(param).__name__}")
            if id(param) in seen:
                raise ValueError(f"parameter {param.name} appears in more than one group")
            seen.add(id(param))


def _one_minus_power(log_beta, step):
    """1 - beta**step, accurate in float32: computing beta**step directly loses ~1e-5 relative when beta=0.999."""
    return -ops.expm1(step * log_beta)


def _log(beta):
    return math.log(beta) if beta > 0 else -math.inf


_adamw_update = ops.MultitypeFuncGraph("adamw_update")


@_adamw_update.register(
    "Function", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor"
)
def _adamw_step(fused_adamw, beta1, beta2, eps, lr_scale, decay, lr, param, grad, exp_avg, exp_avg_sq):
    fused_adamw(param, exp_avg, exp_avg_sq, lr * lr_scale, beta1, beta2, eps, decay, grad.astype(param.dtype))
    return True


class AdamW(GroupedOptimizer):
    """torch.optim.AdamW: bias-corrected Adam with decoupled weight decay, eps added outside the square root.

    Runs MindSpore's fused AdamWeightDecay kernel, one kernel per parameter instead of a dozen (a full-size
    LoRA's 1444 tensors on CPU: 0.87 -> 0.14 s per update, 20 -> 4 s to compile). The kernel has no bias
    correction; it is folded into the kernel's learning rate, eps and decay, which is exact: with
    c1 = 1 - beta1^t and c2 = sqrt(1 - beta2^t),
    torch's step lr * (m / c1) / (sqrt(v) / c2 + eps) + lr * wd * w equals
    (lr * c2 / c1) * (m / (sqrt(v) + eps * c2) + (wd * c1 / c2) * w).
    """

    torch_name = "torch.optim.adamw.AdamW"

    def __init__(self, param_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(param_groups, lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.log_beta1, self.log_beta2 = _log(self.beta1), _log(self.beta2)
        self.kernel_betas = (Tensor(self.beta1, ms.float32), Tensor(self.beta2, ms.float32))
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.exp_avg = ParameterTuple(self._zeros_like_parameters("exp_avg"))
        self.exp_avg_sq = ParameterTuple(self._zeros_like_parameters("exp_avg_sq"))
        self.fused_adamw = ops.AdamWeightDecay()

    def per_parameter_state(self):
        return self.exp_avg, self.exp_avg_sq

    def update(self, grads, params, lrs, states, starts_step):
        step = self._advance_step(starts_step)
        bias_correction1 = _one_minus_power(self.log_beta1, step)
        bias_correction2_sqrt = ops.sqrt(_one_minus_power(self.log_beta2, step))
        lr_scale = bias_correction2_sqrt / bias_correction1
        update = ops.partial(
            _adamw_update,
            self.fused_adamw,
            self.kernel_betas[0],
            self.kernel_betas[1],
            self.eps * bias_correction2_sqrt,
            lr_scale,
            self.weight_decay / lr_scale,
        )
        exp_avg, exp_avg_sq = states
        return self.hyper_map(update, lrs, params, grads, exp_avg, exp_avg_sq)


_lion_update = ops.MultitypeFuncGraph("lion_update")


@_lion_update.register("Number", "Number", "Number", "Tensor", "Tensor", "Tensor", "Tensor")
def _lion_step(beta1, beta2, weight_decay, lr, param, grad, exp_avg):
    grad = grad.astype(ms.float32)
    weight = param.astype(ms.float32) * (1.0 - lr * weight_decay)
    weight = weight - lr * ops.sign(exp_avg * beta1 + grad * (1.0 - beta1))
    ops.assign(exp_avg, exp_avg * beta2 + grad * (1.0 - beta2))
    ops.assign(param, weight.astype(param.dtype))
    return True


class Lion(GroupedOptimizer):
    """lion_pytorch.Lion: sign of an interpolated momentum, weight decay scaled by the learning rate."""

    torch_name = "lion_pytorch.lion_pytorch.Lion"

    def __init__(
        self, param_groups, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, use_triton=False, decoupled_weight_decay=False
    ):
        if use_triton:
            raise UserError("--optimizer_args use_triton=True: Triton kernels do not exist on MindSpore; remove it")
        super().__init__(param_groups, lr)
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        # lion_pytorch's decoupled mode divides the decay by the learning rate given at construction.
        self.weight_decay = float(weight_decay) / lr if decoupled_weight_decay else float(weight_decay)
        self.exp_avg = ParameterTuple(self._zeros_like_parameters("exp_avg"))

    def per_parameter_state(self):
        return (self.exp_avg,)

    def update(self, grads, params, lrs, states, starts_step):
        self._advance_step(starts_step)
        update = ops.partial(_lion_update, self.beta1, self.beta2, self.weight_decay)
        return self.hyper_map(update, lrs, params, grads, states[0])


_sgd_nesterov_update = ops.MultitypeFuncGraph("sgd_nesterov_update")


@_sgd_nesterov_update.register("Number", "Number", "Tensor", "Tensor", "Tensor", "Tensor")
def _sgd_nesterov_step(momentum, weight_decay, lr, param, grad, momentum_buffer):
    weight = param.astype(ms.float32)
    direction = grad.astype(ms.float32) + weight * weight_decay
    # torch starts the buffer at the first direction; with zero dampening, 0 * momentum + direction is exactly that.
    new_buffer = momentum_buffer * momentum + direction
    direction = direction + new_buffer * momentum
    ops.assign(momentum_buffer, new_buffer)
    ops.assign(param, (weight - lr * direction).astype(param.dtype))
    return True


class SGDNesterov(GroupedOptimizer):
    """torch.optim.SGD(nesterov=True) with L2 weight decay added to the gradient."""

    torch_name = "torch.optim.sgd.SGD"

    def __init__(self, param_groups, lr=1e-3, momentum=0.9, dampening=0.0, weight_decay=0.0):
        if momentum <= 0 or dampening != 0:
            raise UserError(
                f"--optimizer_args: SGDNesterov needs momentum > 0 and dampening=0 "
                f"(got momentum={momentum}, dampening={dampening})"
            )
        super().__init__(param_groups, lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.momentum_buffer = ParameterTuple(self._zeros_like_parameters("momentum_buffer"))

    def per_parameter_state(self):
        return (self.momentum_buffer,)

    def update(self, grads, params, lrs, states, starts_step):
        self._advance_step(starts_step)
        update = ops.partial(_sgd_nesterov_update, self.momentum, self.weight_decay)
        return self.hyper_map(update, lrs, params, grads, states[0])


_adafactor_update = ops.MultitypeFuncGraph("adafactor_update")


@_adafactor_update.register(
    "Bool", "Bool", "Number", "Number", "Number", "Number", "Number",
    "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tuple",
)  # fmt: skip
def _adafactor_step(
    relative_step, scale_parameter, eps_squared, eps_scale, clip_threshold, beta1, weight_decay,
    beta2t, relative_step_size, lr, param, grad, state,
):  # fmt: skip
    """One transformers-Adafactor update; `state` is (row, col[, exp_avg]) for matrices, (sq[, exp_avg]) otherwise."""
    grad = grad.astype(ms.float32)
    weight = param.astype(ms.float32)
    step_size = relative_step_size if relative_step else lr
    if scale_parameter:
        step_size = step_size * ops.maximum(_rms(weight), eps_scale)
    squared = grad * grad + eps_squared
    if len(param.shape) >= 2:
        # Factored second moment: running means over rows and over columns stand in for the full matrix.
        row, col = state[0], state[1]
        new_row = row * beta2t + squared.mean(-1) * (1.0 - beta2t)
        new_col = col * beta2t + squared.mean(-2) * (1.0 - beta2t)
        ops.assign(row, new_row)
        ops.assign(col, new_col)
        row_factor = ops.rsqrt(new_row / new_row.mean(-1, keep_dims=True)).expand_dims(-1)
        col_factor = ops.rsqrt(new_col).expand_dims(-2)
        update = row_factor * col_factor * grad
        first_moment_index = 2
    else:
        new_sq = state[0] * beta2t + squared * (1.0 - beta2t)
        ops.assign(state[0], new_sq)
        update = ops.rsqrt(new_sq) * grad
        first_moment_index = 1
    update = update / ops.maximum(_rms(update) / clip_threshold, 1.0)
    update = update * step_size
    if len(state) > first_moment_index:
        exp_avg = state[first_moment_index]
        update = exp_avg * beta1 + update * (1.0 - beta1)
        ops.assign(exp_avg, update)
    weight = weight - weight * (weight_decay * step_size) - update
    ops.assign(param, weight.astype(param.dtype))
    return True


def _rms(tensor):
    return ops.sqrt((tensor * tensor).mean())


class Adafactor(GroupedOptimizer):
    """transformers.optimization.Adafactor, including its relative step size and parameter-scale options.

    With relative_step=True the learning rate is computed from the step number (and the group learning rates
    are not used); otherwise each group's learning rate is used, scaled by the parameter RMS if scale_parameter.
    """

    torch_name = "transformers.optimization.Adafactor"

    def __init__(
        self,
        param_groups,
        lr=None,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        decay_rate=-0.8,
        beta1=None,
        weight_decay=0.0,
        scale_parameter=True,
        relative_step=True,
        warmup_init=False,
    ):
        if lr is not None and relative_step:
            raise ValueError("Adafactor: a manual lr cannot be combined with relative_step=True")
        if lr is None and not relative_step:
            raise ValueError("Adafactor: relative_step=False needs a learning rate")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True requires relative_step=True")
        super().__init__(param_groups, lr)
        self.eps_squared, self.eps_scale = float(eps[0]), float(eps[1])
        self.clip_threshold = float(clip_threshold)
        self.decay_rate = float(decay_rate)
        self.beta1 = beta1
        self.weight_decay = float(weight_decay)
        self.scale_parameter = bool(scale_parameter)
        self.relative_step = bool(relative_step)
        self.warmup_init = bool(warmup_init)

        object.__setattr__(self, "group_first_params", ParameterTuple(group["params"][0] for group in param_groups))
        param_states = [self._new_state(param) for param in self.parameters]
        self.state_tensors = ParameterTuple(tensor for state in param_states for tensor in state)
        # The same Parameters grouped per model parameter, for the update; registered once above.
        object.__setattr__(self, "param_states", tuple(param_states))

    def _new_state(self, param):
        shape = param.shape
        if len(shape) >= 2:
            state = [("exp_avg_sq_row", shape[:-1]), ("exp_avg_sq_col", shape[:-2] + shape[-1:])]
        else:
            state = [("exp_avg_sq", shape)]
        if self.beta1 is not None:
            state.append(("exp_avg", shape))
        return tuple(
            Parameter(Tensor(np.zeros(state_shape, np.float32)), name=f"{name}.{param.name}", requires_grad=False)
            for name, state_shape in state
        )

    def per_parameter_state(self):
        return (self.param_states,)

    def update(self, grads, params, lrs, states, starts_step):
        step = self._advance_step(starts_step)
        beta2t = 1.0 - ops.pow(step, self.decay_rate)
        min_step = 1e-6 * step if self.warmup_init else 1e-2
        relative_step_size = ops.minimum(ops.rsqrt(step), min_step)
        if self.relative_step and starts_step:
            self._record_group_lrs(relative_step_size)
        update = ops.partial(
            _adafactor_update,
            self.relative_step,
            self.scale_parameter,
            self.eps_squared,
            self.eps_scale,
            self.clip_threshold,
            0.0 if self.beta1 is None else float(self.beta1),
            self.weight_decay,
            beta2t,
            relative_step_size,
        )
        return self.hyper_map(update, lrs, params, grads, states[0])

    def _record_group_lrs(self, relative_step_size):
        """With relative_step the group lrs are not inputs; they receive the learning rate each group's first
        parameter is about to use, which is what transformers' AdafactorSchedule reports for logging."""
        for group_lr, first_param in zip(self.group_lrs, self.group_first_params):
            lr = relative_step_size
            if self.scale_parameter:
                lr = lr * ops.maximum(_rms(first_param.astype(ms.float32)), self.eps_scale)
            ops.assign(group_lr, lr)


_prodigy_estimate = ops.MultitypeFuncGraph("prodigy_estimate")


@_prodigy_estimate.register(
    "Number", "Number", "Number", "Bool", "Bool", "Number",
    "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
    "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
)  # fmt: skip
def _prodigy_estimate_step(
    beta1, beta2, beta3, coupled_decay, safeguard_warmup, slice_p,
    weight_decay, d, d0, dlr, active, first_step,
    param, grad, exp_avg, exp_avg_sq, s, p0,
):  # fmt: skip
    """First Prodigy pass over one parameter: its moments and its share of the step-size estimate.

    Returns [numerator contribution, |s| sum]. Nothing is stored while `active` is false (learning rate 0).
    """
    weight = param.astype(ms.float32)
    grad = grad.astype(ms.float32)
    if coupled_decay:
        grad = grad + weight * weight_decay
    sliced_weight = weight.reshape(-1)[::slice_p]
    # The distance travelled is measured from the weights met at the first call, as prodigyopt does.
    start = ops.where(first_step, sliced_weight, p0)
    ops.assign(p0, start)
    sliced_grad = grad.reshape(-1)[::slice_p]
    numerator = (d / d0) * dlr * (sliced_grad * (start - sliced_weight)).sum()
    new_s = s * beta3 + sliced_grad * ((d / d0) * (d if safeguard_warmup else dlr))
    ops.assign(exp_avg, ops.where(active, exp_avg * beta1 + grad * (d * (1.0 - beta1)), exp_avg))
    ops.assign(exp_avg_sq, ops.where(active, exp_avg_sq * beta2 + grad * grad * (d * d * (1.0 - beta2)), exp_avg_sq))
    ops.assign(s, ops.where(active, new_s, s))
    return ops.stack([numerator, ops.abs(new_s).sum()]) * active.astype(ms.float32)


_prodigy_update = ops.MultitypeFuncGraph("prodigy_update")


@_prodigy_update.register(
    "Bool", "Bool", "Number", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor"
)
def _prodigy_update_step(
    use_first_moment, decoupled_decay, eps, weight_decay, d, dlr, take_step, param, grad, exp_avg, exp_avg_sq
):
    """Second Prodigy pass: the Adam-like step with the new estimate d, if the step is taken."""
    weight = param.astype(ms.float32)
    denom = ops.sqrt(exp_avg_sq) + d * eps
    if decoupled_decay:
        weight = weight - weight * (weight_decay * dlr)
    if use_first_moment:
        weight = weight - dlr * exp_avg / denom
    else:
        grad = grad.astype(ms.float32)
        if not decoupled_decay:
            grad = grad + param.astype(ms.float32) * weight_decay
        weight = weight - (dlr * d) * grad / denom
    ops.assign(param, ops.where(take_step, weight, param.astype(ms.float32)).astype(param.dtype))
    return True


class Prodigy(GroupedOptimizer):
    """prodigyopt.Prodigy (1.1.2): Adam whose step size d is estimated from the distance travelled from the start.

    The learning rate (1.0 recommended) scales d; like prodigyopt, all groups must share it. `d` is a Parameter,
    so d * lr can be logged as sd-scripts does ("lr/d*lr").
    """

    torch_name = "prodigyopt.prodigy.Prodigy"
    updates_each_parameter_alone = False  # d is estimated from every gradient

    def __init__(
        self, param_groups, lr=1.0, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0, decouple=True,
        use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=math.inf,
        fsdp_in_use=False, slice_p=1,
    ):  # fmt: skip
        super().__init__(param_groups, lr)
        if len(set(self.base_lrs)) != 1 or not self.base_lrs[0] > 0:
            raise UserError(
                f"Prodigy needs one positive learning rate shared by all parameter groups, got {self.base_lrs}; "
                f"give the U-Net and text encoders the same lr (1.0 is recommended)"
            )
        if fsdp_in_use:
            raise UserError("--optimizer_args fsdp_in_use=True: sharded training is not supported; remove it")
        if not isinstance(slice_p, int) or slice_p < 1:
            raise UserError(f"--optimizer_args slice_p={slice_p!r}: must be a positive integer")
        if not (d0 > 0 and eps > 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise UserError("--optimizer_args: Prodigy needs d0 > 0, eps > 0 and betas in [0, 1)")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.beta3 = math.sqrt(self.beta2) if beta3 is None else float(beta3)
        self.log_beta1, self.log_beta2 = _log(self.beta1), _log(self.beta2)
        self.eps = float(eps)
        self.weight_decay = Tensor(float(weight_decay), ms.float32)
        self.decouple = bool(decouple)
        self.use_bias_correction = bool(use_bias_correction)
        self.safeguard_warmup = bool(safeguard_warmup)
        self.d0 = Tensor(float(d0), ms.float32)
        self.d_coef = float(d_coef)
        self.growth_rate = float(growth_rate)
        self.slice_p = slice_p

        def scalar(name, value):
            return Parameter(Tensor(value, ms.float32), name=name, requires_grad=False)

        self.d = scalar("d", float(d0))
        self.d_max = scalar("d_max", float(d0))
        self.d_numerator = scalar("d_numerator", 0.0)
        self.k = scalar("k", 0.0)  # steps actually taken; a skipped step does not count
        self.exp_avg = ParameterTuple(self._zeros_like_parameters("exp_avg"))
        self.exp_avg_sq = ParameterTuple(self._zeros_like_parameters("exp_avg_sq"))
        self.s = ParameterTuple(
            Parameter(Tensor(np.zeros(_sliced_size(p, slice_p), np.float32)), name=f"s.{p.name}", requires_grad=False)
            for p in self.parameters
        )
        self.p0 = ParameterTuple(
            Parameter(Tensor(np.zeros(_sliced_size(p, slice_p), np.float32)), name=f"p0.{p.name}", requires_grad=False)
            for p in self.parameters
        )

    def set_learning_rates(self, lrs):
        if len(set(lrs)) > 1:
            raise ValueError(f"Prodigy takes one learning rate for all groups, got {list(lrs)}")
        super().set_learning_rates(lrs)

    def per_parameter_state(self):
        return self.exp_avg, self.exp_avg_sq, self.s, self.p0

    def update(self, grads, params, lrs, states, starts_step):
        """All parameters at once (never split): d is estimated from every gradient."""
        exp_avg, exp_avg_sq, s, p0 = states
        first_step = self._advance_step() == 1
        lr = self.group_lrs[0]
        active = lr > 0
        d = self.d
        dlr = d * lr
        if self.use_bias_correction:
            next_k = self.k + 1.0
            dlr = dlr * ops.sqrt(_one_minus_power(self.log_beta2, next_k)) / _one_minus_power(self.log_beta1, next_k)
        estimate = ops.partial(
            _prodigy_estimate, self.beta1, self.beta2, self.beta3, not self.decouple, self.safeguard_warmup,
            self.slice_p, self.weight_decay, d, self.d0, dlr, active, first_step,
        )  # fmt: skip
        contributions = self.hyper_map(estimate, params, grads, exp_avg, exp_avg_sq, s, p0)
        sums = ops.addn(contributions)
        d_numerator = self.d_numerator * self.beta3 + sums[0]
        d_denom = sums[1]
        # prodigyopt returns early, leaving d, k and the weights alone, when nothing was accumulated.
        take_step = ops.logical_and(active, d_denom > 0)
        d_hat = self.d_coef * d_numerator / ops.where(take_step, d_denom, ops.ones_like(d_denom))
        grown_d = ops.where(d == self.d0, ops.maximum(d, d_hat), d)
        d_max = ops.maximum(self.d_max, d_hat)
        new_d = ops.minimum(d_max, grown_d * self.growth_rate)
        ops.assign(self.d_numerator, ops.where(take_step, d_numerator, self.d_numerator))
        ops.assign(self.d_max, ops.where(take_step, d_max, self.d_max))
        ops.assign(self.d, ops.where(take_step, new_d, d))
        ops.assign(self.k, self.k + take_step.astype(ms.float32))
        update = ops.partial(
            _prodigy_update, self.beta1 > 0, self.decouple, self.eps, self.weight_decay, self.d, dlr, take_step
        )
        return self.hyper_map(update, params, grads, exp_avg, exp_avg_sq)


class OptimizerPart(nn.Cell):
    """The update of parameters [first, last) of an optimizer, as a Cell to compile on its own.

    Why: MindSpore's compile time of one update graph grows faster than the number of parameters in it
    (benchmarks/optimizer_compile.py: AdamW plus clipping over 1444 LoRA tensors compiles in 12.1 s as one
    graph, in 9.0 s as one clipping graph and 8 parts of ~180), and a full-size SDXL LoRA has 1444 tensors."""

    def __init__(self, optimizer: GroupedOptimizer, first: int, last: int):
        super().__init__(auto_prefix=False)
        self.first, self.last = first, last
        # The optimizer and the slices are kept out of the Cell's registry, so that the part's graph holds
        # only its own Parameters (a registered optimizer, or slicing inside the graph, brings in all of
        # them; and registering would rename the Parameters, whose names are the state's checkpoint keys).
        object.__setattr__(self, "optimizer", optimizer)
        object.__setattr__(self, "slices", (optimizer.parameters[first:last], optimizer.param_lrs[first:last],
                                            tuple(state[first:last] for state in optimizer.per_parameter_state())))

    def construct(self, *grads):
        params, lrs, states = self.slices
        return self.optimizer.update(grads, params, lrs, states, self.first == 0)

    def scaled_construct(self, factor, *grads):
        """The update from the gradients times `factor` (gradient clipping's, computed over every part's gradients)."""
        return self.construct(*self.optimizer.hyper_map(ops.partial(_times, factor), grads))


def _times(factor, grad):
    return grad * factor.astype(grad.dtype)


def split_update(optimizer: GroupedOptimizer, max_parameters_per_part: int):
    """The optimizer's update as parts of at most `max_parameters_per_part` parameters (of similar size), to
    run in order, each with its parameters' gradients; a single part when one update reads every gradient."""
    count = len(optimizer.parameters)
    if not optimizer.updates_each_parameter_alone:
        return [OptimizerPart(optimizer, 0, count)]
    size = -(-count // -(-count // max_parameters_per_part))
    return [OptimizerPart(optimizer, first, min(first + size, count)) for first in range(0, count, size)]


def _sliced_size(param, slice_p):
    return (int(np.prod(param.shape)) + slice_p - 1) // slice_p


OPTIMIZER_CLASSES = {
    "adamw": AdamW,
    "lion": Lion,
    "sgdnesterov": SGDNesterov,
    "adafactor": Adafactor,
    "prodigy": Prodigy,
}


def create_optimizer(optimizer_type, param_groups, learning_rate, optimizer_args=None):
    """Build the optimizer sd-scripts' get_optimizer would, from --optimizer_type and --optimizer_args.

    Returns (optimizer, optimizer_name, optimizer_args_str): the last two are what sd-scripts records, as
    ss_optimizer = optimizer_name + (f"({optimizer_args_str})" if optimizer_args_str else "").
    Adafactor with relative_step (its default here, as in sd-scripts) ignores `learning_rate` and the groups' "lr".
    """
    optimizer_class = _optimizer_class(optimizer_type or "AdamW")
    kwargs = parse_literal_args(optimizer_args, "--optimizer_args")
    _check_optimizer_kwargs(optimizer_class, kwargs)
    lr = learning_rate

    if optimizer_class is SGDNesterov:
        kwargs.setdefault("momentum", 0.9)
    if optimizer_class is Adafactor:
        kwargs.setdefault("relative_step", True)
        if kwargs.get("warmup_init", False):
            kwargs["relative_step"] = True
        if kwargs["relative_step"]:
            lr = None
            param_groups = [{"params": group["params"]} for group in param_groups]

    optimizer = optimizer_class(param_groups, lr=lr, **kwargs)
    optimizer_args_str = ",".join(f"{key}={value}" for key, value in kwargs.items())
    return optimizer, optimizer_class.torch_name, optimizer_args_str


def create_optimizer_from_args(args, param_groups):
    """create_optimizer() from sd-scripts' parsed arguments, including --use_8bit_adam / --use_lion_optimizer.

    Like sd-scripts, Adafactor with relative_step rewrites `args`: lr_scheduler becomes "adafactor:<learning_rate>",
    learning_rate becomes None, and unet_lr / text_encoder_lr become None if a group had its own lr. sd-scripts'
    metadata (ss_lr_scheduler, ss_learning_rate, ...) records these rewritten values.
    """
    if args.fused_backward_pass:
        raise UserError("--fused_backward_pass is not supported by this trainer; remove it")
    optimizer_type = args.optimizer_type
    for flag, implied_type in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")):
        if getattr(args, flag):
            if optimizer_type:
                raise UserError(f"--{flag} and --optimizer_type {optimizer_type} are both given; keep one")
            optimizer_type = implied_type
            break

    had_group_lr = any("lr" in group for group in param_groups)
    optimizer, optimizer_name, optimizer_args_str = create_optimizer(
        optimizer_type, param_groups, args.learning_rate, args.optimizer_args
    )
    if isinstance(optimizer, Adafactor) and optimizer.relative_step:
        args.lr_scheduler = f"adafactor:{args.learning_rate}"
        args.learning_rate = None
        if had_group_lr:
            args.unet_lr = None
            args.text_encoder_lr = None
    return optimizer, optimizer_name, optimizer_args_str


def parse_literal_args(values, flag):
    """sd-scripts' key=value list (--optimizer_args, --lr_scheduler_args): each value is a Python literal."""
    kwargs = {}
    for item in values or []:
        if item.count("=") != 1:
            raise UserError(f"{flag} {item!r}: expected key=value")
        key, text = item.split("=")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise UserError(
                f"{flag} {key}={text}: the value must be a Python literal (number, True/False, None, tuple or "
                f"quoted string)"
            ) from None
    return kwargs


def _optimizer_class(optimizer_type):
    optimizer_class = OPTIMIZER_CLASSES.get(optimizer_type.lower())
    if optimizer_class is not None:
        return optimizer_class
    supported = ", ".join(SUPPORTED_OPTIMIZERS)
    if "." in optimizer_type:
        raise UserError(
            f"--optimizer_type {optimizer_type}: optimizer classes given by module path are not supported; "
            f"use one of {supported}"
        )
    raise UserError(f"--optimizer_type {optimizer_type} is not supported by this trainer; use one of {supported}")


def _check_optimizer_kwargs(optimizer_class, kwargs):
    """Reject keys the optimizer does not take and values whose type does not fit its default."""
    options = {
        name: option.default
        for name, option in inspect.signature(optimizer_class.__init__).parameters.items()
        if name not in ("self", "param_groups", "lr")
    }
    name = optimizer_class.__name__
    for key, value in kwargs.items():
        if key not in options:
            raise UserError(
                f"--optimizer_args {key}: not an option of {name} here; its options are {', '.join(options)}"
            )
        if not _fits(value, options[key]):
            raise UserError(f"--optimizer_args {key}={value!r}: {name} expects a value like {options[key]!r}")


def _fits(value, default):
    def is_number(item):
        return isinstance(item, (int, float)) and not isinstance(item, bool)

    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, tuple):
        return isinstance(value, (tuple, list)) and len(value) == len(default) and all(map(is_number, value))
    return is_number(value) or (default is None and value is None)
