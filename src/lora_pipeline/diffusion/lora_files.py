"""The one place for diffusion LoRA files: kohya (WebUI/ComfyUI) and diffusers formats, for every family.

Key conventions:

* training layout (ours = diffusers' PEFT layout): ``<component>.<module path>.lora_A.weight`` / ``lora_B``
  with ``component`` one of the family's components (``unet``, ``text_encoder``, ``text_encoder_2``);
* kohya: each family names its modules (:meth:`ModelFamily.kohya_name`): ``lora_unet_<module>`` (SD1: diffusers
  path; SDXL: original SGM path such as ``input_blocks_4_1_transformer_blocks_0_attn1_to_q``),
  ``lora_te_text_model_<module>`` (SD1) or ``lora_te1_`` / ``lora_te2_`` (SDXL), each with ``.lora_down.weight``
  [r, in(, kh, kw)], ``.lora_up.weight`` [out, r(, 1, 1)] and ``.alpha`` (0-dim).

WebUI and ComfyUI apply ``W += strength * alpha / r * up @ down``, so ``alpha`` must be the training alpha.
diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank and names the SD1 text encoder ``lora_te1_``,
so kohya files are written and read here; diffusers' own format is written with diffusers' ``save_lora_weights``,
its text-encoder keys in the canonical ``text_encoder(_2).text_model.`` spelling.

Reading takes downloaded files of every layout the family knows (:func:`lora_name_index`): kohya, diffusers/PEFT
(with or without the component prefix) and, for Flux, BFL/ComfyUI (``diffusion_model.``), OneTrainer
(``lora_transformer_``), OMI and SimpleTuner LyCORIS names; each module's tensors may be ``lora_down``/``lora_up``
or ``lora_A``/``lora_B`` (``.alpha`` optional: without it the scale is 1, or diffusers' adapter metadata), LoHa,
LoKr, LoCon with a Tucker core, or DoRA. A file in none of them is refused with its first keys and the layouts
accepted.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from lora_pipeline.core.errors import DataError
from lora_pipeline.core.files import atomic_folder, atomic_path, read_safetensors_header, sha256_hex
from lora_pipeline.core.models import DTYPES
from lora_pipeline.core.spec import TrainingSummary, rescale_up
from lora_pipeline.diffusion.families import FAMILIES, ModelFamily, get_family, kohya_family_hint

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Every family's kohya prefixes and component names (a file is read before its family is known).
KOHYA_PREFIXES = tuple(sorted({p for f in FAMILIES.values() for p in (f.kohya_denoiser_prefix, *f.kohya_te_prefixes)}))
COMPONENTS = tuple(sorted({c for f in FAMILIES.values() for c in f.components}))
_PEFT_KEY = re.compile(rf"^({'|'.join(COMPONENTS)})\.(.+)\.lora_([AB])\.weight$")
# A LoRA file's key: module name + one tensor of it, in any layout (kohya/OneTrainer lora_down/lora_up, PEFT/diffusers
# lora_A/lora_B, LyCORIS, DoRA). The names differ by layout; the tensor names are these.
_LYCORIS_TENSORS = r"hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t[12]|dora_scale"
_MODULE_KEY = re.compile(rf"^(.+)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|lora_mid\.weight|"
                         rf"alpha|{_LYCORIS_TENSORS})$")
# What marks a key as a LoRA-like file's in any layout (the unsupported kinds too, so that their error names them).
_LYCORIS_KEY = re.compile(rf"\.({_LYCORIS_TENSORS}|oft_blocks|oft_diag|on_input(\.weight)?|diff|diff_b)$")
_PLAIN_PARTS = {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up",
                "alpha": "alpha"}
# LyCORIS / kohya weights that are not merged here, by what they belong to (for the error message).
UNSUPPORTED_KINDS = {"oft_blocks": "OFT", "oft_diag": "OFT", "rescale": "OFT", "diff": "full fine-tune (diff)",
                     "diff_b": "full fine-tune (diff)", "w_norm": "norm-layer", "b_norm": "norm-layer",
                     "a1": "GLoRA", "a2": "GLoRA", "b1": "GLoRA", "b2": "GLoRA", "on_input": "IA3",
                     "weight": "IA3", "bias": "bias", "reshape_weight": "reshaped LoRA"}


# ----------------------------------------------------------------------------- names

# CLIP's text-model parts: transformers 5's CLIPTextModel holds them at its top level, CLIPTextModelWithProjection
# (SDXL's second encoder) and transformers 4 under ``text_model.``. (A T5 encoder's ``encoder.block.N`` is none.)
_CLIP_TEXT_MODEL_PARTS = ("embeddings.", "encoder.layers.", "final_layer_norm")


def canonical_text_encoder_path(module_path: str) -> str:
    """A text-encoder module path as diffusers files name it, ``text_model.encoder.layers.0.self_attn.q_proj``,
    whichever transformers built the encoder: ComfyUI maps only that spelling (for CLIP-L and CLIP-G alike), and
    diffusers reads it into either kind of encoder."""
    return "text_model." + module_path if module_path.startswith(_CLIP_TEXT_MODEL_PARTS) else module_path


# ----------------------------------------------------------------------------- alpha / rank

@dataclass
class LoraModule:
    """One LoRA pair as a reader applies it: ``W += weight * scale * up @ down``."""

    component: str
    path: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    def delta(self, weight: float, base: torch.Tensor) -> torch.Tensor:
        """What merging at ``weight`` adds to the base weight."""
        delta = rescale_up(self.up.float(), self.scale * weight, 1.0).flatten(1) @ self.down.float().flatten(1)
        return delta.reshape(base.shape)


@dataclass
class LycorisModule:
    """A LyCORIS module (LoHa, LoKr, LoCon with a Tucker core) or any DoRA one: not a low-rank pair, so it is
    merged into the weight, by the formulas of the LyCORIS paper and repository (and the way ComfyUI and
    WebUI apply them):

    * LoHa ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r`` (with ``hada_t1/t2``: each factor rebuilt as
      ``einsum('i j k l, j r, i p -> p r k l', t, w_b, w_a)``), r = ``hada_w1_b`` rows;
    * LoKr ``ΔW = kron(w1, w2) · alpha / r``, each of w1, w2 given whole or as ``_a @ _b`` (``lokr_t2`` a
      Tucker core); alpha / r only applies when a factor is low-rank (r its rank), else the scale is 1;
    * LoRA with ``lora_mid`` (Tucker): ``einsum('i j k l, j r, p i -> p r k l', mid, down, up) · alpha / r``;
    * DoRA (``dora_scale`` m beside any of these): ``W' = m · (W + ΔW) / ‖W + ΔW‖`` with the norm per output
      row (m of shape [out, 1, ...]) or per input column (m of shape [1, in, ...]); at strength s the base
      moves by ``s · (W' − W)``, so strength 0 is the base model (ComfyUI's rule).

    A module of a fused original layer (Flux's ``qkv``, ``linear1``) that is several layers here keeps them in
    ``parts`` (row order) with their output widths in ``sizes``: its ΔW is computed over their stacked weights and
    split by rows (a Kronecker or Hadamard product cannot be split into per-part factors, its ΔW can); ``path`` is
    then the first part.
    """

    component: str
    path: str
    kind: str  # loha | lokr | lora (Tucker) ; DoRA when tensors holds dora_scale
    tensors: dict[str, torch.Tensor]
    parts: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()

    @property
    def paths(self) -> tuple[str, ...]:
        """The layers this module changes: its own, or a fused module's parts."""
        return self.parts or (self.path,)

    def _alpha_over(self, rank: int | None) -> float:
        alpha = self.tensors.get("alpha")
        return float(alpha) / rank if alpha is not None and rank else 1.0

    def diff(self, shape: torch.Size) -> torch.Tensor:
        """ΔW at strength 1, alpha/rank included."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "loha":
            if "hada_t1" in t:
                first = _tucker(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
                second = _tucker(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
            else:
                first, second = _product(t["hada_w1_a"], t["hada_w1_b"]), _product(t["hada_w2_a"], t["hada_w2_b"])
            return (first * second).reshape(shape) * self._alpha_over(t["hada_w1_b"].shape[0])
        if self.kind == "lokr":
            rank = None
            w1 = t.get("lokr_w1")
            if w1 is None:
                rank = t["lokr_w1_b"].shape[0]
                w1 = _product(t["lokr_w1_a"], t["lokr_w1_b"])
            w2 = t.get("lokr_w2")
            if w2 is None:
                rank = t["lokr_w2_b"].shape[0]
                w2 = (_tucker(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"]) if "lokr_t2" in t
                      else _product(t["lokr_w2_a"], t["lokr_w2_b"]))
            while w1.dim() < w2.dim():
                w1 = w1.unsqueeze(-1)
            return torch.kron(w1, w2).reshape(shape) * self._alpha_over(rank)
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        if "lora_mid.weight" in t:
            delta = torch.einsum("i j k l, j r, p i -> p r k l", t["lora_mid.weight"], down.flatten(1), up.flatten(1))
        else:
            delta = up.flatten(1) @ down.flatten(1)
        return delta.reshape(shape) * self._alpha_over(down.shape[0])

    def delta(self, weight: float, base: torch.Tensor) -> torch.Tensor:
        """What merging at ``weight`` adds to ``base``."""
        diff = self.diff(base.shape)
        if "dora_scale" not in self.tensors:
            return weight * diff
        merged = base.float() + diff
        magnitude = self.tensors["dora_scale"].float()
        if magnitude.shape[0] == merged.shape[0] and (magnitude.dim() < 2 or magnitude.shape[1] == 1):
            norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
        else:  # per input column
            norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1).reshape(
                merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1)
        decomposed = merged * (magnitude.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps))
        return weight * (decomposed - base.float())


def _product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``up [out, r(, 1, 1)] @ down [r, in(, kh, kw)]`` keeping the kernel dimensions of ``down``."""
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(up.shape[0], *down.shape[1:])


def _tucker(core: torch.Tensor, w_b: torch.Tensor, w_a: torch.Tensor) -> torch.Tensor:
    """A factor rebuilt from its Tucker core: ``einsum('i j k l, j r, i p -> p r k l')`` (LyCORIS' layout)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", core, w_b, w_a)


AnyLoraModule = LoraModule | LycorisModule


def module_paths(m: AnyLoraModule) -> tuple[str, ...]:
    """The layers of ``m.component`` that a module changes, in row order."""
    return m.paths if isinstance(m, LycorisModule) else (m.path,)


def fused_delta(m: AnyLoraModule, weight: float, bases: list[torch.Tensor]) -> list[torch.Tensor]:
    """What merging ``m`` at ``weight`` adds to each of its layers (``bases``: their weights, in
    :func:`module_paths` order): one delta, or a fused module's delta over the stacked bases, split by rows."""
    if len(bases) == 1:
        return [m.delta(weight, bases[0])]
    delta = m.delta(weight, torch.cat([b.float() for b in bases]))
    return list(torch.split(delta, [b.shape[0] for b in bases]))


# ----------------------------------------------------------------------------- writing

def to_kohya_state_dict(peft_state: Mapping[str, torch.Tensor], family: ModelFamily, alpha: float,
                        unet_config: Any, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Training (PEFT) keys -> kohya keys of ``family`` with the training ``alpha`` per module."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in peft_state.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise ValueError(f"not a LoRA weight key: {key!r}")
        component, module_path, which = match.groups()
        pairs.setdefault((component, module_path), {})[which] = tensor
    if incomplete := [f"{c}.{p}" for (c, p), pair in pairs.items() if len(pair) != 2]:
        raise ValueError(f"LoRA weights without their lora_A or lora_B partner: {incomplete[:3]}")
    out: dict[str, torch.Tensor] = {}
    modules = family.to_kohya_modules({k: (pair["A"], pair["B"]) for k, pair in pairs.items()}, alpha, unet_config)
    for name, (down, up, module_alpha) in modules.items():
        out[f"{name}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(module_alpha), dtype=dtype)
    return dict(sorted(out.items()))


def tensor_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors (names, dtypes, shapes, bytes), independent of header metadata.

    Used as ``sshs_model_hash``: identical weights give an identical hash whatever the timestamps say.
    """
    def chunks():
        for key in sorted(state):
            tensor = state[key].detach().to("cpu").contiguous()
            yield f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|"
            yield tensor.reshape(-1).view(torch.uint8).numpy()  # hashed in place, no copy

    return sha256_hex(chunks())


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
        sort_header(tmp)


def sort_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's JSON header with sorted keys, in place (same length, data untouched).

    safetensors' writer keeps the header in a Rust HashMap, so its order, and the file's bytes, change from
    process to process; sorted, the same tensors and metadata always give the same bytes."""
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > size:  # cannot happen for a re-ordering; never corrupt a file if it does
            return
        handle.seek(8)
        handle.write(text + b" " * (size - len(text)))


def load_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A ``.safetensors`` file's tensors and header; any other file is refused with its name and why."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin"):
        raise DataError(f"{path} is a pickled {path.suffix} file: LoRAs are read from .safetensors only (a pickle can "
                        f"run code when loaded). Use the .safetensors version of this LoRA.")
    try:
        metadata = read_safetensors_header(path).metadata
        return load_file(str(path)), metadata
    except SafetensorError as exc:
        raise DataError(f"{path} is not a readable .safetensors file ({exc}); is it damaged, or another format?") \
            from None


def webui_copy_path(folder: str | os.PathLike, title: str, model_hash: str, project: str
                    ) -> tuple[Path, str | None]:
    """Where the WebUI copy of an export goes: ``<title>.safetensors``, unless a file of that name exists that
    this project checkout (``project``, see :func:`project_identity`) did not write for this subject (a user's own
    LoRA, or another checkout's subject of the same name): then ``<title>-<hash8>.safetensors``, and a note saying
    why. An earlier export of the same subject here is replaced, so ``<lora:title>`` is the newest."""
    target = Path(folder).expanduser() / f"{title}.safetensors"
    if not target.exists():
        return target, None
    try:
        header = read_safetensors_header(target).metadata
    except Exception:  # noqa: BLE001 - unreadable means: not ours
        header = {}
    ours = header.get("lora_pipeline.subject") == title
    if ours and header.get("lora_pipeline.project") == project:
        return target, None
    other = target.with_name(f"{title}-{model_hash[:8]}.safetensors")
    whose = ("is the export of a subject named '{0}' from another lora-pipeline project (or a copy of this one "
             "elsewhere)" if ours else "was not exported by lora-pipeline for '{0}'").format(title)
    return other, (f"{target} exists and {whose}; it was left alone and this export was written as {other.name} "
                   f"(use <lora:{other.stem}:0.8>, or delete the old file to take its name)")


def project_identity(root: str | os.PathLike) -> str:
    """A short id of a project checkout (its absolute path, hashed: the path itself stays out of shared files)."""
    return sha256_hex(str(Path(root).resolve()), 16)


def check_is_lora(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse a file that holds no LoRA weights (a whole UNet or checkpoint passed as a LoRA, say)."""
    # kohya-named keys pass here even when their kind is unsupported (OFT ...): kohya_modules names the kind
    if not any(".lora_" in key or key.startswith(KOHYA_PREFIXES) or _LYCORIS_KEY.search(key) for key in state):
        example = next(iter(state), "(no tensors)")
        raise DataError(f"{source} is not a LoRA: it has no lora_down/lora_up (kohya), lora_A/lora_B (diffusers, "
                        f"PEFT) or LyCORIS weights; its keys look like a full model's (e.g. {example}). Give a LoRA "
                        f".safetensors file, such as an export of this project or a kohya/WebUI LoRA.")


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
        **family.kohya_header(summary),  # ss_base_model_version, ss_v2, modelspec.architecture ...
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
        "ss_network_args": {"conv_dim": None, "targets": spec.targets.get(family.denoiser)},
        "ss_dataset_hash": summary.dataset_hash,
        "ss_clip_skip": str(summary.clip_skip),
        "ss_optimizer": summary.optimizer,
        "ss_flip_aug": str(summary.flip_aug),
        "ss_prior_loss_weight": str(summary.prior_loss_weight),
        "ss_num_reg_images": str(summary.num_reg_images),
        **kohya_dataset_dirs(summary.folders),
        "sshs_model_hash": tensor_hash(state),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.trigger_phrase": summary.trigger or None,
    }


def kohya_dataset_dirs(folders: list[dict[str, Any]]) -> dict[str, Any]:
    """kohya's ``ss_dataset_dirs`` / ``ss_reg_dataset_dirs`` (``{folder: {n_repeats, img_count}}``) and
    ``ss_datasets`` with each subset's class tokens, as sd-scripts writes them for DreamBooth-style folders."""
    if not folders:
        return {}
    dirs = {role: {f["folder"] or ".": {"n_repeats": f["repeats"], "img_count": f["kept"]}
                   for f in folders if f["role"] == role} for role in ("instance", "reg")}
    subsets = [{"image_dir": f["folder"] or ".", "num_repeats": f["repeats"], "class_tokens": f["class_tokens"] or None,
                "is_reg": f["role"] == "reg", "img_count": f["kept"]} for f in folders]
    return {"ss_dataset_dirs": dirs["instance"], "ss_reg_dataset_dirs": dirs["reg"],
            "ss_datasets": [{"is_dreambooth": True, "subsets": subsets}]}


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
        if component in family.text_encoders:
            part = {canonical_text_encoder_path(k): v for k, v in part.items()}
        if part:
            layers[f"{component}_lora_layers"] = part
            layers[f"{component}_lora_adapter_metadata"] = spec.adapter_metadata(component)
    with atomic_folder(folder) as tmp:
        family.pipeline_class().save_lora_weights(tmp, **layers)
        _canonical_header(tmp / DIFFUSERS_WEIGHT_NAME)
    return folder


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header deterministically: diffusers writes ``target_modules`` from a Python set, so
    its order (and the file's bytes) changed from process to process. Lists of names are sorted, keys too."""
    from safetensors.torch import save_file

    def canonical(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: canonical(v) for k, v in sorted(value.items())}
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return sorted(value)
        return value

    state, header = load_lora_file(path)
    fixed = {}
    for key, text in sorted(header.items()):
        try:
            fixed[key] = json.dumps(canonical(json.loads(text)), sort_keys=True)
        except (ValueError, TypeError):
            fixed[key] = text
    save_file({k: state[k].contiguous() for k in sorted(state)}, str(path), metadata=fixed)
    sort_header(path)


# ----------------------------------------------------------------------------- reading

def is_kohya(state: Mapping[str, torch.Tensor]) -> bool:
    return any(key.startswith(KOHYA_PREFIXES) for key in state)


def _unsupported(key: str) -> DataError:
    """A key that is no LoRA tensor: say what it belongs to (OFT, a full fine-tune's diff ...) where it is known."""
    parts = key.split(".")
    two, one = ".".join(parts[-2:]), parts[-1]
    kind, suffix = next(((UNSUPPORTED_KINDS[c.removesuffix(".weight")], c) for c in (two, one)
                         if c.removesuffix(".weight") in UNSUPPORTED_KINDS), ("unknown", one))
    return DataError(f"unsupported key {key!r}: a {kind} weight ({suffix}). Supported: LoRA and LoCon "
                     f"(lora_down/lora_up/lora_mid or lora_A/lora_B, with or without .alpha), LoHa (hada_*), LoKr "
                     f"(lokr_*) and DoRA (dora_scale).")


def file_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a LoRA state dict of any layout by module name (the key without its tensor suffix):
    ``{name: {"down": .., "up": .., "alpha": ..}}`` for plain LoRA and LoCon (``lora_down``/``lora_up`` as kohya
    and OneTrainer write them, ``lora_A``/``lora_B`` as PEFT, diffusers and BFL files do); LyCORIS and DoRA
    modules keep their own key names (``hada_w1_a``, ``lokr_w1``, ``dora_scale``)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _MODULE_KEY.match(key)
        if not match:
            raise _unsupported(key)
        name, suffix = match.groups()
        modules.setdefault(name, {})[_PLAIN_PARTS.get(suffix, suffix)] = tensor
    return modules


def kohya_modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`file_modules` of a kohya file (``{lora_unet_...: {"down", "up", "alpha"}}``)."""
    return file_modules(state)


def _lycoris_kind(parts: Mapping[str, torch.Tensor]) -> str | None:
    """None for a plain LoRA / LoCon pair (PEFT can hold it); else how to merge it."""
    if any(k.startswith("hada_") for k in parts):
        return "loha"
    if any(k.startswith("lokr_") for k in parts):
        return "lokr"
    if "lora_mid.weight" in parts or "dora_scale" in parts:
        return "lora"
    return None


def _loaded(modules: Mapping[str, torch.nn.Module | None]) -> dict[str, torch.nn.Module]:
    """The components that are there (a pipeline loaded without its T5 has ``text_encoder_2 = None``)."""
    return {name: model for name, model in modules.items() if model is not None}


def lora_name_index(family: ModelFamily, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    """Every module name a LoRA file may use for a layer of ``modules``, in every layout the family reads:
    ``{name: (component, path)}``, or the family's fused entry (``parts``/``sizes``) for a module that is several
    layers here (Flux's ``qkv``). Its kohya names (:meth:`ModelFamily.kohya_index`), the family's other layouts
    (``lora_file_index``, Flux: BFL/ComfyUI, OneTrainer, OMI ...) and diffusers'/PEFT's, which every family has:
    ``<component>.<path>`` (text encoders with and without ``text_model.``), and for the denoiser the path alone
    or under ``base_model.model.`` (PEFT state dicts saved without the pipeline's prefix)."""
    modules = _loaded(modules)
    index: dict[str, Any] = dict(family.lora_file_index(modules))
    for component, model in modules.items():
        wrapped = tuple(path + "." for path, m in model.named_modules() if path and hasattr(m, "base_layer"))
        for path, _ in model.named_modules():
            if not path or path.startswith(wrapped):  # not the insides of a loaded PEFT adapter
                continue
            entry = (component, path)
            index.setdefault(f"{component}.{path}", entry)
            if component in family.text_encoders:
                index.setdefault(f"{component}.{canonical_text_encoder_path(path)}", entry)
                index.setdefault(f"{component}.{path.removeprefix('text_model.')}", entry)
            elif component == family.denoiser:
                index.setdefault(path, entry)
                index.setdefault(f"base_model.model.{path}", entry)
    return index


def lora_layouts(family: ModelFamily, modules: Mapping[str, torch.nn.Module]) -> list[tuple[str, str, dict[str, str]]]:
    """The layouts ``family`` reads: ``(name, example, {key prefix: component})`` each, for messages and for
    telling a file of another base (a known prefix) from one in an unknown layout."""
    denoiser = modules.get(family.denoiser)
    bare = {f"{child}.": family.denoiser for child, _ in denoiser.named_children()} if denoiser is not None else {}
    kohya = {family.kohya_denoiser_prefix: family.denoiser, **dict(zip(family.kohya_te_prefixes, family.text_encoders))}
    kohya.update({p: "" for p in KOHYA_PREFIXES if p not in kohya})  # another family's: "is it an SDXL LoRA?"
    layouts = [("kohya / WebUI", f"{family.kohya_denoiser_prefix}<module>.lora_down.weight / .lora_up.weight / .alpha, "
                + ", ".join(f"{p}*" for p in family.kohya_te_prefixes), kohya),
               ("diffusers / PEFT", f"{family.denoiser}.<module>.lora_A.weight / .lora_B.weight, "
                + ", ".join(f"{t}.*" for t in family.text_encoders) + ", or the bare module path",
                {**{f"{c}.": c for c in family.components}, "base_model.model.": family.denoiser, **bare})]
    layouts += [(layout.name, layout.example, dict(layout.prefixes)) for layout in family.lora_file_layouts]
    return layouts


def _refuse_unresolved(unresolved: list[str], family: ModelFamily, modules: Mapping[str, torch.nn.Module],
                       state: Mapping[str, torch.Tensor], source: str) -> None:
    """The error for module names that name no layer here: an unknown layout (no known prefix), modules of a
    text encoder this base does not have (named, with the encoder), or a LoRA of another base / other targets."""
    layouts = lora_layouts(family, modules)
    prefixes = {p: c for _, _, known in layouts for p, c in known.items()}

    def component_of(name: str) -> str | None:
        found = [p for p in prefixes if name.startswith(p)]
        return prefixes[max(found, key=len)] if found else None

    unknown = [name for name in unresolved if component_of(name) is None]
    if unknown:
        first = [key for key in state if any(key.startswith(name + ".") for name in unknown[:3])][:4]
        accepted = "; ".join(f"{name} ({example})" for name, example, _ in layouts)
        raise DataError(f"{source}: its LoRA keys are in a layout this project cannot map onto a "
                        f"{family.display_name} base: first keys {', '.join(first)}. Layouts accepted: {accepted}. "
                        f"Each module may hold LoRA/LoCon, LoHa, LoKr or DoRA tensors.")
    listed = lambda names: ", ".join(names[:3]) + (f" ... ({len(names)} in all)" if len(names) > 3 else "")  # noqa: E731
    for component in family.text_encoders:
        missing = [name for name in unresolved if component_of(name) == component]
        if missing:
            model = _loaded(modules).get(component)
            which = f"this base's {component} ({type(model).__name__})" if model is not None else \
                f"this pipeline, which was loaded without {component}"
            raise DataError(f"{source}: {component} LoRA modules that {which} does not have: {listed(missing)}. "
                            f"The file was not loaded, rather than loaded without them: it was trained on another "
                            f"{component} or another base model.")
    raise DataError(f"{source}: LoRA module {unresolved[0]!r} has no matching layer in this {family.display_name} "
                    f"base ({kohya_family_hint(unresolved[0], family)})"
                    + (f"; nor do {listed(unresolved[1:])}" if len(unresolved) > 1 else ""))


def read_lora_modules(path: str | os.PathLike, family: ModelFamily,
                      modules: Mapping[str, torch.nn.Module]) -> list[AnyLoraModule]:
    """Any supported LoRA file (kohya, diffusers/PEFT, or another layout the family reads) as
    :class:`LoraModule`\\ s of ``modules`` (component name -> loaded model). Every module must find its layer, or
    the error says which."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} not found; give an exported .safetensors or diffusers folder.")
    state, header = load_lora_file(path)
    return lora_modules_from_state(state, header, family, modules, str(path))


def _peft_alpha_over_r(header: Mapping[str, str], component: str, rank: int) -> float:
    """diffusers' adapter metadata (``lora_adapter_metadata``: ``<component>.lora_alpha`` / ``.r``) as the scale of
    a lora_A/lora_B pair without an ``.alpha`` tensor; without metadata the scale is 1, as PEFT loads it."""
    meta = json.loads(header.get("lora_adapter_metadata", "{}") or "{}")
    return float(meta.get(f"{component}.lora_alpha", rank)) / float(meta.get(f"{component}.r", rank))


def lora_modules_from_state(state: Mapping[str, torch.Tensor], header: Mapping[str, str], family: ModelFamily,
                            modules: Mapping[str, torch.nn.Module], source: str) -> list[AnyLoraModule]:
    """:func:`read_lora_modules` for tensors already in memory (``source`` names them in errors).

    Each module of the file is looked up by name in :func:`lora_name_index` (never parsed: kohya names turn
    ``.`` into ``_``); a fused entry (Flux's ``qkv``, ``linear1``) splits a LoRA pair by the parts' rows
    (:meth:`ModelFamily.from_kohya_module`) and keeps a LyCORIS module whole, its ΔW split when it is applied."""
    check_is_lora(state, source)
    try:
        grouped = file_modules(state)
    except DataError as exc:
        raise DataError(f"{source}: {exc}") from None
    modules = _loaded(modules)
    index = lora_name_index(family, modules)
    unresolved = [name for name in grouped if name not in index]
    if unresolved:
        _refuse_unresolved(unresolved, family, modules, state, source)
    out: list[AnyLoraModule] = []
    for name, parts in grouped.items():
        entry = index[name]
        kind = _lycoris_kind(parts)
        if kind is not None:
            named = {{"down": "lora_down.weight", "up": "lora_up.weight"}.get(k, k): v for k, v in parts.items()}
            needed = {"loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
                      "lokr": (), "lora": ("lora_down.weight", "lora_up.weight")}[kind]
            if any(k not in named for k in needed):
                raise DataError(f"{source}: {kind} module {name} lacks one of {', '.join(needed)}; the file is "
                                f"damaged.")
            if hasattr(entry, "parts"):  # one ΔW over several layers here, split by rows when applied
                out.append(LycorisModule(entry.component, entry.parts[0], kind, named, tuple(entry.parts),
                                         tuple(entry.sizes)))
            else:
                out.append(LycorisModule(*entry, kind, named))
            continue
        if "down" not in parts or "up" not in parts:
            raise DataError(f"{source}: module {name} lacks its lora_down or lora_up (lora_A / lora_B) weight; the "
                            f"file is damaged.")
        rank = parts["down"].shape[0]
        component = entry.component if hasattr(entry, "parts") else entry[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else _peft_alpha_over_r(header, component, rank)
        out.extend(LoraModule(component, own_path, down, up, scale) for component, own_path, down, up
                   in family.from_kohya_module(name, parts["down"], parts["up"], {name: entry}))
    return out


def to_peft_state(lora_modules: Iterable[AnyLoraModule], target_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Training/diffusers keys with every module's own scale folded into ``lora_B`` relative to ``target_scale``.
    Only plain LoRA / LoCon pairs have this form (LyCORIS modules are merged, see :class:`LycorisModule`)."""
    state = {}
    for m in lora_modules:
        if isinstance(m, LycorisModule):
            raise DataError(f"{m.component}.{m.path} is a {'DoRA' if 'dora_scale' in m.tensors else m.kind} module: "
                            f"only a plain LoRA can seed training (init_lora); LyCORIS files work in generation "
                            f"and merge.")
        state[f"{m.component}.{m.path}.lora_A.weight"] = m.down.float()
        state[f"{m.component}.{m.path}.lora_B.weight"] = rescale_up(m.up.float(), m.scale, target_scale)
    return state
