"""Tiny models with the real architectures, built offline from configs.

They are saved in the standard on-disk layouts (``save_pretrained``), so the demo and the tests go
through exactly the ``from_pretrained(path)`` code that loads a real Stable Diffusion, BLIP or CLIP.
Weights are random but seeded: the same call always writes the same files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# A small English word list so the tokenizers produce real tokens for demo captions and tags.
WORDS = (
    "a an the of and in on with at photo picture drawing painting portrait of woman man girl boy person "
    "character cat dog red blue green yellow black white dress hair shirt hat sky tree forest city street "
    "night day sun moon water sea beach mountain room house car flower smile standing sitting looking "
    "viewer outdoors indoors simple background solo full body upper close up style art anime realistic "
    "lorachar sks shape circle square stripes gradient pattern texture light dark"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write a CLIP BPE vocab.json + merges.txt covering every byte plus whole-word merges of WORDS."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in WORDS:
        # Merge left to right so every word in WORDS becomes one token, as in a trained CLIP vocab.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            merged = current + piece
            if merge not in merges:
                merges.append(merge)
            if merged not in vocab_tokens:
                vocab_tokens.append(merged)
            current = merged
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(vocab_tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_clip_tokenizer(max_length: int = 77):
    """A CLIPTokenizer loaded through ``from_pretrained`` (the path a real one takes) from files written to a
    temporary folder; the pipeline's ``save_pretrained`` then writes it where it belongs."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_clip_tokenizer_files(Path(folder))
        return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


def build_tiny_sd(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Stable Diffusion 1.x pipeline folder (UNet, VAE, CLIP text encoder, tokenizer, scheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    )
    tokenizer = build_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    logger.info("Wrote tiny Stable Diffusion pipeline to %s", out_dir)
    return out_dir


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL pipeline folder with the real architecture: two text encoders (CLIP-L-like ``text_encoder``
    and an OpenCLIP-G-like ``text_encoder_2`` with a projection), ``addition_embed_type: text_time`` UNet
    conditioning on the pooled embedding and the six size/crop time ids."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    common = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # The two encoders differ in width as in SDXL (768 / 1280): diffusers' single-file loader tells CLIP-L from
    # OpenCLIP-G by that width, so equal widths would load one encoder's weights into the other.
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=40,
                                                                hidden_act="gelu", **common))
    # As SDXL base: layers_per_block 2 (so kohya's SGM names input_blocks_4_1 ... apply), a first block without
    # attention, cross-attention over both encoders' states side by side (32 + 48), and the add embedding over
    # the pooled projection (40) plus 6 time ids x addition_time_embed_dim (8).
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=40 + 6 * 8, norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=128, scaling_factor=0.13025, force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(out_dir)
    logger.info("Wrote tiny Stable Diffusion XL pipeline to %s", out_dir)
    return out_dir


def build_t5_tokenizer(max_length: int = 512):
    """A T5 Unigram tokenizer (T5's layout: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) over WORDS plus single
    characters, so every lowercase ASCII text encodes. transformers 5's ``T5Tokenizer`` is tokenizers-backed and
    takes the vocabulary itself; it is round-tripped through disk like the CLIP one, so no sentencepiece model
    (nor a download) is needed."""
    import tempfile

    from transformers import T5Tokenizer

    characters = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{word}", -5.0) for word in dict.fromkeys(WORDS)]
    vocab += [(f"\u2581{c}", -9.0) for c in characters] + [(c, -10.0) for c in characters]
    with tempfile.TemporaryDirectory() as folder:
        T5Tokenizer(vocab=list(dict(vocab).items()), extra_ids=0).save_pretrained(folder)
        return T5Tokenizer.from_pretrained(folder, model_max_length=max_length)


# Flux.1-dev's scheduler as published (FlowMatchEulerDiscreteScheduler, resolution-dependent shift).
FLUX1_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                              max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
# Full-size Flux.1-dev transformer (config only): for kohya module counts and memory figures on the meta device.
FLUX1_DEV_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                    pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def tiny_vae16(scaling_factor: float, shift_factor: float):
    """The tiny 16-channel VAE of the transformer families (Flux.1, Chroma, SD3.5), with the family's latent scale
    and shift; their autoencoders have no quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_flux(out_dir: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny Flux.1 pipeline folder with the real classes: ``FluxTransformer2DModel`` (2 double + 2 single
    blocks; a guidance embedding as dev has, none as schnell), CLIP-L-like ``text_encoder`` (its pooled output
    conditions the transformer), a T5 ``text_encoder_2`` (its sequence is the joint attention's text), a
    16-channel VAE with Flux's scale and shift, and Flux.1-dev's flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    # hidden 64 (2 heads x 32): proj_out maps it to the 64 packed channels (16 latent channels x 2x2); narrower
    # and the output layer cannot span them. RoPE axes must sum to the head dim (16 + 56 + 56 = 128 in the real one).
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds, axes_dims_rope=(8, 12, 12))
    vae = tiny_vae16(scaling_factor=0.3611, shift_factor=0.1159)  # Flux.1's
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_SCHEDULER_CONFIG), vae=vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(out_dir)
    logger.info("Wrote tiny Flux.1 (%s) pipeline to %s", "dev" if guidance_embeds else "schnell", out_dir)
    return out_dir


# Chroma1-HD's transformer (config only): Flux.1-schnell's blocks without their modulation Linears.
CHROMA_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                 axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
                                 approximator_hidden_dim=5120, approximator_layers=5)


def build_tiny_chroma(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Chroma pipeline folder with the real classes: ``ChromaTransformer2DModel`` (2 double + 2 single
    blocks, a small distilled-guidance network), a T5 text encoder (the only one), the Flux-style 16-channel VAE
    and flow-matching scheduler of the tiny Flux."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(8, 12, 12), approximator_num_channels=16, approximator_hidden_dim=32,
        approximator_layers=1)
    vae = tiny_vae16(scaling_factor=0.3611, shift_factor=0.1159)  # Flux.1's
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_SCHEDULER_CONFIG), vae=vae,
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(out_dir)
    logger.info("Wrote tiny Chroma pipeline to %s", out_dir)
    return out_dir


# Stable Diffusion 3.5 (configs only): the scheduler, and the Large and Medium transformers for kohya module counts
# and memory figures on the meta device.
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
SD35_LARGE_TRANSFORMER_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38,
                                     attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                                     caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                                     pos_embed_max_size=192, qk_norm="rms_norm")
SD35_MEDIUM_TRANSFORMER_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                      attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                      caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                      pos_embed_max_size=384, dual_attention_layers=tuple(range(13)),
                                      qk_norm="rms_norm")


def build_tiny_sd3(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Stable Diffusion 3.5 (Medium-like) pipeline folder with the real classes: ``SD3Transformer2DModel``
    (2 joint blocks, q/k RMS norm, x-block self-attention in the first as SD3.5 Medium has), CLIP-L-like and
    CLIP-G-like ``CLIPTextModelWithProjection`` encoders, a T5 encoder (its width is the joint attention's, at
    least the two CLIP widths side by side), a 16-channel VAE with SD3's scale and shift, SD3's scheduler."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer(256)

    def clip(hidden: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))

    text_encoder, text_encoder_2 = clip(32), clip(32)
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=64, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")
    vae = tiny_vae16(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG), vae=vae, transformer=transformer,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(out_dir)
    logger.info("Wrote tiny Stable Diffusion 3.5 pipeline to %s", out_dir)
    return out_dir


# Z-Image-Turbo (configs only): its scheduler (a fixed shift, no resolution-dependent one), its transformer and its
# Qwen3-4B text encoder, for module counts and memory figures on the meta device.
Z_IMAGE_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
Z_IMAGE_TRANSFORMER_CONFIG = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                                  n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                                  cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=(32, 48, 48),
                                  axes_lens=(1024, 512, 512))
QWEN3_4B_CONFIG = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1000000.0, tie_word_embeddings=True)
# Qwen3's chat template for one user turn, as ZImagePipeline renders it (``enable_thinking=True`` adds nothing).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_qwen_tokenizer(max_length: int = 128):
    """A byte-level BPE tokenizer with Qwen's special tokens and chat template, trained here over WORDS, so every
    text encodes and demo captions give real tokens (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 10, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        model_max_length=max_length)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_tiny_z_image(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Z-Image pipeline folder with the real classes: ``ZImageTransformer2DModel`` (2 main layers, 1 noise
    and 1 context refiner; RoPE axes summing to the head dim as in the real one), a tiny ``Qwen3Model`` text encoder
    (the pipeline conditions on its second-to-last hidden state), Flux's 16-channel VAE scale and shift, and
    Z-Image-Turbo's flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id))
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=(8, 12, 12), axes_lens=(256, 64, 64))
    vae = tiny_vae16(scaling_factor=0.3611, shift_factor=0.1159)  # Flux.1's VAE, which Z-Image uses
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER_CONFIG), vae=vae,
                          text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(out_dir)
    logger.info("Wrote tiny Z-Image pipeline to %s", out_dir)
    return out_dir


# Flux.2 dev (configs only): its transformer and Mistral-Small-3.1-24B's text tower, for module counts and memory
# figures on the meta device (the transformer's config is diffusers' default, which is the released one).
FLUX2_TRANSFORMER_CONFIG = dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48,
                                attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
                                timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                                rope_theta=2000, guidance_embeds=True)
MISTRAL_SMALL_3_TEXT_CONFIG = dict(vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                   max_position_embeddings=131072, rope_theta=1000000000.0)
# The whole encoder Flux2Pipeline loads (Mistral3ForConditionalGeneration): the text tower, its Pixtral vision tower
# and projector, which prompt encoding never runs but which are loaded with it.
MISTRAL3_24B_CONFIG = dict(text_config=dict(model_type="mistral", **MISTRAL_SMALL_3_TEXT_CONFIG),
                           vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096,
                                              num_hidden_layers=24, num_attention_heads=16, head_dim=64,
                                              image_size=1540, patch_size=14),
                           spatial_merge_size=2)
# Mistral's instruct format for a system and a user turn, their content a list of {"type": "text"} parts as
# Flux2Pipeline's format_input builds them.
MISTRAL_CHAT_TEMPLATE = (
    "{{ '<s>' }}{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{% else %}{{ '[INST]' + text + '[/INST]' }}{% endif %}{% endfor %}"
)


def build_mistral_tokenizer(max_length: int = 128):
    """A byte-level BPE tokenizer with Mistral's instruct special tokens and a chat template that reads
    Flux2Pipeline's list-of-parts messages, trained here over WORDS (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 10, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        model_max_length=max_length)
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer


def build_tiny_flux2(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Flux.2 pipeline folder with the real classes: ``Flux2Transformer2DModel`` (1 double and 1 single
    block, 4 RoPE axes summing to the head dim, a guidance embedding), a tiny ``Mistral3ForConditionalGeneration``
    with 30 text layers (the pipeline stacks hidden states 10, 20 and 30, so the transformer's text width is 3x the
    encoder's), and an ``AutoencoderKLFlux2`` (32 latent channels) whose batch-norm statistics are not the identity,
    so the latent normalisation is exercised."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_mistral_tokenizer()
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=32, patch_size=16),
        image_token_index=len(tokenizer) - 1)
    text_encoder = Mistral3ForConditionalGeneration(config)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 32, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=32, norm_num_groups=8,
        sample_size=64)
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.2, 0.2)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096, time_shift_type="exponential")
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
    pipe.save_pretrained(out_dir)
    logger.info("Wrote tiny Flux.2 pipeline to %s", out_dir)
    return out_dir


# Qwen-Image (configs only): its scheduler (a resolution-dependent exponential shift), its transformer and its
# Qwen2.5-VL-7B text encoder's language model, for module counts and memory figures on the meta device.
QWEN_IMAGE_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, base_image_seq_len=256, base_shift=0.5,
                                   max_image_seq_len=8192, max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                   time_shift_type="exponential", use_dynamic_shifting=True)
QWEN_IMAGE_TRANSFORMER_CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60,
                                     attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                                     guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN25_VL_7B_TEXT_CONFIG = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000)


def build_tiny_qwen_image(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen-Image pipeline folder with the real classes: ``QwenImageTransformer2DModel`` (2 blocks; RoPE axes
    summing to the head dim as in the real one), a tiny ``Qwen2_5_VLForConditionalGeneration`` text encoder (the
    pipeline conditions on its last hidden state; a one-block vision tower the prompts never use), a tiny
    ``AutoencoderKLQwenImage`` with Qwen-Image's per-channel latent mean and std, and Qwen-Image's scheduler."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_qwen_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         # multimodal RoPE sections summing to half the head dim (8), as [16, 24, 24] do to 128's
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0])))
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    # three downsamples (8x), as the real one; its latents_mean / latents_std defaults are Qwen-Image's own
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG), vae=vae,
                             text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(out_dir)
    logger.info("Wrote tiny Qwen-Image pipeline to %s", out_dir)
    return out_dir


def build_tiny_blip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny BLIP image-captioning model + processor (BERT word-piece tokenizer from a local vocab)."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.txt"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [",", "."]
    vocab_file.write_text("\n".join(dict.fromkeys(specials + letters + list(WORDS))) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(out_dir), bos_token="[DEC]", model_max_length=64)
    torch.manual_seed(seed)
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16, projection_dim=32),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32,
                         bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
                         pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}),
                              tokenizer=tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    logger.info("Wrote tiny BLIP captioner to %s", out_dir)
    return out_dir


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny CLIP model + processor for zero-shot tag scoring."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=64, patch_size=16),
        projection_dim=32,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    logger.info("Wrote tiny CLIP tagger to %s", out_dir)
    return out_dir


def build_all(models_dir: str | Path, skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """Build every tiny model under ``models_dir`` but those named in ``skip`` (and those already there)."""
    models_dir = Path(models_dir)
    builders = {"tiny-sd": build_tiny_sd, "tiny-sdxl": build_tiny_sdxl, "tiny-flux": build_tiny_flux,
                "tiny-sd3": build_tiny_sd3, "tiny-chroma": build_tiny_chroma, "tiny-z-image": build_tiny_z_image, "tiny-qwen-image": build_tiny_qwen_image, "tiny-flux2": build_tiny_flux2, "tiny-blip": build_tiny_blip, "tiny-clip": build_tiny_clip, "tiny-llm": build_tiny_llm}
    built = {}
    for name, builder in builders.items():
        target = models_dir / name
        if name in skip:
            continue
        if not (target / ".complete").exists():
            builder(target)
            (target / ".complete").write_text("ok\n")
        built[name] = target
    return built


# Full-size Stable Diffusion 1.5 architecture (config only): for name checks and benchmarks, never downloaded.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)

SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, sample_size=512,
)


def build_sd15_architecture(device: str = "meta"):
    """SD1.5 UNet + CLIP text encoder with random (or, on ``meta``, no) weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        return UNet2DConditionModel(**SD15_UNET_CONFIG), CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))


# Full-size SDXL base 1.0 architecture (configs only): for kohya module counts and FLOP figures.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT_CONFIG = SD15_TEXT_CONFIG  # CLIP ViT-L/14's text tower, as in SD1.5
SDXL_TEXT_2_CONFIG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
SDXL_VAE_CONFIG = {**SD15_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025}


def build_sdxl_architecture(device: str = "meta"):
    """SDXL base UNet + both text encoders with random (or, on ``meta``, no) weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        return (UNet2DConditionModel(**SDXL_UNET_CONFIG), CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_CONFIG)),
                CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2_CONFIG)))


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
LLM_CORPUS = (
    "患者：头痛三天，伴有恶心。 初步考虑偏头痛，建议休息、补充水分，如加重请就医。 "
    "The patient reports a mild fever and a cough for two days. Rest, fluids and paracetamol are advised. "
    '{"diagnosis": "migraine", "advice": "rest", "urgency": "low"} {"answer": "yes", "confidence": 0.9} '
    "Patient: my knee hurts after running. Doctor: likely overuse; ice it and rest for a week. "
    "0123456789 , . : ; ! ? ( ) [ ] { } \" ' - _ / true false null"
)


def build_tiny_llm(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Llama-architecture causal LM with a byte-level BPE tokenizer trained here, and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = ["<|pad|>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([LLM_CORPUS] * 20, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>",
                                        pad_token="<|pad|>", model_max_length=256)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("Wrote tiny Llama LM to %s", out_dir)
    return out_dir
