"""The typed objects that travel between stages: what a LoRA *is* (:class:`LoraSpec`) and what a training run
produced (:class:`TrainingSummary`).

Training writes both; export, generation, merge, evaluation and the LLM export only read them. Nothing after
training re-derives rank, alpha or targets from the current parameters, so editing ``parameters_*.yml``
between training and export cannot silently change an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Family = Literal["sd1", "sdxl", "causal_lm"]


def rescale_up(up, from_scale: float, to_scale: float):
    """The one alpha/rank fold: ``up`` re-expressed so that ``to_scale * up' @ down == from_scale * up @ down``.

    Used to start training from a file or an earlier adapter (to this run's ``alpha / r``), to stack files (to
    scale 1, which diffusers assumes for a state dict without metadata) and, through ``LoraModule.delta``, to
    merge."""
    return up if from_scale == to_scale else up * (from_scale / to_scale)


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


class TrainingSummary(BaseModel):
    """What one training run produced, as export, evaluation, generation and lineage need it."""

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
    # image track
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
    unet_layout: dict[str, Any] = Field(default_factory=dict, description="layers_per_block and up_block_types: "
                                        "what kohya's SGM-layout names need, so export never loads the base")
    # LLM track
    train_samples: int = 0
    validation_samples: int = 0
    eval_loss_base: float | None = None
    eval_losses: list[float] = Field(default_factory=list)
    tokens_per_second: float = 0.0
    init_from: str | None = Field(None, description="the adapter / LoRA this run started from (a retrain)")
    truncated_samples: int = 0

    @property
    def family(self) -> Family:
        return self.spec.family

    def unet_config(self) -> SimpleNamespace:
        return SimpleNamespace(**self.unet_layout)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
