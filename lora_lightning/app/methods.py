"""The app's training methods (``lora.method``): LoRA and the baselines the paper compares it with.

* ``lora``: rank-r adapters ``(alpha/r)·B·A`` on the targeted matrices (``LoRACallback``, this library).
* ``full``: every weight. ``head_only``: the new head (and BERT's pooler) only; every method below trains it too.
* ``bitfit``: every bias of the encoder (BitFit, Ben Zaken et al. 2021); written here.
* ``adapter_h``: two bottleneck adapters per block (Adapter^H, Houlsby et al. 2019); :mod:`.bottleneck`.
* ``adapter_l``: one bottleneck adapter per block after the MLP, with a LayerNorm (Adapter^L, Lin et al. 2020).
* ``prefix``: ``n`` trained key/value vectors in every layer (PreLayer, prefix tuning, Li & Liang 2021): PEFT's
  ``PrefixTuningConfig``.
* ``prompt``: ``n`` trained input embeddings before the text (PreEmbed, prompt tuning, Lester et al. 2021): PEFT's
  ``PromptTuningConfig``, started from random vocabulary rows.
* ``lora_pe``: LoRA and ``prompt`` together (the paper's LoRA+PE, Table 15); the classification job only.

The methods other than ``lora`` and ``full`` keep only what they train in checkpoints (:func:`keep_trainable_only`,
:func:`restore_trainable_only`) and in ``trainable_state.safetensors`` (:func:`save_trainable_state`). Sizes:
``lora.adapter_size`` (the bottleneck ``m``) and ``lora.prefix_tokens`` (``n``); at ``d = 384`` and 6 layers (MiniLM)
``adapter_h`` m=8, ``adapter_l`` m=16, ``prefix`` n=16 and LoRA W{q,v} r=8 train 78k, 81k, 74k and 74k parameters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from lora_lightning.adapter_io import atomic_write_bytes
from lora_lightning.errors import AdapterFileError, AppConfigError

from .bottleneck import ADAPTER_STYLES, add_adapters

METHODS = ("lora", "full", "head_only", "bitfit", "adapter_h", "adapter_l", "prefix", "prompt", "lora_pe")
USES_LORA = ("lora", "lora_pe")  # the methods LoRACallback adapts (and checkpoints)
PEFT_METHODS = {"prefix": "PrefixTuningConfig", "prompt": "PromptTuningConfig", "lora_pe": "PromptTuningConfig"}
TRAINABLE_ONLY_KEY = "trainable_only"  # a checkpoint's record of what it holds


def check_method(method: str, causal_lm: bool, options: Mapping[str, Any] | None = None) -> None:
    """Refuse, in one line, a method this job cannot run, or LoRA settings a method without LoRA would ignore."""
    if method not in METHODS:
        raise AppConfigError(f"lora.method={method!r} is not one of {METHODS}")
    options = options or {}
    if method not in USES_LORA:
        for key, plain in (("variant", "lora"), ("quantize_base", None)):
            if options.get(key, plain) != plain:
                raise AppConfigError(
                    f"lora.{key}={options[key]} shapes LoRA's adapters, and lora.method={method} has none: drop "
                    f"lora.{key}, or use lora.method=lora (or lora_pe)"
                )
    if causal_lm and method == "lora_pe":
        raise AppConfigError(
            "lora.method=lora_pe runs on the classification job (model=minilm); the causal-LM job exports and merges "
            "plain LoRA: use lora, or prompt for the prompt embeddings alone"
        )
    if causal_lm and method == "head_only":
        raise AppConfigError(
            "lora.method=head_only: a causal LM has no new head (its output layer is the tied embedding); "
            "use lora or full"
        )


def apply_method(module: nn.Module, method: str, options: Mapping[str, Any]) -> None:
    """Make ``module`` (a LightningModule holding a Hugging Face model in ``module.model``, and the names of its new
    head's parameters in ``module.head_parameter_names``) train what ``method`` trains; ``options``: ``cfg.lora``.

    ``lora`` itself is left to ``LoRACallback``; ``lora_pe`` gets its prompt here and its LoRA from the callback."""
    head = set(getattr(module, "head_parameter_names", []))
    if method in ("lora", "full"):
        return
    if method == "head_only":
        if not head:
            raise AppConfigError("lora.method=head_only needs a model with a new head (model=minilm's classifier)")
        _train_only(module, head)
    elif method == "bitfit":
        biases = {n for n, p in module.named_parameters() if n.endswith(".bias") and n not in head}
        if not biases:
            raise AppConfigError(
                f"lora.method=bitfit: {type(module.model).__name__} has no bias parameters to train "
                "(Llama-family layers have none); use lora, adapter_h or adapter_l"
            )
        _train_only(module, head | biases)
    elif method in ADAPTER_STYLES:
        add_adapters(module.model, method, int(options.get("adapter_size", 8)))
        _train_only(module, head | {n for n, _ in module.named_parameters() if ".adapter." in n})
    elif method in PEFT_METHODS:
        _wrap_peft(module, method, options)
    module.trainable_only_method = None if method in USES_LORA else method


def _train_only(module: nn.Module, names: set[str]) -> None:
    for name, p in module.named_parameters():
        p.requires_grad_(name in names)


def _wrap_peft(module: nn.Module, method: str, options: Mapping[str, Any]) -> None:
    """``module.model`` -> PEFT's prefix- or prompt-tuning model; the head (and BERT's pooler) are PEFT's
    ``modules_to_save``, so they train and ``module.head_parameter_names`` names PEFT's trained copies."""
    try:
        import peft
    except ImportError:
        raise AppConfigError(
            f"lora.method={method} runs through PEFT: pip install 'lora-lightning[baselines]'"
        ) from None
    n = int(options.get("prefix_tokens", 16))
    if n < 1:
        raise AppConfigError(f"lora.prefix_tokens={n}: give at least 1 virtual token")
    heads = sorted({name.removeprefix("model.").rpartition(".")[0] for name in module.head_parameter_names})
    task = peft.TaskType.CAUSAL_LM if getattr(module, "task", None) == "causal_lm" else peft.TaskType.SEQ_CLS
    common = dict(task_type=task, num_virtual_tokens=n, modules_to_save=heads or None)
    if method == "prefix":
        config: Any = peft.PrefixTuningConfig(**common, prefix_projection=bool(options.get("prefix_projection")))
    else:  # PreEmbed: prompt vectors started from randomly chosen rows of the vocabulary (Lester et al. 2021)
        config = peft.PromptTuningConfig(**common, prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
    module.model = peft.get_peft_model(module.model, config)
    module.head_parameter_names = [
        f"model.{n}" for n, p in module.model.named_parameters() if p.requires_grad and "prompt_encoder" not in n
    ]


def trainable_names(module: nn.Module) -> list[str]:
    return sorted(n for n, p in module.named_parameters() if p.requires_grad)


def method_parameters(module: nn.Module) -> int:
    """Trainable parameters outside the classification head: what the method itself adds or frees."""
    head = set(getattr(module, "head_parameter_names", []))
    return sum(p.numel() for n, p in module.named_parameters() if p.requires_grad and n not in head)


# --------------------------------------------------------------------------- checkpoints and files
def keep_trainable_only(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: keep only the trained tensors in ``checkpoint["state_dict"]`` and record them."""
    keys = trainable_names(module)
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in set(keys)}
    checkpoint[TRAINABLE_ONLY_KEY] = {"method": module.trainable_only_method, "keys": keys}


def restore_trainable_only(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: check a trainable-only checkpoint fits ``module``, then fill the frozen tensors from
    ``module`` itself, so Lightning's strict load gives the trained model."""
    record = checkpoint.get(TRAINABLE_ONLY_KEY)
    if record is None:
        return
    method = getattr(module, "trainable_only_method", None)
    if record["method"] != method:
        raise AdapterFileError(
            f"the checkpoint holds the trained tensors of lora.method={record['method']}, but this model was set up "
            f"for {method}; set lora.method={record['method']} (with the same sizes) before loading it"
        )
    if record["keys"] != trainable_names(module):
        missing = sorted(set(trainable_names(module)) - set(record["keys"]))[:5]
        extra = sorted(set(record["keys"]) - set(trainable_names(module)))[:5]
        raise AdapterFileError(
            f"the checkpoint's {record['method']} tensors do not fit this model (missing {missing}, unknown {extra}); "
            "set up the model with the lora.adapter_size / lora.prefix_tokens it was trained with"
        )
    params = dict(module.named_parameters())
    wrong = [k for k, v in checkpoint["state_dict"].items() if v.shape != params[k].shape][:3]
    if wrong:
        raise AdapterFileError(
            f"the checkpoint's {record['method']} tensors {wrong} have other shapes than this model's; set up the "
            "model with the lora.adapter_size / lora.prefix_tokens it was trained with"
        )
    checkpoint["state_dict"] = module.state_dict() | checkpoint["state_dict"]


def save_trainable_state(module: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the trained tensors of ``module`` to a safetensors file (atomically); metadata names the method."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
    meta = {"method": str(getattr(module, "trainable_only_method", None))}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_trainable_state(module: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a :func:`save_trainable_state` file into ``module`` set up for the same method and sizes."""
    tensors = load_file(str(path))
    names = set(trainable_names(module))
    if set(tensors) != names:
        raise AdapterFileError(
            f"{path} holds {len(tensors)} tensors that do not match the {len(names)} trained tensors of this model "
            f"(e.g. missing {sorted(names - set(tensors))[:3]}); set the model up with the method and sizes it was "
            "saved from"
        )
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise AdapterFileError(
                    f"{path}: {name} has shape {tuple(value.shape)}, the model's is "
                    f"{tuple(params[name].shape)}; use the sizes it was saved with"
                )
            params[name].copy_(value)
