"""The command line of sdxl_train_network.py: sd-scripts' arguments, --config_file, refusals, checks.

A sd-scripts user's command line and training TOML work here unchanged. `setup_parser()` registers
every argument sd-scripts' `sdxl_train_network.py` registers, with the same names, types, choices
and defaults, plus two of our own (`--pynative` and the dataset's
`--skip_bad_images`). Arguments we cannot honour exactly stay registered, so their names are
recognised, but setting one is refused by name (`UNSUPPORTED_ARGUMENTS`, `UNSUPPORTED_VALUES`).

- `parse_args(argv)`: what the training script calls; parse, read --config_file, refuse, verify.
- `read_config_file(args, parser, argv)`: sd-scripts' --config_file. Its values replace the
  parser's defaults and the arguments given on the command line replace the file's. Unlike
  sd-scripts, an unknown key or a value the command line would reject is an error naming the file.
- `write_config_file(args, parser)`: --output_config, sd-scripts' format (non-default values only).
- `refuse_unsupported(args, parser)`, `verify_args(args)`: one-line UserErrors.
"""

import argparse
import difflib
import logging
import os
import sys
from pathlib import Path

import toml

from library.dataset_args import add_dataset_arguments, refuse_unsupported_arguments
from library.errors import UserError
from library.lr_schedulers import SUPPORTED_SCHEDULERS, add_optimizer_arguments

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.lora"

# argument -> why it is refused when set to anything but its default
UNSUPPORTED_ARGUMENTS = {
    "v2": "SD 2.x models only; this trainer is for SDXL",
    "clip_skip": "SDXL always uses its fixed text-encoder layers; sd-scripts ignores it for SDXL too",
    "weighted_captions": "prompt weighting in captions is not implemented",
    "xformers": "MindSpore has its own attention kernels",
    "sdpa": "MindSpore has its own attention kernels",
    "mem_eff_attn": "MindSpore has its own attention kernels",
    "torch_compile": "the train step is compiled by MindSpore; use --pynative to run it eagerly",
    "dynamo_backend": "the train step is compiled by MindSpore; use --pynative to run it eagerly",
    "fp8_base": "fp8 base weights are not implemented",
    "fp8_base_unet": "fp8 base weights are not implemented",
    "cpu_offload_checkpointing": "offloading checkpointed activations is not implemented",
    "lowram": "a torch/CUDA memory-placement option with no MindSpore counterpart",
    "highvram": "a torch/CUDA memory-placement option with no MindSpore counterpart",
    "ddp_timeout": "torch DistributedDataParallel option",
    "ddp_gradient_as_bucket_view": "torch DistributedDataParallel option",
    "ddp_static_graph": "torch DistributedDataParallel option",
    "deepspeed": "DeepSpeed is torch-only",
    "zero_stage": "DeepSpeed is torch-only",
    "offload_optimizer_device": "DeepSpeed is torch-only",
    "offload_optimizer_nvme_path": "DeepSpeed is torch-only",
    "offload_param_device": "DeepSpeed is torch-only",
    "offload_param_nvme_path": "DeepSpeed is torch-only",
    "zero3_init_flag": "DeepSpeed is torch-only",
    "zero3_save_16bit_model": "DeepSpeed is torch-only",
    "fp16_master_weights_and_gradients": "DeepSpeed is torch-only",
    "huggingface_repo_id": "uploading to the Hugging Face Hub is not implemented",
    "huggingface_repo_type": "uploading to the Hugging Face Hub is not implemented",
    "huggingface_path_in_repo": "uploading to the Hugging Face Hub is not implemented",
    "huggingface_token": "uploading to the Hugging Face Hub is not implemented",
    "huggingface_repo_visibility": "uploading to the Hugging Face Hub is not implemented",
    "save_state_to_huggingface": "uploading to the Hugging Face Hub is not implemented",
    "resume_from_huggingface": "resuming from the Hugging Face Hub is not implemented",
    "async_upload": "uploading to the Hugging Face Hub is not implemented",
    "wandb_run_name": "wandb logging is not implemented",
    "wandb_api_key": "wandb logging is not implemented",
    "log_tracker_config": "tracker configuration files are not implemented",
    "masked_loss": "masked loss is not implemented",
    "conditioning_data_dir": "ControlNet conditioning images are for ControlNet training",
    "base_weights": "merging networks into the model before training is not implemented",
    "base_weights_multiplier": "merging networks into the model before training is not implemented",
    "initial_epoch": "starting at a given epoch is not implemented",
    "initial_step": "starting at a given step is not implemented",
    "skip_until_initial_step": "starting at a given step is not implemented",
    "use_8bit_adam": "8-bit optimizers (bitsandbytes) are CUDA-only",
    "fused_backward_pass": "fused optimizer steps in the backward pass are not implemented",
    "lr_scheduler_type": "custom scheduler classes are not supported; use --lr_scheduler",
    "full_fp16": "the LoRA always trains in fp32, --mixed_precision fp16 stores the frozen model in fp16; "
                 "add --save_precision fp16 to save the fp16 file sd-scripts would write with it",
    "full_bf16": "the LoRA always trains in fp32, --mixed_precision bf16 stores the frozen model in bf16; "
                 "add --save_precision bf16 to save the bf16 file sd-scripts would write with it",
}

# argument -> (values accepted besides its default, why others are refused)
UNSUPPORTED_VALUES = {
    "log_with": (("tensorboard",), "wandb logging is not implemented, and all includes wandb"),
    "save_model_as": ((), "pickle formats need torch"),
    "network_module": ((NETWORK_MODULE,), f"the only network here is {NETWORK_MODULE}"),
}

# keys --output_config leaves out, as sd-scripts: the config's own path, and a secret
NOT_WRITTEN_TO_CONFIG = ("config_file", "output_config", "wandb_api_key")

# sd-scripts accepts a single number in a TOML file for this list argument and keeps it unwrapped
SCALAR_OR_LIST = ("text_encoder_lr",)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train an SDXL LoRA (sd-scripts' sdxl_train_network.py arguments)")
    _add_logging_arguments(parser)
    _add_model_arguments(parser)
    _add_model_spec_arguments(parser)
    add_dataset_arguments(parser)
    _add_saving_arguments(parser)
    _add_training_arguments(parser)
    _add_noise_and_loss_arguments(parser)
    _add_sampling_arguments(parser)
    _add_distributed_arguments(parser)
    add_optimizer_arguments(parser)
    _add_config_arguments(parser)
    _add_network_arguments(parser)
    _add_our_arguments(parser)
    _mark_unsupported_in_help(parser)
    return parser


def _add_logging_arguments(parser):
    add = parser.add_argument
    levels = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    add("--console_log_level", type=str, default=None, choices=levels, help="console log level (default INFO)")
    add("--console_log_file", type=str, default=None, help="also write the console log to this file")
    add("--console_log_simple", action="store_true", help="plain log lines")
    add("--logging_dir", type=str, default=None, help="write tensorboard logs under this folder")
    add("--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"], help="experiment logger")
    add("--log_prefix", type=str, default=None, help="prefix of the timestamped log folder")
    add("--log_tracker_name", type=str, default=None, help="tracker (run) name, default network_train")
    add("--log_tracker_config", type=str, default=None, help="tracker configuration file")
    add("--wandb_run_name", type=str, default=None, help="wandb run name")
    add("--wandb_api_key", type=str, default=None, help="wandb API key")
    add("--log_config", action="store_true", help="log the training configuration")


def _add_model_arguments(parser):
    add = parser.add_argument
    add("--v2", action="store_true", help="SD 2.x base model")
    add("--v_parameterization", action="store_true", help="train with v-prediction targets")
    add("--pretrained_model_name_or_path", type=str, default=None, help="SDXL checkpoint file or diffusers folder")
    add("--tokenizer_cache_dir", type=str, default=None, help="load the tokenizers from (and save them to) here")
    add("--vae", type=str, default=None, help="VAE to use instead of the checkpoint's")
    add("--no_half_vae", action="store_true", help="keep the VAE in float32 with mixed precision")
    add("--disable_mmap_load_safetensors", action="store_true",
        help="read checkpoints without mmap (always so here: tensors are read one at a time with positioned reads)")
    add("--clip_skip", type=int, default=None, help="use the output of the n-th last text encoder layer")


def _add_model_spec_arguments(parser):
    fields = ["title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from"]
    for field in fields + ["trigger_phrase", "preprocessor", "is_negative_embedding"]:
        parser.add_argument(f"--metadata_{field}", type=str, default=None, help=f"modelspec.{field} in the saved file")


def _add_saving_arguments(parser):
    add = parser.add_argument
    add("--output_dir", type=str, default=None, help="folder for the trained LoRA files")
    add("--output_name", type=str, default=None, help="file name of the LoRA, without extension")
    add("--huggingface_repo_id", type=str, default=None, help="Hub repository to upload to")
    add("--huggingface_repo_type", type=str, default=None, help="Hub repository type")
    add("--huggingface_path_in_repo", type=str, default=None, help="path inside the Hub repository")
    add("--huggingface_token", type=str, default=None, help="Hub token")
    add("--huggingface_repo_visibility", type=str, default=None, help="Hub repository visibility")
    add("--save_state_to_huggingface", action="store_true", help="upload training states to the Hub")
    add("--resume_from_huggingface", action="store_true", help="resume from a state on the Hub")
    add("--async_upload", action="store_true", help="upload to the Hub in the background")
    precisions = [None, "float", "fp16", "bf16"]
    add("--save_precision", type=str, default=None, choices=precisions, help="dtype of the saved LoRA")
    add("--save_every_n_epochs", type=int, default=None, help="save every N epochs")
    add("--save_every_n_steps", type=int, default=None, help="save every N steps")
    add("--save_n_epoch_ratio", type=int, default=None, help="save at least N files over the whole training")
    add("--save_last_n_epochs", type=int, default=None, help="keep only the last N epoch saves")
    add("--save_last_n_epochs_state", type=int, default=None, help="keep only the last N epoch states")
    add("--save_last_n_steps", type=int, default=None, help="keep only saves of the last N steps")
    add("--save_last_n_steps_state", type=int, default=None, help="keep only states of the last N steps")
    add("--save_state", action="store_true", help="also save the training state (optimizer, step) with each save")
    add("--save_state_on_train_end", action="store_true", help="save the training state at the end")
    add("--resume", type=str, default=None, help="resume from this saved training state folder")
    add("--no_metadata", action="store_true", help="write only the minimal metadata into the LoRA file")
    formats = [None, "ckpt", "pt", "safetensors"]
    add("--save_model_as", type=str, default="safetensors", choices=formats, help="file format of the LoRA")
    add("--training_comment", type=str, default=None, help="comment stored in the metadata")


def _add_training_arguments(parser):
    add = parser.add_argument
    add("--max_train_steps", type=int, default=1600, help="number of training steps")
    add("--max_train_epochs", type=int, default=None, help="number of epochs (overrides --max_train_steps)")
    add("--seed", type=int, default=None, help="random seed (default: random)")
    add("--gradient_checkpointing", action="store_true", help="recompute activations in the backward pass")
    add("--gradient_accumulation_steps", type=int, default=1, help="steps accumulated per optimizer update")
    add("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="mixed precision")
    add("--full_fp16", action="store_true", help="fp16 training including gradients")
    add("--full_bf16", action="store_true", help="bf16 training including gradients")
    add("--fp8_base", action="store_true", help="fp8 base model weights")
    add("--fp8_base_unet", action="store_true", help="fp8 U-Net weights")
    add("--cpu_offload_checkpointing", action="store_true", help="offload checkpointed tensors to the CPU")
    add("--lowram", action="store_true", help="load the model straight to the accelerator")
    add("--highvram", action="store_true", help="skip memory-saving steps")
    add("--mem_eff_attn", action="store_true", help="memory-efficient attention")
    add("--xformers", action="store_true", help="xformers attention")
    add("--sdpa", action="store_true", help="torch scaled_dot_product_attention")
    add("--torch_compile", action="store_true", help="torch.compile")
    backends = ["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi", "fx2trt"]
    backends += ["onnxrt", "tensort", "ipex", "tvm"]
    add("--dynamo_backend", type=str, default="inductor", choices=backends, help="torch dynamo backend")
    add("--cache_text_encoder_outputs", action="store_true", help="cache text-encoder outputs (U-Net only training)")
    add("--cache_text_encoder_outputs_to_disk", action="store_true", help="cache them in _te_outputs.npz files")
    add("--masked_loss", action="store_true", help="mask the loss with conditioning images or alpha")
    add("--conditioning_data_dir", type=str, default=None, help="ControlNet conditioning images")
    add("--skip_until_initial_step", action="store_true", help="skip batches until --initial_step")
    add("--initial_epoch", type=int, default=None, help="epoch to start at (1: the first)")
    add("--initial_step", type=int, default=None, help="step to start at (0: the first)")
    add("--validate_every_n_steps", type=int, default=None, help="validate every N steps")
    add("--validate_every_n_epochs", type=int, default=None, help="validate every N epochs")
    add("--max_validation_steps", type=int, default=None, help="validation items per validation")


def _add_noise_and_loss_arguments(parser):
    add = parser.add_argument
    add("--noise_offset", type=float, default=None, help="noise offset (around 0.1)")
    add("--noise_offset_random_strength", action="store_true", help="random noise offset in [0, noise_offset]")
    add("--multires_noise_iterations", type=int, default=None, help="pyramid noise iterations (6-10)")
    add("--ip_noise_gamma", type=float, default=None, help="input perturbation noise (around 0.1)")
    add("--ip_noise_gamma_random_strength", action="store_true", help="random ip noise in [0, ip_noise_gamma]")
    add("--multires_noise_discount", type=float, default=0.3, help="pyramid noise discount")
    add("--adaptive_noise_scale", type=float, default=None, help="noise offset added in proportion to latent mean")
    add("--zero_terminal_snr", action="store_true", help="rescale the schedule to zero terminal SNR")
    add("--min_timestep", type=int, default=None, help="smallest training timestep (default 0)")
    add("--max_timestep", type=int, default=None, help="largest training timestep, exclusive (default 1000)")
    add("--loss_type", type=str, default="l2", choices=["l1", "l2", "huber", "smooth_l1"], help="loss function")
    schedules = ["constant", "exponential", "snr"]
    add("--huber_schedule", type=str, default="snr", choices=schedules, help="Huber threshold over timesteps")
    add("--huber_c", type=float, default=0.1, help="Huber threshold")
    add("--huber_scale", type=float, default=1.0, help="Huber loss scale")
    add("--min_snr_gamma", type=float, default=None, help="min-SNR weighting gamma (5 recommended)")
    add("--scale_v_pred_loss_like_noise_pred", action="store_true", help="scale the v-prediction loss like epsilon")
    add("--v_pred_like_loss", type=float, default=None, help="add a v-prediction-like loss with this weight")
    add("--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    add("--weighted_captions", action="store_true", help="(word:1.2) prompt weighting in captions")


def _add_sampling_arguments(parser):
    add = parser.add_argument
    add("--sample_every_n_steps", type=int, default=None, help="render sample images every N steps")
    add("--sample_at_first", action="store_true", help="render sample images before training")
    add("--sample_every_n_epochs", type=int, default=None, help="render sample images every N epochs")
    add("--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json) for sample images")
    samplers = ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++"]
    samplers += ["dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]
    add("--sample_sampler", type=str, default="ddim", choices=samplers, help="sampler of the sample images")


def _add_distributed_arguments(parser):
    add = parser.add_argument
    add("--ddp_timeout", type=int, default=None, help="DDP timeout in minutes")
    add("--ddp_gradient_as_bucket_view", action="store_true", help="DDP gradient_as_bucket_view")
    add("--ddp_static_graph", action="store_true", help="DDP static_graph")
    add("--deepspeed", action="store_true", help="DeepSpeed training")
    add("--zero_stage", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    add("--offload_optimizer_device", type=str, default=None, choices=[None, "cpu", "nvme"], help="ZeRO offload")
    add("--offload_optimizer_nvme_path", type=str, default=None, help="ZeRO offload path")
    add("--offload_param_device", type=str, default=None, choices=[None, "cpu", "nvme"], help="ZeRO-3 offload")
    add("--offload_param_nvme_path", type=str, default=None, help="ZeRO-3 offload path")
    add("--zero3_init_flag", action="store_true", help="ZeRO-3 init")
    add("--zero3_save_16bit_model", action="store_true", help="ZeRO-3 16-bit save")
    add("--fp16_master_weights_and_gradients", action="store_true", help="DeepSpeed fp16 master weights")


def _add_config_arguments(parser):
    add = parser.add_argument
    add("--config_file", type=str, default=None, help="arguments from this .toml file; the command line wins")
    add("--output_config", action="store_true", help="write the command line's arguments to --config_file, exit")


def _add_network_arguments(parser):
    add = parser.add_argument
    add("--unet_lr", type=float, default=None, help="learning rate of the U-Net LoRA")
    add("--text_encoder_lr", type=float, default=None, nargs="*", help="learning rate of the text-encoder LoRA")
    add("--network_weights", type=str, default=None, help="start from these LoRA weights")
    add("--network_module", type=str, default=None, help=f"network to train ({NETWORK_MODULE})")
    add("--network_dim", type=int, default=None, help="LoRA rank (default 4)")
    add("--network_alpha", type=float, default=1, help="LoRA alpha (scale alpha/rank)")
    add("--network_dropout", type=float, default=None, help="dropout of the LoRA down-projection output")
    add("--network_args", type=str, default=None, nargs="*", help="network options as key=value")
    add("--network_train_unet_only", action="store_true", help="train the U-Net LoRA only")
    add("--network_train_text_encoder_only", action="store_true", help="train the text-encoder LoRA only")
    add("--dim_from_weights", action="store_true", help="take ranks from --network_weights")
    add("--scale_weight_norms", type=float, default=None, help="max-norm regularisation of LoRA weights")
    add("--base_weights", type=str, default=None, nargs="*", help="LoRA files merged before training")
    add("--base_weights_multiplier", type=float, default=None, nargs="*", help="multipliers of --base_weights")


def _add_our_arguments(parser):
    add = parser.add_argument
    add("--pynative", action="store_true", help="(ours) run the train step eagerly for debugging; default compiles it")


def _mark_unsupported_in_help(parser):
    for action in parser._actions:
        if action.dest in UNSUPPORTED_ARGUMENTS:
            action.help = f"not supported: {UNSUPPORTED_ARGUMENTS[action.dest]}"
        elif action.dest in UNSUPPORTED_VALUES:
            accepted, reason = UNSUPPORTED_VALUES[action.dest]
            shown = ", ".join(str(value) for value in (action.default, *accepted) if value is not None)
            action.help = f"{action.help}; supported here: {shown}"


def parse_args(argv=None) -> argparse.Namespace:
    """The training arguments from `argv` (default sys.argv[1:]) and --config_file, checked.

    With --output_config, writes the command line's arguments to --config_file and exits (status 0).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = setup_parser()
    args = parser.parse_args(argv)
    if args.output_config:
        refuse_unsupported(args, parser)
        path = write_config_file(args, parser)
        print(f"wrote {path}")
        raise SystemExit(0)
    args = read_config_file(args, parser, argv)
    refuse_unsupported(args, parser)
    verify_args(args)
    return args


def config_path(config_file: str) -> str:
    """sd-scripts adds .toml to a --config_file given without it."""
    return config_file if config_file.endswith(".toml") else config_file + ".toml"


def read_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Apply --config_file: file values replace defaults, and `argv` (as `args` was parsed from) wins over both.

    As sd-scripts, top-level keys and the keys of every [section] form one flat set of argument names;
    the section names themselves mean nothing.
    """
    if not args.config_file:
        return args
    path = config_path(args.config_file)
    if not os.path.isfile(path):
        raise UserError(f"--config_file {path}: file not found")
    values = _flatten_sections(_load_toml(path), path)
    actions = {action.dest: action for action in parser._actions if action.dest != "help"}
    from_file = {key: _config_value(actions, key, value, path) for key, value in values.items()}
    # argparse keeps attributes already present in the namespace unless the command line sets them
    return parser.parse_args(sys.argv[1:] if argv is None else list(argv), namespace=argparse.Namespace(**from_file))


def _load_toml(path):
    try:
        with open(path, encoding="utf-8") as file:
            return toml.load(file)
    except toml.TomlDecodeError as error:
        raise UserError(f"{path}: not valid TOML at line {error.lineno}, column {error.colno}: {error.msg}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None


def _flatten_sections(document, path):
    flat, where = {}, {}
    for name, value in document.items():
        section_items = value.items() if isinstance(value, dict) else [(name, value)]
        place = f"[{name}]" if isinstance(value, dict) else "the top level"
        for key, item in section_items:
            if key in flat:
                raise UserError(f"{path}: {key} is set twice (in {where[key]} and {place}); keep one")
            flat[key], where[key] = item, place
    return flat


def _config_value(actions, key, value, path):
    """The value the command line would give for `key`, from a TOML value; UserError if it has none."""
    where = f"{path}: {key}"
    if key not in actions:
        # sd-scripts silently keeps unknown keys, so a typo there quietly trains with the default
        close = difflib.get_close_matches(key, actions, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UserError(f"{path}: unknown key {key!r}; {hint}keys are the names of the command-line arguments")
    action = actions[key]
    if key in ("config_file", "output_config"):
        raise UserError(f"{where} belongs on the command line, not in a config file; remove it")
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise UserError(f"{where} = {value!r}: expected true or false")
        return value
    if action.nargs in ("*", "+"):
        if isinstance(value, list):
            return [_config_scalar(action, where, item) for item in value]
        if key in SCALAR_OR_LIST:
            return _config_scalar(action, where, value)
        raise UserError(f"{where} = {value!r}: expected a list, e.g. {key} = [{value!r}]")
    return _config_scalar(action, where, value)


def _config_scalar(action, where, value):
    if isinstance(value, (bool, list, dict)):
        raise UserError(f"{where} = {value!r}: expected {_type_name(action)}")
    if action.type is float and isinstance(value, (int, float)):
        # keep TOML's int as sd-scripts does: the ss_* metadata then records the same text
        converted = value
    else:
        try:
            converted = (action.type or str)(value if isinstance(value, str) else str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise UserError(f"{where} = {value!r}: expected {_type_name(action)}") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(repr(choice) for choice in action.choices if choice is not None)
        raise UserError(f"{where} = {value!r}: expected one of {choices}")
    return converted


def _type_name(action):
    names = {int: "an integer", float: "a number", str: "a string", None: "a string", Path: "a path string"}
    return names.get(action.type, f"a value accepted by --{action.dest}")


def write_config_file(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """sd-scripts' --output_config: the arguments that differ from their defaults, as flat TOML, written to
    --config_file (.toml added if missing), which must not exist yet. Returns the path written."""
    if not args.config_file:
        raise UserError("--output_config needs --config_file naming the .toml file to write")
    path = config_path(args.config_file)
    if os.path.exists(path):
        raise UserError(f"--output_config: {path} already exists; remove it or choose another --config_file")
    defaults = vars(parser.parse_args([]))
    values = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key not in NOT_WRITTEN_TO_CONFIG and value != defaults.get(key)
    }
    _write_atomically(path, toml.dumps(values))
    return path


def _write_atomically(path, text):
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def refuse_unsupported(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """UserError naming the first argument set (to a value other than its default) that we cannot honour."""
    for name, reason in UNSUPPORTED_ARGUMENTS.items():
        if getattr(args, name) != parser.get_default(name):
            raise UserError(f"--{name} is not supported ({reason}); remove it")
    for name, (accepted, reason) in UNSUPPORTED_VALUES.items():
        value, default = getattr(args, name), parser.get_default(name)
        if value != default and value not in accepted:
            keep = " or ".join(f"--{name} {choice}" for choice in (default, *accepted) if choice is not None)
            raise UserError(f"--{name} {value} is not supported ({reason}); use {keep} or remove it")
    refuse_unsupported_arguments(args)


def verify_args(args: argparse.Namespace) -> None:
    """sd-scripts' cross-argument checks that apply to SDXL LoRA training, as one-line UserErrors.

    Like sd-scripts, it also completes `args`: the *_to_disk caches imply the in-memory ones, a sample
    interval of 0 or less turns sampling off, and a missing --network_module means networks.lora.
    """
    for name in ("pretrained_model_name_or_path", "output_dir"):
        if getattr(args, name) is None:
            raise UserError(f"--{name} is required")
    _check_loss_arguments(args)
    _check_network_arguments(args)
    _check_schedule_arguments(args)
    _complete_implied_arguments(args)


def _check_loss_arguments(args):
    if args.adaptive_noise_scale is not None and args.noise_offset is None:
        raise UserError("--adaptive_noise_scale needs --noise_offset")
    if args.scale_v_pred_loss_like_noise_pred and not args.v_parameterization:
        raise UserError("--scale_v_pred_loss_like_noise_pred needs --v_parameterization")
    if args.v_pred_like_loss and args.v_parameterization:
        raise UserError("--v_pred_like_loss cannot be used with --v_parameterization")


def _check_network_arguments(args):
    if args.network_train_unet_only and args.network_train_text_encoder_only:
        raise UserError("--network_train_unet_only with --network_train_text_encoder_only trains nothing; keep one")
    caches_text = args.cache_text_encoder_outputs or args.cache_text_encoder_outputs_to_disk
    if caches_text and not args.network_train_unet_only:
        raise UserError(
            "--cache_text_encoder_outputs needs --network_train_unet_only (a text-encoder LoRA needs live outputs)"
        )
    if args.dim_from_weights and args.network_weights is None:
        raise UserError("--dim_from_weights needs --network_weights")
    if isinstance(args.text_encoder_lr, list) and len(args.text_encoder_lr) > 1:
        raise UserError(
            f"--text_encoder_lr: {NETWORK_MODULE} takes one learning rate for both text encoders "
            f"(sd-scripts would use only the first of {args.text_encoder_lr}); give one value"
        )


def _check_schedule_arguments(args):
    if args.lr_scheduler.split(":")[0] not in SUPPORTED_SCHEDULERS:
        raise UserError(f"--lr_scheduler {args.lr_scheduler}: unknown; use one of {', '.join(SUPPORTED_SCHEDULERS)}")
    for name in ("lr_warmup_steps", "lr_decay_steps"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} {getattr(args, name)}: must be a step count or a ratio in [0, 1)")


def _complete_implied_arguments(args):
    if args.cache_latents_to_disk:
        args.cache_latents = True
    if args.cache_text_encoder_outputs_to_disk:
        args.cache_text_encoder_outputs = True
    for name in ("sample_every_n_epochs", "sample_every_n_steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            logger.warning("--%s %s is 0 or less: sampling at that interval is off", name, getattr(args, name))
            setattr(args, name, None)
    if args.network_module is None:
        args.network_module = NETWORK_MODULE
