"""sd-scripts' `--sample_prompts` files and the attention syntax inside prompts.

A prompt file is .txt (one prompt per line with `--` options), .toml (a `[prompt]` table of defaults
and `[[prompt.subset]]` entries) or .json (a list of option tables or prompt lines). Every form yields
the same `SamplePrompt`s with sd-scripts' defaults. Options that sd-scripts reads only for other
model families, or that do not exist, are refused with the file and line named instead of ignored.
"""

import json
import os
import re
import tomllib
from dataclasses import dataclass, fields
from typing import List, Optional, Tuple

from library.errors import UserError
from library.samplers import NUM_TRAIN_TIMESTEPS, check_sampler_name


@dataclass(frozen=True)
class SamplePrompt:
    """One sample image's request; field names are sd-scripts' prompt keys, defaults its defaults."""

    prompt: str = ""
    negative_prompt: Optional[str] = None
    width: int = 512
    height: int = 512
    seed: Optional[int] = None  # None: a fresh random seed for every image
    sample_steps: int = 30
    scale: float = 7.5
    sample_sampler: Optional[str] = None  # None: --sample_sampler
    enum: int = 0  # position in the file; names the image file


PROMPT_KEYS = tuple(field.name for field in fields(SamplePrompt) if field.name != "enum")

# Keys sd-scripts parses for other model families; SDXL sampling would ignore them.
OTHER_FAMILY_KEYS = {
    "guidance_scale": "--g (embedded guidance, FLUX)",
    "controlnet_image": "--cn (ControlNet)",
    "cfg_trunc_ratio": "--ctr (Lumina)",
    "renorm_cfg": "--rcfg (Lumina)",
    "flow_shift": "--fs (flow-matching models)",
}

# Options of a .txt line: flag -> (prompt key, value pattern). Flags are case-insensitive as in sd-scripts.
_LINE_OPTIONS = {
    "n": ("negative_prompt", r".+"),
    "w": ("width", r"\d+"),
    "h": ("height", r"\d+"),
    "d": ("seed", r"\d+"),
    "s": ("sample_steps", r"\d+"),
    "l": ("scale", r"[\d.]+"),
    "ss": ("sample_sampler", r".+"),
    "g": ("guidance_scale", r".+"),
    "cn": ("controlnet_image", r".+"),
    "ctr": ("cfg_trunc_ratio", r".+"),
    "rcfg": ("renorm_cfg", r".+"),
    "fs": ("flow_shift", r".+"),
}


def load_sample_prompts(path: str) -> List[SamplePrompt]:
    """All prompts of a --sample_prompts file, in file order, validated."""
    if not os.path.isfile(path):
        raise UserError(f"--sample_prompts: file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    with open(path, "r", encoding="utf-8") as handle:
        text = handle.read()
    if extension == ".txt":
        # As in sd-scripts, only a "#" in the first column makes a comment.
        entries = [(line, f"{path} line {number}") for number, line in enumerate(text.splitlines(), 1)
                   if line.strip() and not line.startswith("#")]
    elif extension == ".toml":
        entries = _toml_entries(text, path)
    elif extension == ".json":
        entries = _json_entries(text, path)
    else:
        raise UserError(f"--sample_prompts: {path} must be a .txt, .toml or .json file")

    prompts = []
    for entry, where in entries:
        values = parse_prompt_line(entry.strip(), where) if isinstance(entry, str) else entry
        prompts.append(prompt_from_values(values, len(prompts), where))
    return prompts


def _toml_entries(text: str, path: str):
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"--sample_prompts: {path} is not valid TOML: {error}") from error
    table = data.get("prompt")
    if not isinstance(table, dict) or not isinstance(table.get("subset"), list):
        raise UserError(f"--sample_prompts: {path} needs a [prompt] table with [[prompt.subset]] entries")
    defaults = {key: value for key, value in table.items() if key != "subset"}
    entries = []
    for number, subset in enumerate(table["subset"], 1):
        where = f"{path} [[prompt.subset]] {number}"
        # sd-scripts stops on a key given both in [prompt] and a subset; here the subset's value wins.
        entries.append(({**defaults, **_table(subset, where)}, where))
    return entries


def _json_entries(text: str, path: str):
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"--sample_prompts: {path} is not valid JSON: {error}") from error
    if not isinstance(data, list):
        raise UserError(f"--sample_prompts: {path} must hold a JSON list of prompts")
    entries = []
    for number, item in enumerate(data, 1):
        where = f"{path} item {number}"
        entries.append((item if isinstance(item, str) else _table(item, where), where))
    return entries


def _table(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"--sample_prompts: {where}: expected a table of prompt options or a prompt line, "
                        f"got {value!r}")
    return value


def parse_prompt_line(line: str, where: str = "prompt") -> dict:
    """sd-scripts' prompt line syntax: `prompt --n negative --w 1024 --h 1024 --d 1 --l 7 --s 28 --ss euler_a`.

    Returns the prompt keys given on the line. The steps are clamped to 1..1000 as sd-scripts does.
    """
    prompt, *options = line.split(" --")
    values = {"prompt": prompt}
    for option in options:
        flag, _, value = option.strip().partition(" ")
        key, pattern = _LINE_OPTIONS.get(flag.lower(), (None, None))
        if key is None:
            raise UserError(f"--sample_prompts: {where}: unknown option --{flag}; "
                            f"use --n, --w, --h, --d, --s, --l or --ss")
        value = value.strip()
        if not re.fullmatch(pattern, value):
            raise UserError(f"--sample_prompts: {where}: --{flag} needs a value matching {pattern}, got {value!r}")
        values[key] = value
    for key in ("width", "height", "seed", "sample_steps"):
        if key in values:
            values[key] = int(values[key])
    if "sample_steps" in values:
        values["sample_steps"] = max(1, min(NUM_TRAIN_TIMESTEPS, values["sample_steps"]))
    if "scale" in values:
        values["scale"] = _number(values["scale"], "--l", where)
    return values


def _number(text: str, name: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"--sample_prompts: {where}: {name} must be a number, got {text!r}") from None


def prompt_from_values(values: dict, enum: int, where: str) -> SamplePrompt:
    """A SamplePrompt from sd-scripts prompt keys (a .toml/.json table or a parsed line), checked."""
    for key in values:
        if key in OTHER_FAMILY_KEYS:
            raise UserError(f"--sample_prompts: {where}: {key} ({OTHER_FAMILY_KEYS[key]}) does not apply to "
                            "SDXL sampling; remove it")
        if key not in PROMPT_KEYS:
            raise UserError(f"--sample_prompts: {where}: unknown key {key!r}; use {', '.join(PROMPT_KEYS)}")

    def check(key, valid, expected):
        if key in values and not valid(values[key]):
            raise UserError(f"--sample_prompts: {where}: {key} must be {expected}, got {values[key]!r}")

    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    check("prompt", lambda v: isinstance(v, str), "a string")
    check("negative_prompt", lambda v: isinstance(v, str), "a string")
    check("width", lambda v: is_int(v) and v > 0, "a positive integer")
    check("height", lambda v: is_int(v) and v > 0, "a positive integer")
    check("seed", lambda v: is_int(v) and v >= 0, "a non-negative integer")
    check("sample_steps", lambda v: is_int(v) and 1 <= v <= NUM_TRAIN_TIMESTEPS,
          f"an integer 1 to {NUM_TRAIN_TIMESTEPS}")
    check("scale", lambda v: (is_int(v) or isinstance(v, float)), "a number")
    check("sample_sampler", lambda v: isinstance(v, str), "a sampler name")
    if "sample_sampler" in values:
        check_sampler_name(values["sample_sampler"], f"--sample_prompts: {where}")
    if "scale" in values:
        values = {**values, "scale": float(values["scale"])}
    return SamplePrompt(**values, enum=enum)


# ---- Attention syntax --------------------------------------------------------------------------------

ROUND_BRACKET_WEIGHT = 1.1

# A1111's grammar, as sd-scripts tokenizes sample prompts: escapes, brackets, "(text:weight)", plain text.
_ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]? |              # \( \) \[ \] \\ -> the literal character (a lone backslash is dropped)
    \( | \[ |                    # open a bracket
    :(?P<weight>[+-]?[.\d]+)\) | # ":1.3)" closes a round bracket with an explicit weight
    \) | \] |                    # close a bracket
    [^\\()\[\]:]+ |              # plain text
    :                            # a colon that is not a weight
    """,
    re.VERBOSE,
)


def parse_prompt_attention(text: str) -> List[Tuple[str, float]]:
    """Split a prompt into (text, weight) runs: `(x)` multiplies by 1.1, `[x]` divides by 1.1,
    `(x:1.5)` multiplies by 1.5; brackets left open apply to the end; adjacent equal weights merge.

    >>> parse_prompt_attention("a (red:1.5) [cat]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('cat', 0.9090909090909091)]
    """
    runs: List[List] = []
    open_round, open_square = [], []

    def multiply_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _ATTENTION_TOKEN.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            runs.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(runs))
        elif token == "[":
            open_square.append(len(runs))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), _attention_weight(weight, text))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_WEIGHT)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), 1 / ROUND_BRACKET_WEIGHT)
        else:
            runs.append([token, 1.0])
    for start in open_round:
        multiply_from(start, ROUND_BRACKET_WEIGHT)
    for start in open_square:
        multiply_from(start, 1 / ROUND_BRACKET_WEIGHT)

    merged: List[List] = []
    for run in runs or [["", 1.0]]:
        if merged and merged[-1][1] == run[1]:
            merged[-1][0] += run[0]
        else:
            merged.append(list(run))
    return [(run_text, weight) for run_text, weight in merged]


def _attention_weight(weight: str, prompt: str) -> float:
    try:
        return float(weight)
    except ValueError:
        raise UserError(f"prompt {prompt!r}: attention weight {weight!r} is not a number") from None
