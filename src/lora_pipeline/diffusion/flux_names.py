"""Flux.1 LoRA module names: diffusers' ``FluxTransformer2DModel`` against the original (BFL) layout that kohya's
``lora_flux.py``, ComfyUI and most downloaded Flux LoRAs use.

The original model keeps q/k/v in one ``qkv`` Linear (and a single block's q/k/v plus its MLP input in one
``linear1``); diffusers splits them. A LoRA trained on the split modules is written fused, the way kohya writes
one: the parts' downs stacked (``n*r x in``), their ups block-diagonal (``sum(out) x n*r``) and alpha multiplied by
``n``, so that ``alpha / rank`` -- the strength every reader applies -- stays the parts' ``alpha / r``. Reading
goes the other way: each part takes the fused down and its rows of the up.

Downloaded Flux LoRAs name the same modules in several layouts besides kohya's (:data:`FILE_LAYOUTS`): the BFL
names under ``diffusion_model.`` (ComfyUI; BFL's own and ai-toolkit's files), OneTrainer's ``lora_transformer_``
+ diffusers path, the OMI layout OneTrainer writes now (BFL names with a fused module's parts numbered:
``transformer.double_blocks.0.img_attn.qkv.0`` is ``to_q``) and SimpleTuner's ``lycoris_`` + diffusers path
(ComfyUI's ``model_lora_keys_unet`` and ``model_lora_keys_clip`` map the same set).
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_pipeline.diffusion.original_layout import BlockMap, OriginalLayout, fuse, linear_layers, split  # noqa: F401

KOHYA_PREFIX = "lora_unet_"
BFL_PREFIX = "diffusion_model."  # BFL / ComfyUI: the original module path
ONETRAINER_PREFIX = "lora_transformer_"  # OneTrainer (legacy): the diffusers path with . -> _
OMI_PREFIX = "transformer."  # OMI (OneTrainer now): BFL names, fused parts numbered
LYCORIS_PREFIX = "lycoris_"  # SimpleTuner's LyCORIS files: the diffusers path with . -> _
# The text encoders in the same layouts: (prefix, flattened: . -> _), CLIP-L (with transformers 4's text_model.)
# and T5 (transformers' T5EncoderModel paths, encoder.block.0.layer.0.SelfAttention.q ...).
CLIP_PREFIXES = (("text_encoders.clip_l.transformer.", False), ("clip_l.", False))
T5_PREFIXES = (("lora_te3_", True), ("lora_te2_", True), ("text_encoders.t5xxl.transformer.", False), ("t5.", False))


@dataclass(frozen=True)
class FileLayout:
    """One way LoRA files name Flux modules: what to call it in messages, an example key, and the key prefixes
    it uses with the component each one names."""

    name: str
    example: str
    prefixes: tuple[tuple[str, str], ...]


FILE_LAYOUTS = (
    FileLayout("BFL / ComfyUI", "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight (or .lora_down.weight), "
               "text_encoders.clip_l.transformer.*, text_encoders.t5xxl.transformer.*",
               ((BFL_PREFIX, "transformer"), ("text_encoders.clip_l.", "text_encoder"),
                ("text_encoders.t5xxl.", "text_encoder_2"))),
    FileLayout("OneTrainer", "lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight, lora_te1_* (CLIP-L), "
               "lora_te2_* (T5)", ((ONETRAINER_PREFIX, "transformer"), ("lora_te2_", "text_encoder_2"))),
    FileLayout("OMI (OneTrainer)", "transformer.double_blocks.0.img_attn.qkv.0.lora_down.weight, clip_l.*, t5.*",
               (("transformer.double_blocks.", "transformer"), ("transformer.single_blocks.", "transformer"),
                ("clip_l.", "text_encoder"), ("t5.", "text_encoder_2"))),
    FileLayout("SimpleTuner LyCORIS", "lycoris_transformer_blocks_0_attn_to_q.lokr_w1", ((LYCORIS_PREFIX, "transformer"),)),
)


# diffusers module (within a block) -> original module (within the same block).
FLUX1_LAYOUT = OriginalLayout(
    BlockMap("transformer_blocks", "double_blocks",
             {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
              "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
              "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"},
             {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}),
    BlockMap("single_transformer_blocks", "single_blocks", {"proj_out": "linear2", "norm.linear": "modulation.lin"},
             {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}),
)
original_name = FLUX1_LAYOUT.original_name
fused_modules = FLUX1_LAYOUT.fused_modules


def kohya_name(original: str) -> str:
    """``double_blocks.0.img_attn.qkv`` -> ``lora_unet_double_blocks_0_img_attn_qkv`` (kohya's lora_flux naming)."""
    return KOHYA_PREFIX + original.replace(".", "_")
