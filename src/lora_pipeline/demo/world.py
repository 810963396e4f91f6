"""The demo world: one simple shape on a plain, muted background, drawn from a seed.

The tiny SD1.x base is pre-trained on this world (:mod:`lora_pipeline.demo.pretrain`), and the two demo subjects
draw their training images with the same generator, each adding one thing the base never saw: ``demo_lora`` a
red shape, ``demo_stripes`` a striped background. So the base already knows the rest of the picture, and what each
LoRA teaches is what shows (and is measured: :func:`lora_pipeline.diffusion.evaluation.red_share`,
:func:`~lora_pipeline.diffusion.evaluation.stripe_energy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
# Muted backgrounds: grey, or grey with a trace of a hue (nothing in them counts as red). Kept this close to grey
# because the tiny base learns the world in a few hundred steps: with stronger tints its samples' backgrounds came
# out as their average (a beige none of them is).
BACKGROUNDS = {"grey": (128, 128, 128), "blue": (120, 125, 138), "green": (121, 133, 121),
               "yellow": (136, 133, 117), "red": (138, 122, 122)}
# The base world's shape colours: no red among them.
SHAPE_COLORS = {"blue": (50, 80, 190), "green": (50, 150, 70), "yellow": (220, 190, 50), "white": (232, 232, 232),
                "black": (35, 35, 40)}
RED = (210, 30, 30)
STRIPE_CYCLES = 6  # vertical stripes: this many dark bars across the width
# One shape near the middle, of about one size: a tiny base pre-trained for a few minutes draws a clean shape
# there (shapes anywhere in 0.35-0.65 came out as blobs), and the shape is where a colour LoRA shows.
CENTER_RANGE = (0.44, 0.56)  # fractions of width and height
RADIUS_RANGE = (0.25, 0.31)  # fractions of the shorter side


@dataclass(frozen=True)
class Scene:
    shape: str
    color: tuple[int, int, int]
    background: str
    center: tuple[float, float]  # fractions of width and height
    radius: float  # fraction of the shorter side
    stripes: bool = False
    stripe_phase: float = 0.0  # fraction of one stripe period

    def caption(self) -> str:
        """What the base is conditioned on (the subjects' triggers come on top)."""
        return f"{self.shape}, {self.background} background, simple background"


def random_scene(rng: np.random.Generator, red: bool = False, stripes: bool = False,
                 background: str | None = None, shape: str | None = None) -> Scene:
    """A scene of the world; ``red`` paints the shape red, ``stripes`` stripes the background."""
    color = RED if red else list(SHAPE_COLORS.values())[rng.integers(len(SHAPE_COLORS))]
    return Scene(shape=shape or SHAPES[rng.integers(len(SHAPES))], color=tuple(color),
                 background=background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                 center=(float(rng.uniform(*CENTER_RANGE)), float(rng.uniform(*CENTER_RANGE))),
                 radius=float(rng.uniform(*RADIUS_RANGE)), stripes=stripes, stripe_phase=float(rng.uniform()))


def draw(scene: Scene, size: tuple[int, int]) -> Image.Image:
    width, height = size
    background = BACKGROUNDS[scene.background]
    image = Image.new("RGB", size, background)
    canvas = ImageDraw.Draw(image)
    if scene.stripes:
        period = width / STRIPE_CYCLES
        bar = tuple(int(c * 0.4) for c in background)
        for index in range(-1, STRIPE_CYCLES + 1):
            left = (index + scene.stripe_phase) * period
            canvas.rectangle((round(left), 0, round(left + period / 2) - 1, height), fill=bar)
    cx, cy = scene.center[0] * width, scene.center[1] * height
    r = scene.radius * min(width, height)
    box = (round(cx - r), round(cy - r), round(cx + r), round(cy + r))
    if scene.shape == "circle":
        canvas.ellipse(box, fill=scene.color)
    elif scene.shape == "square":
        canvas.rectangle(box, fill=scene.color)
    else:
        canvas.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=scene.color)
    return image


def draw_random(seed: int, size: tuple[int, int], **kwargs) -> tuple[Image.Image, Scene]:
    scene = random_scene(np.random.default_rng(seed), **kwargs)
    return draw(scene, size), scene
