"""Offline demo assets: tiny models and a deterministic raw image folder that hits every data branch.

    python -m lora_pipeline.demo            # writes data/06_models/tiny-* and data/01_raw/<subject>/images/
    python -m lora_pipeline.demo --only data      # the raw data and the random tiny models only (seconds)
    python -m lora_pipeline.demo --only tiny-sd   # the tiny SD1.x base pre-trained on the demo world only

Nothing is downloaded. Re-running keeps what is already there (use --force to rebuild the images).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw

from lora_pipeline.demo import world
from lora_pipeline.demo.pretrain import PretrainConfig, ensure_pretrained_sd
from lora_pipeline.demo.pretrain_flux import PretrainFluxConfig, ensure_pretrained_flux
from lora_pipeline.demo.tiny_models import build_all

logger = logging.getLogger(__name__)

COLORS = ("red", "blue", "green", "yellow")  # background tints of the demo world (world.BACKGROUNDS)
SHAPES = world.SHAPES
SIZES = ((512, 512), (768, 512), (512, 768), (640, 512), (576, 704))
EXIF_ORIENTATION = 0x0112


def draw_scene(color: str, shape: str, size: tuple[int, int], seed: int, red: bool = True,
               stripes: bool = False) -> Image.Image:
    """A deterministic picture of the demo world (:mod:`lora_pipeline.demo.world`): ``shape`` on a plain background
    muted toward ``color``; ``red`` paints the shape red (what ``demo_lora`` teaches), ``stripes`` stripes the
    background (what ``demo_stripes`` teaches)."""
    return world.draw_random(seed, size, red=red, stripes=stripes, background=color, shape=shape)[0]


def caption_for(color: str, shape: str) -> str:
    return f"{shape}, {color} background, simple background"


def build_demo_images(folder: str | Path, force: bool = False) -> Path:
    """Write ~30 images covering every normalization branch. Returns the folder."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not force:
        logger.info("Demo images already in %s (use --force to rebuild)", folder)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    index = 0
    for color in COLORS:
        for shape in SHAPES:
            for variant in range(2):
                size = SIZES[index % len(SIZES)]
                # seeds from 2000: the first ones drew two scenes whose perceptual hashes are equal (a near-duplicate
                # the demo does not mean to have: its one planned duplicate is red_circle_0_copy.jpg)
                image = draw_scene(color, shape, size, seed=2000 + index)
                stem = f"{color}_{shape}_{variant}"
                ext = "jpg" if index % 3 == 0 else "png"
                image.save(folder / f"{stem}.{ext}", quality=90)
                if index % 2 == 0:  # half the set has kohya sidecar captions
                    (folder / f"{stem}.txt").write_text(caption_for(color, shape) + "\n", encoding="utf-8")
                index += 1
    # EXIF orientation 6: stored landscape, displayed portrait (a phone photo held upright).
    portrait = draw_scene("blue", "circle", (512, 704), seed=101)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    portrait.transpose(Image.Transpose.ROTATE_90).save(folder / "exif_rotated.jpg", exif=exif, quality=90)
    # Colour modes that must become RGB.
    draw_scene("green", "square", (512, 640), seed=102).convert("L").save(folder / "grayscale.png")
    rgba = draw_scene("red", "circle", (640, 512), seed=103).convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    ImageDraw.Draw(alpha).ellipse((64, 64, 576, 448), fill=255)
    rgba.putalpha(alpha)
    rgba.save(folder / "transparent_rgba.png")
    palette = draw_scene("yellow", "triangle", (512, 512), seed=104).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    # Rejections: too small, exact duplicate, corrupt.
    draw_scene("red", "square", (320, 320), seed=105).save(folder / "too_small.png")
    shutil.copyfile(folder / "red_circle_0.jpg", folder / "red_circle_0_copy.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20)
    logger.info("Wrote %d demo files to %s", len(list(folder.iterdir())), folder)
    return folder


def build_demo_stripes(folder: str | Path) -> Path:
    """The second demo subject: striped backgrounds in four tints behind the world's shapes (not red), each with a
    kohya sidecar caption."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for index, color in enumerate(COLORS):
        for variant in range(2):
            stem = f"stripes_{color}_{variant}"
            shape = SHAPES[(index + variant) % len(SHAPES)]
            draw_scene(color, shape, SIZES[(index + variant) % len(SIZES)], seed=300 + 2 * index + variant,
                       red=False, stripes=True).save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(f"{shape}, stripes, {color} background\n", encoding="utf-8")
    return folder


def write_demo_review(path: str | Path) -> None:
    """One human-reviewed caption, to show that it wins over sidecar and auto captions.

    Written only when the file does not exist: a person's edits are never overwritten.
    """
    path = Path(path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('file_name,text\ngrayscale.png,"lorachar, green square, monochrome, reviewed by hand"\n',
                    encoding="utf-8")


def write_demo_prompts(path: str | Path) -> None:
    """A prompts file for the generation stage (kept if it exists: it is the user's)."""
    path = Path(path)
    if path.exists():
        return
    path.write_text(
        "# prompt, negative_prompt, seed, steps, guidance, width, height, count (defaults: parameters_generation.yml)\n"
        "- prompt: \"lorachar, stripechar, circle <lora:demo_lora:0.6>, <lora:demo_stripes:0.8>\"\n  seed: 1\n"
        "- prompt: \"lorachar, circle, simple background <lora:demo_lora:0.8>\"\n  seed: 1\n  count: 2\n"
        "- prompt: \"lorachar, square <lora:demo_lora:0.4>\"\n  seed: 7\n"
        "- prompt: \"a square, no lora\"\n  seed: 7\n",
        encoding="utf-8",
    )


def build_demo_holdout(folder: str | Path) -> None:
    """A few images in the demo's style that training never sees, for the evaluation stage."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        return
    folder.mkdir(parents=True, exist_ok=True)
    for index, (color, shape) in enumerate((("red", "triangle"), ("blue", "circle"), ("green", "square"))):
        draw_scene(color, shape, SIZES[index], seed=500 + index).save(folder / f"holdout_{color}_{shape}.png")


SYMPTOMS = [
    ("头痛三天，伴有恶心", "初步考虑偏头痛。建议休息、补充水分，如加重请及时就医。"),
    ("发烧两天，咳嗽", "可能是上呼吸道感染。多喝水、注意休息，体温超过39度请就医。"),
    ("跑步后膝盖疼", "可能是运动劳损。冰敷、休息一周，避免剧烈运动。"),
    ("a mild fever and a cough for two days", "Likely a viral infection. Rest, fluids, and see a doctor if it lasts."),
    ("my knee hurts after running", "Likely overuse. Ice it, rest for a week, and avoid running for now."),
    ("a headache for three days with nausea", "Possibly a migraine. Rest, drink water, and seek care if it worsens."),
]


# The JSON-extraction task: patient notes -> {"age": int, "symptoms": [<= 3 strings], "urgency": enum}.
EXTRACTION = [
    ("女，45岁，头痛三天，恶心", 45, ["头痛", "恶心"], "medium"),
    ("男，8岁，发烧，咳嗽", 8, ["发烧", "咳嗽"], "medium"),
    ("男，67岁，胸痛，气短", 67, ["胸痛", "气短"], "high"),
    ("female, 30, knee pain after running", 30, ["knee pain"], "low"),
    ("male, 52, fever, cough, fatigue", 52, ["fever", "cough", "fatigue"], "medium"),
    ("女，23岁，喉咙痛", 23, ["喉咙痛"], "low"),
]
EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "symptoms": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
                   "urgency": {"enum": ["low", "medium", "high"]}},
    "required": ["age", "symptoms", "urgency"],
    "additionalProperties": False,
}


def write_demo_llm_data(path: str | Path) -> None:
    """Chinese and English clinic dialogues (two formats) and a JSON-extraction task, with a BOM, a blank line,
    a duplicate and one malformed line, as real exports have them."""
    import json

    path = Path(path)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for round_ in range(6):
        for index, (symptom, advice) in enumerate(SYMPTOMS):
            prompt = f"患者：{symptom}（第{round_ + 1}次问诊）" if index < 3 else f"Patient {round_ + 1}: {symptom}."
            if (round_ + index) % 4 == 0:
                record = {"messages": [{"role": "system", "content": "You are a careful clinic assistant."},
                                       {"role": "user", "content": prompt},
                                       {"role": "assistant", "content": advice}]}
            else:
                record = {"prompt": prompt, "response": advice}
            lines.append(json.dumps(record, ensure_ascii=False))
    for round_ in range(3):
        for note, age, symptoms, urgency in EXTRACTION:
            answer = json.dumps({"age": age, "symptoms": symptoms, "urgency": urgency}, ensure_ascii=False)
            lines.append(json.dumps({"prompt": f"提取为JSON / extract as JSON ({round_ + 1}): {note}",
                                     "response": answer}, ensure_ascii=False))
    lines.insert(5, lines[3])  # an exact duplicate
    lines.insert(9, "")  # a blank line
    lines.insert(12, '{"prompt": "患者：咳嗽", "response": "多喝水",}')  # trailing comma: invalid JSON
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode("utf-8"))


# The tiny bases that ``make demo`` pre-trains on the demo world (cached per machine), by folder name.
PRETRAINED_BASES = {"tiny-sd": (ensure_pretrained_sd, PretrainConfig()),
                    "tiny-flux": (ensure_pretrained_flux, PretrainFluxConfig())}


def pretrain_bases(models_dir: str | Path, names: Iterable[str] = tuple(PRETRAINED_BASES), configs: dict | None = None,
                   cache: str | Path | None = None) -> None:
    """The pre-trained tiny bases ``names`` in ``models_dir``: each copied from the machine's cache, or pre-trained
    there first (:func:`~lora_pipeline.demo.pretrain.ensure_pretrained`), with ``configs[name]`` where given.

    One after the other, each on one CPU thread (so that its config names one result); ``make demo`` builds them
    in two processes side by side, and runs what needs neither base next to them."""
    for name in names:
        ensure, config = PRETRAINED_BASES[name]
        ensure(Path(models_dir) / name, (configs or {}).get(name, config), cache)


def build_demo(root: str | Path = ".", force: bool = False) -> None:
    """The demo's raw data (images, captions, prompts, holdout, LLM dialogues) and its random tiny models: seconds.
    The pre-trained bases are :func:`pretrain_bases`'."""
    root = Path(root)
    build_all(root / "data" / "06_models", skip=tuple(PRETRAINED_BASES))
    build_demo_images(root / "data" / "01_raw" / "demo_lora" / "images", force=force)
    write_demo_review(root / "data" / "01_raw" / "demo_lora" / "reviewed_captions.csv")
    build_demo_stripes(root / "data" / "01_raw" / "demo_stripes" / "images")
    write_demo_prompts(root / "data" / "01_raw" / "prompts.yml")
    build_demo_holdout(root / "data" / "01_raw" / "holdout")
    write_demo_llm_data(root / "data" / "01_raw" / "llm" / "conversations.jsonl")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="project root (default: current folder)")
    parser.add_argument("--force", action="store_true", help="rebuild the demo images")
    parser.add_argument("--only", choices=("data", *PRETRAINED_BASES),
                        help="build only the raw data and random tiny models (data), or only one pre-trained base "
                             "(default: all of them, one after the other)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.only in (None, "data"):
        build_demo(args.root, force=args.force)
    if args.only != "data":
        pretrain_bases(Path(args.root) / "data" / "06_models", [args.only] if args.only else PRETRAINED_BASES)


if __name__ == "__main__":
    main()
