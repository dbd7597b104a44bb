"""The two SDXL CLIP tokenizers, loaded offline, and sd-scripts' long-prompt chunking.

CLIP text encoders see 77 tokens at a time. With --max_token_length 150 or 225 a prompt is
tokenized to 152 or 227 ids and cut into 2 or 3 windows of 77 (<BOS> + 75 tokens + <EOS>/pad),
each encoded separately; `join_chunked_hidden_states` glues the encoder outputs back together.
"""

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from library.errors import UserError

logger = logging.getLogger(__name__)

SHIPPED_TOKENIZERS_DIR = Path(__file__).resolve().parent.parent / "configs"

# Hub ids sd-scripts downloads; --tokenizer_cache_dir holds them as <dir>/<id with "/" -> "_">,
# so a cache filled by sd-scripts is used as is.
TOKENIZER1_ID = "openai/clip-vit-large-patch14"
TOKENIZER2_ID = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"

CLIP_VOCAB_SIZE = 49408
CHUNK_LENGTH = 77
TOKENS_PER_CHUNK = CHUNK_LENGTH - 2

# OpenCLIP (TE2) was trained with 0 ("!") as padding. Set after loading, as sd-scripts does: a
# folder declaring pad_token "!" would also turn every "!" typed in a prompt into a lone special token.
TOKENIZER2_PAD_ID = 0


def load_sdxl_tokenizers(tokenizer_cache_dir: str | None = None) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(tokenizer for TE1, tokenizer for TE2), never touching a model hub.

    Like sd-scripts: a tokenizer already saved under `tokenizer_cache_dir` is loaded from there;
    otherwise the copy shipped in configs/ is used and saved into the cache dir for next time.
    """
    if importlib.util.find_spec("ftfy") is None:
        logger.warning(
            "ftfy is not installed: prompts with CJK text, curly quotes, ligatures, full-width characters "
            "or HTML entities tokenize differently from sd-scripts; `pip install ftfy` to match it"
        )
    tokenizer1 = _load_cached_or_shipped(TOKENIZER1_ID, SHIPPED_TOKENIZERS_DIR / "tokenizer_1", tokenizer_cache_dir)
    tokenizer2 = _load_cached_or_shipped(TOKENIZER2_ID, SHIPPED_TOKENIZERS_DIR / "tokenizer_2", tokenizer_cache_dir)
    tokenizer2.pad_token_id = TOKENIZER2_PAD_ID
    return tokenizer1, tokenizer2


def _load_cached_or_shipped(hub_id: str, shipped_dir: Path, tokenizer_cache_dir: str | None) -> CLIPTokenizer:
    if not tokenizer_cache_dir:
        return load_tokenizer_folder(shipped_dir)

    cached_dir = Path(tokenizer_cache_dir) / hub_id.replace("/", "_")
    if cached_dir.exists():
        logger.info(f"load tokenizer from cache: {cached_dir}")
        return load_tokenizer_folder(cached_dir)

    tokenizer = load_tokenizer_folder(shipped_dir)
    # Saved before TE2's pad id is changed, so the cache never declares "!" as a special token.
    logger.info(f"save tokenizer to cache: {cached_dir}")
    try:
        tokenizer.save_pretrained(cached_dir)
    except OSError as error:
        raise UserError(f"--tokenizer_cache_dir: cannot save tokenizer to {cached_dir}: {error}") from error
    return tokenizer


_REPAIR_HINT = "restore it (a folder inside --tokenizer_cache_dir can simply be deleted to be re-created)"


def load_tokenizer_folder(folder: str | os.PathLike) -> CLIPTokenizer:
    """A CLIPTokenizer from a local HF tokenizer folder; UserError if it is missing or not a CLIP tokenizer."""
    folder = Path(folder)
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        raise UserError(f"tokenizer folder {folder} lacks {', '.join(missing)}: {_REPAIR_HINT}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise UserError(f"tokenizer folder {folder} is unreadable ({error}): {_REPAIR_HINT}") from error
    if tokenizer.vocab_size != CLIP_VOCAB_SIZE or tokenizer.model_max_length != CHUNK_LENGTH:
        raise UserError(
            f"tokenizer folder {folder} is not a CLIP tokenizer (vocab size {tokenizer.vocab_size}, "
            f"model_max_length {tokenizer.model_max_length}; expected {CLIP_VOCAB_SIZE} and {CHUNK_LENGTH})"
        )
    return tokenizer


def check_max_token_length(max_token_length: int | None) -> None:
    if max_token_length is not None and (type(max_token_length) is not int or max_token_length not in (150, 225)):
        raise UserError(f"--max_token_length must be 150, 225 or unset (75), got {max_token_length!r}")


def chunk_count(max_token_length: int | None) -> int:
    check_max_token_length(max_token_length)
    return 1 if max_token_length is None else max_token_length // TOKENS_PER_CHUNK


def tokenize_prompts(tokenizer: CLIPTokenizer, prompts: list[str], max_token_length: int | None) -> np.ndarray:
    """Token ids of shape [len(prompts), n_chunks, 77], int32, each chunk framed by <BOS> ... <EOS>/pad."""
    n_chunks = chunk_count(max_token_length)
    if isinstance(prompts, str):
        prompts = [prompts]
    # One <BOS>, n_chunks * 75 prompt tokens, one <EOS>; short prompts padded to that length.
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=n_chunks * TOKENS_PER_CHUNK + 2,
        return_tensors="np",
    ).input_ids
    chunks = [[chunk_ids(row, index, tokenizer) for index in range(n_chunks)] for row in ids]
    return np.asarray(chunks, dtype=np.int32).reshape(len(ids), n_chunks, CHUNK_LENGTH)


def chunk_ids(ids: np.ndarray, index: int, tokenizer: CLIPTokenizer) -> np.ndarray:
    """Window `index` of a padded id row: the row's first id, 75 ids from the middle, the row's last id."""
    start = 1 + index * TOKENS_PER_CHUNK
    chunk = np.concatenate([ids[:1], ids[start : start + TOKENS_PER_CHUNK], ids[-1:]])

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad != eos:
        # The row's last id is <EOS> only when the prompt fills every chunk; a chunk cut
        # mid-prompt must still end in <EOS>, and one the prompt never reaches reads <BOS> <EOS> pad...
        if chunk[-2] not in (eos, pad):
            chunk[-1] = eos
        if chunk[1] == pad:
            chunk[1] = eos
    return chunk


def join_chunked_hidden_states(hidden_states, n_chunks: int):
    """Per-chunk encoder states [B*n_chunks, 77, D] (or [B, n_chunks, 77, D]) -> [B, n_chunks*75 + 2, D].

    Keeps the first chunk's <BOS> state, the 75 inner states of every chunk and the last chunk's
    final state (<EOS>, or pad for TE2). With one chunk this is the identity. Works on numpy
    arrays and MindSpore Tensors (slicing and concat only, differentiable).
    """
    width = hidden_states.shape[-1]
    chunks = hidden_states.reshape(-1, n_chunks, CHUNK_LENGTH, width)
    parts = [chunks[:, 0, :1], *(chunks[:, index, 1:-1] for index in range(n_chunks)), chunks[:, -1, -1:]]
    if isinstance(hidden_states, np.ndarray):
        return np.concatenate(parts, axis=1)
    # Imported here so numpy-only users (tokenizing, caching tools) skip MindSpore's slow import.
    from mindspore import ops

    return ops.cat(parts, axis=1)


def select_pooled_output(pooled, n_chunks: int):
    """TE2's pooled output per prompt from per-chunk pooled outputs [B*n_chunks, D] -> [B, D]."""
    # sd-scripts keeps the first chunk's pooled output of each prompt and ignores the others.
    return pooled[::n_chunks]


def eos_positions(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """Index of the first <EOS> in each row of [N, 77] ids (0 if none): where sd-scripts pools TE2.

    Unlike CLIP's own pooling (position of the largest id), this stays right when textual-inversion
    tokens with ids above <EOS> appear in the prompt.
    """
    return np.argmax(np.asarray(input_ids) == eos_token_id, axis=1)
