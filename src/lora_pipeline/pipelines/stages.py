"""The per-subject stages (captioning -> evaluation) and which stage a node belongs to."""

from __future__ import annotations

import functools

from lora_pipeline.pipelines import captioning, evaluation, export, normalization, training

SUBJECT_STAGES = {
    "captioning": captioning, "normalization": normalization, "training": training, "export": export,
    "evaluation": evaluation,
}
# Content-addressed caches: safe to share between subjects (a retrain of one reuses another's latents).
SHARED_DATASETS = {"caption_cache", "image_check_cache", "latent_cache"}


@functools.lru_cache(maxsize=1)
def _node_stages() -> dict[str, str]:
    return {node.name: stage for stage, module in SUBJECT_STAGES.items() for node in module.create_pipeline().nodes}


def stage_of_node(node_name: str) -> str | None:
    """The subject stage (``training`` ...) a node belongs to, by its name without the namespace."""
    return _node_stages().get(node_name)
