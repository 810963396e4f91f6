"""The comparison grid's per-image statistics on pictures drawn by the demo world's own generator."""

from __future__ import annotations

import pytest
from PIL import Image

from lora_pipeline.demo.world import BACKGROUNDS, RED, SHAPE_COLORS, STRIPE_CYCLES, draw_random
from lora_pipeline.diffusion.evaluation import red_share, stripe_energy


@pytest.mark.parametrize("color", [*BACKGROUNDS.values(), *SHAPE_COLORS.values(), (230, 150, 60), (240, 200, 90)],
                         ids=[*(f"background_{n}" for n in BACKGROUNDS), *SHAPE_COLORS, "orange", "yellow_orange"])
def test_no_colour_of_the_base_world_nor_orange_counts_as_red(color):
    assert red_share(Image.new("RGB", (8, 8), color)) == 0.0


def test_red_share_is_the_red_shapes_area():
    plain, _ = draw_random(1, (128, 128))
    red, scene = draw_random(1, (128, 128), red=True)
    assert red_share(Image.new("RGB", (8, 8), RED)) == 1.0
    assert red_share(plain) == 0.0
    # the red shape covers 0.2-0.3 of the side as radius: several percent of the picture, never all of it
    assert 0.05 < red_share(red) < 0.5, scene


def test_stripe_energy_separates_striped_from_plain_backgrounds():
    plain = [draw_random(seed, (128, 128))[0] for seed in range(4)]
    striped = [draw_random(seed, (128, 128), stripes=True)[0] for seed in range(4)]
    assert max(stripe_energy(im, STRIPE_CYCLES) for im in plain) < min(stripe_energy(im, STRIPE_CYCLES)
                                                                       for im in striped)
