"""Model families: everything that differs between SD1.x and SDXL lives behind :class:`ModelFamily`.

A family says which pipeline class loads it, which text encoders it has, how a prompt becomes UNet
conditioning, how kohya/WebUI name its LoRA modules, and what the LoRA header says. Adding a family (Flux,
SD3) means one more instance here plus its conditioning and naming functions; the trainer, the exporter,
stacking, merge and evaluation only talk to this interface.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from lora_pipeline.core.errors import ConfigError
from lora_pipeline.core.files import read_safetensors_header

logger = logging.getLogger(__name__)


@dataclass
class Conditioning:
    """What the UNet gets besides the noisy latents: token states, and SDXL's pooled embedding + time ids."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def unet_kwargs(self, time_ids: torch.Tensor | None) -> dict[str, Any]:
        if self.pooled is None:
            return {}
        return {"added_cond_kwargs": {"text_embeds": self.pooled, "time_ids": time_ids}}


@dataclass(frozen=True)
class ModelFamily:
    name: str
    pipeline_class_name: str
    text_encoders: tuple[str, ...]  # component names, in the pipeline's order
    kohya_te_prefixes: tuple[str, ...]  # one per text encoder
    sgm_unet_names: bool  # kohya names the UNet in the original (SGM) layout rather than diffusers'
    base_model_version: str  # ss_base_model_version
    architecture: str  # modelspec.architecture
    default_resolution: int
    display_name: str

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet",) + self.text_encoders

    def uses_time_ids(self) -> bool:
        return self.name == "sdxl"

    def check_clip_skip(self, clip_skip: int) -> None:
        if clip_skip > 1 and self.name == "sdxl":
            raise ConfigError(f"clip_skip {clip_skip} with an SDXL base: SDXL is trained on the penultimate CLIP layer "
                              f"already (kohya's SDXL scripts ignore clip_skip too). Set clip_skip: 1.")

    def prompt_kwargs(self, pipe, prompt: str, negative: str | None, clip_skip: int | None) -> dict[str, Any]:
        """What a pipeline call gets for its prompt: the text itself, or with clip_skip 2 the embeddings of
        prompt and negative prompt, both from the penultimate layer (as WebUI does it).

        Computed here rather than through the pipeline's own ``clip_skip``: diffusers 0.42 reaches for
        ``text_encoder.text_model``, which transformers 5 no longer has, and it leaves the negative prompt at
        the last layer."""
        if not clip_skip or clip_skip <= 1:
            return {"prompt": prompt, "negative_prompt": negative or None}
        self.check_clip_skip(clip_skip)
        with torch.no_grad():
            embed = [self.encode_prompt([pipe.text_encoder], [pipe.tokenizer], [text], pipe.device, clip_skip).hidden
                     for text in (prompt, negative or "")]
        return {"prompt_embeds": embed[0], "negative_prompt_embeds": embed[1]}

    def encode_prompt(self, text_encoders: Sequence[Any], tokenizers: Sequence[Any], texts: Sequence[str],
                      device: torch.device, clip_skip: int = 1) -> Conditioning:
        """Prompts -> UNet conditioning, the way the family's own pipeline does it.

        ``clip_skip`` counts as kohya and WebUI do: 1 is the last layer, 2 the penultimate one (then CLIP's final
        layer norm, as kohya's train_util and diffusers' ``clip_skip`` apply it)."""
        if self.name == "sd1":
            ids = _token_ids(tokenizers[0], texts, device)
            if clip_skip <= 1:
                return Conditioning(text_encoders[0](ids)[0])
            encoder = getattr(text_encoders[0], "module", text_encoders[0])
            encoder = getattr(encoder, "text_model", encoder)  # transformers 4 nests it; 5 does not
            out = text_encoders[0](ids, output_hidden_states=True)
            return Conditioning(encoder.final_layer_norm(out.hidden_states[-clip_skip]))
        self.check_clip_skip(clip_skip)
        # SDXL: penultimate hidden states of both encoders side by side; the pooled, projected output of the
        # second one (as StableDiffusionXLPipeline.encode_prompt and kohya's sdxl_train_util do).
        states, pooled = [], None
        for encoder, tokenizer in zip(text_encoders, tokenizers):
            out = encoder(_token_ids(tokenizer, texts, device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        return Conditioning(torch.cat(states, dim=-1), pooled)


def _token_ids(tokenizer, texts: Sequence[str], device: torch.device) -> torch.Tensor:
    tok = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return tok.input_ids.to(device)


SD1 = ModelFamily(
    name="sd1", pipeline_class_name="StableDiffusionPipeline", text_encoders=("text_encoder",),
    kohya_te_prefixes=("lora_te_",), sgm_unet_names=False, base_model_version="sd_v1",
    architecture="stable-diffusion-v1/lora", default_resolution=512, display_name="Stable Diffusion 1.x",
)
SDXL = ModelFamily(
    name="sdxl", pipeline_class_name="StableDiffusionXLPipeline", text_encoders=("text_encoder", "text_encoder_2"),
    kohya_te_prefixes=("lora_te1_", "lora_te2_"), sgm_unet_names=True, base_model_version="sdxl_base_v1-0",
    architecture="stable-diffusion-xl-v1-base/lora", default_resolution=1024, display_name="Stable Diffusion XL",
)
FAMILIES = {family.name: family for family in (SD1, SDXL)}
# Where the next families plug in (kept here so the error below can name them).
PLANNED = {"flux": "Flux.1 (FluxPipeline, T5 + CLIP-L, a DiT instead of a UNet)",
           "sd3": "Stable Diffusion 3 (SD3Transformer2DModel, three text encoders)"}


def get_family(name: str) -> ModelFamily:
    if name in FAMILIES:
        return FAMILIES[name]
    planned = f" ({PLANNED[name]} is planned, not supported yet)" if name in PLANNED else ""
    raise ConfigError(f"base_model_family '{name}' is not supported{planned}; use auto, "
                      f"{', '.join(FAMILIES)}.")


def family_of(pipe: Any) -> ModelFamily:
    """The family of a loaded diffusers pipeline (by its class; img2img and inpaint variants included)."""
    name = type(pipe).__name__
    return SDXL if name.startswith("StableDiffusionXL") else SD1


def detect_family(source: str | Path, allow_download: bool = False) -> ModelFamily:
    """The family of a diffusers folder (``model_index.json``), a single-file checkpoint (its keys), or a hub id
    (its ``model_index.json``, from the local hub cache, or fetched when downloads are allowed)."""
    path = Path(source)
    index = path / "model_index.json"
    if not path.exists():
        index = _hub_model_index(str(source), allow_download) or index
    if index.is_file():
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
        for family in FAMILIES.values():
            if class_name == family.pipeline_class_name:
                return family
        raise ConfigError(f"{index}: pipeline class '{class_name}' is not a supported family "
                          f"({', '.join(f.pipeline_class_name for f in FAMILIES.values())}). "
                          f"Set base_model_family explicitly if it is one of them.")
    if path.is_file():
        keys = _checkpoint_keys(path)
        if any(key.startswith("conditioner.embedders.1.") for key in keys):
            return SDXL
        if any(key.startswith("cond_stage_model.") for key in keys):
            return SD1
        raise ConfigError(f"{path}: cannot tell the model family from its keys (neither SD1.x nor SDXL layout); "
                          f"set base_model_family: sd1 or sdxl.")
    logger.warning("Cannot tell the family of %s without its model_index.json; assuming %s. Set "
                   "base_model_family: sdxl for an SDXL base (or allow_download: true).", source, SD1.display_name)
    return SD1


def _hub_model_index(repo_id: str, allow_download: bool) -> Path | None:
    """A hub repository's ``model_index.json`` (a few hundred bytes), or None when it cannot be had."""
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, "model_index.json", local_files_only=not allow_download))
    except Exception:  # not cached, offline, no such repo: the caller falls back and says so
        return None


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        return read_safetensors_header(path).keys
    state = torch.load(path, map_location="meta", weights_only=True)
    return list(state.get("state_dict", state))


def resolve_family(requested: str, source: str | Path, allow_download: bool = False) -> ModelFamily:
    """``auto`` detects; an explicit family must agree with what local model files say."""
    if requested != "auto" and not Path(source).exists():
        return get_family(requested)
    detected = detect_family(source, allow_download)
    if requested == "auto":
        return detected
    family = get_family(requested)
    if family is not detected:
        raise ConfigError(f"base_model_family is '{requested}', but {source} is a {detected.display_name} model; "
                          f"set base_model_family: auto (or {detected.name}).")
    return family


@functools.lru_cache(maxsize=32)  # three nodes ask per run; say a fallback warning once
def native_resolution(base_model: str | None, requested: str = "auto") -> int:
    """The bucket side a family trains at (SD1.x 512, SDXL 1024), for ``normalization.resolution: auto``."""
    if requested != "auto":
        return get_family(requested).default_resolution
    if not base_model:
        return SD1.default_resolution
    return detect_family(base_model).default_resolution


# ----------------------------------------------------------------------------- original (SGM/LDM) UNet names

_RESNET_RENAMES = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                   ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _resnet(rest: str) -> str:
    for new, old in _RESNET_RENAMES:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def sgm_unet_path(path: str, layers_per_block: int, up_has_attention: Sequence[bool]) -> str | None:
    """A diffusers UNet path (module or parameter) in the original LDM/SGM layout, or None for the few
    top-level layers (conv_in, time embedding ...) that callers map with diffusers' fixed table.

    ``down_blocks.1.attentions.0.x`` -> ``input_blocks.4.1.x`` when ``layers_per_block`` is 2 (SDXL, SD1.5).
    The same rule serves kohya's SDXL LoRA names and the single-file checkpoint writer.
    """
    per = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.?(.*)", path):
        return f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.0.{_resnet(m[3])}".rstrip(".")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.?(.*)", path):
        return f"input_blocks.{int(m[1]) * per + int(m[2]) + 1}.1.{m[3]}".rstrip(".")
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.?(.*)", path):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}".rstrip(".")
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.?(.*)", path):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}".rstrip(".")
    if m := re.fullmatch(r"mid_block\.attentions\.0\.?(.*)", path):
        return f"middle_block.1.{m[1]}".rstrip(".")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.?(.*)", path):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}".rstrip(".")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.?(.*)", path):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}".rstrip(".")
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.?(.*)", path):
        b = int(m[1])
        return f"output_blocks.{b * per + layers_per_block}.{2 if up_has_attention[b] else 1}.conv.{m[2]}".rstrip(".")
    return None


def unet_layout(unet_config: Any) -> tuple[int, list[bool]]:
    """(layers_per_block, has-attention per up block): what :func:`sgm_unet_path` needs from a UNet config."""
    layers = unet_config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError(f"UNet with per-block layers_per_block {layers} has no single SGM layout")
    return layers, ["CrossAttn" in t for t in unet_config.up_block_types]
