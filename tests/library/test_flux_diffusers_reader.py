"""diffusers' own reader of kohya Flux (and Chroma) files (``_convert_kohya_flux_lora_to_diffusers``, reached through
``FluxPipeline.load_lora_weights``) on the file we export, against our diffusers folder.

That converter hard-codes Flux.1's widths (it cuts ``linear1`` into rows of 3072, 3072, 3072 and 12288), so the
tiny Flux cannot be read by it. This test builds a Flux transformer of the real width -- 3072 hidden (24 heads of
128), 12288 MLP -- with one double and one single block (~530M parameters, fp32), and the tiny Flux's other
components. It takes about 20 s on 2 cores and ~5 GB of memory (hence slow)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import flux_transformer_inputs, make_params, real_width_flux, summary_for

from lora_pipeline.diffusion.families import get_family
from lora_pipeline.diffusion.loading import load_diffusion_model
from lora_pipeline.diffusion.lora_files import save_diffusers_lora, to_kohya_state_dict
from lora_pipeline.diffusion.training import inject_lora, lora_spec, lora_state_dict

pytestmark = pytest.mark.slow


@torch.no_grad()
def _out(transformer) -> torch.Tensor:
    transformer.eval()
    return transformer(**flux_transformer_inputs(transformer), return_dict=False)[0]


CASES = {"flux": ("tiny-flux", "FluxTransformer2DModel"), "chroma": ("tiny-chroma", "ChromaTransformer2DModel")}


@pytest.mark.parametrize("family", list(CASES))
def test_diffusers_reads_our_kohya_file_like_our_diffusers_folder(tiny_models, tmp_path, family):
    from safetensors.torch import save_file

    tiny, transformer_class = CASES[family]
    base = real_width_flux(tiny_models[tiny], tmp_path / "wide", transformer_class)
    params = make_params(tiny_models, tmp_path, base_model=str(base), lora_rank=4, alpha=2)  # alpha != rank
    components = load_diffusion_model(str(base))
    spec = lora_spec(params, components.family)
    inject_lora(components, spec)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: PEFT starts lora_B at zero, which would prove nothing
        for name, weight in components.denoiser.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    ours = _out(components.denoiser)
    lora_state = lora_state_dict(components)
    del components

    kohya_state = to_kohya_state_dict(lora_state, get_family(family), params.alpha, None, torch.float32)
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"} <= {
        k.split(".")[0] for k in kohya_state}
    save_file(kohya_state, tmp_path / "kohya.safetensors")
    folder = save_diffusers_lora(tmp_path / "diffusers", lora_state, summary_for(params, spec, family=family))

    pipe = get_family(family).pipeline_class().from_pretrained(str(base))
    before = _out(pipe.transformer)
    pipe.load_lora_weights(str(tmp_path / "kohya.safetensors"), adapter_name="kohya")
    from_kohya = _out(pipe.transformer)
    pipe.delete_adapters("kohya")
    assert torch.equal(_out(pipe.transformer), before)
    pipe.load_lora_weights(str(folder), adapter_name="folder")
    from_folder = _out(pipe.transformer)

    effect = (ours - before).abs().max().item()
    assert effect > 1e-3
    tolerance = 1e-4 * max(1.0, effect)
    assert (from_folder - ours).abs().max().item() < tolerance
    assert (from_kohya - from_folder).abs().max().item() < tolerance  # same effect, both readers
