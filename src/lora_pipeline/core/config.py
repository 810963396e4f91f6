"""The one parameter schema. Each ``params:<group>`` dict is validated here before any heavy work.

Unknown keys are errors (``extra="forbid"``): a typo such as ``lora_rnak`` must not be ignored silently.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_pipeline.core.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClipTagsParams(_Strict):
    vocabulary: list[str] = Field(default_factory=list, description="Tags CLIP scores every image against.")
    top_k: int = Field(5, ge=1, le=100)
    threshold: float = Field(0.05, ge=0.0, le=1.0, description="Minimum softmax probability of a tag.")
    prompt: str = Field("a photo of {tag}", description="Text CLIP embeds for each tag.")

    @field_validator("prompt")
    @classmethod
    def _has_tag_slot(cls, value: str) -> str:
        if "{tag}" not in value:
            raise ValueError("must contain '{tag}', e.g. 'a photo of {tag}'")
        return value


class WD14Params(_Strict):
    general_threshold: float = Field(0.35, ge=0.0, le=1.0)
    character_threshold: float = Field(0.85, ge=0.0, le=1.0)
    exclude_tags: list[str] = Field(default_factory=list, description="tags never written (e.g. 'simple background')")
    underscores_to_spaces: bool = True
    escape_parentheses: bool = Field(True, description="'(' -> '\\(' so WebUI does not read them as weights")


class CaptioningParams(_Strict):
    backend: Literal["sidecar", "blip", "clip_tags", "wd14"] = "blip"
    model: str | None = Field(None, description="Local folder or hub id of the captioning model.")
    allow_download: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    batch_size: int = Field(8, ge=1, le=1024)
    max_new_tokens: int = Field(30, ge=1, le=512)
    trigger: str = ""
    template: str = "{trigger}, {caption}"
    use_sidecars: bool = Field(True, description="kohya caption files next to images win over auto captions.")
    caption_extension: str = Field(".txt", pattern=r"^\.[A-Za-z0-9_]+$",
                                   description="the sidecar captions' extension, as kohya's caption_extension")
    metadata_csv: str | None = Field(None, description="a metadata.csv of captions (file_name, and text, caption or "
                                     "prompt; file names relative to its folder, as diffusers' imagefolder): ranked "
                                     "like sidecars, which win over its rows")
    clip_tags: ClipTagsParams = Field(default_factory=ClipTagsParams)
    wd14: WD14Params = Field(default_factory=WD14Params, description="backend: wd14 (a WD tagger: model.onnx + "
                             "selected_tags.csv)")

    @field_validator("template")
    @classmethod
    def _has_caption_slot(cls, value: str) -> str:
        if "{caption}" not in value:
            raise ValueError("must contain '{caption}', e.g. '{trigger}, {caption}'")
        return value

    @model_validator(mode="after")
    def _model_needed(self) -> "CaptioningParams":
        if self.backend != "sidecar" and not self.model:
            raise ValueError(f"backend '{self.backend}' needs 'model': a local folder or a hub id")
        if self.backend == "clip_tags" and not self.clip_tags.vocabulary:
            raise ValueError("backend 'clip_tags' needs a non-empty 'clip_tags.vocabulary' list")
        return self

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that change an auto caption; a change re-captions every image."""
        fields: dict[str, Any] = {"backend": self.backend, "model": self.model}
        if self.backend == "blip":
            fields["max_new_tokens"] = self.max_new_tokens
        if self.backend == "clip_tags":
            fields["clip_tags"] = self.clip_tags.model_dump()
        if self.backend == "wd14":
            fields["wd14"] = self.wd14.model_dump()
        return fields


class PromptParams(_Strict):
    trigger: str = ""
    lowercase: bool = True
    front_keywords: list[str] = Field(default_factory=list, description="Tags moved right after the trigger.")
    keep_tokens: int = Field(1, ge=0, le=32, description="Leading tags training never shuffles (kohya).")


# ``auto`` or a family of the registry (lora_pipeline.diffusion.families: a new family is one module there, and
# nothing here lists them); checked before the first node by project.preflight, and by the loader.
FamilyName = str


class NormalizationParams(_Strict):
    min_size: int = Field(512, ge=8, le=16384, description="Shortest side an input image must have.")
    mode: Literal["buckets", "crop"] = "buckets"
    resolution: int | Literal["auto"] | tuple[int, int] = Field(
        "auto", description="Square side, or 'W,H' / [W, H] as kohya's resolution: the crop size, or the bucket "
                            "area W*H; auto: the base model family's native size (SD1.x 512, SDXL 1024)")
    bucket_min: int | None = Field(None, ge=64, le=4096, description="null: resolution / 2")
    bucket_max: int | None = Field(None, ge=64, le=8192, description="null: resolution * 2")
    bucket_step: int = Field(64, ge=8, le=512)
    base_model: str | None = Field(None, description="the training base, read only for resolution: auto")
    base_model_family: FamilyName = "auto"
    subject: str = Field("", description="set per subject from subjects.yml; names the MLflow artifacts")
    kohya_folders: bool = Field(True, description="read kohya's N_concept sub-folders as N repeats of class token "
                                "'concept'; false: folder names are plain names")
    reg_caption_extension: str = Field(".txt", pattern=r"^\.[A-Za-z0-9_]+$",
                                       description="caption files of regularization images (else their class token)")
    background: tuple[int, int, int] = (255, 255, 255)
    near_duplicates: bool = False
    near_duplicate_distance: int = Field(4, ge=0, le=64, description="Max perceptual-hash Hamming distance.")
    output_format: Literal["png", "jpg", "webp"] = "png"
    workers: int = Field(0, ge=0, le=256, description="Decode/resize threads; 0 means one per CPU core.")
    prompt: PromptParams = Field(default_factory=PromptParams)

    @field_validator("background")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("each channel must be between 0 and 255")
        return value

    @field_validator("resolution", mode="before")
    @classmethod
    def _resolution_pair(cls, value: Any) -> Any:
        if isinstance(value, str) and "," in value:  # kohya writes "768,512"
            try:
                value = [int(part) for part in value.split(",")]
            except ValueError:
                raise ValueError("must be 'auto', one size, or 'W,H' such as '768,512'") from None
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution_range(cls, value: Any) -> Any:
        sides = value if isinstance(value, tuple) else (value,)
        if value != "auto" and not all(64 <= side <= 4096 for side in sides):
            raise ValueError("must be 'auto', or sizes between 64 and 4096")
        return value

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the base resolution (square unless written as W,H)."""
        if isinstance(self.resolution, tuple):
            return self.resolution
        return int(self.resolution), int(self.resolution)

    @model_validator(mode="after")
    def _buckets_consistent(self) -> "NormalizationParams":
        if self.bucket_min and self.bucket_max and self.bucket_min > self.bucket_max:
            raise ValueError(f"bucket_min ({self.bucket_min}) must not exceed bucket_max ({self.bucket_max})")
        if self.resolution == "auto":
            return self  # the rest is checked by sized(), once the family's size is known
        low, high = self.bucket_bounds()
        if low > high:
            raise ValueError(f"bucket_min ({low}) must not exceed bucket_max ({high})")
        for key, value in (("resolution", self.size[0]), ("resolution", self.size[1]), ("bucket_min", low),
                           ("bucket_max", high)):
            if value % self.bucket_step:
                raise ValueError(f"{key} ({value}) must be a multiple of bucket_step ({self.bucket_step})")
        if not all(low <= side <= high for side in self.size):
            raise ValueError("resolution must lie between bucket_min and bucket_max")
        return self

    def bucket_bounds(self) -> tuple[int, int]:
        short, long = min(self.size), max(self.size)
        return (self.bucket_min or max(self.bucket_step, short // 2 // self.bucket_step * self.bucket_step),
                self.bucket_max or long * 2)

    def sized(self, native_resolution: int) -> "NormalizationParams":
        """A copy with concrete sizes: ``auto`` becomes the family's native resolution, null bounds derived."""
        resolution = native_resolution if self.resolution == "auto" else self.resolution
        low, high = self.model_copy(update={"resolution": resolution}).bucket_bounds()
        try:
            return NormalizationParams.model_validate(
                {**self.model_dump(), "resolution": resolution, "bucket_min": low, "bucket_max": high})
        except ValidationError as exc:
            raise ConfigError(f"Invalid parameters in conf/*/parameters_normalization.yml once resolution is "
                              f"{resolution}: {exc.errors()[0]['msg']}. Set resolution, bucket_min and bucket_max "
                              f"explicitly.") from None


KOHYA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
KOHYA_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


class TrainingParams(_Strict):
    base_model: str = Field(..., description="diffusers folder, hub id, or single .safetensors/.ckpt file")
    base_model_family: FamilyName = Field("auto", description="auto: read from model_index.json or the file's keys")
    allow_download: bool = False
    single_file_config: str | None = Field(None, description="local diffusers folder of the same family, for single "
                                                             "files (configs + tokenizers; nothing is downloaded)")
    output_name: str = Field("my_lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    lora_rank: int = Field(8, ge=1, le=1024)
    alpha: float = Field(8.0, gt=0, le=4096, description="scale = alpha / lora_rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    unet_targets: list[str] = Field(default_factory=lambda: list(KOHYA_UNET_TARGETS), min_length=1)
    train_text_encoder: bool = False
    text_encoder_targets: list[str] = Field(default_factory=lambda: list(KOHYA_TE_TARGETS), min_length=1)
    batch_size: int = Field(1, ge=1, le=1024)
    epochs: int = Field(10, ge=1, le=100000)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    learning_rate: float = Field(1e-4, gt=0, le=1.0)
    text_encoder_lr: float = Field(5e-5, gt=0, le=1.0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_scheduler_num_cycles: int = Field(1, ge=1, le=1000, description="restarts of cosine_with_restarts")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_grad_norm: float = Field(1.0, ge=0.0)
    seed: int = Field(42, ge=0, lt=2**31)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass; on by "
                                         "default with a base_quantization (set false to turn it off there)")
    base_quantization: Literal["none", "nf4", "float8"] = Field(
        "none", description="store the frozen denoiser's Linear weights in 4 bits (nf4, bitsandbytes) or 8 bits "
                            "(float8, torchao) on a CUDA GPU; the LoRA trains on top in bf16 (mixed_precision: "
                            "bf16). Needs pip install 'lora_pipeline[quantization]'")
    min_snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0.0, le=1.0)
    # flow matching (Flux.1): how the noise level of each image is drawn; kohya's recommended preset is the default
    timestep_sampling: Literal["sigmoid", "shift", "logit_normal", "uniform"] = Field(
        "shift", description="flow-matching families: sigma = sigmoid(sigmoid_scale * N(0, 1)), then shifted by "
                             "discrete_flow_shift for 'shift'; logit_normal as SD3; uniform")
    discrete_flow_shift: float = Field(3.1582, gt=0, le=100)
    sigmoid_scale: float = Field(1.0, gt=0, le=100)
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    shuffle_tags: bool = False
    keep_tokens: int | None = Field(None, ge=0, description="None: the value normalization recorded")
    repeats: int = Field(1, ge=1, le=1000, description="times each image is seen per epoch, times its folder's N_")
    prior_loss_weight: float = Field(1.0, ge=0.0, le=100.0, description="loss weight of regularization images "
                                     "(DreamBooth prior preservation, kohya's prior_loss_weight)")
    clip_skip: int = Field(1, ge=1, le=2, description="1: last CLIP layer; 2: penultimate (WebUI 'Clip skip'), "
                           "SD1.x only")
    flip_aug: bool = Field(False, description="train on horizontally mirrored copies too (caches both latents)")
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "lion", "adafactor"] = "adamw"
    optimizer_args: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments for the "
                                           "optimizer, as kohya's optimizer_args (e.g. {weight_decay: 0.01})")
    cache_latents: bool = Field(True, description="encode each image once (disk cache) instead of every step")
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps; 0 = only at the end (a run shorter "
                            "than save_steps saves at its end)")
    save_every_n_epochs: int = Field(0, ge=0, description="checkpoint at the end of every N epochs (kohya's); "
                                     "with save_steps, both")
    keep_checkpoints: int = Field(3, ge=1)
    checkpoint_dir: str = "data/06_models/checkpoints"
    resume: str = Field("none", description="none | auto | latest | <checkpoint folder>")
    init_lora: str | None = Field(None, description="kohya/diffusers LoRA file, or 'latest' (newest export)")
    export_dir: str = Field("data/07_model_output", description="where init_lora: latest looks for exports")
    sample_prompts: list[str] = Field(default_factory=list)
    sample_every_steps: int = Field(0, ge=0, description="0 = samples only at the end")
    sample_inference_steps: int = Field(20, ge=1, le=200)
    sample_size: int | None = Field(None, ge=64, le=2048)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    gpu: int | None = Field(None, ge=0, description="with several GPUs visible, this run's GPU (index modulo their "
                                                     "count); subjects get their position in subjects.yml")
    data_workers: int | None = Field(None, ge=0, le=64, description="DataLoader processes; null: 0 on CPU, "
                                     "up to 4 beside a GPU")
    allow_tf32: bool = Field(True, description="TF32 matmuls on Ampere+ GPUs (about 2x; loss differs ~1e-3)")
    log_every_steps: int = Field(1, ge=1, description="loss read-back + MLflow log interval; 10+ on a GPU")



class ExportParams(_Strict):
    precision: Literal["fp16", "fp32", "bf16"] = "fp16"
    webui_lora_dir: str | None = Field(None, description="also copy the .safetensors into this folder")
    base_model_name: str | None = Field(None, description="shown as ss_sd_model_name; default: base_model")


class PromptSpec(_Strict):
    """One row of a prompts file."""

    prompt: str = Field(..., min_length=1)
    negative_prompt: str = ""
    seed: int = Field(0, ge=0, lt=2**32)
    steps: int = Field(25, ge=1, le=500)
    guidance: float = Field(7.0, ge=0.0, le=50.0)
    width: int = Field(512, ge=64, le=4096, multiple_of=8)
    height: int = Field(512, ge=64, le=4096, multiple_of=8)
    count: int = Field(1, ge=1, le=64)
    clip_skip: int | None = Field(None, ge=1, le=2, description="WebUI's Clip skip; null: the LoRA's ss_clip_skip")


class GenerationParams(_Strict):
    base_model: str
    base_model_family: FamilyName = "auto"
    allow_download: bool = False
    single_file_config: str | None = None
    lora_dirs: list[str] = Field(default_factory=lambda: ["data/07_model_output"],
                                 description="searched in order: project exports first, then e.g. WebUI models/Lora")
    prompts_file: str = Field("data/01_raw/prompts.yml", description="YAML or CSV: prompt, negative_prompt, seed, ...")
    prompt: str | None = Field(None, description="one prompt from the command line; replaces the prompts file")
    defaults: PromptSpec = Field(default_factory=lambda: PromptSpec(prompt="-"))
    comparison_weights: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0], min_length=1)
    comparison_statistics: list[Literal["red_share", "stripe_energy"]] = Field(
        default_factory=list, description="measured on every grid cell: share of red pixels, vertical-stripe energy")
    stripe_cycles: int = Field(6, ge=1, le=256, description="stripe_energy: stripe periods across the width")
    thumbnail: int = Field(256, ge=32, le=2048)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class EvaluationParams(_Strict):
    holdout_dir: str | None = Field(None, description="images the LoRA did not train on")
    timesteps: list[int] = Field(default_factory=lambda: [100, 300, 500, 700, 900], min_length=1)
    seed: int = Field(0, ge=0)
    clip_model: str | None = Field(None, description="CLIP for prompt adherence; null skips it")
    eval_prompts: list[str] = Field(default_factory=list)
    eval_steps: int = Field(20, ge=1, le=200)
    eval_size: int = Field(512, ge=64, le=2048, multiple_of=8)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"


class MergeEntry(_Strict):
    name: str
    weight: float = 1.0


class MergeParams(_Strict):
    loras: list[MergeEntry] = Field(..., min_length=1)
    output_name: str = Field("merged", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    precision: Literal["fp16", "fp32"] = "fp16"


class LLMDataParams(_Strict):
    tokenizer: str = Field(..., description="the base model's folder or hub id (for token counts and templates)")
    allow_download: bool = False
    template: str | None = Field(None, description="None: the tokenizer's chat template, else the default one")
    max_length: int = Field(512, ge=16, le=131072, description="tokens per sample (prompt + response)")
    overlong: Literal["truncate", "reject"] = "truncate"
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = Field(42, ge=0)
    split_salt: str | None = Field(None, description="salt of the prompt hash that picks validation examples; "
                                   "null: the seed. Changing it reshuffles the split")

    @property
    def salt(self) -> str:
        return self.split_salt if self.split_salt is not None else str(self.seed)


class LLMTrainingParams(_Strict):
    base_model: str
    allow_download: bool = False
    output_name: str = Field("llm_lora", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    lora_rank: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32.0, gt=0, le=4096)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    batch_size: int = Field(4, ge=1, le=1024)
    epochs: int = Field(3, ge=1, le=10000)
    max_steps: int | None = Field(None, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    lr_warmup_steps: int = Field(0, ge=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, ge=0.0)
    seed: int = Field(42, ge=0, lt=2**31)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    quantize_4bit: bool = Field(False, description="QLoRA: 4-bit base weights (needs bitsandbytes + CUDA)")
    packing: bool = Field(False, description="pack several samples per row (block-diagonal attention)")
    pack_length: int = Field(0, ge=0, description="tokens per packed row; 0 = the longest sample")
    save_steps: int = Field(0, ge=0)
    keep_checkpoints: int = Field(3, ge=1)
    checkpoint_dir: str = "data/06_models/checkpoints"
    resume: str = "none"
    init_adapter: str | None = Field(None, description="continue from an earlier adapter: 'latest' (the newest "
                                     "export of output_name) or a PEFT adapter folder; null: a new adapter")
    export_dir: str = Field("data/07_model_output", description="where init_adapter: latest looks for exports")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    log_every_steps: int = Field(1, ge=1, description="loss read-back + MLflow log interval; 10+ on a GPU")


class LLMEvalParams(_Strict):
    max_new_tokens: int = Field(64, ge=1, le=4096)
    max_prompts: int = Field(20, ge=1)
    json_schema: dict[str, Any] | None = Field(None, description="JSON Schema for response_format: json")
    json_prompts: list[str] = Field(default_factory=list, description="prompts for the JSON-validity figure")


SUBJECT_GROUPS = ("captioning", "normalization", "training", "export", "evaluation")


class SubjectParams(_Strict):
    """One LoRA of the project's library: its data, trigger, base and overrides of the shared parameter groups.

    Every string in the subject's parameters may use ``{subject}`` and ``{trigger}``.
    """

    trigger: str | None = Field(None, description="the subject's trigger word (default: globals.trigger)")
    base_model: str | None = Field(None, description="default: globals.base_model")
    base_model_family: FamilyName | None = None
    images: str | None = Field(None, description="raw image folder; default data/01_raw/<subject>/images")
    reviewed_captions: str | None = Field(None, description="default data/01_raw/<subject>/reviewed_captions.csv")
    reg_images: str | None = Field(None, description="kohya reg_data_dir: class images for prior preservation; "
                                   "default data/01_raw/<subject>/reg (optional)")
    captioning: dict[str, Any] = Field(default_factory=dict)
    normalization: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    export: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] = Field(default_factory=dict)


SUBJECT_NAME = r"^[A-Za-z][A-Za-z0-9_]*$"  # a Kedro namespace and a WebUI <lora:NAME>: no dots or dashes


def parse_subjects(raw: Mapping[str, Any] | None) -> dict[str, SubjectParams]:
    """``subjects.yml``'s ``subjects:`` mapping, validated; errors name the subject and the key."""
    import re

    entries = dict((raw or {}).get("subjects") or {})
    if not entries:
        raise ConfigError("conf/*/subjects.yml lists no subjects. Add one, e.g.\nsubjects:\n  my_lora:\n    "
                          "trigger: sks\nand put its images in data/01_raw/my_lora/images/.")
    subjects = {}
    for name, values in entries.items():
        if not re.match(SUBJECT_NAME, str(name)):
            raise ConfigError(f"subjects.yml: subject name {name!r} must start with a letter and hold only letters, "
                              f"digits and _ (it becomes a Kedro namespace and the <lora:{name}> name).")
        subjects[str(name)] = parse_params(SubjectParams, values or {}, f"subjects.{name}")
    return subjects


SCHEMAS: dict[str, type[_Strict]] = {
    "captioning": CaptioningParams,
    "normalization": NormalizationParams,
    "training": TrainingParams,
    "export": ExportParams,
    "generation": GenerationParams,
    "evaluation": EvaluationParams,
    "merge": MergeParams,
    "llm_data": LLMDataParams,
    "llm_training": LLMTrainingParams,
    "llm_eval": LLMEvalParams,
}

P = TypeVar("P", bound=BaseModel)
PARAMETER_FILES = {"llm_data": "llm", "llm_training": "llm", "llm_eval": "llm"}  # groups that share a file


def _known_keys(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The valid keys at the level of an error location (nested models included)."""
    model: Any = schema
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def _describe(error: Mapping[str, Any], schema: type[BaseModel]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(error["loc"][-1]), _known_keys(schema, error["loc"]), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"{location}: unknown parameter{hint}"
    return f"{location}: {error['msg']} (got {error.get('input')!r})"


def parse_params(schema: type[P], raw: Mapping[str, Any] | None, group: str) -> P:
    """Validate one ``params:<group>`` dict, turning pydantic's errors into one actionable message."""
    try:
        return schema.model_validate(dict(raw or {}))
    except ValidationError as exc:
        allowed = ", ".join(sorted(schema.model_fields))
        problems = "\n".join(f"  - {group}.{_describe(err, schema)}" for err in exc.errors())
        if group.startswith("subjects."):
            where = "conf/*/subjects.yml"
        elif "." in group:  # a subject's copy: the shared group, or the subject's overrides
            subject, shared = group.split(".", 1)
            where = f"conf/*/parameters_{shared}.yml or subject '{subject}' in conf/*/subjects.yml"
        else:
            where = f"conf/*/parameters_{PARAMETER_FILES.get(group, group)}.yml"
        raise ConfigError(
            f"Invalid parameters in {where}:\n{problems}\n"
            f"Known keys of '{group}': {allowed}. Fix the file (or your override in conf/local/) and re-run."
        ) from None


def validate_all(parameters: Mapping[str, Any], subjects: Mapping[str, Any] = ()) -> dict[str, BaseModel]:
    """Validate every known parameter group that is present, and each subject's copy of its groups
    (``aki.training``); used by a hook before any node runs. An unknown top-level group (``trainning:``) is an
    error too: its settings would otherwise be ignored without a word."""
    unknown = [key for key in parameters if key not in SCHEMAS and key not in subjects]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), [*SCHEMAS, *subjects], n=1)
            hints.append(f"  - {key}: unknown parameter group" + (f"; did you mean '{close[0]}'?" if close else ""))
        raise ConfigError("Invalid parameters in conf/*/parameters*.yml (or --params):\n" + "\n".join(hints) +
                          f"\nKnown groups: {', '.join(SCHEMAS)}, and the subjects of subjects.yml "
                          f"({', '.join(subjects) or 'none'}). Rename or remove the group and re-run.")
    validated = {group: parse_params(schema, parameters[group], group)
                 for group, schema in SCHEMAS.items() if group in parameters}
    for name in subjects:
        for group in SUBJECT_GROUPS:
            if group in parameters.get(name, {}):
                validated[f"{name}.{group}"] = parse_params(SCHEMAS[group], parameters[name][group],
                                                            f"{name}.{group}")
    return validated
