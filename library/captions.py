"""Caption files and caption processing, with sd-scripts' rules.

- `read_caption_file(image_path, caption_extension, enable_wildcard)`: the caption next to an image.
- `caption_from_metadata(caption, tags, options)`: a fine-tuning metadata entry's caption.
- `process_caption(caption, options, rng, epoch, step, max_train_steps)`: prefix/suffix, dropout,
  wildcards, shuffling with kept tokens, tag dropout, token warmup, secondary separator -- the
  transform sd-scripts applies each time an image is drawn. All randomness comes from `rng`, so the
  result is a pure function of the caption, the options, the rng's seed, the epoch and the step.
- `count_tags(captions)`: tag frequencies for ss_tag_frequency.
"""

import math
import os
import random
import re
from dataclasses import dataclass
from typing import Dict, Iterable, Optional

from library.errors import UserError


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings of one subset (names and defaults as sd-scripts' command line)."""

    caption_prefix: Optional[str] = None
    caption_suffix: Optional[str] = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: Optional[str] = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0  # steps, or a fraction of max_train_steps when below 1

    @property
    def is_random(self) -> bool:
        """Whether the processed caption can differ between draws of the same image."""
        return (
            self.shuffle_caption
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.caption_tag_dropout_rate > 0
            or self.token_warmup_step > 0
            or self.enable_wildcard
        )


def read_caption_file(image_path: str, caption_extension: str, enable_wildcard: bool) -> Optional[str]:
    """The caption for an image, or None when it has no caption file.

    Like sd-scripts, `<stem><ext>` is tried first, then the stem without a face-crop suffix
    (`name_cx_cy_w_h.png` -> `name<ext>`). Only the first line is used, unless wildcards are on: then
    all non-blank lines are kept (one is drawn at random per step).
    """
    for path in caption_candidates(image_path, caption_extension):
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rt", encoding="utf-8") as f:
                lines = f.readlines()
        except UnicodeDecodeError:
            raise UserError(f"caption file is not UTF-8 text: {path} (re-save it as UTF-8)") from None
        if not lines:
            raise UserError(f"caption file is empty: {path} (write a caption, or delete the file to use the class tokens)")
        if enable_wildcard:
            return "\n".join(line.strip() for line in lines if line.strip() != "")
        return lines[0].strip()
    return None


def caption_candidates(image_path: str, caption_extension: str):
    base = os.path.splitext(image_path)[0]
    yield base + caption_extension
    tokens = base.split("_")
    if len(tokens) >= 5:
        yield "_".join(tokens[:-4]) + caption_extension


def caption_from_metadata(caption: Optional[str], tags: Optional[str], options: CaptionOptions) -> str:
    """Merge a metadata entry's caption and tags the way sd-scripts' fine-tuning dataset does."""
    caption = caption or ""
    if options.enable_wildcard:
        if tags is None:
            return caption
        tags = tags.replace("\n", options.caption_separator)
        lines = [line for line in caption.split("\n") if line.strip() != ""]
        return "\n".join(f"{line}{options.caption_separator}{tags}" for line in lines)
    if tags:
        if caption:
            caption = caption + options.caption_separator
        caption = caption + tags
    return caption


def process_caption(
    caption: str, options: CaptionOptions, rng: random.Random, epoch: int, step: int = 0, max_train_steps: int = 0
) -> str:
    """The caption used for one draw of an image (sd-scripts' BaseDataset.process_caption).

    `epoch` counts from 1 as in sd-scripts; `step` is the number of optimizer steps done so far,
    used only by token warmup.
    """
    if options.caption_prefix:
        caption = options.caption_prefix + " " + caption
    if options.caption_suffix:
        caption = caption + " " + options.caption_suffix

    dropped = options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate
    dropped = dropped or (options.caption_dropout_every_n_epochs > 0 and epoch % options.caption_dropout_every_n_epochs == 0)
    if dropped:
        return ""

    if options.enable_wildcard:
        if "\n" in caption:
            caption = rng.choice(caption.split("\n"))
        caption = expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    if options.shuffle_caption or options.token_warmup_step > 0 or options.caption_tag_dropout_rate > 0:
        caption = shuffle_and_drop_tags(caption, options, rng, step, max_train_steps)

    if options.secondary_separator:
        caption = caption.replace(options.secondary_separator, options.caption_separator)
    return caption


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """Replace each `{a|b|c}` with one random choice; `{{` and `}}` are literal braces."""
    open_marker, close_marker = "⦅", "⦆"
    while open_marker in caption or close_marker in caption:
        open_marker += "⦅"
        close_marker += "⦆"
    caption = caption.replace("{{", open_marker).replace("}}", close_marker)
    caption = re.sub(r"\{([^}]+)\}", lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_marker, "{").replace(close_marker, "}")


def shuffle_and_drop_tags(caption: str, options: CaptionOptions, rng: random.Random, step: int, max_train_steps: int) -> str:
    separator = options.caption_separator
    fixed_tokens, flex_tokens, fixed_suffix_tokens = [], [], []
    keep_separator = options.keep_tokens_separator
    if keep_separator and keep_separator in caption:
        fixed_part, flex_part = caption.split(keep_separator, 1)
        if keep_separator in flex_part:
            flex_part, fixed_suffix_part = flex_part.split(keep_separator, 1)
            fixed_suffix_tokens = split_tags(fixed_suffix_part, separator)
        fixed_tokens = split_tags(fixed_part, separator)
        flex_tokens = split_tags(flex_part, separator)
    else:
        # sd-scripts keeps empty tags here (unlike the separator branch above)
        tokens = [t.strip() for t in caption.strip().split(separator)]
        flex_tokens = tokens[:]
        if options.keep_tokens > 0:
            fixed_tokens = flex_tokens[: options.keep_tokens]
            flex_tokens = tokens[options.keep_tokens :]

    warmup_steps = options.token_warmup_step
    if warmup_steps < 1:
        warmup_steps = math.floor(warmup_steps * max_train_steps)
    if warmup_steps and step < warmup_steps:
        visible = math.floor(step * ((len(flex_tokens) - options.token_warmup_min) / warmup_steps)) + options.token_warmup_min
        flex_tokens = flex_tokens[:visible]

    if options.shuffle_caption:
        rng.shuffle(flex_tokens)
    if options.caption_tag_dropout_rate > 0:
        flex_tokens = [t for t in flex_tokens if rng.random() >= options.caption_tag_dropout_rate]

    return ", ".join(fixed_tokens + flex_tokens + fixed_suffix_tokens)


def split_tags(text: str, separator: str):
    return [t.strip() for t in text.split(separator) if t.strip()]


def count_tags(captions: Iterable[str], counts: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Lower-cased comma-separated tag counts, added into `counts` (sd-scripts' set_tag_frequency)."""
    counts = {} if counts is None else counts
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
