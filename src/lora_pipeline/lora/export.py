"""Writing and reading LoRA files: kohya/WebUI .safetensors, diffusers folders, model cards."""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import torch

from lora_pipeline.lora.files import atomic_path
from lora_pipeline.lora.formats import stringify_metadata, tensor_hash, to_kohya_state_dict

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def save_lora_file(path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Atomically write a safetensors file with string metadata (no partial file under the final name)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=stringify_metadata(metadata))


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    return load_file(str(path)), metadata


def kohya_metadata(summary: Mapping[str, Any], state: Mapping[str, torch.Tensor], title: str,
                   base_model_name: str) -> dict[str, Any]:
    """``ss_*`` + ``modelspec.*`` header that WebUI/ComfyUI show in their LoRA cards."""
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(summary["lora_rank"]),
        "ss_network_alpha": str(summary["alpha"]),
        "ss_network_dropout": str(summary["dropout"]),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_sd_model_name": base_model_name,
        "ss_num_train_images": str(summary["num_images"]),
        "ss_num_epochs": str(summary["epochs"]),
        "ss_steps": str(summary["steps"]),
        "ss_learning_rate": str(summary["learning_rate"]),
        "ss_text_encoder_lr": str(summary["text_encoder_lr"]) if summary["train_text_encoder"] else None,
        "ss_unet_lr": str(summary["learning_rate"]),
        "ss_resolution": json.dumps(summary["resolution"]),
        "ss_seed": str(summary["seed"]),
        "ss_tag_frequency": {summary.get("dataset_name", "dataset"): summary["tag_frequency"]},
        "ss_training_started_at": str(summary["started_at"]),
        "ss_training_finished_at": str(summary["finished_at"]),
        "ss_output_name": title,
        "ss_network_args": {"conv_dim": None, "targets": summary["unet_targets"]},
        "ss_dataset_hash": summary["dataset_hash"],
        "sshs_model_hash": tensor_hash(state),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{summary['resolution'][0]}x{summary['resolution'][1]}",
        "modelspec.trigger_phrase": summary.get("trigger") or None,
    }


def build_kohya_file(lora_state: Mapping[str, torch.Tensor], summary: Mapping[str, Any], precision: str,
                     title: str, base_model_name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = to_kohya_state_dict(lora_state, summary["alpha"], DTYPES[precision])
    return state, kohya_metadata(summary, state, title, base_model_name)


def save_diffusers_lora(folder: str | os.PathLike, lora_state: Mapping[str, torch.Tensor],
                        summary: Mapping[str, Any]) -> Path:
    """diffusers' own format, with adapter metadata so that alpha != rank survives ``load_lora_weights``.

    Written into a temp folder that is renamed into place.
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    unet = {k[len("unet."):]: v for k, v in lora_state.items() if k.startswith("unet.")}
    text = {k[len("text_encoder."):]: v for k, v in lora_state.items() if k.startswith("text_encoder.")}

    def adapter_metadata(targets: list[str]) -> dict[str, Any]:
        return {"r": summary["lora_rank"], "lora_alpha": summary["alpha"], "target_modules": targets,
                "lora_dropout": summary["dropout"], "use_dora": False, "bias": "none"}

    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=unet, text_encoder_lora_layers=text or None,
        unet_lora_adapter_metadata=adapter_metadata(summary["unet_targets"]),
        text_encoder_lora_adapter_metadata=adapter_metadata(summary["text_encoder_targets"]) if text else None,
    )
    if folder.exists():
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(folder)
    return folder


def model_card(summary: Mapping[str, Any], title: str, file_name: str, base_model_name: str,
               sample_files: list[str]) -> str:
    trigger = summary.get("trigger") or ""
    tags = list(summary["tag_frequency"].items())[:20]
    tag_lines = "\n".join(f"| {tag} | {count} |" for tag, count in tags) or "| (none) | 0 |"
    samples = "\n".join(f"![sample]({name})" for name in sample_files)
    return f"""# {title}

A LoRA for Stable Diffusion 1.x, trained with lora-pipeline.

- **Base model:** {base_model_name}
- **Trigger word:** `{trigger}`
- **Rank / alpha:** {summary['lora_rank']} / {summary['alpha']} (scale {summary['alpha'] / summary['lora_rank']:.3g})
- **Trained layers:** UNet {', '.join(summary['unet_targets'])}{'; text encoder ' + ', '.join(summary['text_encoder_targets']) if summary['train_text_encoder'] else ''}
- **Images / steps / epochs:** {summary['num_images']} / {summary['steps']} / {summary['epochs']}
- **Learning rate:** {summary['learning_rate']}, seed {summary['seed']}
- **Dataset hash:** `{summary['dataset_hash']}`

## Use it

**Stable Diffusion WebUI (A1111/Forge):** copy `{file_name}` into `models/Lora/` and write
`{trigger + ', ' if trigger else ''}<lora:{title}:0.8>` in the prompt.

**ComfyUI:** copy `{file_name}` into `models/loras/` and add a *Load LoRA* node between the checkpoint
loader and the sampler (strength 0.8 for model and clip).

**diffusers:**

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("{base_model_name}")
pipe.load_lora_weights("path/to/diffusers_folder", adapter_name="{title}")
pipe.set_adapters(["{title}"], adapter_weights=[0.8])
image = pipe("{trigger}, ...").images[0]
```

## Tags in the training captions

| tag | count |
| --- | --- |
{tag_lines}

## Samples

{samples or '(no sample prompts configured)'}
"""


def load_lora_for_training(path: str | os.PathLike, unet_modules: list[str], te_modules: list[str],
                           alpha: float, rank: int) -> dict[str, torch.Tensor]:
    """Read a kohya or diffusers LoRA file into the training layout, rescaled to this run's ``alpha/rank``.

    Used by ``init_lora`` (continue from an earlier LoRA) and by generation.
    """
    from lora_pipeline.lora.formats import from_kohya_state_dict

    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found; give an exported .safetensors or diffusers folder.")
    state, header = load_lora_file(path)
    if any(key.startswith(("lora_unet_", "lora_te_")) for key in state):
        peft, file_alpha, file_rank = from_kohya_state_dict(state, unet_modules, te_modules)
    else:
        peft = {}
        for key, tensor in state.items():
            if key.startswith("text_encoder.text_model."):
                key = "text_encoder." + key[len("text_encoder.text_model."):]
            peft[key] = tensor.float()
        meta = json.loads(header.get("lora_adapter_metadata", "{}") or "{}")
        unet_meta = meta.get("unet", meta)
        file_rank = int(unet_meta.get("r", rank))
        file_alpha = float(unet_meta.get("lora_alpha", file_rank))
    if file_rank and file_alpha and (file_alpha / file_rank) != (alpha / rank):
        factor = (file_alpha / file_rank) / (alpha / rank)
        peft = {k: v * factor if ".lora_B." in k else v for k, v in peft.items()}
    return peft
