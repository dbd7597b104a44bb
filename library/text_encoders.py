"""SDXL's two text encoders (mindone.transformers CLIP cells) and how SDXL reads their outputs.

TE1 = CLIP ViT-L/14 (`CLIPTextModel`), TE2 = OpenCLIP ViT-bigG/14 in HF layout
(`CLIPTextModelWithProjection`). SDXL's context is the concatenation of both encoders' penultimate
hidden states (TE1 layer 11 of 12, TE2 layer 31 of 32); its pooled vector is TE2's final-layer-normed
state at the first <EOS>, projected by `text_projection`.
"""

from typing import Dict, Tuple

import numpy as np

from mindspore import mint, nn
from transformers import CLIPTextConfig

from library import backend
from library.tokenizers import eos_positions, select_pooled_output

BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
# SDXL's encoders use 64-wide attention heads; the head count is not recoverable from weight shapes.
HEAD_DIM = 64


def clip_text_config(
    hidden_size: int, num_layers: int, intermediate_size: int, vocab_size: int, max_positions: int,
    projection_dim: int, hidden_act: str,
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(1, hidden_size // HEAD_DIM),
        max_position_embeddings=max_positions,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        layer_norm_eps=1e-5,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=1,
    )


CLIP_L_CONFIG = dict(hidden_size=768, num_layers=12, intermediate_size=3072, vocab_size=49408, max_positions=77,
                     projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG_CONFIG = dict(hidden_size=1280, num_layers=32, intermediate_size=5120, vocab_size=49408, max_positions=77,
                        projection_dim=1280, hidden_act="gelu")


def clip_config_from_hf_shapes(shapes: Dict[str, Tuple[int, ...]], hidden_act: str) -> CLIPTextConfig:
    """Rebuild the configuration from HF-named weight shapes (single files carry no config)."""
    vocab, hidden = shapes["text_model.embeddings.token_embedding.weight"]
    max_positions = shapes["text_model.embeddings.position_embedding.weight"][0]
    num_layers = len({name.split(".")[3] for name in shapes if name.startswith("text_model.encoder.layers.")})
    intermediate = shapes["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    projection = shapes.get("text_projection.weight", (hidden, hidden))[0]
    return clip_text_config(hidden, num_layers, intermediate, vocab, max_positions, projection, hidden_act)


def build_text_encoder(config: CLIPTextConfig, with_projection: bool) -> nn.Cell:
    from mindone.transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = backend.adapt_mindone_text_encoder(cls(config))
    model.set_train(False)
    return model


class SDXLTextEncoding(nn.Cell):
    """(ids1, ids2, eos_mask2) -> (context [B, T, D1+D2], pooled [B, P]), with n_chunks x 75-token chunks.

    ids*: int32 [B * n_chunks, 77]; eos_mask2: float32 [B * n_chunks, 77], one-hot at TE2's first <EOS>
    (see `eos_mask`), so pooling is a batched matmul on every device.
    """

    def __init__(self, text_encoder1: nn.Cell, text_encoder2: nn.Cell, n_chunks: int = 1):
        super().__init__()
        self.text_encoder1 = text_encoder1
        self.text_encoder2 = text_encoder2
        self.n_chunks = n_chunks

    def construct(self, ids1, ids2, eos_mask2):
        out1 = self.text_encoder1(ids1, output_hidden_states=True, return_dict=False)
        hidden1 = out1[2][-2]
        out2 = self.text_encoder2.text_model(ids2, output_hidden_states=True, return_dict=False)
        hidden2 = out2[2][-2]
        last2 = out2[0]
        pooled_state = mint.bmm(eos_mask2[:, None, :].astype(last2.dtype), last2)[:, 0]
        pooled = self.text_encoder2.text_projection(pooled_state)
        context = mint.cat((hidden1, hidden2), dim=-1)
        if self.n_chunks > 1:
            context = self._join_chunks(context)
        return context, select_pooled_output(pooled, self.n_chunks)

    def _join_chunks(self, states):
        """Same rule as `tokenizers.join_chunked_hidden_states`, written with graph-mode ops only."""
        chunks = states.reshape(-1, self.n_chunks, states.shape[1], states.shape[2])
        parts = [chunks[:, 0, :1]]
        for index in range(self.n_chunks):
            parts.append(chunks[:, index, 1:-1])
        parts.append(chunks[:, self.n_chunks - 1, -1:])
        return mint.cat(parts, dim=1)


def eos_mask(input_ids: np.ndarray) -> np.ndarray:
    """[N, 77] ids -> float32 one-hot of the first <EOS> per row (sd-scripts pools TE2 there)."""
    ids = np.asarray(input_ids).reshape(-1, input_ids.shape[-1])
    mask = np.zeros(ids.shape, np.float32)
    mask[np.arange(ids.shape[0]), eos_positions(ids, EOS_TOKEN_ID)] = 1.0
    return mask
