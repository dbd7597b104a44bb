import gzip
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import regex
from transformers import CLIPTokenizer

from library.errors import UserError
from library.tokenizers import (
    eos_positions,
    join_chunked_hidden_states,
    load_sdxl_tokenizers,
    load_tokenizer_folder,
    select_pooled_output,
    tokenize_prompts,
)
from tools import build_clip_tokenizers

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BOS, EOS, CAT = 49406, 49407, 2368


@pytest.fixture(scope="module")
def tokenizers():
    return load_sdxl_tokenizers()


@pytest.fixture(scope="module")
def shipped_vocab():
    return json.loads((CONFIGS / "tokenizer_1" / "vocab.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def shipped_merges():
    lines = (CONFIGS / "tokenizer_1" / "merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(line.split()) for line in lines[1:]]


def reference_bpe_ids(text, vocab, merges):
    """OpenAI CLIP's SimpleTokenizer, cut down to ASCII prompts (no byte remapping or ftfy needed)."""
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    words = regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", " ".join(text.split()).lower())
    ids = [BOS]
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda candidate: ranks.get(candidate, float("inf")))
            if pair not in ranks:
                break
            merged, index = [], 0
            while index < len(symbols):
                if tuple(symbols[index : index + 2]) == pair:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        ids += [vocab[symbol] for symbol in symbols]
    return ids + [EOS]


# Ids checked by hand against vocab.json ("don</w>"=847, "'t</w>"=713, ...); the "!" row is OpenCLIP's own output.
KNOWN_IDS = {
    "a photo of a cat": [BOS, 320, 1125, 539, 320, CAT, EOS],
    "! !! !!!": [BOS, 256, 748, 995, EOS],
    "don't stop-believing 12345": [BOS, 847, 713, 1691, 268, 19551, 272, 273, 274, 275, 276, EOS],
    "Hello, World!!  1girl, (masterpiece:1.2)": [BOS, 3306, 267, 1002, 748, 272, 1611, 267, 263, 12066, 281, 272, 269, 273, 264, EOS],
    "score_9, BREAK <lora:x:1>": [BOS, 4431, 318, 280, 267, 2568, 283, 2179, 320, 281, 343, 281, 272, 285, EOS],
}


@pytest.mark.parametrize("folder", ["tokenizer_1", "tokenizer_2"])
def test_shipped_folder_loads_offline_as_clip_tokenizer(folder):
    tokenizer = CLIPTokenizer.from_pretrained(str(CONFIGS / folder), local_files_only=True)
    assert (tokenizer.vocab_size, tokenizer.model_max_length) == (49408, 77)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS, EOS)


def test_shipped_vocab_is_bytes_then_merges_then_specials(shipped_vocab, shipped_merges):
    assert len(shipped_vocab) == 49408 and len(shipped_merges) == 48894
    ids_in_order = sorted(shipped_vocab, key=shipped_vocab.get)
    assert ids_in_order[:3] == ["!", '"', "#"]
    assert ids_in_order[256:259] == ["!</w>", '"</w>', "#</w>"]
    assert ids_in_order[512:] == ["".join(pair) for pair in shipped_merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert (shipped_vocab["a</w>"], shipped_vocab["photo</w>"], shipped_vocab["cat</w>"]) == (320, 1125, 2368)


def test_both_folders_hold_the_same_files():
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (CONFIGS / "tokenizer_1" / name).read_bytes() == (CONFIGS / "tokenizer_2" / name).read_bytes()


def test_byte_map_keeps_printable_bytes_and_shifts_the_rest():
    mapping = build_clip_tokenizers.byte_to_unicode()
    assert len(set(mapping.values())) == 256
    assert mapping[ord("a")] == "a" and mapping[ord("~")] == "~" and mapping[0xE9] == "é"
    # 0-32 are the first bytes shifted, so space (32) lands on 256 + 32; DEL (127) follows them.
    assert mapping[0] == chr(256) and mapping[32] == "Ġ" and mapping[127] == chr(256 + 33)


def test_builder_reproduces_shipped_folders_from_gz_and_wheel(tmp_path, shipped_merges):
    merge_lines = [f"{first} {second}" for first, second in shipped_merges]
    # The real file carries far more merges than CLIP uses; the builder must stop at 48894.
    merges_text = "\n".join(['"bpe_simple_vocab_16e6.txt#version: 0.2', *merge_lines, "z z", "y y", ""])
    gz_path = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz_path.write_bytes(gzip.compress(merges_text.encode("utf-8")))
    wheel_path = tmp_path / "open_clip_torch-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        wheel.write(gz_path, "open_clip/bpe_simple_vocab_16e6.txt.gz")

    build_clip_tokenizers.main([str(gz_path), "--output_dir", str(tmp_path / "from_gz")])
    build_clip_tokenizers.main([str(wheel_path), "--output_dir", str(tmp_path / "from_wheel")])
    for output in ("from_gz", "from_wheel"):
        for folder in ("tokenizer_1", "tokenizer_2"):
            for file in (CONFIGS / folder).iterdir():
                assert (tmp_path / output / folder / file.name).read_bytes() == file.read_bytes(), (output, folder, file.name)


@pytest.mark.parametrize("prompt", KNOWN_IDS)
def test_known_prompts_match_hand_checked_ids_and_reference_bpe(tokenizers, prompt, shipped_vocab, shipped_merges):
    assert reference_bpe_ids(prompt, shipped_vocab, shipped_merges) == KNOWN_IDS[prompt]
    for tokenizer in tokenizers:
        assert tokenizer(prompt).input_ids == KNOWN_IDS[prompt]


def test_tokenizer1_pads_with_eos_and_tokenizer2_with_zero(tokenizers):
    tokenizer1, tokenizer2 = tokenizers
    expected_start = KNOWN_IDS["a photo of a cat"]
    ids1 = tokenize_prompts(tokenizer1, ["a photo of a cat"], None)
    ids2 = tokenize_prompts(tokenizer2, ["a photo of a cat"], None)
    assert ids1.shape == ids2.shape == (1, 1, 77) and ids1.dtype == ids2.dtype == np.int32
    assert ids1[0, 0].tolist() == expected_start + [EOS] * 70
    assert ids2[0, 0].tolist() == expected_start + [0] * 70


def test_default_length_truncates_to_77_ending_in_eos(tokenizers):
    for tokenizer in tokenizers:
        ids = tokenize_prompts(tokenizer, ["cat " * 100, ""], None)
        assert ids[0, 0].tolist() == [BOS] + [CAT] * 75 + [EOS]
        assert ids[1, 0, :2].tolist() == [BOS, EOS]


def framed(body, tail):
    """One 77-id chunk: <BOS>, the prompt tokens, then the closing <EOS>/padding ids."""
    chunk = [BOS, *body, *tail]
    assert len(chunk) == 77
    return chunk


FULL_CHUNK = [BOS] + [CAT] * 75 + [EOS]


@pytest.mark.parametrize(
    "cats, max_token_length, expected1, expected2",
    [
        # 100 tokens in 2 chunks: the first is cut mid-prompt, the second holds the end.
        (100, 150, [FULL_CHUNK, framed([CAT] * 25, [EOS] * 51)], [FULL_CHUNK, framed([CAT] * 25, [EOS] + [0] * 50)]),
        # Exactly one chunk of text: the second chunk is empty and must read <BOS> <EOS> pad...
        (75, 150, [FULL_CHUNK, framed([], [EOS] * 76)], [FULL_CHUNK, framed([], [EOS] + [0] * 75)]),
        # Exactly two chunks of text: the real <EOS> closes the last one.
        (150, 150, [FULL_CHUNK] * 2, [FULL_CHUNK] * 2),
        (100, 225, [FULL_CHUNK, framed([CAT] * 25, [EOS] * 51), framed([], [EOS] * 76)],
         [FULL_CHUNK, framed([CAT] * 25, [EOS] + [0] * 50), framed([], [EOS] + [0] * 75)]),
        # Too long: truncated to 225 tokens, every chunk full.
        (300, 225, [FULL_CHUNK] * 3, [FULL_CHUNK] * 3),
    ],
)
def test_long_prompts_split_into_framed_chunks(tokenizers, cats, max_token_length, expected1, expected2):
    tokenizer1, tokenizer2 = tokenizers
    prompt = " ".join(["cat"] * cats)
    assert tokenize_prompts(tokenizer1, [prompt], max_token_length).tolist() == [expected1]
    assert tokenize_prompts(tokenizer2, [prompt], max_token_length).tolist() == [expected2]


def test_batch_keeps_prompt_order(tokenizers):
    ids = tokenize_prompts(tokenizers[1], ["cat", "a photo of a cat", ""], 225)
    assert ids.shape == (3, 3, 77)
    assert ids[:, 0, :3].tolist() == [[BOS, CAT, EOS], [BOS, 320, 1125], [BOS, EOS, 0]]


@pytest.mark.parametrize("bad", [75, 77, 100, 300, 0, 150.0, "150"])
def test_unsupported_max_token_length_is_refused(tokenizers, bad):
    with pytest.raises(UserError, match="--max_token_length"):
        tokenize_prompts(tokenizers[0], ["cat"], bad)


def position_coded_states(batch, n_chunks, width=2):
    """states[b, c, t, :] = 1000*b + 100*c + t, so every kept position is recognisable."""
    codes = 1000 * np.arange(batch)[:, None, None] + 100 * np.arange(n_chunks)[None, :, None] + np.arange(77)
    return np.repeat(codes[..., None], width, axis=-1).astype(np.float32)


def test_join_keeps_first_bos_inner_states_and_last_final_state():
    states = position_coded_states(batch=2, n_chunks=2)
    joined = join_chunked_hidden_states(states.reshape(4, 77, 2), n_chunks=2)
    for b in range(2):
        expected = [1000 * b] + [1000 * b + t for t in range(1, 76)] + [1000 * b + 100 + t for t in range(1, 77)]
        assert joined.shape == (2, 152, 2)
        assert joined[b, :, 0].tolist() == expected and joined[b, :, 1].tolist() == expected
    assert np.array_equal(join_chunked_hidden_states(states, n_chunks=2), joined)


def test_join_with_one_chunk_is_identity():
    states = position_coded_states(batch=3, n_chunks=1).reshape(3, 77, 2)
    assert np.array_equal(join_chunked_hidden_states(states, n_chunks=1), states)


def test_join_on_mindspore_tensors_matches_numpy_and_passes_gradients():
    import mindspore

    states = position_coded_states(batch=2, n_chunks=3, width=4).reshape(6, 77, 4)
    tensor = mindspore.Tensor(states)
    joined = join_chunked_hidden_states(tensor, n_chunks=3)
    assert np.array_equal(joined.asnumpy(), join_chunked_hidden_states(states, n_chunks=3))

    gradient = mindspore.grad(lambda x: join_chunked_hidden_states(x, n_chunks=3).sum())(tensor).asnumpy()
    kept = np.zeros((2, 3, 77), dtype=bool)
    kept[:, :, 1:76] = True
    kept[:, 0, 0] = kept[:, -1, -1] = True
    assert np.array_equal(gradient.reshape(2, 3, 77, 4), np.repeat(kept[..., None], 4, axis=-1).astype(np.float32))


def test_pooled_output_comes_from_each_prompts_first_chunk():
    pooled = np.array([[10.0], [11.0], [12.0], [20.0], [21.0], [22.0]])  # prompt*10 + chunk
    assert select_pooled_output(pooled, n_chunks=3).tolist() == [[10.0], [20.0]]
    assert select_pooled_output(pooled, n_chunks=1).tolist() == pooled.tolist()


def test_eos_positions_find_the_first_eos():
    ids = np.array([
        [BOS, 320, EOS, 0, 0],
        [BOS, EOS, 0, 0, EOS],
        [BOS, 49408, 320, EOS, 0],  # a textual-inversion id above <EOS> does not move the pooling position
        [BOS, 320, 320, 320, 320],
    ])
    assert eos_positions(ids, EOS).tolist() == [2, 1, 3, 0]


def test_cache_dir_is_filled_then_preferred(tmp_path):
    tokenizer1, tokenizer2 = load_sdxl_tokenizers(str(tmp_path))
    cached1 = tmp_path / "openai_clip-vit-large-patch14"
    cached2 = tmp_path / "laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"
    assert (cached1 / "vocab.json").is_file() and (cached2 / "merges.txt").is_file()

    # Prove the second load reads the cache: make the cached TE1 tokenizer pad with "!".
    config_path = cached1 / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["pad_token"] = "!"
    config_path.write_text(json.dumps(config))
    (cached1 / "special_tokens_map.json").unlink()

    reloaded1, reloaded2 = load_sdxl_tokenizers(str(tmp_path))
    assert reloaded1.pad_token_id == 0 and tokenizer1.pad_token_id == EOS
    # The cached TE2 tokenizer still declares <|endoftext|> padding, as a hub copy does; loading forces 0.
    assert json.loads((cached2 / "tokenizer_config.json").read_text())["pad_token"] == "<|endoftext|>"
    assert reloaded2.pad_token_id == tokenizer2.pad_token_id == 0
    assert reloaded2("wow!! great!").input_ids == [BOS, 2781, 748, 830, 256, EOS]


def test_empty_cached_folder_is_a_user_error(tmp_path):
    (tmp_path / "openai_clip-vit-large-patch14").mkdir()
    with pytest.raises(UserError, match="openai_clip-vit-large-patch14 lacks vocab.json, merges.txt"):
        load_sdxl_tokenizers(str(tmp_path))


def test_missing_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nowhere lacks vocab.json"):
        load_tokenizer_folder(tmp_path / "nowhere")


@pytest.mark.parametrize("vocab_text", ['{"!": 0, "a', '{"!": 0, "<|endoftext|>": 1, "<|startoftext|>": 2}'])
def test_corrupt_vocab_is_a_user_error(tmp_path, vocab_text):
    shutil.copytree(CONFIGS / "tokenizer_1", tmp_path / "tok")
    (tmp_path / "tok" / "vocab.json").write_text(vocab_text)
    with pytest.raises(UserError, match="tok"):
        load_tokenizer_folder(tmp_path / "tok")
