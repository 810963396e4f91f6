"""The one place for diffusion LoRA files: kohya (WebUI/ComfyUI) and diffusers formats, for every family.

Key conventions:

* training layout (ours = diffusers' PEFT layout): ``<component>.<module path>.lora_A.weight`` / ``lora_B``
  with ``component`` in ``unet``, ``text_encoder``, ``text_encoder_2``;
* kohya: ``lora_unet_<module>`` (SD1: diffusers path; SDXL: original SGM path such as
  ``input_blocks_4_1_transformer_blocks_0_attn1_to_q``), ``lora_te_text_model_<module>`` (SD1) or
  ``lora_te1_`` / ``lora_te2_`` (SDXL), each with ``.lora_down.weight`` [r, in(, kh, kw)],
  ``.lora_up.weight`` [out, r(, 1, 1)] and ``.alpha`` (0-dim).

WebUI and ComfyUI apply ``W += strength * alpha / r * up @ down``, so ``alpha`` must be the training alpha.
diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank and names the SD1 text encoder ``lora_te1_``,
and diffusers 0.42 drops a kohya file's text-encoder attention weights on load, so kohya files are written
and read here; diffusers' own format is written with diffusers' ``save_lora_weights``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from lora_pipeline.core.files import atomic_folder, atomic_path
from lora_pipeline.core.spec import TrainingSummary
from lora_pipeline.diffusion.families import ModelFamily, get_family, sgm_unet_path, unet_layout
from lora_pipeline.errors import DataError

DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_PEFT_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^(lora_unet_|lora_te[12]?_)(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


# ----------------------------------------------------------------------------- names

def kohya_module_name(family: ModelFamily, component: str, module_path: str, unet_config: Any = None) -> str:
    """One module's kohya name, e.g. SDXL ``unet`` + ``down_blocks.1.attentions.0.proj_in`` ->
    ``lora_unet_input_blocks_4_1_proj_in``.

    transformers 5's CLIPTextModel has no ``text_model.`` wrapper any more, but WebUI keys still carry it,
    so it is added explicitly for the text encoders.
    """
    if component == "unet":
        path = module_path
        if family.sgm_unet_names:
            path = sgm_unet_path(module_path, *unet_layout(unet_config)) or module_path
        return "lora_unet_" + path.replace(".", "_")
    prefix = family.kohya_te_prefixes[family.text_encoders.index(component)]
    return prefix + "text_model_" + module_path.removeprefix("text_model.").replace(".", "_")


def kohya_name_index(family: ModelFamily, modules: Mapping[str, torch.nn.Module]) -> dict[str, tuple[str, str]]:
    """``{kohya name: (component, module path)}`` for every named module of a loaded model.

    kohya names turn ``.`` into ``_``, which is ambiguous, so names are looked up, never parsed.
    """
    index = {}
    for component, model in modules.items():
        config = getattr(model, "config", None)
        for path, _ in model.named_modules():
            if path:
                index[kohya_module_name(family, component, path, config)] = (component, path)
    return index


# ----------------------------------------------------------------------------- alpha / rank

def rescale_up(up: torch.Tensor, from_scale: float, to_scale: float) -> torch.Tensor:
    """The one alpha/rank fold: ``up`` re-expressed so that ``to_scale * up' @ down == from_scale * up @ down``.

    Used to start training from a file (to this run's ``alpha / r``), to stack files (to scale 1, which
    diffusers assumes for a state dict without metadata) and, through :meth:`LoraModule.delta`, to merge.
    """
    return up if from_scale == to_scale else up * (from_scale / to_scale)


@dataclass
class LoraModule:
    """One LoRA pair as a reader applies it: ``W += weight * scale * up @ down``."""

    component: str
    path: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def delta(self, weight: float, shape: torch.Size) -> torch.Tensor:
        delta = rescale_up(self.up.float(), self.scale * weight, 1.0).flatten(1) @ self.down.float().flatten(1)
        return delta.reshape(shape)


# ----------------------------------------------------------------------------- writing

def to_kohya_state_dict(peft_state: Mapping[str, torch.Tensor], family: ModelFamily, alpha: float,
                        unet_config: Any, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Training (PEFT) keys -> kohya keys of ``family`` with the training ``alpha`` per module."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in peft_state.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise ValueError(f"not a LoRA weight key: {key!r}")
        component, module_path, which = match.groups()
        name = kohya_module_name(family, component, module_path, unet_config)
        suffix = "lora_down.weight" if which == "A" else "lora_up.weight"
        out[f"{name}.{suffix}"] = tensor.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return dict(sorted(out.items()))


def tensor_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes), independent of header metadata.

    Used as ``sshs_model_hash``: identical weights give an identical hash whatever the timestamps say.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stringify_metadata(metadata: Mapping[str, object]) -> dict[str, str]:
    """safetensors headers hold strings only; dicts/lists become JSON."""
    return {
        key: value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
        for key, value in metadata.items()
        if value is not None
    }


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


def kohya_metadata(summary: TrainingSummary, state: Mapping[str, torch.Tensor], title: str,
                   base_model_name: str) -> dict[str, Any]:
    """``ss_*`` + ``modelspec.*`` header that WebUI/ComfyUI show in their LoRA cards."""
    spec, family = summary.spec, get_family(summary.spec.family)
    trains_te = any(spec.trains(name) for name in family.text_encoders)
    resolution = summary.resolution or [family.default_resolution] * 2
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(spec.rank),
        "ss_network_alpha": str(spec.alpha),
        "ss_network_dropout": str(spec.dropout),
        "ss_base_model_version": family.base_model_version,
        "ss_v2": "False",
        "ss_sd_model_name": base_model_name,
        "ss_num_train_images": str(summary.num_images),
        "ss_num_epochs": str(summary.epochs),
        "ss_steps": str(summary.steps),
        "ss_learning_rate": str(summary.learning_rate),
        "ss_text_encoder_lr": str(summary.text_encoder_lr) if trains_te else None,
        "ss_unet_lr": str(summary.learning_rate),
        "ss_network_train_unet_only": str(not trains_te),
        "ss_resolution": json.dumps(resolution),
        "ss_seed": str(summary.seed),
        "ss_tag_frequency": {"dataset": summary.tag_frequency},
        "ss_training_started_at": summary.started_at,
        "ss_training_finished_at": summary.finished_at,
        "ss_output_name": title,
        "ss_network_args": {"conv_dim": None, "targets": spec.targets.get("unet")},
        "ss_dataset_hash": summary.dataset_hash,
        "sshs_model_hash": tensor_hash(state),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.architecture,
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.trigger_phrase": summary.trigger or None,
    }


def build_kohya_file(lora_state: Mapping[str, torch.Tensor], summary: TrainingSummary, unet_config: Any,
                     precision: str, title: str, base_model_name: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = to_kohya_state_dict(lora_state, get_family(summary.spec.family), summary.spec.alpha, unet_config,
                                DTYPES[precision])
    return state, kohya_metadata(summary, state, title, base_model_name)


def save_diffusers_lora(folder: str | os.PathLike, lora_state: Mapping[str, torch.Tensor],
                        summary: TrainingSummary) -> Path:
    """diffusers' own format via the family pipeline's ``save_lora_weights``, with adapter metadata so that
    alpha != rank survives ``load_lora_weights``. Written into a temp folder that is renamed into place."""
    spec, family = summary.spec, get_family(summary.spec.family)
    folder = Path(folder)
    layers: dict[str, Any] = {}
    for component in family.components:
        part = {k[len(component) + 1:]: v for k, v in lora_state.items() if k.startswith(component + ".")}
        if part:
            layers[f"{component}_lora_layers"] = part
            layers[f"{component}_lora_adapter_metadata"] = spec.adapter_metadata(component)
    with atomic_folder(folder) as tmp:
        family.pipeline_class().save_lora_weights(tmp, **layers)
    return folder


# ----------------------------------------------------------------------------- reading

def is_kohya(state: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(KOHYA_PREFIXES) for key in state)


def kohya_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a kohya state dict by module: ``{name: {"down": .., "up": .., "alpha": ..}}``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _KOHYA_KEY.match(key)
        if not match:
            raise DataError(f"unsupported key {key!r}: only plain LoRA (lora_down/lora_up/alpha) is supported, "
                            f"not LyCORIS (LoHa/LoKr/LoCon hada_/lokr_ keys) or DoRA")
        prefix, body, suffix = match.groups()
        part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[suffix]
        modules.setdefault(prefix + body, {})[part] = tensor
    return modules


def read_lora_modules(path: str | os.PathLike, family: ModelFamily,
                      modules: Mapping[str, torch.nn.Module]) -> list[LoraModule]:
    """Any supported LoRA file (kohya of this family, or a diffusers file/folder) as :class:`LoraModule`\\ s
    of ``modules`` (component name -> loaded model). Every pair must find its layer, or the error says which."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found; give an exported .safetensors or diffusers folder.")
    state, header = load_lora_file(path)
    return lora_modules_from_state(state, header, family, modules, str(path))


def lora_modules_from_state(state: Mapping[str, torch.Tensor], header: Mapping[str, str], family: ModelFamily,
                            modules: Mapping[str, torch.nn.Module], source: str) -> list[LoraModule]:
    """:func:`read_lora_modules` for tensors already in memory (``source`` names them in errors)."""
    out = []
    if is_kohya(state):
        index = kohya_name_index(family, modules)
        for name, parts in kohya_modules(state).items():
            if name not in index:
                other = "SDXL" if family.name == "sd1" else "SD1.x"
                raise DataError(f"{source}: LoRA module {name!r} has no matching layer in this {family.display_name} "
                                f"base (is it an {other} LoRA, or were other targets trained?)")
            if "down" not in parts or "up" not in parts:
                raise DataError(f"{source}: module {name} lacks its lora_down or lora_up weight; the file is damaged.")
            rank = parts["down"].shape[0]
            scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
            out.append(LoraModule(*index[name], parts["down"], parts["up"], scale))
        return out
    adapter_meta = json.loads(header.get("lora_adapter_metadata", "{}") or "{}")
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise DataError(f"{source}: unsupported key {key!r} (neither kohya nor diffusers LoRA layout)")
        component, module_path, which = match.groups()
        pairs.setdefault((component, module_path), {})[which] = tensor
    names = {component: {p for p, _ in model.named_modules()} for component, model in modules.items()}
    for (component, module_path), pair in pairs.items():
        if component not in names:
            raise DataError(f"{source}: has {component} weights, which a {family.display_name} base does not have")
        own_path = _own_path(module_path, names[component])
        if own_path is None:
            raise DataError(f"{source}: {component} layer {module_path} does not exist in this base model")
        rank = pair["A"].shape[0]
        alpha = adapter_meta.get(f"{component}.lora_alpha", rank)
        scale = float(alpha) / float(adapter_meta.get(f"{component}.r", rank))
        out.append(LoraModule(component, own_path, pair["A"], pair["B"], scale))
    return out


def _own_path(path: str, names: set[str]) -> str | None:
    """Tolerate the ``text_model.`` wrapper that transformers 5 removed from CLIPTextModel (or kept)."""
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        if candidate in names:
            return candidate
    return None


def to_peft_state(lora_modules: Iterable[LoraModule], target_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Training/diffusers keys with every module's own scale folded into ``lora_B`` relative to ``target_scale``."""
    state = {}
    for m in lora_modules:
        state[f"{m.component}.{m.path}.lora_A.weight"] = m.down.float()
        state[f"{m.component}.{m.path}.lora_B.weight"] = rescale_up(m.up.float(), m.scale, target_scale)
    return state
