"""The model card (README.md) written next to an exported LoRA."""

from __future__ import annotations

from lora_pipeline.core.spec import TrainingSummary
from lora_pipeline.diffusion.families import get_family


def model_card(summary: TrainingSummary, title: str, file_name: str, base_model_name: str,
               sample_files: list[str]) -> str:
    spec, family = summary.spec, get_family(summary.spec.family)
    trigger = summary.trigger
    tags = list(summary.tag_frequency.items())[:20]
    tag_lines = "\n".join(f"| {tag} | {count} |" for tag, count in tags) or "| (none) | 0 |"
    samples = "\n".join(f"![sample]({name})" for name in sample_files)
    layers = "; ".join(f"{component} {', '.join(targets) if isinstance(targets, list) else targets}"
                       for component, targets in spec.targets.items())
    pipeline = family.pipeline_class_name
    return f"""# {title}

A LoRA for {family.display_name}, trained with lora-pipeline.

- **Base model:** {base_model_name} ({family.name})
- **Trigger word:** `{trigger}`
- **Rank / alpha:** {spec.rank} / {spec.alpha} (scale {spec.scale:.3g})
- **Trained layers:** {layers}
- **Images / steps / epochs:** {summary.num_images} / {summary.steps} / {summary.epochs}
- **Learning rate:** {summary.learning_rate}, seed {summary.seed}
- **Dataset hash:** `{summary.dataset_hash}`

## Use it

**Stable Diffusion WebUI (A1111/Forge):** copy `{file_name}` into `models/Lora/` and write
`{trigger + ', ' if trigger else ''}<lora:{title}:0.8>` in the prompt.

**ComfyUI:** copy `{file_name}` into `models/loras/` and add a *Load LoRA* node between the checkpoint
loader and the sampler (strength 0.8 for model and clip).

**diffusers:**

```python
from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained("{base_model_name}")
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
