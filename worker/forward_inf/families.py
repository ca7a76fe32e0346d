"""Models of the libraries people train with, loaded from a local directory, as modules the engine's tasks
call like any built-in one:

    transformers:causal-lm                ids (B, T) -> logits (B, T, V)       AutoModelForCausalLM
    transformers:sequence-classification  ids (B, T) -> logits (B, C)          AutoModelForSequenceClassification
    peft:lora                             a LoRA adapter over a loaded base (either transformers kind)
    diffusers:unet2d                      (x_t, t) -> predicted noise           UNet2DModel
    torchvision:NAME                      images (B, C, H, W) -> logits         torchvision.models.get_model(NAME)

Only local files, only safetensors: `local_files_only`, `use_safetensors`, never `trust_remote_code`. The
caller (worker/warm.py) verifies every file's digest first. Attention runs in its "eager" form: torch's
fused attention kernels have no forward-mode derivative (linear mode) and transformers' mask helpers branch
on data, which vmap cannot; a padding mask is therefore passed as a ready 4-D additive mask. Each library is
imported only when a model of its family is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import AttributionInputError

__all__ = ["FAMILIES", "load"]


def _attention_mask(model: nn.Module, ids: torch.Tensor, pad_id: int, causal: bool) -> torch.Tensor:
    """(B, 1, T, T) additive mask: pad keys (and, causal, later positions) at the dtype's minimum."""
    dtype = model.get_input_embeddings().weight.dtype
    keep = (ids != pad_id)[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
    if causal:
        keep = keep & torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()
    return torch.zeros(keep.shape, dtype=dtype, device=ids.device).masked_fill(~keep, torch.finfo(dtype).min)


class CausalLM(nn.Module):
    def __init__(self, model: nn.Module, pad_id: int):
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, ids):  # (B, T) -> (B, T, V)
        return self.model(input_ids=ids, attention_mask=_attention_mask(self.model, ids, self.pad_id, True)).logits


class SequenceClassifier(nn.Module):
    def __init__(self, model: nn.Module, pad_id: int):
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, ids):  # (B, T) -> (B, C); pad tokens are masked out of attention
        return self.model(input_ids=ids, attention_mask=_attention_mask(self.model, ids, self.pad_id, False)).logits


class UNet(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, t):  # (B, C, H, W), (B,) -> (B, C, H, W)
        return self.model(x, t).sample


def _transformers(kind: str, folder: Path, pad_id: int | None) -> nn.Module:
    import transformers

    auto = {
        "causal-lm": transformers.AutoModelForCausalLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }
    if kind not in auto:
        raise AttributionInputError(f"transformers:{kind}: expected one of {sorted(auto)}")
    model = auto[kind].from_pretrained(
        folder, local_files_only=True, use_safetensors=True, trust_remote_code=False, attn_implementation="eager"
    )
    wrap = CausalLM if kind == "causal-lm" else SequenceClassifier
    return wrap(model, model.config.pad_token_id or 0 if pad_id is None else pad_id)


def _lora(folder: Path, base: nn.Module) -> nn.Module:
    """The adapter over `base` (warm, shared with its other adapters): a fresh shell of the base's modules
    whose parameters are the base's own tensors (no copy), wrapped by peft with the adapter's weights."""
    import peft

    if not isinstance(base, CausalLM | SequenceClassifier):
        raise AttributionInputError("peft:lora: the base must be a transformers model")
    inner = base.model
    with torch.device("meta"):
        shell = type(inner)(inner.config)
    shell.load_state_dict(inner.state_dict(), assign=True, strict=False)
    shell.tie_weights()
    adapted = peft.PeftModel.from_pretrained(shell, folder, is_trainable=False, local_files_only=True)
    wrapped = adapted.get_base_model()  # the base's modules with LoRA layers injected
    out = type(base)(wrapped, base.pad_id)
    meta = [n for n, p in out.named_parameters() if p.is_meta]
    if meta:
        raise AttributionInputError(f"peft:lora: the adapter does not fit its base ({', '.join(meta[:4])} unset)")
    return out


def _unet(folder: Path) -> nn.Module:
    import diffusers
    from diffusers.models.attention_processor import AttnProcessor

    model = diffusers.UNet2DModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    for module in model.modules():
        if hasattr(module, "set_processor"):  # the plain (eager) attention: see the module's docstring
            module.set_processor(AttnProcessor())
        if isinstance(module, nn.GroupNorm):  # torch's vmap rule for group_norm views its input: give it a
            module.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))  # contiguous one
    return UNet(model)


def _torchvision(name: str, weights: Path, params: dict) -> nn.Module:
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - a wheel built for another torch fails in many ways
        raise AttributionInputError(
            f"torchvision:{name}: torchvision cannot be imported on this worker: {exc}"
        ) from exc
    from safetensors.torch import load_file

    try:
        model = torchvision.models.get_model(name, weights=None, **params)
    except ValueError as exc:
        raise AttributionInputError(f"torchvision:{name}: {exc}") from exc
    model.load_state_dict(load_file(weights), strict=True)
    return model


FAMILIES = ("transformers", "peft", "diffusers", "torchvision")


def load(
    architecture: str,
    folder: Path,
    weights: str,
    params: dict,
    base: nn.Module | None = None,
    pad_id: int | None = None,
) -> nn.Module:
    """The module for `architecture` (family:kind) from the verified files in `folder`; `pad_id` (a
    transformers model's padding token, masked out of attention) defaults to its config's."""
    family, _, kind = architecture.partition(":")
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: the libraries never reach a model hub from a worker
    try:
        if family == "transformers":
            return _transformers(kind, folder, pad_id)
        if family == "peft":
            if base is None:
                raise AttributionInputError("peft:lora needs its base model")
            return _lora(folder, base)
        if family == "diffusers":
            return _unet(folder)
        if family == "torchvision":
            return _torchvision(kind, folder / weights, params)
    except (OSError, KeyError, TypeError) as exc:
        raise AttributionInputError(f"{architecture}: cannot load the model from its files: {exc}") from exc
    raise AttributionInputError(f"unknown model family {family!r}: expected one of {FAMILIES}")
