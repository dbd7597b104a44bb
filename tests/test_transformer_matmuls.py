"""The product count of benchmarks/transformer_matmuls.py against the linear layers of a real UNet."""

from collections import Counter

from benchmarks.transformer_matmuls import CONTEXT_TOKENS, transformer_products
from library.layers import Linear, weight_init
from library.sdxl_unet import SDXLUNet, SpatialTransformer
from tools.make_tiny_sdxl import TINY_UNET


def test_forward_products_are_the_linear_layers_of_the_unets_transformers():
    with weight_init(seed=0):
        unet = SDXLUNet(TINY_UNET)
    layers = Counter()
    for _, cell in unet.cells_and_names():
        if isinstance(cell, SpatialTransformer):
            layers.update((linear.in_features, linear.out_features) for _, linear in cell.cells_and_names()
                          if isinstance(linear, Linear))
    products = transformer_products(TINY_UNET, 128)
    forward = Counter()
    for (rows, inner, outputs, direction), count in products.items():
        if direction == "forward":
            forward[(inner, outputs)] += count
    assert forward == layers
    # every layer's input gradient but the cross-attention keys' and values', whose input is the text conditioning
    grads = sum(count for (rows, _, _, direction), count in products.items() if direction == "input_grad")
    assert grads == sum(layers.values()) - sum(count for (rows, _, _, direction), count in products.items()
                                              if direction == "forward" and rows == CONTEXT_TOKENS)
    # tokens: (128 px / 8 / 2 ** level) ** 2 at the two levels with transformers
    assert {rows for rows, *_ in products} == {CONTEXT_TOKENS, 8 * 8, 4 * 4}
