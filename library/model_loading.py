"""Load an SDXL checkpoint (Stability-style single .safetensors file or diffusers folder) into
MindSpore cells, and write the cells back out in either layout.

Tensors are streamed one at a time into parameters built without random initialisation, so peak
memory stays near one copy of the model. Half-precision files load into float32 parameters.
"""

import ctypes
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

import mindspore as ms
from mindspore import nn

from library import model_conversion as conv
from library.errors import UserError
from library.layers import weight_init
from library.model_configs import (
    clip_config_from_folder,
    read_json,
    unet_config_from_diffusers,
    unet_config_from_sgm_shapes,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_from_diffusers_shapes,
    vae_config_from_ldm_shapes,
    vae_config_to_diffusers,
)
from library.safetensors_io import open_safetensors, refuse_pickle, save_safetensors, save_safetensors_streaming
from library.sdxl_unet import SDXLUNet, UNetConfig
from library.sdxl_vae import AutoencoderKL, VAEConfig
from library.text_encoders import build_text_encoder, clip_config_from_hf_shapes

DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                          "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


@dataclass
class SDXLModels:
    """The parts of an SDXL checkpoint; a part not loaded (see `load_sdxl`) is None."""

    unet: Optional[SDXLUNet]
    vae: Optional[AutoencoderKL]
    text_encoder1: Optional[nn.Cell]
    text_encoder2: Optional[nn.Cell]
    # open_clip's logit_scale is not part of the text encoder; kept so a saved single file is complete.
    logit_scale: Optional[np.ndarray] = None

    @property
    def text_encoders(self):
        return [encoder for encoder in (self.text_encoder1, self.text_encoder2) if encoder is not None]


# ---- Reading tensors into cells -------------------------------------------------------------------


def _describe_mismatch(source: str, what: str, missing, unexpected, wrong_shapes) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shapes)):
        if keys:
            keys = sorted(keys)
            shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            parts.append(f"{len(keys)} {label} ({shown})")
    return f"{source}: {what} weights do not fit the model: " + "; ".join(parts)


def load_into_cell(cell: nn.Cell, tensors: Iterable[Tuple[str, Tuple[int, ...], Callable[[], np.ndarray]]],
                   to_param_name: Callable[[str], str], source: str, what: str) -> None:
    """Assign (name, shape, read) triples to the cell's parameters; all must match exactly, both ways."""
    params = dict(cell.parameters_and_names())
    seen, unexpected, wrong_shapes = set(), [], []
    pending = []
    for name, shape, read in tensors:
        param_name = to_param_name(name)
        param = params.get(param_name)
        if param is None:
            unexpected.append(name)
        else:
            seen.add(param_name)
            if tuple(param.shape) != tuple(shape):
                wrong_shapes.append(f"{name} {list(shape)} vs {list(param.shape)}")
            else:
                pending.append((param, read))
    missing = [n for n in params if n not in seen and not n.endswith("position_ids")]
    if missing or unexpected or wrong_shapes:
        raise UserError(_describe_mismatch(source, what, missing, unexpected, wrong_shapes))
    for param, read in pending:
        value = read()
        param.set_data(ms.Tensor(np.ascontiguousarray(value.astype(np.float32)), dtype=param.dtype))


def _reader_tensors(reader, names, rename=lambda n: n, transform=None):
    for name in names:
        def read(name=name):
            value = reader.read_float32(name)
            return transform(name, value) if transform else value
        yield rename(name), reader.shape(name), read


# ---- Single files ---------------------------------------------------------------------------------


def _strip(names, prefix):
    return {n[len(prefix):]: n for n in names if n.startswith(prefix)}


def _check_sdxl_single_file(path: str, names) -> None:
    if not any(n.startswith(conv.UNET_PREFIX) for n in names):
        raise UserError(f"{path}: not a Stability-style SDXL checkpoint (no '{conv.UNET_PREFIX}*' tensors)")
    if not any(n.startswith(conv.UNET_PREFIX + "label_emb.") for n in names) or not any(
        n.startswith(conv.TE2_PREFIX) for n in names
    ):
        raise UserError(
            f"{path}: looks like an SD 1.x/2.x checkpoint (no SDXL label_emb or second text encoder); "
            "this trainer needs an SDXL base model"
        )


def load_single_file(path: str, unet: bool = True, encoders: bool = True) -> SDXLModels:
    """The UNet and/or the encoders (VAE and both text encoders) of a Stability-style single file."""
    refuse_pickle(path)
    with open_safetensors(path) as reader:
        names = reader.keys()
        _check_sdxl_single_file(path, names)
        unet_names = _strip(names, conv.UNET_PREFIX)
        vae_names = _strip(names, conv.VAE_PREFIX)
        te1_names = _strip(names, conv.TE1_PREFIX)
        te2_names = _strip(names, conv.TE2_PREFIX)
        leftovers = set(names) - set(unet_names.values()) - set(vae_names.values()) - set(te1_names.values()) - set(
            te2_names.values()
        )
        if leftovers:
            raise UserError(_describe_mismatch(path, "checkpoint", [], leftovers, []))
        try:
            unet_config = unet_config_from_sgm_shapes({k: reader.shape(v) for k, v in unet_names.items()})
            vae_config = vae_config_from_ldm_shapes({k: reader.shape(v) for k, v in vae_names.items()})
            te1_shapes = {k: reader.shape(v) for k, v in te1_names.items()}
            te2_hf_shapes = _open_clip_hf_shapes({k: reader.shape(v) for k, v in te2_names.items()})
            te1_config = clip_config_from_hf_shapes(te1_shapes, "quick_gelu")
            te2_config = clip_config_from_hf_shapes(te2_hf_shapes, "gelu")
        except (KeyError, StopIteration, IndexError, ValueError) as error:
            raise UserError(f"{path}: incomplete SDXL checkpoint (cannot find {error})") from None

        models = SDXLModels(None, None, None, None)
        if unet:
            with weight_init(skip=True):
                models.unet = SDXLUNet(unet_config)
            load_into_cell(models.unet, _reader_tensors(reader, unet_names.values(),
                                                        lambda n: n[len(conv.UNET_PREFIX):]), lambda n: n, path, "UNet")
        if encoders:
            with weight_init(skip=True):
                models.vae = AutoencoderKL(vae_config)
            load_into_cell(models.vae, _reader_tensors(reader, vae_names.values(), lambda n: n[len(conv.VAE_PREFIX):]),
                           lambda n: n, path, "VAE")
            models.text_encoder1 = build_text_encoder(te1_config, with_projection=False)
            te1 = {n: v for n, v in te1_names.items() if not n.endswith("position_ids")}
            load_into_cell(models.text_encoder1, _reader_tensors(reader, te1.values(),
                                                                 lambda n: n[len(conv.TE1_PREFIX):]),
                           conv.hf_clip_to_mindone_name, path, "text encoder 1")
            models.text_encoder2 = build_text_encoder(te2_config, with_projection=True)
            te2_state = conv.open_clip_to_hf({k: reader.read_float32(v) for k, v in te2_names.items()})
            models.logit_scale = te2_state.pop("logit_scale", None)
            load_into_cell(models.text_encoder2, ((n, v.shape, lambda v=v: v) for n, v in te2_state.items()),
                           conv.hf_clip_to_mindone_name, path, "text encoder 2")
    return models


def _open_clip_hf_shapes(shapes):
    """HF-named shapes of an open_clip state, without reading any tensor data."""
    fake = {name: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, [0] * len(shape))
            for name, shape in shapes.items()}
    return {name: value.shape for name, value in conv.open_clip_to_hf(fake).items()}


# ---- Diffusers folders ----------------------------------------------------------------------------


def _component_file(folder: str, component: str) -> str:
    sub = os.path.join(folder, component)
    if not os.path.isdir(sub):
        raise UserError(f"{folder}: diffusers folder has no '{component}' subfolder")
    for name in DIFFUSERS_WEIGHT_FILES:
        if os.path.exists(os.path.join(sub, name)):
            return os.path.join(sub, name)
    raise UserError(f"{sub}: no weights found (expected one of {', '.join(DIFFUSERS_WEIGHT_FILES)})")


def load_diffusers_folder(folder: str, unet: bool = True, encoders: bool = True) -> SDXLModels:
    """The UNet and/or the encoders (VAE and both text encoders) of a diffusers folder."""
    models = SDXLModels(None, None, None, None)
    if unet:
        unet_config = unet_config_from_diffusers(read_json(os.path.join(folder, "unet", "config.json")), folder)
        with weight_init(skip=True):
            models.unet = SDXLUNet(unet_config)
        with open_safetensors(_component_file(folder, "unet")) as reader:
            def to_sgm(name):
                try:
                    return conv.unet_diffusers_name_to_sgm(name, unet_config)
                except KeyError:
                    return "unexpected:" + name

            load_into_cell(models.unet, _reader_tensors(reader, reader.keys()), to_sgm, reader.path, "UNet")
    if not encoders:
        return models
    models.vae = load_vae(os.path.join(folder, "vae"))
    text_encoders = []
    for component, with_projection in (("text_encoder", False), ("text_encoder_2", True)):
        config = clip_config_from_folder(os.path.join(folder, component))
        model = build_text_encoder(config, with_projection)
        with open_safetensors(_component_file(folder, component)) as reader:
            names = [n for n in reader.keys() if not n.endswith("position_ids")]
            load_into_cell(model, _reader_tensors(reader, names), conv.hf_clip_to_mindone_name, reader.path, component)
        text_encoders.append(model)
    models.text_encoder1, models.text_encoder2 = text_encoders
    return models


# ---- VAE on its own (--vae) -----------------------------------------------------------------------


def load_vae(path: str) -> AutoencoderKL:
    """A VAE from a diffusers `vae` folder, a diffusers-named VAE file, an LDM-named VAE file, or a full
    single-file checkpoint (its first_stage_model.* part)."""
    if os.path.isdir(path):
        config = vae_config_from_diffusers(read_json(os.path.join(path, "config.json")), path)
        weights = _component_file(os.path.dirname(path.rstrip("/")) or ".", os.path.basename(path.rstrip("/")))
        return _load_vae_file(weights, config)
    if not os.path.exists(path):
        raise UserError(f"{path}: VAE not found")
    refuse_pickle(path)
    return _load_vae_file(path, None)


def _load_vae_file(path: str, config: Optional[VAEConfig]) -> AutoencoderKL:
    with open_safetensors(path) as reader:
        names = reader.keys()
        if any(n.startswith(conv.VAE_PREFIX) for n in names):
            names = [n for n in names if n.startswith(conv.VAE_PREFIX)]
            strip = len(conv.VAE_PREFIX)
            state = {n[strip:]: reader.read_float32(n) for n in names}
        else:
            state = {n: reader.read_float32(n) for n in names}
        if any(n.startswith("encoder.down_blocks.") for n in state):
            guess = config or vae_config_from_diffusers_shapes({n: v.shape for n, v in state.items()})
            state = conv.vae_diffusers_to_ldm(state, guess)
        if not any(n.startswith("encoder.down.") for n in state):
            raise UserError(f"{path}: not an SDXL VAE (no encoder.down.* or encoder.down_blocks.* tensors)")
        config = config or vae_config_from_ldm_shapes({n: v.shape for n, v in state.items()})
    with weight_init(skip=True):
        vae = AutoencoderKL(config)
    load_into_cell(vae, ((n, v.shape, lambda v=v: v) for n, v in state.items()), lambda n: n, path, "VAE")
    return vae


# ---- Entry point ----------------------------------------------------------------------------------


def load_sdxl(path: str, vae_path: Optional[str] = None, unet: bool = True, encoders: bool = True) -> SDXLModels:
    """`--pretrained_model_name_or_path` (file or diffusers folder) and optional `--vae` override; `unet` and
    `encoders` (VAE and text encoders) choose the parts built, the others are None."""
    if not os.path.exists(path):
        raise UserError(f"{path}: model not found (give a .safetensors SDXL checkpoint or a diffusers folder)")
    load = load_diffusers_folder if os.path.isdir(path) else load_single_file
    models = load(path, unet=unet, encoders=encoders)
    if vae_path and encoders:
        models.vae = load_vae(vae_path)
    release_freed_host_memory()
    return models


def release_freed_host_memory() -> None:
    """Hand memory freed by the loading's temporary arrays back to the OS (glibc keeps it otherwise).

    Measured on the full-size SDXL single file: 17.3 -> 14.3 GiB anonymous RSS after loading."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to release this way
        pass


# ---- Writing --------------------------------------------------------------------------------------


def cell_state(cell: nn.Cell, rename=lambda n: n) -> Dict[str, np.ndarray]:
    # Names relative to `cell`: Parameter.name changes when a cell is wrapped by another one.
    return {rename(name): p.asnumpy() for name, p in cell.parameters_and_names()}


def _cell_entries(cell: nn.Cell, prefix: str, dtype, rename=lambda n: n):
    """Streamed tensors of a cell: each parameter is copied out only when its bytes are written."""
    for name, param in cell.parameters_and_names():
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.float32)
        yield prefix + rename(name), tuple(param.shape), out_dtype, lambda p=param: p.asnumpy().astype(out_dtype)


def single_file_entries(models: SDXLModels, dtype=None):
    """Every tensor of the Stability-style single file, as streamed (name, shape, dtype, read) entries."""
    entries = list(_cell_entries(models.unet, conv.UNET_PREFIX, dtype))
    entries += _cell_entries(models.vae, conv.VAE_PREFIX, dtype)
    entries += _cell_entries(models.text_encoder1, conv.TE1_PREFIX, dtype, conv.mindone_to_hf_clip_name)
    # Text encoder 2 is re-fused into open_clip's layout (q/k/v into in_proj) as a whole: ~3 GB at full size.
    te2 = cell_state(models.text_encoder2, conv.mindone_to_hf_clip_name)
    if models.logit_scale is not None:
        te2["logit_scale"] = models.logit_scale
    for name, value in conv.hf_to_open_clip(te2).items():
        value = value.astype(dtype) if dtype is not None else value
        entries.append((conv.TE2_PREFIX + name, value.shape, value.dtype, lambda v=value: v))
    return entries


def save_single_file(models: SDXLModels, path: str, dtype=None) -> None:
    save_safetensors_streaming(single_file_entries(models, dtype), path)


def _cast_all(state, dtype):
    return {n: (v.astype(dtype) if dtype is not None else v) for n, v in state.items()}


def save_diffusers_folder(models: SDXLModels, folder: str, dtype=None) -> None:
    def write(component, state, config):
        os.makedirs(os.path.join(folder, component), exist_ok=True)
        with open(os.path.join(folder, component, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True)
        name = "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
        save_safetensors(_cast_all(state, dtype), os.path.join(folder, component, name))

    unet_config: UNetConfig = models.unet.config
    vae_config: VAEConfig = models.vae.config
    write("unet", conv.unet_sgm_to_diffusers(cell_state(models.unet), unet_config), unet_config_to_diffusers(unet_config))
    write("vae", conv.vae_ldm_to_diffusers(cell_state(models.vae), vae_config), vae_config_to_diffusers(vae_config))
    for component, model, arch in (("text_encoder", models.text_encoder1, "CLIPTextModel"),
                                   ("text_encoder_2", models.text_encoder2, "CLIPTextModelWithProjection")):
        config = model.config.to_diff_dict()
        config["architectures"] = [arch]
        config.pop("transformers_version", None)
        write(component, cell_state(model, conv.mindone_to_hf_clip_name), config)
