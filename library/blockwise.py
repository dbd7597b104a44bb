"""The SDXL LoRA step compiled unit by unit, which is what --gradient_checkpointing selects.

Why: the whole step as one graph does not fit a full-size SDXL in 24 GiB on CPU, and compiling it takes
many minutes (measured, README "Full-size step"). Here the UNet runs as a sequence of units (each half
of a ResBlock, the projections around a transformer, each transformer block, ...), each compiled alone,
forward and backward. Units of the same structure share one compiled graph: their layers take the weights as
arguments (library/layers.py, `weights`), so the 70 transformer blocks of SDXL compile twice, not 70
times. Only the unit inputs are kept from forward to backward, and each backward recomputes its unit's
forward, as gradient checkpointing does. Units end in a convolution or projection where they can: the
backward to a linear layer's input does not need its output, so the compiler drops that part of the
recompute (a ResBlock as two units: 121 -> 87 ms backward at 1280 channels, 8x8). Transformer blocks
go further: they keep what their backward needs, up to a budget of bytes per step
(`MAX_SAVED_ACTIVATION_BYTES`), and skip the recompute (library/transformer_backward.py).

After the gradients: mindone's TrainStep accumulation and all-reduce in one compiled graph (only when there is
something to accumulate or reduce), the clipping factor in another, and the optimizer update in parts of a few
hundred parameters, each its own graph that also applies the clipping factor (library/optimizers.py,
`OptimizerPart`: one graph over all 1444 tensors of a full-size LoRA compiles more slowly, 12 s against 9 s, and
holds more memory).
"""

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Parameter, Tensor, mint, nn, ops

from library.errors import UserError
from library.layers import WeightedCell
from library.optimizers import split_update
from library.sdxl_unet import ResBlock, SpatialTransformer
from library.train_step import SDXLLoRALoss, TrainStepForSDXLLoRA
from library.transformer_backward import SavedBackwardBlock, supports_saved_backward

# Attributes every Cell carries for MindSpore's own bookkeeping; they say nothing about a cell's computation.
_CELL_INTERNALS = frozenset(vars(nn.Cell())) - {"training"}
_STATIC_TYPES = (bool, int, float, type(None))
# Parameters per compiled optimizer-update graph: ~180 compiled fastest over a full-size LoRA's 1444 tensors.
MAX_PARAMETERS_PER_UPDATE = 192
# Activations transformer blocks may keep per step to skip their recompute: all of a full-size SDXL step at
# 256 px (~0.75 GiB), 1-2 GiB worth of blocks at 1024 px (~140 MB per 1280-channel block); the rest recompute.
MAX_SAVED_ACTIVATION_BYTES = 2 * 2**30
_hyper_map = ops.HyperMap()


def _owned_cells(cell: nn.Cell, exclude: str = "") -> List[nn.Cell]:
    """The cells under `cell`, in registration order, leaving out the subtree named `exclude`."""
    return [sub for name, sub in cell.cells_and_names()
            if not exclude or not (name == exclude or name.startswith(exclude + "."))]


def weighted_cells(cell: nn.Cell, exclude: str = "") -> List[WeightedCell]:
    """The layers under `cell` whose weights a unit takes, in the order of their slots."""
    return [sub for sub in _owned_cells(cell, exclude) if isinstance(sub, WeightedCell)]


def bind_weight_slots(cell: nn.Cell, exclude: str = "") -> List[Parameter]:
    """Give every weighted layer under `cell` its slot in one flat weight tuple; return the tuple's Parameters."""
    weights = []
    for sub in weighted_cells(cell, exclude):
        sub.slot = len(weights)
        weights += sub.weight_params()
    return weights


def passed_weights(layers: Sequence[WeightedCell]) -> Tuple[Tensor, ...]:
    """The weight tensors a unit over `layers` (`weighted_cells`) receives, in slot order."""
    return tuple(tensor for layer in layers for tensor in layer.passed_weights())


def structure_key(cell: nn.Cell, exclude: str = "") -> Tuple:
    """Everything a unit's compiled graph depends on besides its weights' values: cell types, their numeric
    settings (heads, eps, LoRA scale, dropouts, slots, training mode), and each parameter's shape, dtype
    and trainability. Names (a LoRA module's `lora_name`) are deliberately left out."""
    parts = []
    for sub in _owned_cells(cell, exclude):
        settings = tuple(sorted((key, value) for key, value in vars(sub).items()
                                if key not in _CELL_INTERNALS and not key.startswith("_")
                                and isinstance(value, _STATIC_TYPES + (tuple,))
                                and all(isinstance(item, _STATIC_TYPES) for item in
                                        (value if isinstance(value, tuple) else (value,)))))
        params = tuple((tuple(p.shape), str(p.dtype), p.requires_grad) for p in sub.get_parameters(expand=False))
        parts.append((type(sub).__name__, settings, params))
    return tuple(parts)


class _Graph(nn.Cell):
    """A function to compile; as a Cell, compiling the same code again for another unit is not a warning."""

    def __init__(self, function: Callable):
        super().__init__()
        self.function = function

    def construct(self, *tensors):
        return self.function(*tensors)


class CompiledUnit:
    """`call(activations, constants, weights) -> tensor`, compiled forward and backward.

    backward returns the gradients of the activations and of the trainable weights (`trainable`: their
    indices in the weight tuple) for the given gradient of the output; it recomputes the forward.
    `saving`, when set, is the same unit with a backward that needs no recompute (SavingUnit).
    """

    def __init__(self, call: Callable, num_activations: int, num_constants: int, trainable: Sequence[int],
                 kind: str = "", saving: Optional["SavingUnit"] = None):
        self.kind, self.num_activations, self.trainable = kind, num_activations, tuple(trainable)
        self.saving = saving
        first_weight = num_activations + num_constants

        def forward(*tensors):
            return call(tensors[:num_activations], tensors[num_activations:first_weight], tensors[first_weight:])

        def output_dot_upstream(upstream, *tensors):
            return (forward(*tensors) * upstream).sum()

        positions = tuple(range(1, 1 + num_activations)) + tuple(1 + first_weight + i for i in self.trainable)
        gradient = ops.grad(output_dot_upstream, grad_position=positions)

        def backward(upstream, *tensors):
            return gradient(upstream, *tensors)

        self.forward, self._backward = ms.jit(_Graph(forward).construct), ms.jit(_Graph(backward).construct)

    def backward(self, upstream, tensors) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        grads = self._backward(upstream, *tensors)
        if not isinstance(grads, tuple):  # ops.grad returns a lone gradient bare, even for a 1-tuple of positions
            grads = (grads,)
        return tuple(grads[: self.num_activations]), tuple(grads[self.num_activations:])


class SavingUnit:
    """A transformer-block unit whose forward also returns what its backward needs, so that the backward
    does not recompute it (library/transformer_backward.py). Same tensor layout as its CompiledUnit:
    (tokens, emb, context, *weights)."""

    def __init__(self, block: SavedBackwardBlock, kind: str):
        self.kind = kind

        def forward(tokens, emb, context, *weights):
            return block.forward(tokens, context, weights)

        def backward(upstream, tokens, emb, context, *saved_and_weights):
            saved, weights = saved_and_weights[:block.num_saved], saved_and_weights[block.num_saved:]
            return block.backward(upstream, tokens, context, saved, weights)

        self._forward, self._backward = ms.jit(_Graph(forward).construct), ms.jit(_Graph(backward).construct)

    def forward(self, tensors) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        output, *saved = self._forward(*tensors)
        return output, tuple(saved)

    def backward(self, upstream, tensors, saved) -> Tuple[Tuple[Tensor, ...], Tuple[Tensor, ...]]:
        tokens, emb, context, *weights = tensors
        grads = self._backward(upstream, tokens, emb, context, *saved, *weights)
        return grads[:1], tuple(grads[1:])


class Tape:
    """The units run by one forward pass, with what their backward needs, for the backward pass.

    Units that can save their activations (`CompiledUnit.saving`) do so while the bytes saved in this pass stay
    under `max_saved_bytes`; later ones recompute.
    """

    def __init__(self, max_saved_bytes: int = MAX_SAVED_ACTIVATION_BYTES):
        self.entries = []
        self.max_saved_bytes, self.saved_bytes = max_saved_bytes, 0

    def run(self, unit: CompiledUnit, weights: Sequence[Parameter], layers: Sequence[WeightedCell],
            activations: Tuple, constants: Tuple) -> Tensor:
        tensors = (*activations, *constants, *passed_weights(layers))
        if unit.saving is not None and self.saved_bytes < self.max_saved_bytes:
            output, saved = unit.saving.forward(tensors)
            self.saved_bytes += sum(tensor.nbytes for tensor in saved)
            backward = partial(unit.saving.backward, tensors=tensors, saved=saved)
        else:
            output = unit.forward(*tensors)
            backward = partial(unit.backward, tensors=tensors)
        self.entries.append((backward, unit.trainable, weights, activations, output))
        return output

    def backward(self, output: Tensor, upstream: Tensor) -> Dict[int, Tensor]:
        """Gradients of the trainable weights (by id of the Parameter) given d(objective)/d(output)."""
        activation_grads = {id(output): upstream}
        weight_grads: Dict[int, Tensor] = {}
        for backward, trainable, weights, activations, output in reversed(self.entries):
            grads_in, grads_w = backward(activation_grads.pop(id(output)))
            for activation, grad in zip(activations, grads_in):
                _accumulate(activation_grads, id(activation), grad)
            for index, grad in zip(trainable, grads_w):
                _accumulate(weight_grads, id(weights[index]), grad)
        self.entries, self.saved_bytes = [], 0
        return weight_grads


def _accumulate(grads: Dict[int, Tensor], key: int, grad: Tensor) -> None:
    grads[key] = grad if key not in grads else grads[key] + grad


def _unit_call(kind: str, cell: nn.Cell, loss_cell: SDXLLoRALoss) -> Callable:
    """The computation of one unit kind on `cell`, as a function of (activations, constants, weights)."""
    if kind == "layer":
        def call(activations, constants, weights):
            return cell(activations[0], constants[0], constants[1], weights)
    elif kind == "resblock_in":
        def call(activations, constants, weights):
            return cell.hidden(activations[0], constants[0], weights)
    elif kind == "resblock_in_on_skip":
        def call(activations, constants, weights):
            return cell.hidden(mint.cat((activations[0], activations[1]), dim=1), constants[0], weights)
    elif kind == "resblock_out":
        def call(activations, constants, weights):
            return cell.output(activations[0], activations[1], weights)
    elif kind == "resblock_out_on_skip":
        def call(activations, constants, weights):
            return cell.output(mint.cat((activations[0], activations[1]), dim=1), activations[2], weights)
    elif kind == "transformer_in":
        def call(activations, constants, weights):
            return cell.project_in(activations[0], weights)
    elif kind == "transformer_block":
        def call(activations, constants, weights):
            return cell(activations[0], constants[1], weights)
    elif kind == "transformer_out":
        def call(activations, constants, weights):
            return cell.project_out(activations[0], activations[1], weights)
    elif kind == "head":
        def call(activations, constants, weights):
            return cell(activations[0], weights)
    else:
        def call(activations, constants, weights):
            prediction = cell(activations[0], weights)
            return loss_cell.loss(prediction, constants[0], constants[1], constants[2])
    return call


class BlockwiseSDXLLoss:
    """SDXLLoRALoss computed unit by unit: (step inputs) -> (loss, gradients of `params` in their order)."""

    def __init__(self, loss_cell: SDXLLoRALoss, params: Sequence[Parameter],
                 max_saved_bytes: int = MAX_SAVED_ACTIVATION_BYTES):
        self.loss_cell, self.unet, self.params = loss_cell, loss_cell.unet, list(params)
        self.max_saved_bytes, self.last_saved_bytes = max_saved_bytes, 0
        self._units: Dict[Tuple, CompiledUnit] = {}
        self._cell_units: Dict[Tuple[str, int], Tuple[CompiledUnit, List[Parameter], List[WeightedCell]]] = {}
        self._condition = ms.jit(loss_cell.condition_unet)
        self._embed = ms.jit(self.unet.embedding)
        covered = set()
        for kind, cell, exclude in self._unit_cells():
            weights = self._register(kind, cell, exclude)
            covered.update(id(param) for param in weights if param.requires_grad)
        outside = [param.name for param in self.params if id(param) not in covered]
        if outside:
            raise UserError("--gradient_checkpointing trains the UNet's LoRA only for now; add "
                            f"--network_train_unet_only (not in the UNet: {outside[0]} and {len(outside) - 1} more)")

    def _unit_cells(self):
        unet = self.unet
        for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks):
            for index, layer in enumerate(block.cell_list):
                if isinstance(layer, SpatialTransformer):
                    yield "transformer_in", layer, "transformer_blocks"
                    yield "transformer_out", layer, "transformer_blocks"
                    for transformer_block in layer.transformer_blocks:
                        yield "transformer_block", transformer_block, ""
                elif isinstance(layer, ResBlock):
                    on_skip = "_on_skip" if index == 0 and any(block is up for up in unet.output_blocks) else ""
                    yield "resblock_in" + on_skip, layer, ""
                    yield "resblock_out" + on_skip, layer, ""
                else:
                    yield "layer", layer, ""
        yield "loss", unet.out, ""
        yield "head", unet.out, ""

    def _register(self, kind: str, cell: nn.Cell, exclude: str) -> List[Parameter]:
        weights = bind_weight_slots(cell, exclude)
        key = (kind, self.loss_cell.loss_type, structure_key(cell, exclude))
        if key not in self._units:
            num_activations = {"resblock_in_on_skip": 2, "resblock_out": 2, "resblock_out_on_skip": 3,
                               "transformer_out": 2}.get(kind, 1)
            num_constants = {"loss": 3, "head": 0}.get(kind, 2)
            trainable = [i for i, param in enumerate(weights) if param.requires_grad]
            saving = None
            if kind == "transformer_block" and supports_saved_backward(cell, weights):
                saving = SavingUnit(SavedBackwardBlock(cell), kind)
            self._units[key] = CompiledUnit(_unit_call(kind, cell, self.loss_cell), num_activations, num_constants,
                                            trainable, kind, saving)
        self._cell_units[(kind, id(cell))] = (self._units[key], weights, weighted_cells(cell, exclude))
        return weights

    @property
    def compiled_units(self) -> List[CompiledUnit]:
        return list(self._units.values())

    @property
    def num_compiled_units(self) -> int:
        return len(self._units)

    @property
    def num_units(self) -> int:
        return len(self._cell_units)

    def _run(self, tape, kind: str, cell: nn.Cell, activations: Tuple, constants: Tuple) -> Tensor:
        unit, weights, layers = self._cell_units[(kind, id(cell))]
        if tape is None:
            return unit.forward(*activations, *constants, *passed_weights(layers))
        return tape.run(unit, weights, layers, activations, constants)

    def _block(self, tape: Tape, block, activations: Tuple, constants: Tuple) -> Tensor:
        for index, layer in enumerate(block.cell_list):
            if isinstance(layer, SpatialTransformer):
                x = activations[0]
                tokens = self._run(tape, "transformer_in", layer, (x,), constants)
                for transformer_block in layer.transformer_blocks:
                    tokens = self._run(tape, "transformer_block", transformer_block, (tokens,), constants)
                x = self._run(tape, "transformer_out", layer, (x, tokens), constants)
            elif isinstance(layer, ResBlock):
                on_skip = "_on_skip" if len(activations) == 2 else ""
                hidden = self._run(tape, "resblock_in" + on_skip, layer, activations, constants)
                x = self._run(tape, "resblock_out" + on_skip, layer, (*activations, hidden), constants)
            else:
                x = self._run(tape, "layer", layer, activations, constants)
            activations = (x,)
        return activations[0]

    def _unet_blocks(self, tape, latents: Tensor, constants: Tuple) -> Tensor:
        """The UNet up to its output head; with a tape, recorded for the backward pass."""
        h, skips = latents, []
        for block in self.unet.input_blocks:
            h = self._block(tape, block, (h,), constants)
            skips.append(h)
        h = self._block(tape, self.unet.middle_block, (h,), constants)
        for block in self.unet.output_blocks:
            h = self._block(tape, block, (h, skips.pop()), constants)
        return h

    def predict(self, latents, timesteps, context, y) -> Tensor:
        """The UNet's output through the same units, forward only: sampling during training compiles no
        whole-UNet graph (at full size that graph alone would add ~5 GiB)."""
        h = self._unet_blocks(None, latents, (self._embed(timesteps, y), context))
        return self._run(None, "head", self.unet.out, (h,), ())

    def loss(self, noisy_latents, target, timesteps, sizes, loss_weights, huber_c, text_a, text_b, text_c) -> Tensor:
        """The loss alone through the same units, forward only (validation)."""
        context, emb = self._condition(timesteps, sizes, text_a, text_b, text_c)
        h = self._unet_blocks(None, noisy_latents, (emb, context))
        return self._run(None, "loss", self.unet.out, (h,), (target, loss_weights, huber_c))

    def __call__(self, upstream: Tensor, noisy_latents, target, timesteps, sizes, loss_weights, huber_c,
                 text_a, text_b, text_c) -> Tuple[Tensor, List[Tensor]]:
        """The loss and the gradients of upstream * loss."""
        context, emb = self._condition(timesteps, sizes, text_a, text_b, text_c)
        tape = Tape(self.max_saved_bytes)
        h = self._unet_blocks(tape, noisy_latents, (emb, context))
        loss = self._run(tape, "loss", self.unet.out, (h,), (target, loss_weights, huber_c))
        self.last_saved_bytes = tape.saved_bytes
        weight_grads = tape.backward(loss, upstream)
        # Not dict.get(key, default): the default, an eager zeros, would be built for all ~1444 tensors (~1 s).
        return loss, [weight_grads[id(param)] if id(param) in weight_grads else ops.zeros(param.shape, param.dtype)
                      for param in self.params]


class BlockwiseTrainStepForSDXLLoRA(TrainStepForSDXLLoRA):
    """TrainStepForSDXLLoRA whose gradients come from BlockwiseSDXLLoss; call `run(*step inputs)`.

    Not compiled as a whole: `run` drives the compiled units, then the graphs of what mindone's
    TrainStep.construct does after the backward pass (it has no method for that part): accumulation and
    all-reduce; clipping; the optimizer update, part by part; the end of the step."""

    def __init__(self, loss_cell: SDXLLoRALoss, optimizer, max_grad_norm=None, gradient_accumulation_steps=1,
                 max_parameters_per_update=MAX_PARAMETERS_PER_UPDATE):
        super().__init__(loss_cell, optimizer, max_grad_norm, gradient_accumulation_steps)
        self.set_train(True)  # before the units are keyed: the training mode is part of their structure
        self.blockwise = BlockwiseSDXLLoss(loss_cell, self.parameters)
        self._upstream = self.scale_loss(Tensor(1.0, ms.float32))
        accumulator = self.grad_accumulator  # its reducer is mindone's choice for the parallel mode
        gathers = accumulator.gradient_accumulation_steps > 1 or not isinstance(accumulator.grad_reducer, nn.Identity)
        self._gather_gradients = ms.jit(self.gather_gradients) if gathers else None
        max_grad_norm = self.grad_clipper.max_grad_norm
        # Clipping is on exactly when _max_grad_norm is set; then every update graph also takes the factor.
        self._max_grad_norm = None if max_grad_norm is None else Tensor(max_grad_norm, ms.float32)
        self._clip_factor = ms.jit(clip_factor)
        self.update_parts = [(part.first, part.last,
                              ms.jit(part.construct if self._max_grad_norm is None else part.scaled_construct))
                             for part in split_update(optimizer, max_parameters_per_update)]
        self._finish_step = ms.jit(self.finish_step)

    def gather_gradients(self, *grads):
        """-> (whether the optimizer steps now, the gradients to step with): accumulated, and averaged over ranks
        under data parallelism. Not unscaled: this step has no loss scaler, and mindone's unscale by its static
        1.0 is a kernel per tensor (40-140 ms for a full-size LoRA's 1444)."""
        grads = self.grad_accumulator.step(grads)  # before reading sync_gradients: the step sets it
        return self.sync_gradients, grads

    def finish_step(self):
        self.grad_scaler.update()
        return self.grad_accumulator.zero_grad()

    def run(self, *inputs):
        loss, grads = self.blockwise(self._upstream, *inputs)
        step_now = True
        if self._gather_gradients is not None:
            step_now, grads = self._gather_gradients(*grads)
        if step_now:  # no loss scaler here, so a step is never skipped for overflow
            factor = () if self._max_grad_norm is None else (self._clip_factor(self._max_grad_norm, *grads),)
            for first, last, update in self.update_parts:
                update(*factor, *grads[first:last])
            self._finish_step()
        return loss, loss


def clip_factor(max_norm, *grads):
    """What clipping multiplies the gradients by, as mindone's clip_by_global_norm computes it:
    max_norm / max(global L2 norm, max_norm). The squares are summed over one concatenation: a sum per tensor
    was two kernels each (1444 in a full-size LoRA, ~50-380 us apiece on CPU), and returning the clipped
    tensors from this graph cost as much again in outputs."""
    flat = ops.concat(_hyper_map(_flattened_float32, grads))
    norm = ops.sqrt((flat * flat).sum())
    return max_norm / ops.maximum(norm, max_norm)


def _flattened_float32(tensor):
    return tensor.reshape(-1).astype(ms.float32)
