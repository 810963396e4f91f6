"""The one parameter schema. Each ``params:<group>`` dict is validated here before any heavy work.

Unknown keys are errors (``extra="forbid"``): a typo such as ``lora_rnak`` must not be ignored silently.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lora_pipeline.errors import ConfigError


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


class CaptioningParams(_Strict):
    backend: Literal["sidecar", "blip", "clip_tags"] = "blip"
    model: str | None = Field(None, description="Local folder or hub id of the captioning model.")
    allow_download: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    batch_size: int = Field(8, ge=1, le=1024)
    max_new_tokens: int = Field(30, ge=1, le=512)
    trigger: str = ""
    template: str = "{trigger}, {caption}"
    use_sidecars: bool = Field(True, description="kohya .txt files next to images win over auto captions.")
    clip_tags: ClipTagsParams = Field(default_factory=ClipTagsParams)

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
        return fields


class PromptParams(_Strict):
    trigger: str = ""
    lowercase: bool = True
    front_keywords: list[str] = Field(default_factory=list, description="Tags moved right after the trigger.")
    keep_tokens: int = Field(1, ge=0, le=32, description="Leading tags training never shuffles (kohya).")


class NormalizationParams(_Strict):
    min_size: int = Field(512, ge=8, le=16384, description="Shortest side an input image must have.")
    mode: Literal["buckets", "crop"] = "buckets"
    resolution: int = Field(512, ge=64, le=4096, description="Square side (crop) or bucket area side.")
    bucket_min: int = Field(256, ge=64, le=4096)
    bucket_max: int = Field(1024, ge=64, le=8192)
    bucket_step: int = Field(64, ge=8, le=512)
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

    @model_validator(mode="after")
    def _buckets_consistent(self) -> "NormalizationParams":
        if self.bucket_min > self.bucket_max:
            raise ValueError(f"bucket_min ({self.bucket_min}) must not exceed bucket_max ({self.bucket_max})")
        for key in ("resolution", "bucket_min", "bucket_max"):
            if getattr(self, key) % self.bucket_step:
                raise ValueError(f"{key} must be a multiple of bucket_step ({self.bucket_step})")
        if not self.bucket_min <= self.resolution <= self.bucket_max:
            raise ValueError("resolution must lie between bucket_min and bucket_max")
        return self


SCHEMAS: dict[str, type[_Strict]] = {
    "captioning": CaptioningParams,
    "normalization": NormalizationParams,
}

P = TypeVar("P", bound=BaseModel)


def _describe(error: Mapping[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown parameter (typo?)"
    return f"{location}: {error['msg']} (got {error.get('input')!r})"


def parse_params(schema: type[P], raw: Mapping[str, Any] | None, group: str) -> P:
    """Validate one ``params:<group>`` dict, turning pydantic's errors into one actionable message."""
    try:
        return schema.model_validate(dict(raw or {}))
    except ValidationError as exc:
        allowed = ", ".join(sorted(schema.model_fields))
        problems = "\n".join(f"  - {group}.{_describe(err)}" for err in exc.errors())
        raise ConfigError(
            f"Invalid parameters in conf/*/parameters_{group}.yml:\n{problems}\n"
            f"Known keys of '{group}': {allowed}. Fix the file (or your override in conf/local/) and re-run."
        ) from None


def validate_all(parameters: Mapping[str, Any]) -> dict[str, BaseModel]:
    """Validate every known parameter group that is present; used by a hook before any node runs."""
    return {
        group: parse_params(schema, parameters[group], group)
        for group, schema in SCHEMAS.items()
        if group in parameters
    }
