"""The ss_* / modelspec.* metadata of a training run, filled as sd-scripts' train_network.py fills it."""

from library.lora_metadata import modelspec_from_args, source_model_metadata


def training_metadata(args, dataset_group, network, session_id, training_started_at, optimizer_name,
                      optimizer_args, num_epochs) -> dict:
    metadata = {
        "ss_session_id": session_id,
        "ss_training_started_at": training_started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": args.text_encoder_lr[0] if isinstance(args.text_encoder_lr, list) else args.text_encoder_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": bool(args.cache_latents),
        "ss_seed": args.seed,
        "ss_lowram": args.lowram,
        "ss_noise_offset": args.noise_offset,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_training_comment": args.training_comment,
        "ss_sd_scripts_commit_hash": "(unknown)",
        "ss_optimizer": optimizer_name + (f"({optimizer_args})" if optimizer_args else ""),
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_caption_dropout_rate": args.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": args.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate,
        "ss_face_crop_aug_range": args.face_crop_aug_range,
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_noise_offset_random_strength": args.noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule,
        "ss_huber_scale": args.huber_scale,
        "ss_huber_c": args.huber_c,
        "ss_fp8_base": bool(args.fp8_base),
        "ss_fp8_base_unet": bool(args.fp8_base_unet),
        "ss_validation_seed": args.validation_seed,
        "ss_validation_split": args.validation_split,
        "ss_max_validation_steps": args.max_validation_steps,
        "ss_validate_every_n_epochs": args.validate_every_n_epochs,
        "ss_validate_every_n_steps": args.validate_every_n_steps,
        "ss_resize_interpolation": args.resize_interpolation,
    }
    metadata.update(network.metadata())
    metadata.update(dataset_group.metadata())
    metadata.update(source_model_metadata(args.pretrained_model_name_or_path, args.vae))
    metadata.update(modelspec_from_args(args))
    return metadata
