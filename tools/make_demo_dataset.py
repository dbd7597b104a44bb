"""Write the small demo image set: coloured shapes on plain backgrounds, each with a caption file.

    python tools/make_demo_dataset.py --out demo/images
"""

import argparse
import os

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 210, 40),
           "black": (20, 20, 20), "white": (245, 245, 245), "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle", "cross")
SCENES = [("red", "circle", "white"), ("blue", "square", "black"), ("green", "circle", "yellow"),
          ("white", "triangle", "blue"), ("black", "square", "blue"), ("purple", "triangle", "white"),
          ("yellow", "cross", "white"), ("blue", "triangle", "green")]


def draw(shape: str, colour, background, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    a, b = size // 5, size - size // 5
    if shape == "circle":
        pen.ellipse((a, a, b, b), fill=colour)
    elif shape == "square":
        pen.rectangle((a, a, b, b), fill=colour)
    elif shape == "triangle":
        pen.polygon(((size // 2, a), (b, b), (a, b)), fill=colour)
    else:
        third = (b - a) // 3
        pen.rectangle((a + third, a, b - third, b), fill=colour)
        pen.rectangle((a, a + third, b, b - third), fill=colour)
    return image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for index, (colour, shape, background) in enumerate(SCENES):
        stem = os.path.join(args.out, f"{index:02d}_{colour}_{shape}")
        draw(shape, COLOURS[colour], COLOURS[background], args.size).save(stem + ".png")
        with open(stem + ".txt", "w", encoding="utf-8") as handle:
            handle.write(f"shapetoken, a {colour} {shape} on a {background} background\n")
    print(f"wrote {len(SCENES)} images with captions to {args.out}")


if __name__ == "__main__":
    main()
