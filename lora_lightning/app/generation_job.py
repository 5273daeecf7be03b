"""The causal-LM job (``lora-train model=smollm2 data=e2e_nlg``): LoRA on a pretrained decoder, scored
by generating from the merged model.

Steps: zero-shot generation of the base on the test inputs -> fit (loss on answer tokens, checkpoint
with the lowest validation loss) -> restore that checkpoint -> merge the adapters -> greedy generation
-> corpus BLEU-4 and ROUGE-L against all references (torchmetrics). The trained adapter is also
exported in PEFT's format (checked by loading it with ``peft`` on a fresh base: the largest logit
difference goes into the summary) and the merged model as a plain Hugging Face folder.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.text import BLEUScore
from torchmetrics.text.rouge import ROUGEScore

from lora_lightning import LoRAConfig, count_parameters, export_peft_adapter, merge_and_unload, merge_lora, save_adapter

from .causal_lm import CausalLMModule, generate, load_causal_lm, resolve_decoder_path
from .generation_data import GenerationDataModule


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU-4 (multi-reference) and ROUGE-L F1 (best reference per prediction), in [0, 1]."""
    bleu = BLEUScore(n_gram=4)(list(predictions), [list(r) for r in references])
    rouge = ROUGEScore(rouge_keys=("rougeL",), accumulate="best")(list(predictions), [list(r) for r in references])
    return {"bleu": float(bleu), "rougeL": float(rouge["rougeL_fmeasure"])}


def evaluate(
    model: torch.nn.Module, tokenizer: Any, dm: GenerationDataModule, split: str, max_new_tokens: int, batch_size: int
) -> tuple[dict[str, float], list[str], float]:
    """Generate for every input of ``split``; returns (scores, predictions, generated tokens per second)."""
    prompts, refs = dm.prompts(split)
    start = time.perf_counter()
    preds = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    seconds = time.perf_counter() - start
    n_tokens = sum(len(tokenizer(p, add_special_tokens=False)["input_ids"]) + 1 for p in preds)
    return score(preds, refs), preds, n_tokens / seconds


def run_generation(
    cfg: Any,
    datamodule: GenerationDataModule,
    out: Path,
    lora: LoRAConfig | None,
    trainer: pl.Trainer,
    model: CausalLMModule,
) -> dict[str, Any]:
    gen = cfg.get("generation", {}) or {}
    max_new, gen_batch = int(gen.get("max_new_tokens", 64)), int(gen.get("batch_size", 16))
    tokenizer = datamodule.tokenizer
    summary: dict[str, Any] = {}
    if gen.get("zero_shot", True):
        base = model.model.get_base_model() if hasattr(model.model, "get_base_model") else model.model  # no prompt
        base_scores, base_preds, _ = evaluate(base, tokenizer, datamodule, "test", max_new, gen_batch)
        summary.update({f"zero_shot_{k}": v for k, v in base_scores.items()})
        (out / "zero_shot_predictions.json").write_text(json.dumps(base_preds, indent=1))
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    ckpt = trainer.checkpoint_callback
    best = ckpt.best_model_path if ckpt else ""
    tested = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False) if cfg.test else []
    summary.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
    train_tokens = sum(len(ids) for ids, _ in datamodule.datasets["train"].items) * trainer.current_epoch
    if lora is not None:
        summary["adapter_bytes"] = save_adapter(model, out / "adapter.safetensors").stat().st_size
        peft_dir = export_peft_adapter(
            model, out / "peft_adapter", base_model_name_or_path=str(cfg.model.model), submodule="model"
        )
        summary["peft_max_abs_logit_diff"] = peft_logit_difference(model, peft_dir, cfg.model.model, datamodule)
        merge_lora(model)  # generation below runs on the merged weights: no adapter cost
    scores, preds, tok_per_s = evaluate(model.model, tokenizer, datamodule, "test", max_new, gen_batch)
    summary.update({f"test_{k}": v for k, v in scores.items()})
    (out / "test_predictions.json").write_text(
        json.dumps(
            [
                {"prompt_input": g.input, "prediction": p, "references": list(g.references)}
                for g, p in zip(datamodule.groups["test"], preds, strict=True)
            ],
            indent=1,
        )
    )
    if lora is not None and gen.get("save_merged_hf", True):
        merged = merge_and_unload(copy.deepcopy(model)).model  # the LoRA record lives on the LightningModule
        merged.save_pretrained(out / "merged_hf")
        tokenizer.save_pretrained(out / "merged_hf")
        summary["merged_hf"] = str(out / "merged_hf")
        reloaded, _ = load_causal_lm(out / "merged_hf")  # plain transformers, no lora_lightning layers
        prompts = datamodule.prompts("test")[0][:2]
        summary["merged_hf_generates_the_same"] = generate(
            reloaded, tokenizer, prompts, max_new, gen_batch
        ) == generate(model.model, tokenizer, prompts, max_new, gen_batch)
    counts = count_parameters(model)
    summary.update(
        {
            "best_val_loss": float(ckpt.best_model_score) if ckpt and ckpt.best_model_score is not None else None,
            "fit_seconds": round(fit_seconds, 2),
            "steps": trainer.global_step,
            "epochs": trainer.current_epoch,
            "train_tokens_per_second": round(train_tokens / fit_seconds, 1) if fit_seconds > 0 else None,
            "generation_tokens_per_second": round(tok_per_s, 1),
            "params_trainable": counts.trainable,
            "params_total": counts.total,
            "params_lora": counts.lora,
            "train_examples": len(datamodule.datasets["train"]),
            "test_inputs": len(datamodule.groups["test"]),
            "best_checkpoint": best,
        }
    )
    return summary


@torch.no_grad()
def peft_logit_difference(model: CausalLMModule, peft_dir: Path, base: str, dm: GenerationDataModule) -> float:
    """Load the exported PEFT adapter with ``peft`` onto a fresh copy of the base and compare logits on
    one validation batch: the largest absolute difference."""
    from .quiet import import_quietly, quiet_backend_imports

    # peft imports torchao at import and (peft >= 0.22) bitsandbytes when it builds its LoRA layers
    PeftModel = import_quietly("peft").PeftModel
    fresh, _ = load_causal_lm(resolve_decoder_path(base))
    rows = model.model.get_input_embeddings().num_embeddings
    if fresh.get_input_embeddings().num_embeddings != rows:  # lora.new_tokens: the same vocabulary (new rows: PEFT's)
        fresh.resize_token_embeddings(rows)
    with quiet_backend_imports():
        peft_model = PeftModel.from_pretrained(fresh, str(peft_dir)).eval()
    batch = next(iter(dm.val_dataloader()))
    was = model.training
    model.eval()
    ours = model(batch["input_ids"], batch["attention_mask"])
    theirs = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was)
    mask = batch["attention_mask"].bool()
    return float((ours - theirs).abs()[mask].max())
