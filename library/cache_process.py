"""Caching latents and text-encoder outputs in a child process, so that training never holds the encoders.

Why a process: in MindSpore 2.10 a compiled graph keeps its cells' parameters and its working memory until
the process ends (measured on CPU: deleting the cells, `gc`, `ms.runtime.empty_cache()` and
`ms.ms_memory_recycle()` free none of it). sd-scripts moves the VAE and text encoders off the GPU once
their outputs are cached; here the only way to give their memory back is to load them in a process that
exits. When training needs neither afterwards, the trainer process builds the UNet alone.
"""

import logging
import multiprocessing
import traceback
from typing import Sequence

from library.errors import UserError

logger = logging.getLogger(__name__)

# What caching sets on an ImageItem: the in-memory arrays, or the .npz files they were written to.
CACHE_ATTRIBUTES = ("latents", "latents_npz", "text_encoder_outputs", "text_encoder_outputs_npz")


def encoders_needed_after_caching(args) -> bool:
    """Whether training uses the VAE or a text encoder once the caches are built: to encode uncached batches,
    to train a text-encoder LoRA, to render sample prompts, or to shape the network from --network_weights
    (whose text-encoder modules must be matched against the text encoders)."""
    return not (args.cache_latents and args.cache_text_encoder_outputs and args.network_train_unet_only) or bool(
        args.sample_prompts or args.dim_from_weights)


def cache_in_child_process(trainer_class, args, world, groups: Sequence) -> None:
    """Build the caches of `groups` in a fresh process running `trainer_class`'s own caching (the same code
    as in the trainer process, on this rank's share), then set each item's cache attributes here."""
    context = multiprocessing.get_context("spawn")  # a fork would share this process's MindSpore runtime
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_cache_and_send, args=(trainer_class, args, world, list(groups), sender),
                            name="cache-encoders")
    logger.info("caching in a child process that loads the VAE and text encoders; this process loads the UNet "
                "alone afterwards")
    child.start()
    sender.close()
    try:
        for group in groups:
            for _, item in group.image_items():
                path, values = _receive(receiver, child, "item")
                if path != item.path:
                    raise RuntimeError(f"cache process: got {path} for {item.path}: the two dataset orders differ")
                for name, value in values.items():
                    setattr(item, name, value)
        _receive(receiver, child, "done")
    finally:
        receiver.close()
        child.join(timeout=60)
        if child.is_alive():
            child.terminate()


def _receive(receiver, child, expected: str):
    try:
        kind, *payload = receiver.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"the caching process ended without finishing (exit code {child.exitcode})") from None
    if kind == "user_error":
        raise UserError(payload[0])
    if kind == "failed":
        raise RuntimeError(f"the caching process failed:\n{payload[0]}")
    if kind != expected:
        raise RuntimeError(f"cache process: expected '{expected}', got '{kind}'")
    return payload


def _cache_and_send(trainer_class, args, world, groups, connection) -> None:
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING, format="%(message)s")
    try:
        trainer = trainer_class()
        trainer.world = world
        models = trainer.load_target_model(args, unet=False)
        for group in groups:
            trainer.cache_latents_if_needed(args, models, group)
            trainer.cache_text_encoder_outputs_if_needed(args, models, group)
            for _, item in group.image_items():
                connection.send(("item", item.path, {name: getattr(item, name) for name in CACHE_ATTRIBUTES}))
        connection.send(("done",))
    except UserError as error:
        connection.send(("user_error", str(error)))
    except BaseException:  # noqa: B036 - the trainer process reports it, then exits non-zero
        connection.send(("failed", traceback.format_exc()))
    finally:
        connection.close()
