"""The typed objects that travel between stages: what a LoRA *is* (:class:`LoraSpec`), a LoRA file's tensors and
header (:class:`LoraFile`), what normalization found (:class:`DatasetInfo`) and what a training run produced
(:class:`ImageTrainingSummary`, :class:`LLMTrainingSummary`).

Training writes the summaries; export, generation, merge, evaluation and the LLM export and evaluation only read
them. Nothing after training re-derives rank, alpha, targets or the base model from the current parameters, so
editing ``parameters_*.yml`` between training and export cannot silently change an adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from torch import Tensor

Family = str  # a name of lora_pipeline.diffusion.families' registry, or "causal_lm" (the LLM track)


def rescale_up(up, from_scale: float, to_scale: float):
    """The one alpha/rank fold: ``up`` re-expressed so that ``to_scale * up' @ down == from_scale * up @ down``.

    Used to start training from a file or an earlier adapter (to this run's ``alpha / r``), to stack files (to
    scale 1, which diffusers assumes for a state dict without metadata) and, through ``LoraModule.delta``, to
    merge."""
    return up if from_scale == to_scale else up * (from_scale / to_scale)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA as one ``.safetensors`` file holds it: tensors by name and the header's string metadata.

    What training hands export (its own layout, ``metadata["format"]``), what export writes (kohya names, the
    ``ss_*`` / ``modelspec.*`` header) and what generation and evaluation read back."""

    state: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DiffusersLora:
    """diffusers' LoRA folder to write: training-layout weights and the summary whose spec says rank, alpha and
    targets (the adapter metadata that lets alpha != rank survive ``load_lora_weights``)."""

    weights: LoraFile
    summary: ImageTrainingSummary


@dataclass(frozen=True)
class PretrainedFolder:
    """A ``save_pretrained`` folder to write: its parts (a model, its tokenizer) and our model card, which
    replaces the empty template PEFT writes as README.md."""

    parts: tuple[Any, ...]
    model_card: str | None = None


class LoraSpec(BaseModel):
    """One LoRA's shape: family, rank, alpha, dropout and the target modules of each component.

    ``targets`` maps a component (``unet``, ``text_encoder``, ``text_encoder_2``, or ``model`` for an LLM) to
    PEFT ``target_modules`` (a list of names, or a PEFT shortcut string such as ``all-linear``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    family: Family
    rank: int = Field(..., ge=1)
    alpha: float = Field(..., gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    targets: dict[str, list[str] | str]

    @property
    def scale(self) -> float:
        """The factor readers apply to ``up @ down`` (kohya, WebUI, ComfyUI, PEFT all use alpha / rank)."""
        return self.alpha / self.rank

    @property
    def components(self) -> list[str]:
        return list(self.targets)

    def trains(self, component: str) -> bool:
        return component in self.targets

    def peft_config(self, component: str, task_type: str | None = None):
        """The ``peft.LoraConfig`` for one component (PEFT's default init: gaussian A, zero B, as kohya)."""
        from peft import LoraConfig

        targets = self.targets[component]
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=targets if isinstance(targets, str) else list(targets),
                          init_lora_weights=True, task_type=task_type)

    def adapter_metadata(self, component: str) -> dict[str, Any]:
        """diffusers' ``*_lora_adapter_metadata``: makes alpha != rank survive ``load_lora_weights``."""
        targets = self.targets[component]
        return {"r": self.rank, "lora_alpha": self.alpha, "lora_dropout": self.dropout, "use_dora": False,
                "bias": "none", "target_modules": targets if isinstance(targets, str) else list(targets)}


class FolderInfo(BaseModel):
    """One source folder of a subject: its role (``instance`` or kohya's ``reg``), repeats, class tokens, counts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    folder: str
    role: Literal["instance", "reg"]
    repeats: int = 1
    class_tokens: str = ""
    kept: int = 0
    rejected: int = 0


class DatasetInfo(BaseModel):
    """What normalization made of a subject's images (``dataset_info.json``), as training reads it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    trigger: str = ""
    keep_tokens: int = 0
    mode: str = "buckets"
    resolution: list[int] = Field(default_factory=list)
    num_images: int = 0
    num_reg_images: int = 0
    num_rejected: int = 0
    buckets: dict[str, int] = Field(default_factory=dict, description="``WxH`` -> images in that bucket")
    tag_frequency: dict[str, int] = Field(default_factory=dict)
    folders: list[FolderInfo] = Field(default_factory=list)


class SubjectInputs(BaseModel):
    """What a subject was last trained and exported from (``<subject>.subject_inputs``): the fingerprint of its
    raw files and parameters, so ``lora-pipeline run`` skips a subject with nothing new."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fingerprint: str
    trained_at: str


class TrainingSummary(BaseModel):
    """What every training run produced, image or LLM; :class:`ImageTrainingSummary` and
    :class:`LLMTrainingSummary` add their track's figures. :func:`training_summary_from_json` reads either."""

    model_config = ConfigDict(extra="forbid")

    spec: LoraSpec
    base_model: str
    output_name: str
    steps: int
    epochs: float
    seed: int
    learning_rate: float
    dataset_hash: str
    started_at: str
    finished_at: str
    first_loss: float | None = None
    final_loss: float | None = None
    peak_memory_mb: float = 0.0
    resumed_from: str | None = None
    mlflow_run_id: str | None = None

    # Summaries written before the split held both tracks' fields (the other track's at their defaults).
    _OTHER_TRACK: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _drop_the_other_tracks_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls._OTHER_TRACK & data.keys():
            return {key: value for key, value in data.items() if key not in cls._OTHER_TRACK}
        return data

    @property
    def family(self) -> Family:
        return self.spec.family

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ImageTrainingSummary(TrainingSummary):
    """A diffusion LoRA's training run, as export, evaluation, generation, reporting and lineage need it."""

    num_images: int = 0
    resolution: list[int] | None = None
    trigger: str = ""
    tag_frequency: dict[str, int] = Field(default_factory=dict)
    text_encoder_lr: float | None = None
    images_per_second: float = 0.0
    latents_encoded: int = 0
    clip_skip: int = 1
    optimizer: str = "adamw"
    flip_aug: bool = False
    prior_loss_weight: float = 1.0
    num_reg_images: int = 0
    folders: list[dict[str, Any]] = Field(default_factory=list, description="each source folder's role (instance "
                                          "or reg), kohya repeats, class tokens and image count")
    unet_layout: dict[str, Any] = Field(default_factory=dict, description="what the family's kohya names need of "
                                        "the denoiser's config (SDXL: layers_per_block, up_block_types; Flux: "
                                        "guidance_embeds), so export never loads the base")
    recipe: dict[str, str] = Field(default_factory=dict, description="header keys of the family's objective "
                                   "settings (Flux: ss_timestep_sampling, ss_discrete_flow_shift ...)")

    def unet_config(self) -> SimpleNamespace:
        return SimpleNamespace(**self.unet_layout)


class LLMTrainingSummary(TrainingSummary):
    """An LLM adapter's training run, as the LLM export and evaluation need it."""

    train_samples: int = 0
    validation_samples: int = 0
    eval_loss_base: float | None = None
    eval_losses: list[float] = Field(default_factory=list)
    tokens_per_second: float = 0.0
    init_from: str | None = Field(None, description="the adapter / LoRA this run started from (a retrain)")
    truncated_samples: int = 0


_BASE_FIELDS = frozenset(TrainingSummary.model_fields)
ImageTrainingSummary._OTHER_TRACK = frozenset(LLMTrainingSummary.model_fields) - _BASE_FIELDS
LLMTrainingSummary._OTHER_TRACK = frozenset(ImageTrainingSummary.model_fields) - _BASE_FIELDS


def training_summary_from_json(text: str) -> ImageTrainingSummary | LLMTrainingSummary:
    """A summary file of either track (the spec's family says which), old single-class files included."""
    data = json.loads(text)
    family = data.get("spec", {}).get("family") if isinstance(data, dict) else None
    return (LLMTrainingSummary if family == "causal_lm" else ImageTrainingSummary).model_validate(data)
