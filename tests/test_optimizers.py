import argparse

import numpy as np
import mindspore as ms
import pytest
from mindspore import Parameter, Tensor, nn

from library.errors import UserError
from library.optimizers import (
    Adafactor,
    AdamW,
    Lion,
    Prodigy,
    SGDNesterov,
    create_optimizer,
    create_optimizer_from_args,
    parse_literal_args,
    split_update,
)

SHAPES = {"matrix": (3, 4), "bias": (4,), "conv": (2, 3, 2, 2)}
GROUP_OF = {"matrix": 0, "bias": 0, "conv": 1}
# Per optimizer step, the learning rate of each group, as a scheduler would set them.
GROUP_LRS = [(1e-2, 5e-3), (2e-2, 1e-3), (5e-3, 5e-3), (1e-3, 2e-3)]


class Toy(nn.Cell):
    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        for name, shape in SHAPES.items():
            setattr(self, name, Parameter(Tensor(rng.standard_normal(shape).astype(np.float32)), name=name))

    def groups(self):
        return [{"params": [self.matrix, self.bias], "lr": GROUP_LRS[0][0]}, {"params": [self.conv], "lr": 5e-3}]

    def groups_without_lr(self):
        return [{"params": group["params"]} for group in self.groups()]

    def weights(self):
        return {name: getattr(self, name).asnumpy().astype(np.float64) for name in SHAPES}


def gradient_steps(count, seed=1):
    rng = np.random.default_rng(seed)
    return [
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()} for _ in range(count)
    ]


class JitStep(nn.Cell):
    """Calls the optimizer inside a compiled graph, as mindone's TrainStep does."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer = optimizer

    @ms.jit
    def construct(self, grads):
        return self.optimizer(grads)


def run(optimizer, steps, mode, group_lrs=GROUP_LRS):
    call = optimizer if mode == "pynative" else JitStep(optimizer)
    names = [param.name for param in optimizer.parameters]
    for grads, lrs in zip(steps, group_lrs):
        if optimizer.default_lr is not None:
            optimizer.set_learning_rates(lrs)
        call(tuple(Tensor(grads[name]) for name in names))


def assert_updates_match(model, initial, expected):
    for name in SHAPES:
        actual = getattr(model, name).asnumpy().astype(np.float64)
        assert not np.allclose(actual, initial[name])  # the optimizer really moved the weights
        # The weights are float32 of magnitude ~1, so each step may round by ~1e-7 whatever the update.
        np.testing.assert_allclose(actual - initial[name], expected[name] - initial[name], rtol=1e-5, atol=5e-7)


# Independent float64 references, written from the published update rules.


def adamw_reference(weights, steps, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    beta1, beta2 = betas
    w = {k: v.copy() for k, v in weights.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    for t, (grads, lrs) in enumerate(zip(steps, GROUP_LRS), start=1):
        for name, g in grads.items():
            lr = lrs[GROUP_OF[name]]
            w[name] -= lr * weight_decay * w[name]
            m[name] = beta1 * m[name] + (1 - beta1) * g
            v[name] = beta2 * v[name] + (1 - beta2) * g**2
            m_hat = m[name] / (1 - beta1**t)
            v_hat = v[name] / (1 - beta2**t)
            w[name] -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return w


def lion_reference(weights, steps, betas=(0.9, 0.99), weight_decay=0.0):
    beta1, beta2 = betas
    w = {k: v.copy() for k, v in weights.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    for grads, lrs in zip(steps, GROUP_LRS):
        for name, g in grads.items():
            lr = lrs[GROUP_OF[name]]
            direction = np.sign(beta1 * m[name] + (1 - beta1) * g)
            w[name] = w[name] * (1 - lr * weight_decay) - lr * direction
            m[name] = beta2 * m[name] + (1 - beta2) * g
    return w


def sgd_nesterov_reference(weights, steps, momentum=0.9, weight_decay=0.0):
    w = {k: v.copy() for k, v in weights.items()}
    buffers = {}
    for grads, lrs in zip(steps, GROUP_LRS):
        for name, g in grads.items():
            d = g + weight_decay * w[name]
            buffers[name] = d.copy() if name not in buffers else momentum * buffers[name] + d
            w[name] -= lrs[GROUP_OF[name]] * (d + momentum * buffers[name])
    return w


def adafactor_reference(
    weights, steps, relative_step=True, scale_parameter=True, warmup_init=False, beta1=None, weight_decay=0.0,
    eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
):  # fmt: skip
    w = {k: v.copy() for k, v in weights.items()}
    state = {}
    for t, (grads, lrs) in enumerate(zip(steps, GROUP_LRS), start=1):
        for name, g in grads.items():
            g = g.astype(np.float64)
            factored = g.ndim >= 2
            if name not in state:
                state[name] = {"m": np.zeros_like(g)}
                if factored:
                    state[name]["r"] = np.zeros(g.shape[:-1])
                    state[name]["c"] = np.zeros(g.shape[:-2] + g.shape[-1:])
                else:
                    state[name]["v"] = np.zeros_like(g)
            s = state[name]
            rms = lambda x: np.sqrt(np.mean(x**2))  # noqa: E731
            if relative_step:
                alpha = min(1e-6 * t if warmup_init else 1e-2, 1 / np.sqrt(t))
            else:
                alpha = lrs[GROUP_OF[name]]
            if scale_parameter:
                alpha *= max(eps[1], rms(w[name]))
            rho = 1 - t**decay_rate
            g2 = g**2 + eps[0]
            if factored:
                s["r"] = rho * s["r"] + (1 - rho) * g2.mean(axis=-1)
                s["c"] = rho * s["c"] + (1 - rho) * g2.mean(axis=-2)
                v_hat = (s["r"] / s["r"].mean(axis=-1, keepdims=True))[..., :, None] * s["c"][..., None, :]
            else:
                s["v"] = rho * s["v"] + (1 - rho) * g2
                v_hat = s["v"]
            u = g / np.sqrt(v_hat)
            u = u / max(1.0, rms(u) / clip_threshold) * alpha
            if beta1 is not None:
                s["m"] = beta1 * s["m"] + (1 - beta1) * u
                u = s["m"]
            w[name] = w[name] - weight_decay * alpha * w[name] - u
    return w


def prodigy_reference(
    weights, steps, lrs, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
    use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=np.inf, slice_p=1,
):  # fmt: skip
    """Prodigy (Mishchenko & Defazio) as prodigyopt 1.1.2 runs it; `lrs` is the shared lr of each step.
    Returns the weights and the final step-size estimate d."""
    beta1, beta2 = betas
    beta3 = np.sqrt(beta2) if beta3 is None else beta3
    w = {k: v.copy() for k, v in weights.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v = {k: np.zeros_like(x) for k, x in w.items()}
    s = {k: np.zeros_like(x.reshape(-1)[::slice_p]) for k, x in w.items()}
    start = {k: x.reshape(-1)[::slice_p].copy() for k, x in w.items()}
    d, d_max, d_numerator, k = d0, d0, 0.0, 0
    for grads, lr in zip(steps, lrs):
        correction = np.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if use_bias_correction else 1.0
        dlr = d * lr * correction
        numerator, denominator = d_numerator * beta3, 0.0
        effective = {}
        if lr > 0:
            for name, g in grads.items():
                g = g + weight_decay * w[name] if not decouple else g.astype(np.float64)
                effective[name] = g
                flat = g.reshape(-1)[::slice_p]
                numerator += d / d0 * dlr * np.dot(flat, start[name] - w[name].reshape(-1)[::slice_p])
                m[name] = beta1 * m[name] + d * (1 - beta1) * g
                v[name] = beta2 * v[name] + d * d * (1 - beta2) * g * g
                s[name] = beta3 * s[name] + d / d0 * (d if safeguard_warmup else dlr) * flat
                denominator += np.abs(s[name]).sum()
        if denominator == 0:
            continue
        d_hat = d_coef * numerator / denominator
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d = min(d_max, d * growth_rate)
        d_numerator = numerator
        for name in w:
            root = np.sqrt(v[name]) + d * eps
            if decouple:
                w[name] = w[name] - weight_decay * dlr * w[name]
            w[name] = w[name] - (dlr * m[name] if beta1 > 0 else dlr * d * effective[name]) / root
        k += 1
    return w, d


MODES = ["pynative", "graph"]


@pytest.mark.parametrize("mode", MODES)
def test_adamw_matches_reference(mode):
    model = Toy()
    initial = model.weights()
    steps = gradient_steps(3)
    run(AdamW(model.groups(), lr=1e-3, betas=(0.8, 0.99), weight_decay=0.1), steps, mode)
    assert_updates_match(model, initial, adamw_reference(initial, steps, betas=(0.8, 0.99), weight_decay=0.1))


def test_adamw_defaults_are_torchs():
    model = Toy()
    initial = model.weights()
    steps = gradient_steps(3)
    run(AdamW(model.groups()), steps, "pynative")
    assert_updates_match(model, initial, adamw_reference(initial, steps))


def test_adamw_adds_eps_outside_the_bias_corrected_root():
    # One step from zero moments: m_hat = g and v_hat = g^2, so torch moves by lr * g / (|g| + eps).
    # With g = 2, eps = 0.5, lr = 0.01 that is 0.01 * 2 / 2.5 = 0.008. (MindSpore's fused Adam, which adds eps
    # before bias correction, would move by 0.01 * 2 / (2 + 0.5 / sqrt(0.001)) instead.)
    weight = Parameter(Tensor(np.array([1.0], np.float32)), name="w")
    AdamW([{"params": [weight]}], lr=0.01, eps=0.5, weight_decay=0.0)((Tensor(np.array([2.0], np.float32)),))
    assert weight.asnumpy()[0] == pytest.approx(1.0 - 0.008, abs=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_lion_matches_reference(mode):
    model = Toy()
    initial = model.weights()
    steps = gradient_steps(3)
    run(Lion(model.groups(), lr=1e-2, weight_decay=0.5), steps, mode)
    assert_updates_match(model, initial, lion_reference(initial, steps, weight_decay=0.5))


def test_lion_decoupled_weight_decay_divides_by_the_initial_lr():
    model = Toy()
    initial = model.weights()
    steps = gradient_steps(3)
    optimizer = Lion(model.groups(), lr=1e-2, betas=(0.95, 0.98), weight_decay=1e-3, decoupled_weight_decay=True)
    run(optimizer, steps, "pynative")
    expected = lion_reference(initial, steps, betas=(0.95, 0.98), weight_decay=1e-3 / 1e-2)
    assert_updates_match(model, initial, expected)


@pytest.mark.parametrize("mode", MODES)
def test_sgd_nesterov_matches_reference(mode):
    model = Toy()
    initial = model.weights()
    steps = gradient_steps(3)
    run(SGDNesterov(model.groups(), lr=1e-2, momentum=0.8, weight_decay=0.05), steps, mode)
    assert_updates_match(model, initial, sgd_nesterov_reference(initial, steps, momentum=0.8, weight_decay=0.05))


@pytest.mark.parametrize("mode", MODES)
def test_adafactor_relative_step_matches_reference(mode):
    model = Toy()
    initial = model.weights()
    steps = gradient_steps(3)
    run(Adafactor(model.groups_without_lr()), steps, mode)
    assert_updates_match(model, initial, adafactor_reference(initial, steps))


@pytest.mark.parametrize("mode", MODES)
def test_adafactor_external_lr_with_first_moment_and_decay_matches_reference(mode):
    model = Toy()
    initial = model.weights()
    steps = gradient_steps(3)
    options = dict(relative_step=False, beta1=0.9, weight_decay=0.1, clip_threshold=0.5, decay_rate=-0.5)
    run(Adafactor(model.groups(), lr=1e-2, **options), steps, mode)
    assert_updates_match(model, initial, adafactor_reference(initial, steps, **options))


def test_adafactor_warmup_init_without_parameter_scale_matches_reference():
    model = Toy()
    initial = model.weights()
    steps = gradient_steps(3)
    options = dict(warmup_init=True, scale_parameter=False)
    run(Adafactor(model.groups_without_lr(), **options), steps, "pynative")
    assert_updates_match(model, initial, adafactor_reference(initial, steps, **options))


def test_optimizer_inside_mindone_train_step_in_graph_mode():
    from mindone.diffusers.training_utils import TrainStep

    class LinearLossStep(TrainStep):
        """loss = sum(weight * input) over the three weights, so each gradient is the matching input."""

        def forward(self, matrix_input, bias_input, conv_input):
            model = self.model
            loss = (model.matrix * matrix_input).sum() + (model.bias * bias_input).sum()
            loss = loss + (model.conv * conv_input).sum()
            return self.scale_loss(loss), loss

    model = Toy()
    initial = model.weights()
    steps = gradient_steps(3)
    optimizer = AdamW(model.groups())
    train_step = LinearLossStep(model, optimizer, gradient_accumulation_steps=1).set_train()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        for grads, lrs in zip(steps, GROUP_LRS):
            optimizer.set_learning_rates(lrs)
            train_step(*(Tensor(grads[name]) for name in SHAPES))
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    # TrainStep names the model "model"; attaching the optimizer renames neither the weights nor its state.
    assert [param.name for param in optimizer.parameters] == [f"model.{name}" for name in SHAPES]
    assert [param.name for param in optimizer.exp_avg] == [f"exp_avg.{name}" for name in SHAPES]
    assert_updates_match(model, initial, adamw_reference(initial, steps))


def test_an_update_split_into_parts_equals_the_whole_update():
    """The --gradient_checkpointing step runs the update in parts, each its own graph: same weights, same state,
    and the step is counted once per step, not once per part."""
    names = list(SHAPES)
    finals = {}
    for max_per_part in (len(names), 1):
        model = Toy()
        optimizer = AdamW(model.groups())
        parts = [(part.first, part.last, ms.jit(part.construct)) for part in split_update(optimizer, max_per_part)]
        assert len(parts) == (1 if max_per_part == len(names) else 3)
        for grads, lrs in zip(gradient_steps(3), GROUP_LRS):
            optimizer.set_learning_rates(lrs)
            for first, last, update in parts:
                update(*(Tensor(grads[name]) for name in names[first:last]))
        assert int(optimizer.step_count.asnumpy()) == 3
        finals[max_per_part] = [p.asnumpy() for p in (*optimizer.parameters, *optimizer.exp_avg, *optimizer.exp_avg_sq)]
    for whole, split in zip(finals[len(names)], finals[1]):
        np.testing.assert_array_equal(whole, split)


@pytest.mark.parametrize("make_optimizer", [lambda groups: Lion(groups, lr=1e-2, weight_decay=0.1),
                                            lambda groups: SGDNesterov(groups, lr=1e-2, weight_decay=0.1),
                                            lambda groups: Adafactor(groups)], ids=["Lion", "SGDNesterov", "Adafactor"])
def test_per_parameter_optimizers_split_like_adamw(make_optimizer):
    names = list(SHAPES)
    results = []
    for max_per_part in (len(names), 2):
        model = Toy()
        parts = split_update(make_optimizer(model.groups_without_lr()), max_per_part)
        assert len(parts) == (1 if max_per_part == len(names) else 2)
        for grads in gradient_steps(3):
            for part in parts:
                part(*(Tensor(grads[name]) for name in names[part.first:part.last]))
        results.append(model.weights())
    for name in names:
        np.testing.assert_allclose(results[1][name], results[0][name], rtol=1e-6, atol=1e-7)
        assert not np.allclose(results[1][name], Toy().weights()[name])


def test_prodigy_is_never_split():
    """Prodigy's step size is estimated from every gradient at once."""
    optimizer = Prodigy(Toy().groups_without_lr())
    assert [(part.first, part.last) for part in split_update(optimizer, 1)] == [(0, len(SHAPES))]


OPTIMIZER_FACTORIES = {
    "AdamW": lambda groups: AdamW(groups),
    "Lion": lambda groups: Lion(groups, weight_decay=0.1),
    "SGDNesterov": lambda groups: SGDNesterov(groups, weight_decay=0.1),
    "Adafactor": lambda groups: Adafactor(groups, lr=1e-2, relative_step=False, beta1=0.9),
    "Prodigy": lambda groups: Prodigy([dict(group, lr=1e-2) for group in groups], d0=1e-2),
}


@pytest.mark.parametrize("optimizer_type", OPTIMIZER_FACTORIES)
def test_resuming_from_a_checkpoint_continues_bit_identically(tmp_path, optimizer_type):
    make_optimizer = OPTIMIZER_FACTORIES[optimizer_type]
    steps = gradient_steps(4)
    shared_lrs = [(lr, lr) for lr, _ in GROUP_LRS]  # Prodigy wants one lr for all groups

    uninterrupted = Toy()
    run(make_optimizer(uninterrupted.groups()), steps, "graph", group_lrs=shared_lrs)

    interrupted = Toy()
    optimizer = make_optimizer(interrupted.groups())
    run(optimizer, steps[:2], "graph", group_lrs=shared_lrs)
    ms.save_checkpoint(optimizer, str(tmp_path / "optimizer.ckpt"))
    ms.save_checkpoint(interrupted, str(tmp_path / "model.ckpt"))

    resumed = Toy(seed=7)
    resumed_optimizer = make_optimizer(resumed.groups())
    ms.load_param_into_net(resumed, ms.load_checkpoint(str(tmp_path / "model.ckpt")))
    not_loaded, unused = ms.load_param_into_net(resumed_optimizer, ms.load_checkpoint(str(tmp_path / "optimizer.ckpt")))
    assert not_loaded == [] and unused == []
    assert int(resumed_optimizer.step_count.asnumpy()) == 2
    run(resumed_optimizer, steps[2:], "graph", group_lrs=shared_lrs[2:])

    for name in SHAPES:
        np.testing.assert_array_equal(getattr(resumed, name).asnumpy(), getattr(uninterrupted, name).asnumpy())


# create_optimizer: sd-scripts' names, options and recorded strings.


def toy_groups():
    return Toy().groups()


@pytest.mark.parametrize(
    "optimizer_type, optimizer_args, expected_class, expected_name, expected_args",
    [
        ("", None, AdamW, "torch.optim.adamw.AdamW", ""),
        (
            "adamw",
            ["weight_decay=0.1", "betas=0.9,0.99"],
            AdamW,
            "torch.optim.adamw.AdamW",
            "weight_decay=0.1,betas=(0.9, 0.99)",
        ),
        ("LION", None, Lion, "lion_pytorch.lion_pytorch.Lion", ""),
        ("SGDNesterov", None, SGDNesterov, "torch.optim.sgd.SGD", "momentum=0.9"),
        ("sgdnesterov", ["weight_decay=1e-4"], SGDNesterov, "torch.optim.sgd.SGD", "weight_decay=0.0001,momentum=0.9"),
        ("AdaFactor", None, Adafactor, "transformers.optimization.Adafactor", "relative_step=True"),
        (
            "Adafactor",
            ["scale_parameter=False", "relative_step=False", "warmup_init=False"],
            Adafactor,
            "transformers.optimization.Adafactor",
            "scale_parameter=False,relative_step=False,warmup_init=False",
        ),
    ],
)
def test_create_optimizer_names_and_recorded_args(
    optimizer_type, optimizer_args, expected_class, expected_name, expected_args
):
    optimizer, name, args_str = create_optimizer(optimizer_type, toy_groups(), 1e-4, optimizer_args)
    assert type(optimizer) is expected_class
    assert (name, args_str) == (expected_name, expected_args)


def test_create_optimizer_passes_options_and_group_lrs():
    optimizer, _, _ = create_optimizer("AdamW", toy_groups() + [], 1e-4, ["betas=(0.8,0.9)", "eps=1e-6"])
    assert (optimizer.beta1, optimizer.beta2, optimizer.eps, optimizer.weight_decay) == (0.8, 0.9, 1e-6, 0.01)
    assert optimizer.base_lrs == [1e-2, 5e-3]
    assert optimizer.learning_rates() == pytest.approx([1e-2, 5e-3])

    groups = [{"params": toy_groups()[0]["params"]}]
    optimizer, _, _ = create_optimizer("Lion", groups, 3e-5, None)
    assert optimizer.base_lrs == [3e-5] and (optimizer.beta1, optimizer.beta2) == (0.9, 0.99)


def test_adafactor_relative_step_ignores_learning_rates_and_warmup_init_forces_it():
    options = ["relative_step=False", "warmup_init=True"]
    optimizer, _, args_str = create_optimizer("Adafactor", toy_groups(), 1e-4, options)
    assert optimizer.relative_step and optimizer.warmup_init and optimizer.default_lr is None
    assert optimizer.base_lrs == [None, None]
    assert args_str == "relative_step=True,warmup_init=True"

    optimizer, _, _ = create_optimizer("Adafactor", toy_groups(), 1e-4, ["relative_step=False"])
    assert not optimizer.relative_step and optimizer.base_lrs == [1e-2, 5e-3]


@pytest.mark.parametrize(
    "optimizer_type",
    ["AdamW8bit", "PagedAdamW8bit", "Lion8bit", "SGDNesterov8bit", "PagedAdamW", "DAdaptation", "DAdaptAdam",
     "AdamWScheduleFree", "Adam", "bitsandbytes.optim.AdEMAMix8bit"],
)  # fmt: skip
def test_unsupported_optimizer_types_are_refused_by_name(optimizer_type):
    with pytest.raises(UserError) as error:
        create_optimizer(optimizer_type, toy_groups(), 1e-4, None)
    message = str(error.value)
    assert optimizer_type in message and "AdamW, Lion, SGDNesterov, Adafactor, Prodigy" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "optimizer_type, optimizer_args, fragment",
    [
        ("AdamW", ["amsgrad=True"], "amsgrad"),
        ("Lion", ["momentum=0.9"], "momentum"),
        ("AdamW", ["weight_decay=abc"], "weight_decay=abc"),
        ("AdamW", ["betas=0.9"], "betas=0.9"),
        ("AdamW", ["eps=True"], "eps=True"),
        ("Adafactor", ["relative_step=1"], "relative_step=1"),
        ("AdamW", ["weight_decay"], "weight_decay"),
        ("SGDNesterov", ["momentum=0"], "momentum=0"),
        ("SGDNesterov", ["dampening=0.1"], "dampening=0.1"),
        ("Lion", ["use_triton=True"], "use_triton"),
    ],
)
def test_bad_optimizer_args_are_refused_naming_the_key(optimizer_type, optimizer_args, fragment):
    with pytest.raises(UserError) as error:
        create_optimizer(optimizer_type, toy_groups(), 1e-4, optimizer_args)
    assert fragment in str(error.value)


def test_unknown_key_message_names_the_optimizer():
    with pytest.raises(UserError, match="amsgrad: not an option of AdamW"):
        create_optimizer("AdamW", toy_groups(), 1e-4, ["amsgrad=True"])


def test_parse_literal_args_evaluates_python_literals():
    parsed = parse_literal_args(["a=1", "b=0.5", "c=True", "d=None", "e=0.9,0.99", "f='x'"], "--optimizer_args")
    assert parsed == {"a": 1, "b": 0.5, "c": True, "d": None, "e": (0.9, 0.99), "f": "x"}


def sd_scripts_args(**overrides):
    values = dict(
        optimizer_type="", use_8bit_adam=False, use_lion_optimizer=False, fused_backward_pass=False,
        learning_rate=1e-4, optimizer_args=None, lr_scheduler="constant", unet_lr=1e-2, text_encoder_lr=5e-3,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def test_create_optimizer_from_args_honours_the_legacy_flags():
    optimizer, _, _ = create_optimizer_from_args(sd_scripts_args(use_lion_optimizer=True), toy_groups())
    assert isinstance(optimizer, Lion)
    with pytest.raises(UserError, match="AdamW8bit"):
        create_optimizer_from_args(sd_scripts_args(use_8bit_adam=True), toy_groups())
    with pytest.raises(UserError, match="use_lion_optimizer"):
        create_optimizer_from_args(sd_scripts_args(use_lion_optimizer=True, optimizer_type="AdamW"), toy_groups())
    with pytest.raises(UserError, match="fused_backward_pass"):
        create_optimizer_from_args(sd_scripts_args(fused_backward_pass=True), toy_groups())


def test_adafactor_relative_step_rewrites_args_as_sd_scripts_does():
    args = sd_scripts_args(optimizer_type="Adafactor", learning_rate=2e-6)
    create_optimizer_from_args(args, toy_groups())
    assert (args.lr_scheduler, args.learning_rate, args.unet_lr, args.text_encoder_lr) == (
        "adafactor:2e-06", None, None, None
    )

    args = sd_scripts_args(optimizer_type="Adafactor", optimizer_args=["relative_step=False"])
    create_optimizer_from_args(args, toy_groups())
    assert (args.lr_scheduler, args.learning_rate, args.unet_lr) == ("constant", 1e-4, 1e-2)


# Prodigy: all groups share one lr; a first warmup step at lr 0 is skipped entirely. Gradients that keep their
# direction make the step-size estimate d grow, which is the part worth checking.
PRODIGY_LRS = [0.0, 1.0, 0.5, 1.0]


def steady_gradient_steps(count):
    return [gradient_steps(1)[0]] * count


def prodigy_groups(model):
    return [{"params": [model.matrix, model.bias], "lr": 1.0}, {"params": [model.conv], "lr": 1.0}]


@pytest.mark.parametrize("mode", MODES)
def test_prodigy_matches_reference(mode):
    model = Toy()
    initial = model.weights()
    steps = steady_gradient_steps(4)
    optimizer = Prodigy(prodigy_groups(model), weight_decay=0.01, d0=1e-3)
    run(optimizer, steps, mode, group_lrs=[(lr, lr) for lr in PRODIGY_LRS])
    expected, expected_d = prodigy_reference(initial, steps, PRODIGY_LRS, weight_decay=0.01, d0=1e-3)
    assert_updates_match(model, initial, expected)
    # d comes from dot products with (start - weights), a float32 difference of nearby numbers: ~1e-4 relative.
    assert float(optimizer.d.asnumpy()) == pytest.approx(expected_d, rel=1e-4)
    assert expected_d > 1e-3  # the estimate grew, so the test exercises it
    assert float(optimizer.k.asnumpy()) == 3  # the lr-0 step was not taken


def test_prodigy_options_match_reference():
    model = Toy()
    initial = model.weights()
    steps = steady_gradient_steps(4)
    options = dict(
        betas=(0.0, 0.99), beta3=0.9, weight_decay=0.1, decouple=False, use_bias_correction=True,
        safeguard_warmup=True, d0=1e-2, d_coef=20.0, growth_rate=1.5, slice_p=2,
    )  # fmt: skip
    optimizer = Prodigy(prodigy_groups(model), **options)
    run(optimizer, steps, "pynative", group_lrs=[(lr, lr) for lr in PRODIGY_LRS])
    expected, expected_d = prodigy_reference(initial, steps, PRODIGY_LRS, **options)
    assert_updates_match(model, initial, expected)
    assert float(optimizer.d.asnumpy()) == pytest.approx(expected_d, rel=1e-4)
    assert expected_d > 1e-2


def test_prodigy_refuses_different_group_lrs():
    with pytest.raises(UserError, match="same lr"):
        create_optimizer("Prodigy", toy_groups(), 1.0, None)
    one_group = [{"params": toy_groups()[0]["params"]}]
    optimizer, name, args_str = create_optimizer("prodigy", one_group, 1.0, ["d_coef=0.5"])
    assert (type(optimizer), name, args_str) == (Prodigy, "prodigyopt.prodigy.Prodigy", "d_coef=0.5")
