"""The base weights LoRA modules adapt, read one tensor at a time from an SDXL checkpoint (a
Stability-style single file or a diffusers folder) without loading the model.

Only the safetensors headers are read up front: the model configs are inferred from them as
library.model_loading does, and each weight is read on request from the memory-mapped file.
Text encoder 2 is stored by single files in open_clip's layout (q, k and v fused into one in_proj
tensor): its Hugging Face names are found by converting a zero-stride stand-in of each tensor.
"""

import os
from typing import Dict, Tuple

import numpy as np

from library import model_conversion as conv
from library.errors import UserError
from library.model_configs import (
    clip_config_from_folder,
    read_json,
    unet_config_from_diffusers,
    unet_config_from_sgm_shapes,
)
from library.model_loading import DIFFUSERS_WEIGHT_FILES
from library.safetensors_io import open_safetensors, refuse_pickle
from library.text_encoders import clip_config_from_hf_shapes
from networks.sdxl_lora_modules import LoRAModuleSpec, sdxl_lora_modules

WEIGHT = ".weight"


def _stand_in(shape) -> np.ndarray:
    """A read-only array of `shape` that takes no memory: enough for name and shape conversions."""
    return np.broadcast_to(np.zeros((), np.float32), shape)


class SDXLCheckpointWeights:
    """`modules` lists every LoRA module the checkpoint's model has; `read(spec)` returns its base weight
    as float32. Use as a context manager (the files stay open)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise UserError(f"{self.path}: model not found (give an SDXL .safetensors file or diffusers folder)")
        self._readers = []
        # root -> {Hugging Face / SGM weight name: (reader, stored name)}
        self._locations: Dict[str, Dict[str, Tuple[object, str]]] = {}
        try:
            if os.path.isdir(self.path):
                unet_config, te1_config, te2_config = self._open_diffusers_folder()
            else:
                unet_config, te1_config, te2_config = self._open_single_file()
        except BaseException:
            self.close()
            raise
        self.unet_config = unet_config
        self.modules: Dict[str, LoRAModuleSpec] = sdxl_lora_modules(unet_config, te1_config, te2_config)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers = []

    def _open(self, path):
        reader = open_safetensors(path)
        self._readers.append(reader)
        return reader

    # ---- Single files

    def _open_single_file(self):
        refuse_pickle(self.path)
        reader = self._open(self.path)
        names = reader.keys()
        if not any(n.startswith(conv.UNET_PREFIX + "label_emb.") for n in names) or not any(
                n.startswith(conv.TE2_PREFIX) for n in names):
            raise UserError(f"{self.path}: not an SDXL single-file checkpoint (needs the SDXL UNet's label_emb and "
                            "the second text encoder)")
        unet = {n[len(conv.UNET_PREFIX):]: (reader, n) for n in names if n.startswith(conv.UNET_PREFIX)}
        te1 = {n[len(conv.TE1_PREFIX):]: (reader, n) for n in names if n.startswith(conv.TE1_PREFIX)}
        te2, te2_shapes = {}, {}
        for name in names:
            if name.startswith(conv.TE2_PREFIX):
                stand_in = {name[len(conv.TE2_PREFIX):]: _stand_in(reader.shape(name))}
                for hf_name, value in conv.open_clip_to_hf(stand_in).items():
                    te2[hf_name] = (reader, name)
                    te2_shapes[hf_name] = value.shape
        self._locations = {"unet": unet, "te1": te1, "te2": te2}
        return (self._config(unet_config_from_sgm_shapes, {n: r.shape(s) for n, (r, s) in unet.items()}),
                self._config(clip_config_from_hf_shapes, {n: r.shape(s) for n, (r, s) in te1.items()}, "quick_gelu"),
                self._config(clip_config_from_hf_shapes, te2_shapes, "gelu"))

    def _config(self, infer, shapes, *args):
        try:
            return infer(shapes, *args)
        except (KeyError, StopIteration, IndexError, ValueError) as error:
            raise UserError(f"{self.path}: incomplete SDXL checkpoint (cannot find {error})") from None

    # ---- Diffusers folders

    def _weights_file(self, component: str) -> str:
        folder = os.path.join(self.path, component)
        for name in DIFFUSERS_WEIGHT_FILES:
            if os.path.exists(os.path.join(folder, name)):
                return os.path.join(folder, name)
        raise UserError(f"{folder}: no weights found (expected one of {', '.join(DIFFUSERS_WEIGHT_FILES)})")

    def _open_diffusers_folder(self):
        unet_config = unet_config_from_diffusers(read_json(os.path.join(self.path, "unet", "config.json")), self.path)
        unet_reader = self._open(self._weights_file("unet"))
        unet = {}
        for name in unet_reader.keys():
            try:
                unet[conv.unet_diffusers_name_to_sgm(name, unet_config)] = (unet_reader, name)
            except KeyError:
                raise UserError(f"{unet_reader.path}: '{name}' is not a tensor of an SDXL UNet") from None
        self._locations["unet"] = unet
        configs = [unet_config]
        for root, component in (("te1", "text_encoder"), ("te2", "text_encoder_2")):
            reader = self._open(self._weights_file(component))
            self._locations[root] = {name: (reader, name) for name in reader.keys()}
            configs.append(clip_config_from_folder(os.path.join(self.path, component)))
        return tuple(configs)

    # ---- Reading

    def read(self, spec: LoRAModuleSpec) -> np.ndarray:
        """The base weight `spec` adapts, float32 (half-precision files are upcast exactly)."""
        name = spec.path + WEIGHT
        location = self._locations[spec.root].get(name)
        if location is None:
            raise UserError(f"{self.path}: no weight '{name}' for LoRA module {spec.lora_name}")
        reader, stored = location
        value = reader.read_float32(stored)
        if spec.root == "te2" and stored.startswith(conv.TE2_PREFIX):
            value = conv.open_clip_to_hf({stored[len(conv.TE2_PREFIX):]: value})[name]
        if tuple(value.shape) != spec.shape:
            raise UserError(f"{self.path}: '{name}' has shape {list(value.shape)}, the model's config needs "
                            f"{list(spec.shape)}")
        return value
