"""Build the two SDXL CLIP tokenizer folders (HF CLIPTokenizer layout) from CLIP's BPE merges file.

The merges file `bpe_simple_vocab_16e6.txt.gz` ships inside the `open_clip_torch` wheel:

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/build_clip_tokenizers.py /tmp/oc/open_clip_torch-*.whl

Both SDXL text encoders share one vocabulary, so both folders get the same files, like the hub
copies sd-scripts caches. TE2 pads with id 0 ("!"), but that is set at load time by
library/tokenizers.py: declaring "!" as pad_token here would make the tokenizer treat every "!"
in a prompt as a special token and split it away from its word, unlike OpenCLIP.
"""

import argparse
import gzip
import json
import zipfile
from pathlib import Path

MERGES_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77

# CLIP keeps only the first merges of the file: enough to reach a 49408-token vocabulary
# (256 bytes + 256 word-final bytes + merges + 2 special tokens). Line 0 is a version header.
MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_FOLDERS = ("tokenizer_1", "tokenizer_2")


def read_merges_text(source: Path) -> str:
    """Text of the merges file, given the .gz itself or a wheel that contains it."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            members = [name for name in wheel.namelist() if name.endswith("/" + MERGES_FILE_NAME)]
            if not members:
                raise SystemExit(f"error: {source} holds no {MERGES_FILE_NAME}")
            compressed = wheel.read(members[0])
    else:
        compressed = source.read_bytes()
    return gzip.decompress(compressed).decode("utf-8")


def byte_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the rest (controls, space, ...) are shifted to
    code points from 256 upwards, in byte order, so BPE never sees whitespace or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def parse_merges(merges_text: str) -> list[tuple[str, str]]:
    lines = merges_text.split("\n")[1 : 1 + MERGE_COUNT]
    return [tuple(line.split()) for line in lines]


def build_vocab(merges: list[tuple[str, str]]) -> list[str]:
    """Tokens in id order: bytes, word-final bytes, one token per merge, then BOS and EOS."""
    byte_tokens = list(byte_to_unicode().values())
    return [
        *byte_tokens,
        *(token + "</w>" for token in byte_tokens),
        *("".join(pair) for pair in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]


def check_vocab(vocab: list[str]) -> None:
    ids = {token: index for index, token in enumerate(vocab)}
    if len(vocab) != VOCAB_SIZE or len(ids) != VOCAB_SIZE:
        raise SystemExit(f"error: built {len(vocab)} tokens ({len(ids)} distinct), expected {VOCAB_SIZE}")
    known = {"!": 0, "a</w>": 320, "photo</w>": 1125, "cat</w>": 2368, BOS_TOKEN: 49406, EOS_TOKEN: 49407}
    wrong = {token: ids.get(token) for token, expected in known.items() if ids.get(token) != expected}
    if wrong:
        raise SystemExit(f"error: unexpected token ids {wrong}, expected {known}")


def write_tokenizer_folder(folder: Path, vocab: list[str], merges: list[tuple[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as file:
        json.dump({token: index for index, token in enumerate(vocab)}, file, ensure_ascii=False, indent=0)
        file.write("\n")
    with open(folder / "merges.txt", "w", encoding="utf-8") as file:
        file.write("#version: 0.2\n")
        file.writelines(f"{first} {second}\n" for first, second in merges)

    special_tokens = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        **special_tokens,
    }
    for name, content in (("special_tokens_map.json", special_tokens), ("tokenizer_config.json", config)):
        with open(folder / name, "w", encoding="utf-8") as file:
            json.dump(content, file, indent=2)
            file.write("\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help=f"{MERGES_FILE_NAME} or an open_clip_torch wheel containing it")
    parser.add_argument("--output_dir", type=Path, default=REPO_ROOT / "configs", help="where tokenizer_1/ and tokenizer_2/ go")
    args = parser.parse_args(argv)

    merges = parse_merges(read_merges_text(args.source))
    vocab = build_vocab(merges)
    check_vocab(vocab)
    for folder_name in TOKENIZER_FOLDERS:
        write_tokenizer_folder(args.output_dir / folder_name, vocab, merges)
        print(f"wrote {args.output_dir / folder_name}")


if __name__ == "__main__":
    main()
