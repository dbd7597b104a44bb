import json

import pytest

from library.errors import UserError
from library.sample_prompts import SamplePrompt, load_sample_prompts, parse_prompt_attention, parse_prompt_line

# sd-scripts' documented example (docs/train_README-ja.md), plus the corners of its line format.
NEGATIVE = "low quality, worst quality, bad anatomy,bad composition, poor, low effort"
GIRL = "masterpiece, best quality, 1girl, in white shirts, upper body, looking at viewer, simple background"
BOY = "masterpiece, best quality, 1boy, in business suit, standing at street, looking back"
PROMPTS_TXT = f"""\
# prompt 1
{GIRL} --n {NEGATIVE} --w 768 --h 768 --d 1 --l 7.5 --s 28

# prompt 2
{BOY} --n {NEGATIVE} --w 576 --h 832 --d 2 --l 5.5 --s 40
a plain prompt
  # indented: not a comment for sd-scripts either
a cat --W 640 --S 5000 --ss k_euler_a
a dog --s 0 --l 3
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_txt_prompts(tmp_path):
    prompts = load_sample_prompts(write(tmp_path, "prompts.txt", PROMPTS_TXT))
    assert prompts == [
        SamplePrompt(prompt=GIRL, negative_prompt=NEGATIVE, width=768, height=768, seed=1, scale=7.5,
                     sample_steps=28, enum=0),
        SamplePrompt(prompt=BOY, negative_prompt=NEGATIVE, width=576, height=832, seed=2, scale=5.5,
                     sample_steps=40, enum=1),
        SamplePrompt(prompt="a plain prompt", enum=2),
        SamplePrompt(prompt="# indented: not a comment for sd-scripts either", enum=3),
        # Flags ignore case; steps are clamped to 1..1000.
        SamplePrompt(prompt="a cat", width=640, sample_steps=1000, sample_sampler="k_euler_a", enum=4),
        SamplePrompt(prompt="a dog", sample_steps=1, scale=3.0, enum=5),
    ]


def test_defaults_are_sd_scripts_defaults():
    prompt = SamplePrompt(prompt="x")
    assert (prompt.width, prompt.height, prompt.sample_steps, prompt.scale) == (512, 512, 30, 7.5)
    assert (prompt.negative_prompt, prompt.seed, prompt.sample_sampler) == (None, None, None)


@pytest.mark.parametrize(
    "line, message",
    [
        ("a cat --x 3", r"line 2: unknown option --x; use --n, --w"),
        ("a cat --w big", r"line 2: --w needs a value matching \\d\+, got 'big'"),
        ("a cat --n", r"line 2: --n needs a value"),
        ("a cat --l 7.5.1", r"line 2: --l must be a number, got '7.5.1'"),
        ("a cat --g 3.5", r"line 2: guidance_scale \(--g \(embedded guidance, FLUX\)\) does not apply to SDXL"),
        ("a cat --cn hint.png", r"line 2: controlnet_image .* does not apply to SDXL"),
        ("a cat --ss pndm", r"line 2: sampler 'pndm' is not supported"),
        ("a cat --ss fast", r"line 2: unknown sampler 'fast'"),
    ],
)
def test_bad_txt_lines_name_the_line(tmp_path, line, message):
    path = write(tmp_path, "prompts.txt", f"a good prompt\n{line}\n")
    with pytest.raises(UserError, match=rf"prompts.txt {message}"):
        load_sample_prompts(path)


def test_toml_prompts_take_defaults_from_the_prompt_table(tmp_path):
    path = write(tmp_path, "prompts.toml", """
[prompt]
negative_prompt = "blurry"
width = 1024
height = 1024
sample_steps = 20
scale = 5

[[prompt.subset]]
prompt = "a castle"
seed = 7

[[prompt.subset]]
prompt = "a boat"
width = 832
sample_sampler = "euler_a"
""")
    assert load_sample_prompts(path) == [
        SamplePrompt(prompt="a castle", negative_prompt="blurry", width=1024, height=1024, seed=7,
                     sample_steps=20, scale=5.0, enum=0),
        # A subset's own value wins over [prompt] (sd-scripts stops on such a repeated key).
        SamplePrompt(prompt="a boat", negative_prompt="blurry", width=832, height=1024, sample_steps=20,
                     scale=5.0, sample_sampler="euler_a", enum=1),
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ('[prompt]\nwidth = 512\n', r"needs a \[prompt\] table with \[\[prompt.subset\]\] entries"),
        ('[[prompt.subset]]\nprompt = "a"\nsteps = 20\n', r"\[\[prompt.subset\]\] 1: unknown key 'steps'"),
        ('[[prompt.subset]]\nprompt = "a"\nwidth = "512"\n', r"\[\[prompt.subset\]\] 1: width must be a positive"),
        ('[[prompt.subset]]\nprompt = "a"\nsample_steps = 2000\n', r"sample_steps must be an integer 1 to 1000"),
        ('[[prompt.subset]]\nprompt = "a"\nseed = -1\n', r"seed must be a non-negative integer"),
        ('[[prompt.subset]]\nprompt = "a"\nflow_shift = 3.0\n', r"flow_shift .* does not apply to SDXL"),
        ('[prompt\n', r"is not valid TOML"),
    ],
)
def test_bad_toml_is_refused_by_name(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_sample_prompts(write(tmp_path, "prompts.toml", text))


def test_json_prompts_mix_tables_and_lines(tmp_path):
    path = write(tmp_path, "prompts.json", json.dumps([
        {"prompt": "a tree", "seed": 3, "scale": 4, "width": 640},
        "a river --n fog --d 9",
    ]))
    assert load_sample_prompts(path) == [
        SamplePrompt(prompt="a tree", seed=3, scale=4.0, width=640, enum=0),
        SamplePrompt(prompt="a river", negative_prompt="fog", seed=9, enum=1),
    ]


def test_json_errors(tmp_path):
    with pytest.raises(UserError, match=r"prompts.json item 2: expected a table of prompt options or a prompt line"):
        load_sample_prompts(write(tmp_path, "prompts.json", '["a", 5]'))
    with pytest.raises(UserError, match="must hold a JSON list"):
        load_sample_prompts(write(tmp_path, "prompts.json", '{"prompt": "a"}'))
    with pytest.raises(UserError, match="prompts.json item 1: seed must be a non-negative integer, got True"):
        load_sample_prompts(write(tmp_path, "prompts.json", '[{"prompt": "a", "seed": true}]'))


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="--sample_prompts: file not found"):
        load_sample_prompts(str(tmp_path / "absent.txt"))
    with pytest.raises(UserError, match=r"must be a .txt, .toml or .json file"):
        load_sample_prompts(write(tmp_path, "prompts.yaml", "a cat"))


def test_line_keeps_the_prompt_text_before_the_first_option():
    assert parse_prompt_line("a photo of a cat --n dog --d 3") == {
        "prompt": "a photo of a cat", "negative_prompt": "dog", "seed": 3,
    }


@pytest.mark.parametrize(
    "text, runs",
    [
        # The examples documented by A1111 and sd-scripts.
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.1 / 1.1), (" a ", 1.1),
             ("hill", 0.5 * 1.1), (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)],
        ),
        ("[weak:1.5]", [("weak:1.5", 1 / 1.1)]),  # an explicit weight only closes a round bracket
        ("ratio 16:9", [("ratio 16:9", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_attention_syntax(text, runs):
    parsed = parse_prompt_attention(text)
    assert [run for run, _ in parsed] == [run for run, _ in runs]
    assert [weight for _, weight in parsed] == pytest.approx([weight for _, weight in runs])


def test_bad_attention_weight_is_a_user_error():
    with pytest.raises(UserError, match=r"attention weight '1.2.3' is not a number"):
        parse_prompt_attention("(cat:1.2.3)")
