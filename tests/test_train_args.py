"""The training command line: sd-scripts' names and defaults, --config_file, --output_config, refusals, checks."""

import argparse
import textwrap
from pathlib import Path

import pytest
import toml

from library.errors import UserError
from library.train_args import parse_args, setup_parser

REQUIRED = ["--pretrained_model_name_or_path", "sdxl.safetensors", "--output_dir", "out"]

# Every argument sd-scripts' sdxl_train_network.py setup_parser() registers (train_network.setup_parser plus
# add_sdxl_training_arguments), in its registration order.
SD_SCRIPTS_ARGUMENTS = """
console_log_level console_log_file console_log_simple v2 v_parameterization pretrained_model_name_or_path
tokenizer_cache_dir metadata_title metadata_author metadata_description metadata_license metadata_tags
metadata_usage_hint metadata_thumbnail metadata_merged_from metadata_trigger_phrase metadata_preprocessor
metadata_is_negative_embedding train_data_dir cache_info shuffle_caption caption_separator caption_extension
caption_extention keep_tokens keep_tokens_separator secondary_separator enable_wildcard caption_prefix
caption_suffix color_aug flip_aug face_crop_aug_range random_crop debug_dataset resolution cache_latents
vae_batch_size cache_latents_to_disk skip_cache_check enable_bucket min_bucket_reso max_bucket_reso
bucket_reso_steps bucket_no_upscale resize_interpolation token_warmup_min token_warmup_step alpha_mask
dataset_class caption_dropout_rate caption_dropout_every_n_epochs caption_tag_dropout_rate reg_data_dir in_json
dataset_repeats output_dir output_name huggingface_repo_id huggingface_repo_type huggingface_path_in_repo
huggingface_token huggingface_repo_visibility save_state_to_huggingface resume_from_huggingface async_upload
save_precision save_every_n_epochs save_every_n_steps save_n_epoch_ratio save_last_n_epochs
save_last_n_epochs_state save_last_n_steps save_last_n_steps_state save_state save_state_on_train_end resume
train_batch_size max_token_length mem_eff_attn torch_compile dynamo_backend xformers sdpa vae max_train_steps
max_train_epochs max_data_loader_n_workers persistent_data_loader_workers seed gradient_checkpointing
gradient_accumulation_steps mixed_precision full_fp16 full_bf16 fp8_base ddp_timeout ddp_gradient_as_bucket_view
ddp_static_graph clip_skip logging_dir log_with log_prefix log_tracker_name wandb_run_name log_tracker_config
wandb_api_key log_config noise_offset noise_offset_random_strength multires_noise_iterations ip_noise_gamma
ip_noise_gamma_random_strength multires_noise_discount adaptive_noise_scale zero_terminal_snr min_timestep
max_timestep loss_type huber_schedule huber_c huber_scale lowram highvram sample_every_n_steps sample_at_first
sample_every_n_epochs sample_prompts sample_sampler config_file output_config prior_loss_weight
conditioning_data_dir masked_loss deepspeed zero_stage offload_optimizer_device offload_optimizer_nvme_path
offload_param_device offload_param_nvme_path zero3_init_flag zero3_save_16bit_model
fp16_master_weights_and_gradients optimizer_type use_8bit_adam use_lion_optimizer learning_rate max_grad_norm
optimizer_args lr_scheduler_type lr_scheduler_args lr_scheduler lr_warmup_steps lr_decay_steps
lr_scheduler_num_cycles lr_scheduler_power fused_backward_pass lr_scheduler_timescale lr_scheduler_min_lr_ratio
dataset_config min_snr_gamma scale_v_pred_loss_like_noise_pred v_pred_like_loss debiased_estimation_loss
weighted_captions cpu_offload_checkpointing no_metadata save_model_as unet_lr text_encoder_lr fp8_base_unet
network_weights network_module network_dim network_alpha network_dropout network_args network_train_unet_only
network_train_text_encoder_only training_comment dim_from_weights scale_weight_norms base_weights
base_weights_multiplier no_half_vae skip_until_initial_step initial_epoch initial_step validation_seed
validation_split validate_every_n_steps validate_every_n_epochs max_validation_steps cache_text_encoder_outputs
cache_text_encoder_outputs_to_disk disable_mmap_load_safetensors
""".split()

OUR_ARGUMENTS = {"pynative", "skip_bad_images"}

# argument -> default in sd-scripts' parser, read from its source (train_util.py, train_network.py,
# sdxl_train_util.py, custom_train_functions.py, deepspeed_utils.py, utils.py, sai_model_spec.py)
SD_SCRIPTS_DEFAULTS = {
    "learning_rate": 2e-6,
    "max_train_steps": 1600,
    "max_train_epochs": None,
    "network_dim": None,
    "network_alpha": 1,
    "network_dropout": None,
    "network_module": None,
    "network_args": None,
    "unet_lr": None,
    "text_encoder_lr": None,
    "optimizer_type": "",
    "optimizer_args": None,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "lr_decay_steps": 0,
    "lr_scheduler_num_cycles": 1,
    "lr_scheduler_power": 1,
    "lr_scheduler_type": "",
    "lr_scheduler_min_lr_ratio": None,
    "save_precision": None,
    "mixed_precision": "no",
    "max_grad_norm": 1.0,
    "noise_offset": None,
    "multires_noise_discount": 0.3,
    "min_snr_gamma": None,
    "huber_c": 0.1,
    "huber_scale": 1.0,
    "huber_schedule": "snr",
    "loss_type": "l2",
    "sample_sampler": "ddim",
    "save_model_as": "safetensors",
    "max_token_length": None,
    "caption_extension": ".caption",
    "caption_separator": ",",
    "keep_tokens": 0,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "max_data_loader_n_workers": 8,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "vae_batch_size": 1,
    "prior_loss_weight": 1.0,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
    "dynamo_backend": "inductor",
    "zero_stage": 2,
    "seed": None,
    "resolution": None,
    "output_name": None,
    "save_every_n_epochs": None,
    "v_pred_like_loss": None,
    "validation_split": 0.0,
    "gradient_checkpointing": False,
    "cache_latents": False,
    "network_train_unet_only": False,
    "xformers": False,
    "config_file": None,
    "output_config": False,
}

SD_SCRIPTS_CHOICES = {
    "mixed_precision": ["no", "fp16", "bf16"],
    "save_precision": [None, "float", "fp16", "bf16"],
    "save_model_as": [None, "ckpt", "pt", "safetensors"],
    "loss_type": ["l1", "l2", "huber", "smooth_l1"],
    "huber_schedule": ["constant", "exponential", "snr"],
    "max_token_length": [None, 150, 225],
    "log_with": ["tensorboard", "wandb", "all"],
    "zero_stage": [0, 1, 2, 3],
    "sample_sampler": [
        "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
        "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
    ],  # fmt: skip
}


def write(tmp_path, text, name="train.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def user_error(argv):
    with pytest.raises(UserError) as caught:
        parse_args(argv)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_registers_exactly_sd_scripts_arguments_plus_ours():
    registered = [action.dest for action in setup_parser()._actions if action.dest != "help"]
    assert len(SD_SCRIPTS_ARGUMENTS) == 196
    assert set(registered) == set(SD_SCRIPTS_ARGUMENTS) | OUR_ARGUMENTS
    assert len(registered) == len(set(registered))


@pytest.mark.parametrize("name, default", SD_SCRIPTS_DEFAULTS.items())
def test_default_equals_sd_scripts(name, default):
    value = setup_parser().get_default(name)
    assert value == default and type(value) is type(default)


@pytest.mark.parametrize("name, choices", SD_SCRIPTS_CHOICES.items())
def test_choices_equal_sd_scripts(name, choices):
    action = next(action for action in setup_parser()._actions if action.dest == name)
    assert list(action.choices) == choices


def test_types_parse_like_sd_scripts():
    args = parse_args(
        REQUIRED
        + ["--lr_warmup_steps", "0.05", "--lr_decay_steps", "10%", "--text_encoder_lr", "1e-5"]
        + ["--network_args", "conv_dim=4", "conv_alpha=1", "--network_alpha", "16", "--dataset_config", "d.toml"]
    )
    assert args.lr_warmup_steps == 0.05 and args.lr_decay_steps == 0.1
    assert args.text_encoder_lr == [1e-5]
    assert args.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert args.network_alpha == 16.0 and isinstance(args.network_alpha, float)
    assert args.dataset_config == Path("d.toml")
    assert parse_args(REQUIRED + ["--lr_warmup_steps", "100"]).lr_warmup_steps == 100


# (command line, what the one-line message starts with)
REFUSALS = [
    (["--xformers"], "--xformers is not supported"),
    (["--sdpa"], "--sdpa is not supported"),
    (["--mem_eff_attn"], "--mem_eff_attn is not supported"),
    (["--fp8_base"], "--fp8_base is not supported"),
    (["--fp8_base_unet"], "--fp8_base_unet is not supported"),
    (["--deepspeed"], "--deepspeed is not supported"),
    (["--zero_stage", "3"], "--zero_stage is not supported"),
    (["--offload_optimizer_device", "cpu"], "--offload_optimizer_device is not supported"),
    (["--offload_param_nvme_path", "/nvme"], "--offload_param_nvme_path is not supported"),
    (["--zero3_init_flag"], "--zero3_init_flag is not supported"),
    (["--zero3_save_16bit_model"], "--zero3_save_16bit_model is not supported"),
    (["--fp16_master_weights_and_gradients"], "--fp16_master_weights_and_gradients is not supported"),
    (["--lowram"], "--lowram is not supported"),
    (["--highvram"], "--highvram is not supported"),
    (["--huggingface_repo_id", "me/lora"], "--huggingface_repo_id is not supported"),
    (["--huggingface_token", "hf_x"], "--huggingface_token is not supported"),
    (["--huggingface_repo_visibility", "public"], "--huggingface_repo_visibility is not supported"),
    (["--save_state_to_huggingface"], "--save_state_to_huggingface is not supported"),
    (["--resume_from_huggingface"], "--resume_from_huggingface is not supported"),
    (["--async_upload"], "--async_upload is not supported"),
    (["--log_with", "wandb"], "--log_with wandb is not supported"),
    (["--log_with", "all"], "--log_with all is not supported"),
    (["--wandb_run_name", "run"], "--wandb_run_name is not supported"),
    (["--wandb_api_key", "key"], "--wandb_api_key is not supported"),
    (["--log_tracker_config", "trackers.toml"], "--log_tracker_config is not supported"),
    (["--torch_compile"], "--torch_compile is not supported"),
    (["--dynamo_backend", "eager"], "--dynamo_backend is not supported"),
    (["--ddp_timeout", "30"], "--ddp_timeout is not supported"),
    (["--ddp_gradient_as_bucket_view"], "--ddp_gradient_as_bucket_view is not supported"),
    (["--ddp_static_graph"], "--ddp_static_graph is not supported"),
    (["--cpu_offload_checkpointing"], "--cpu_offload_checkpointing is not supported"),
    (["--fused_backward_pass"], "--fused_backward_pass is not supported"),
    (["--use_8bit_adam"], "--use_8bit_adam is not supported"),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR"], "--lr_scheduler_type is not supported"),
    (["--masked_loss"], "--masked_loss is not supported"),
    (["--network_module", "networks.lycoris"], "--network_module networks.lycoris is not supported"),
    (["--base_weights", "a.safetensors"], "--base_weights is not supported"),
    (["--base_weights_multiplier", "0.5"], "--base_weights_multiplier is not supported"),
    (["--initial_epoch", "2"], "--initial_epoch is not supported"),
    (["--initial_step", "100"], "--initial_step is not supported"),
    (["--skip_until_initial_step"], "--skip_until_initial_step is not supported"),
    (["--conditioning_data_dir", "cond"], "--conditioning_data_dir is not supported"),
    (["--v2"], "--v2 is not supported"),
    (["--clip_skip", "2"], "--clip_skip is not supported"),
    (["--weighted_captions"], "--weighted_captions is not supported"),
    (["--save_model_as", "ckpt"], "--save_model_as ckpt is not supported"),
    (["--save_model_as", "pt"], "--save_model_as pt is not supported"),
    (["--face_crop_aug_range", "2.0,4.0"], "--face_crop_aug_range is not supported"),
    (["--debug_dataset"], "--debug_dataset is not supported"),
]


@pytest.mark.parametrize("argv, start", REFUSALS, ids=[argv[0] + "=" + argv[-1] for argv, _ in REFUSALS])
def test_refusal_is_one_line_naming_the_argument(argv, start):
    assert user_error(REQUIRED + argv).startswith(start)


def test_refusal_applies_to_config_file_values(tmp_path):
    config = write(tmp_path, "[attention]\nsdpa = true\n")
    assert user_error(REQUIRED + ["--config_file", config]).startswith("--sdpa is not supported")


@pytest.mark.parametrize(
    "argv",
    [["--log_with", "tensorboard"], ["--network_module", "networks.lora"], ["--save_model_as", "safetensors"],
     ["--disable_mmap_load_safetensors"]],
)
def test_supported_values_of_partly_supported_arguments(argv):
    parse_args(REQUIRED + argv)


# (extra command line, the one-line message names these)
CHECKS = [
    (["--output_dir", "out"], "--pretrained_model_name_or_path is required"),
    (["--adaptive_noise_scale", "0.01"], "--adaptive_noise_scale needs --noise_offset"),
    (["--scale_v_pred_loss_like_noise_pred"], "--scale_v_pred_loss_like_noise_pred needs --v_parameterization"),
    (["--v_parameterization", "--v_pred_like_loss", "0.1"], "--v_pred_like_loss cannot be used with --v_param"),
    (["--cache_text_encoder_outputs"], "--cache_text_encoder_outputs needs --network_train_unet_only"),
    (["--cache_text_encoder_outputs_to_disk"], "--cache_text_encoder_outputs needs --network_train_unet_only"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "--network_train_unet_only with --netw"),
    (["--dim_from_weights"], "--dim_from_weights needs --network_weights"),
    (["--text_encoder_lr", "1e-5", "2e-5"], "--text_encoder_lr: networks.lora takes one learning rate"),
    (["--lr_scheduler", "step"], "--lr_scheduler step: unknown"),
    (["--lr_warmup_steps", "-5"], "--lr_warmup_steps -5.0: must be a step count or a ratio"),
]


@pytest.mark.parametrize("extra, start", CHECKS, ids=[start.split(":")[0] for _, start in CHECKS])
def test_cross_argument_check(extra, start):
    argv = extra if start.endswith("is required") else REQUIRED + extra
    assert user_error(argv).startswith(start)


def test_output_dir_is_required():
    assert user_error(["--pretrained_model_name_or_path", "m.safetensors"]) == "--output_dir is required"


def test_implied_arguments_are_completed_as_sd_scripts():
    caches = ["--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only"]
    args = parse_args(REQUIRED + caches + ["--sample_every_n_steps", "0", "--sample_every_n_epochs", "-1"])
    assert args.cache_latents is True and args.cache_text_encoder_outputs is True
    assert args.sample_every_n_steps is None and args.sample_every_n_epochs is None
    assert args.network_module == "networks.lora"
    assert parse_args(REQUIRED + ["--sample_every_n_steps", "50"]).sample_every_n_steps == 50


def test_half_precision_lora_training_is_refused_with_the_save_precision_to_use():
    # sd-scripts would train and save the LoRA in bf16; here it trains in fp32, so the flag cannot be honoured.
    message = user_error(REQUIRED + ["--full_bf16", "--mixed_precision", "bf16"])
    assert message.startswith("--full_bf16 is not supported") and "--save_precision bf16" in message


CONFIG_EQUIVALENT_CLI = REQUIRED + [
    "--network_dim", "16", "--network_alpha", "8", "--learning_rate", "1e-4", "--lr_warmup_steps", "0.1",
    "--network_args", "conv_dim=4", "conv_alpha=1", "--text_encoder_lr", "5e-5", "--cache_latents", "--enable_bucket",
    "--resolution", "1024,1024", "--mixed_precision", "bf16", "--dataset_config", "data.toml", "--max_token_length",
    "225", "--optimizer_args", "weight_decay=0.1", "betas=(0.9,0.99)", "--save_every_n_epochs", "1",
]  # fmt: skip

CONFIG_EQUIVALENT_TOML = """
    pretrained_model_name_or_path = "sdxl.safetensors"
    output_dir = "out"

    [network_arguments]
    network_dim = 16
    network_alpha = 8.0
    network_args = ["conv_dim=4", "conv_alpha=1"]

    [optimizer_arguments]
    learning_rate = 1e-4
    lr_warmup_steps = 0.1
    text_encoder_lr = [5e-5]
    optimizer_args = ["weight_decay=0.1", "betas=(0.9,0.99)"]

    [training_arguments]
    cache_latents = true
    enable_bucket = true
    resolution = "1024,1024"
    mixed_precision = "bf16"
    dataset_config = "data.toml"
    max_token_length = 225
    save_every_n_epochs = 1
"""


def test_config_file_equals_command_line(tmp_path):
    config = write(tmp_path, CONFIG_EQUIVALENT_TOML)
    from_file = vars(parse_args(["--config_file", config]))
    from_cli = vars(parse_args(CONFIG_EQUIVALENT_CLI))
    assert from_file.pop("config_file") == config and from_cli.pop("config_file") is None
    assert from_file == from_cli
    assert type(from_file["network_alpha"]) is float and isinstance(from_file["dataset_config"], Path)


def test_precedence_is_command_line_then_file_then_default(tmp_path):
    config = write(
        tmp_path,
        """
        learning_rate = 1e-4
        max_train_steps = 500
        [network]
        network_dim = 32
        gradient_checkpointing = true
        """,
    )
    args = parse_args(REQUIRED + ["--config_file", config, "--learning_rate", "3e-4", "--max_train_steps", "1600"])
    assert args.learning_rate == 3e-4  # command line over file
    assert args.max_train_steps == 1600  # given on the command line with the default's value: still wins
    assert args.network_dim == 32 and args.gradient_checkpointing is True  # file over default
    assert args.network_alpha == 1 and args.lr_scheduler == "constant"  # default


def test_config_file_without_extension_gets_toml(tmp_path):
    write(tmp_path, "network_dim = 8\n")
    assert parse_args(REQUIRED + ["--config_file", str(tmp_path / "train")]).network_dim == 8


def test_config_keeps_toml_numbers_as_sd_scripts(tmp_path):
    # sd-scripts puts TOML values into the namespace as they are; its ss_* metadata then shows "16" and "0.0001"
    config = write(tmp_path, "network_alpha = 16\ntext_encoder_lr = 1e-4\n")
    args = parse_args(REQUIRED + ["--config_file", config])
    assert args.network_alpha == 16 and type(args.network_alpha) is int
    assert args.text_encoder_lr == 1e-4 and type(args.text_encoder_lr) is float


def test_unknown_config_key_names_key_and_file(tmp_path):
    config = write(tmp_path, "[training]\nlearning_rte = 1e-4\n")
    message = user_error(REQUIRED + ["--config_file", config])
    assert message.startswith(f"{config}: unknown key 'learning_rte'") and "did you mean learning_rate?" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ('learning_rate = "fast"', "learning_rate = 'fast': expected a number"),
        ("max_train_steps = 10.5", "max_train_steps = 10.5: expected an integer"),
        ('mixed_precision = "fp32"', "mixed_precision = 'fp32': expected one of 'no', 'fp16', 'bf16'"),
        ('cache_latents = "yes"', "cache_latents = 'yes': expected true or false"),
        ("network_dim = true", "network_dim = True: expected an integer"),
        ('network_args = "conv_dim=4"', "network_args = 'conv_dim=4': expected a list"),
        ('lr_warmup_steps = "soon"', "lr_warmup_steps = 'soon': expected a value accepted by --lr_warmup_steps"),
        ('config_file = "other.toml"', "config_file belongs on the command line"),
    ],
)
def test_config_value_the_command_line_would_reject(tmp_path, text, expected):
    config = write(tmp_path, text + "\n")
    assert user_error(REQUIRED + ["--config_file", config]).startswith(f"{config}: {expected}")


def test_malformed_toml_gives_line_and_column(tmp_path):
    config = write(tmp_path, 'network_dim = 8\nlearning_rate = = 1\n')
    message = user_error(REQUIRED + ["--config_file", config])
    assert message.startswith(f"{config}: not valid TOML at line 2, column ")


def test_key_set_in_two_sections_is_an_error(tmp_path):
    config = write(tmp_path, "[a]\nnetwork_dim = 8\n[b]\nnetwork_dim = 16\n")
    message = user_error(REQUIRED + ["--config_file", config])
    assert message == f"{config}: network_dim is set twice (in [a] and [b]); keep one"


def test_missing_config_file(tmp_path):
    message = user_error(REQUIRED + ["--config_file", str(tmp_path / "absent.toml")])
    assert message == f"--config_file {tmp_path / 'absent.toml'}: file not found"


def test_output_config_round_trip(tmp_path):
    config = str(tmp_path / "written.toml")
    with pytest.raises(SystemExit) as exited:
        parse_args(CONFIG_EQUIVALENT_CLI + ["--config_file", config, "--output_config"])
    assert exited.value.code == 0
    written = toml.load(config)
    # only values that differ from the defaults, flat, without config_file/output_config, paths as text
    assert written == {
        "pretrained_model_name_or_path": "sdxl.safetensors",
        "output_dir": "out",
        "network_dim": 16,
        "network_alpha": 8.0,
        "learning_rate": 1e-4,
        "lr_warmup_steps": 0.1,
        "network_args": ["conv_dim=4", "conv_alpha=1"],
        "text_encoder_lr": [5e-5],
        "cache_latents": True,
        "enable_bucket": True,
        "resolution": "1024,1024",
        "mixed_precision": "bf16",
        "dataset_config": "data.toml",
        "max_token_length": 225,
        "optimizer_args": ["weight_decay=0.1", "betas=(0.9,0.99)"],
        "save_every_n_epochs": 1,
    }
    read_back = vars(parse_args(["--config_file", config]))
    original = vars(parse_args(CONFIG_EQUIVALENT_CLI))
    assert read_back.pop("config_file") == config and original.pop("config_file") is None
    assert read_back == original
    assert sorted(path.name for path in tmp_path.iterdir()) == ["written.toml"]


def test_output_config_does_not_overwrite(tmp_path):
    config = write(tmp_path, "network_dim = 8\n")
    message = user_error(REQUIRED + ["--config_file", config, "--output_config"])
    assert message.startswith(f"--output_config: {config} already exists")
    assert Path(config).read_text() == "network_dim = 8\n"


def test_output_config_needs_config_file():
    message = user_error(REQUIRED + ["--output_config"])
    assert message == "--output_config needs --config_file naming the .toml file to write"


def test_our_additions_default_off():
    args = parse_args(REQUIRED)
    assert (args.pynative, args.skip_bad_images) == (False, False)
    assert isinstance(args, argparse.Namespace)
