"""A transformer block's backward pass without recomputing its forward.

Why: under --gradient_checkpointing every unit's backward recomputes the unit's forward (library/blockwise.py),
and in a transformer block that recompute is most of the matmul work: q, k, v of both attentions and the
feed-forward's input projection feed nonlinearities, so their outputs are needed again (full-size SDXL at 256 px:
37 ms forward, 70 ms recomputing backward per 1280-channel block, 60 such blocks a step). Here the forward keeps
what the backward needs (the inputs of every projection, q/k/v, the feed-forward's hidden layer) and the
backward of each projection is written out: for y = x W^T + b + s (x D^T) U^T, with D the LoRA down and U the
LoRA up matrix and s = multiplier * alpha / rank,

    dx = dy W + s (dy U) D,   dU = s dy^T (x D^T),   dD = s (dy U)^T x.

The pieces between the projections are differentiated by hand as well, from saved tensors: attention from the
head-split q, k, v (recomputing the probabilities, one batched matmul and a softmax), GEGLU from the gate's saved
normal CDF, the layer norms by `backend.layer_norm_input_grad`. Differentiating small functions with `ops.grad`
instead recomputed their forwards (the exact GELU's erf among them) and took ~75 more kernels per block, each
~0.1 ms on CPU; tokens stay 2-D [batch * tokens, channels] inside the block for the same reason (no reshape
around every matmul). A 1280-channel block at 256 px went from 321 to 260 kernels, 98 -> 87 ms forward and
backward, a 640-channel one 134 -> 106 ms (interleaved in one process). At 256 px a full-size SDXL step keeps
~0.75 GiB this way; at 1024 px a 1280-channel block keeps ~140 MB, so the tape saves blocks only up to a byte
budget and recomputes the rest (library/blockwise.py, `Tape`).

Only blocks whose trainable weights are the LoRA matrices of their projections, without LoRA dropouts, take this
path (`supports_saved_backward`); any other block keeps the recomputing backward.
"""

import math
from typing import Callable, List, Tuple

from mindspore import nn, ops

from library import backend
from library.layers import Dropout, LayerNorm, Linear
from library.sdxl_unet import BasicTransformerBlock
from networks.lora import LoRAModule

_matmul = ops.MatMul()
_matmul_ta = ops.MatMul(transpose_a=True)
_batch_matmul = ops.BatchMatMul()
_batch_matmul_ta = ops.BatchMatMul(transpose_a=True)
_batch_matmul_tb = ops.BatchMatMul(transpose_b=True)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _cast(weight, like):
    return weight if weight.dtype == like.dtype else weight.astype(like.dtype)


def _projections(block: BasicTransformerBlock) -> List[nn.Cell]:
    return [block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn1.to_out[0],
            block.attn2.to_q, block.attn2.to_k, block.attn2.to_v, block.attn2.to_out[0],
            block.ff.net[0].proj, block.ff.net[2]]


def _is_plain_lora(layer: nn.Cell) -> bool:
    return (isinstance(layer, LoRAModule) and not layer.is_conv and isinstance(layer.org_module, Linear)
            and layer.dropout is None and layer.rank_dropout is None and layer.module_dropout is None)


def supports_saved_backward(block: nn.Cell, weights) -> bool:
    """Whether `block` (its weights bound as `weights`) can take the saved-activation backward."""
    if type(block) is not BasicTransformerBlock:
        return False
    layers = _projections(block)
    if not all(type(layer) is Linear or _is_plain_lora(layer) for layer in layers):
        return False
    dropouts = [block.attn1.to_out[1], block.attn2.to_out[1], block.ff.net[1]]
    if not all(type(dropout) is Dropout and dropout.p == 0.0 for dropout in dropouts):
        return False
    if not all(type(norm) is LayerNorm for norm in (block.norm1, block.norm2, block.norm3)):
        return False
    lora_matrices = {id(matrix.weight) for layer in layers if isinstance(layer, LoRAModule)
                     for matrix in (layer.lora_down, layer.lora_up)}
    return lora_matrices == {id(param) for param in weights if param.requires_grad}


def _projection(layer: nn.Cell) -> Tuple[Callable, Callable, Tuple[int, ...]]:
    """(forward(x, weights) -> (y, lora_input), backward(dy, x, lora_input, weights, need_dx) -> (dx, grads),
    the weight slots of `grads`), on tokens as 2-D [tokens, channels] matrices.

    The forward saves s * (x D^T), so that the backward's dU = dy^T (s x D^T) needs no multiply. It is saved as a
    product of its own: feeding that product to the up matmul, or saving the down matmul's output that also
    feeds it, made a 1280-channel block's forward 58-62 ms instead of 46-51 on CPU (interleaved in one process)."""
    lora = layer if isinstance(layer, LoRAModule) else None
    base = layer.org_module if lora is not None else layer
    weight_slot, has_bias = base.slot, base.bias is not None
    multiplier, lora_scale = (lora.multiplier, lora.scale) if lora is not None else (None, 1.0)

    def base_weights(x, weights):
        weight = _cast(weights[weight_slot], x)
        bias = _cast(weights[weight_slot + 1], x) if has_bias else None
        return weight, bias

    if lora is None:
        def forward(x, weights):
            weight, bias = base_weights(x, weights)
            return backend.linear(x, weight, bias), x

        def backward(dy, x, lora_input, weights, need_dx):
            if not need_dx:
                return None, ()
            weight, _ = base_weights(dy, weights)
            return backend.linear_input_grad(dy, weight), ()

        return forward, backward, ()

    down_slot, up_slot = lora.lora_down.slot, lora.lora_up.slot

    def forward(x, weights):
        weight, bias = base_weights(x, weights)
        lx = backend.linear(x, _cast(weights[down_slot], x))
        scale = multiplier.astype(x.dtype) * lora_scale
        return backend.linear(x, weight, bias) + backend.linear(lx, _cast(weights[up_slot], x)) * scale, lx * scale

    def backward(dy, x, scaled_lx, weights, need_dx):
        down, up = _cast(weights[down_slot], dy), _cast(weights[up_slot], dy)
        dlx = _matmul(dy, up) * (multiplier.astype(dy.dtype) * lora_scale)
        grad_up = _matmul_ta(dy, scaled_lx)
        grad_down = _matmul_ta(dlx, x)
        if not need_dx:
            return None, (grad_down, grad_up)
        weight, _ = base_weights(dy, weights)
        return backend.linear_input_grad(dy, weight) + _matmul(dlx, down), (grad_down, grad_up)

    return forward, backward, (down_slot, up_slot)


def _layer_norm_grad(norm: LayerNorm) -> Callable:
    """`grad(x, weights, dy) -> dx` of the layer norm `norm` (its weight bound to a slot of `weights`)."""
    input_grad = backend.layer_norm_input_grad(norm.norm.eps)

    def grad(x, weights, dy):
        return input_grad(x, _cast(weights[norm.slot], x), dy)

    return grad


def _split_heads(x, batch: int, heads: int):
    """[batch * tokens, heads * head_dim] -> [batch, heads, tokens, head_dim]."""
    return x.reshape(batch, -1, heads, x.shape[-1] // heads).swapaxes(1, 2)


def _merge_heads(x):
    """[batch, heads, tokens, head_dim] -> [batch * tokens, heads * head_dim]."""
    return x.swapaxes(1, 2).reshape(-1, x.shape[1] * x.shape[3])


def _attention_forward(q, k, v, batch: int, heads: int):
    """Multi-head scaled dot-product attention on 2-D [batch * tokens, heads * head_dim] matrices
    -> (out, *saved for `_attention_backward`).

    The backward recomputes the attention probabilities (one batched matmul and a softmax) rather than have the
    forward keep them: at 1024 px they would be 84 MB of a 1280-channel block's saved tensors, taking the place
    of whole blocks under the tape's byte budget, whose recompute costs far more."""
    scaled_q = _split_heads(q, batch, heads) * (1.0 / math.sqrt(q.shape[-1] // heads))
    k, v = _split_heads(k, batch, heads), _split_heads(v, batch, heads)
    probs = ops.softmax(_batch_matmul_tb(scaled_q, k), -1)
    return _merge_heads(_batch_matmul(probs, v)), scaled_q, k, v


def _attention_backward(dout, scaled_q, k, v, batch: int, heads: int):
    """(dq, dk, dv) given d(out) and what `_attention_forward` saved."""
    probs = ops.softmax(_batch_matmul_tb(scaled_q, k), -1)
    dout = _split_heads(dout, batch, heads)
    dprobs = _batch_matmul_tb(dout, v)
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True))
    dq = _merge_heads(_batch_matmul(dscores, k)) * (1.0 / math.sqrt(scaled_q.shape[-1]))
    return dq, _merge_heads(_batch_matmul_ta(dscores, scaled_q)), _merge_heads(_batch_matmul_ta(probs, dout))


def _geglu(hidden: int) -> Tuple[Callable, Callable]:
    """(forward(p) -> (out, *saved), backward(dout, *saved) -> dp) of value * gelu(gate) for p = [value, gate],
    GELU exact (erf); the forward keeps the gate's normal CDF, so the backward needs no erf."""

    def forward(p):
        value, gate = p[:, :hidden], p[:, hidden:]
        cdf = 0.5 + 0.5 * ops.erf(gate * _INV_SQRT2)
        return value * (gate * cdf), value, gate, cdf

    def backward(dout, value, gate, cdf):
        dvalue = dout * (gate * cdf)
        pdf = ops.exp(gate * gate * -0.5) * _INV_SQRT_2PI
        dgate = dout * value * (cdf + gate * pdf)
        return ops.concat((dvalue, dgate), -1)

    return forward, backward


class SavedBackwardBlock:
    """`forward(x, context, weights) -> (y, *saved)` and `backward(dy, x, context, saved, weights) -> (dx, *grads)`
    for one BasicTransformerBlock structure; `grads` follow `grad_slots` (the slots of its LoRA matrices).

    Inside, tokens are 2-D [batch * tokens, channels] matrices: every projection is one plain matrix product and
    its gradient needs no reshape."""

    num_saved = 27

    def __init__(self, block: BasicTransformerBlock):
        layers = [_projection(layer) for layer in _projections(block)]
        self.grad_slots = tuple(slot for _, _, layer_slots in layers for slot in layer_slots)
        ((q1, q1_back, _), (k1, k1_back, _), (v1, v1_back, _), (o1, o1_back, _), (q2, q2_back, _), (k2, k2_back, _),
         (v2, v2_back, _), (o2, o2_back, _), (ff_in, ff_in_back, _), (ff_out, ff_out_back, _)) = layers
        heads1, heads2 = block.attn1.heads, block.attn2.heads
        geglu, geglu_back = _geglu(block.ff.net[0].dim_out)
        norm1, norm2, norm3 = block.norm1, block.norm2, block.norm3
        norm1_grad, norm2_grad, norm3_grad = (_layer_norm_grad(norm) for norm in (norm1, norm2, norm3))
        # The gradients in the order of their slots, as the unit's trainable weights are listed.
        order = sorted(range(len(self.grad_slots)), key=lambda index: self.grad_slots[index])
        self.grad_slots = tuple(sorted(self.grad_slots))

        def forward(x, context, weights):
            batch, tokens, channels = x.shape
            x = x.reshape(batch * tokens, channels)
            context = context.reshape(-1, context.shape[-1])
            h1 = norm1(x, weights)
            q, lq = q1(h1, weights)
            k, lk = k1(h1, weights)
            v, lv = v1(h1, weights)
            a1, *attention1 = _attention_forward(q, k, v, batch, heads1)
            out1, lo1 = o1(a1, weights)
            x1 = x + out1
            h2 = norm2(x1, weights)
            qq, lq2 = q2(h2, weights)
            kk, lk2 = k2(context, weights)
            vv, lv2 = v2(context, weights)
            a2, *attention2 = _attention_forward(qq, kk, vv, batch, heads2)
            out2, lo2 = o2(a2, weights)
            x2 = x1 + out2
            h3 = norm3(x2, weights)
            p, lp = ff_in(h3, weights)
            g, *ff = geglu(p)
            out3, lf = ff_out(g, weights)
            saved = (h1, a1, x1, h2, a2, x2, h3, g, *attention1, *attention2, *ff,
                     lq, lk, lv, lo1, lq2, lk2, lv2, lo2, lp, lf)
            return ((x2 + out3).reshape(batch, tokens, channels),) + saved

        def backward(dy, x, context, saved, weights):
            (h1, a1, x1, h2, a2, x2, h3, g, sq1, sk1, sv1, sq2, sk2, sv2, value, gate, cdf,
             lq, lk, lv, lo1, lq2, lk2, lv2, lo2, lp, lf) = saved
            batch, tokens, channels = x.shape
            dy = dy.reshape(batch * tokens, channels)
            x = x.reshape(batch * tokens, channels)
            context = context.reshape(-1, context.shape[-1])
            dg, grads_ff_out = ff_out_back(dy, g, lf, weights, True)
            dh3, grads_ff_in = ff_in_back(geglu_back(dg, value, gate, cdf), h3, lp, weights, True)
            dx2 = dy + norm3_grad(x2, weights, dh3)
            da2, grads_o2 = o2_back(dx2, a2, lo2, weights, True)
            dq2, dk2, dv2 = _attention_backward(da2, sq2, sk2, sv2, batch, heads2)
            dh2, grads_q2 = q2_back(dq2, h2, lq2, weights, True)
            _, grads_k2 = k2_back(dk2, context, lk2, weights, False)
            _, grads_v2 = v2_back(dv2, context, lv2, weights, False)
            dx1 = dx2 + norm2_grad(x1, weights, dh2)
            da1, grads_o1 = o1_back(dx1, a1, lo1, weights, True)
            dq, dk, dv = _attention_backward(da1, sq1, sk1, sv1, batch, heads1)
            dhq, grads_q1 = q1_back(dq, h1, lq, weights, True)
            dhk, grads_k1 = k1_back(dk, h1, lk, weights, True)
            dhv, grads_v1 = v1_back(dv, h1, lv, weights, True)
            dx = dx1 + norm1_grad(x, weights, dhq + dhk + dhv)
            grads = (grads_q1 + grads_k1 + grads_v1 + grads_o1 + grads_q2 + grads_k2 + grads_v2 + grads_o2
                     + grads_ff_in + grads_ff_out)
            return (dx.reshape(batch, tokens, channels),) + tuple(grads[index] for index in order)

        self.forward, self.backward = forward, backward
