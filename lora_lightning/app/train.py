"""The Hydra app: ``lora-train`` / ``python -m lora_lightning.app.train``.

config (``conf/``) -> data module + model (``_target_``) -> LoRA callback -> Trainer -> fit/test
-> adapter file, adapter-only checkpoints, ``summary.json`` and a summary table.
Every bad input is reported as one line naming the fix, before any training starts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lora_lightning import (
    LoRACallback,
    LoRAConfig,
    LoRAMonitor,
    base_memory,
    count_parameters,
    plan_injection,
    rank_for_budget,
    save_adapter,
    telemetry,
)
from lora_lightning.config import all_option_defaults
from lora_lightning.errors import AppConfigError, LoRAError
from lora_lightning.injection import lora_layers

from .causal_lm import add_new_tokens
from .generation_data import GenerationDataModule
from .generation_job import run_generation
from .methods import USES_LORA, apply_method, check_method, method_parameters, save_trainable_state
from .quiet import quiet_run, without_wandb_anonymous

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # also shipped in the wheel (package data)
LORA_APP_KEYS = (
    "method",
    "budget",
    "merge_on_fit_end",
    "lr",
    "new_tokens",
    "adapter_size",
    "prefix_tokens",
    "prefix_projection",
)
USER_ERRORS = (LoRAError, FileNotFoundError)  # printed as one line, exit code 2
LAST_CHECKPOINT = "last"  # checkpoints/last.ckpt: the weights after the latest validation
log = logging.getLogger("lora_lightning")

# the `lora` group's schema: every LoRA option (shared and every registered variant's) with its default
ConfigStore.instance().store(group="lora", name="options", node=all_option_defaults())


def cpu_precision() -> str:
    """``${cpu_precision:}`` in conf/trainer/cpu.yaml: ``bf16-mixed`` where the CPU computes in bf16 natively
    (AVX512-BF16 or AMX tiles: about 2x faster steps at equal accuracy, benchmarks/RESULTS.md §9, §11 and
    experiments/results/precision.md), else ``32-true`` (emulated bf16 would be slower than fp32)."""
    cpu = getattr(torch, "cpu", None)
    native = any(
        bool(getattr(cpu, f, lambda: False)()) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return "bf16-mixed" if native else "32-true"


def device_precision() -> str:
    """``${device_precision:}`` in conf/trainer/multinode.yaml: ``bf16-mixed`` on CUDA nodes, else as
    ``${cpu_precision:}`` (so the multi-node config also runs on CPU nodes, as in the torchrun test)."""
    return "bf16-mixed" if torch.cuda.is_available() else cpu_precision()


def run_stamp() -> str:
    """``${run_stamp:}`` in ``hydra.run.dir``: the run folder's name, the same on every process of one launch.

    One process (Lightning's own launcher hands its children the parent's folder): the start time,
    ``%Y-%m-%d_%H-%M-%S``. Processes started by torchrun or srun each compose the config, seconds apart, so
    a timestamp could split one run over folders: under torchrun the stamp is ``torchrun-<rdzv id>``; in a
    SLURM batch job ``slurm-<job id>`` (array tasks ``slurm-<array job>_<task>``, srun steps after the first
    ``.<step>``), which a requeued job gets again, so Lightning finds the checkpoint it saved on pre-emption.
    ``LORA_RUN_STAMP`` overrides all of them (several runs in one job script: one stamp each)."""
    env = os.environ
    if env.get("LORA_RUN_STAMP"):
        return env["LORA_RUN_STAMP"]
    world = int(env.get("WORLD_SIZE", "1") or 1)
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if world > 1 and run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if env.get("SLURM_JOB_ID") and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        job = env["SLURM_JOB_ID"]
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        step = env.get("SLURM_STEP_ID", "")
        return f"slurm-{job}" + (f".{step}" if step.isdigit() and step != "0" else "")
    if world > 1:
        raise AppConfigError(
            f"hydra.run.dir: the {world} processes of this launch would each name their run folder by their own "
            "start time; give torchrun --rdzv-id=<name> (folder torchrun-<name>), or set hydra.run.dir=<dir> "
            "or LORA_RUN_STAMP=<name>"
        )
    return time.strftime("%Y-%m-%d_%H-%M-%S")


OmegaConf.register_new_resolver("cpu_precision", cpu_precision, replace=True)
OmegaConf.register_new_resolver("device_precision", device_precision, replace=True)
OmegaConf.register_new_resolver("run_stamp", run_stamp, replace=True)


# --------------------------------------------------------------------------- building blocks
def build_lora_config(cfg: DictConfig, model: pl.LightningModule, new_token_ids: list[int] | None = None) -> LoRAConfig:
    """``cfg.lora`` -> :class:`LoRAConfig`, resolving ``modules_to_save: auto`` and ``budget``; ``new_token_ids``
    (``lora.new_tokens`` added to the tokenizer) join ``trainable_token_indices`` (the input embedding's)."""
    fields = {k: v for k, v in OmegaConf.to_container(cfg.lora, resolve=True).items() if k not in LORA_APP_KEYS}
    if new_token_ids:
        given = fields.get("trainable_token_indices")
        if isinstance(given, dict):
            raise AppConfigError(
                "lora.new_tokens trains the new tokens' rows of the input embedding: give lora.trainable_token_indices "
                "as a list of ids (the input embedding's) with it, not a mapping"
            )
        fields["trainable_token_indices"] = list(dict.fromkeys([*(given or []), *new_token_ids]))
    targets = fields.get("targets")
    if isinstance(targets, str) and not targets.startswith("re:"):  # "q+k+v+o": a list as one sweeper choice
        fields["targets"] = [t.strip() for t in targets.split("+") if t.strip()]
    if fields.get("modules_to_save") == "auto":
        head = getattr(model, "head_parameter_names", [])
        prompt = [n for n, p in model.named_parameters() if p.requires_grad and ".prompt_encoder." in n]  # lora_pe
        fields["modules_to_save"] = sorted({n.rpartition(".")[0] for n in [*head, *prompt]})
    config = LoRAConfig.from_dict(fields, drop_other_variant_defaults=True)
    budget = cfg.lora.get("budget")
    if budget is not None:
        config = LoRAConfig.from_dict(config.to_dict() | {"r": rank_for_budget(model, config, int(budget))})
    plan_injection(model, config)  # fail now, with the candidates listed, rather than after data loading
    return config


def variant_summary(trainer: pl.Trainer, model: pl.LightningModule, lora: LoRAConfig) -> dict[str, Any]:
    """Variant extras for ``summary.json``: base-weight bytes (quantized base), AdaLoRA's final ranks."""
    out: dict[str, Any] = {"quantize_base": lora.quantize_base}
    if lora.quantize_base is not None:
        out.update(base_memory(model))
    for cb in trainer.callbacks:
        if isinstance(cb, LoRACallback) and cb.variant_hooks is not None:
            out.update(cb.variant_hooks.summary())
    return out


def parallel_job_threads() -> int | None:
    """Under a launcher running ``n_jobs`` runs at once on this machine (``hydra/launcher=joblib``), each run
    gets ``cores // n_jobs`` torch threads (at least 1), so the jobs do not oversubscribe the cores;
    ``threads=...`` overrides it. ``None`` otherwise (torch's default)."""
    try:
        launcher = HydraConfig.get().launcher
    except ValueError:  # not under Hydra
        return None
    n_jobs = launcher.get("n_jobs") if "n_jobs" in launcher else None
    if not n_jobs:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // (cores if n_jobs < 0 else int(n_jobs)))


def run_name(cfg: DictConfig) -> str:
    if cfg.run_name:
        return str(cfg.run_name)
    try:
        return HydraConfig.get().job.override_dirname or cfg.experiment_name
    except ValueError:  # not running under Hydra (tests calling run() directly)
        return str(cfg.experiment_name)


def build_logger(cfg: DictConfig) -> Any:
    if cfg.get("logger") is None or cfg.logger.get("_target_") is None:
        return False
    logger_cfg = cfg.logger
    if str(logger_cfg._target_).endswith("WandbLogger"):
        logger_cfg = OmegaConf.merge(logger_cfg, wandb_run_fields(cfg))
    logger = without_wandb_anonymous(instantiate(logger_cfg))
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return logger


W_AND_B_TAG_CHARS = 64  # W&B refuses longer tags


def wandb_run_fields(cfg: DictConfig) -> dict[str, Any]:
    """The W&B ``group``, ``job_type`` and ``tags`` the logger config leaves unset (``null``): a multirun's jobs share
    the group ``<experiment_name>/<sweep folder>`` and have job type ``sweep`` (one run: group ``experiment_name``,
    job type ``train``; ``tune=...``: ``tune``); tags are the job's own command-line overrides (``lora.r=4``), the
    keys kept out of run names (``hydra.job.config.override_dirname.exclude_keys``) left out, and
    ``experiment_name=``."""
    try:
        hc = HydraConfig.get()
    except ValueError:  # not running under Hydra (tests calling run() directly)
        hc = None
    multirun = hc is not None and hc.mode == RunMode.MULTIRUN
    excluded = set(hc.job.config.override_dirname.exclude_keys) if hc is not None else set()
    overrides = [
        o for o in (hc.overrides.task if hc is not None else []) if o.split("=", 1)[0].lstrip("+~") not in excluded
    ]
    tags = [f"experiment_name={cfg.experiment_name}", *overrides]
    fields = {
        "group": f"{cfg.experiment_name}/{Path(hc.sweep.dir).name}" if multirun else str(cfg.experiment_name),
        "job_type": "tune" if cfg.get("tune") is not None else "sweep" if multirun else "train",
        "tags": list(dict.fromkeys(t[:W_AND_B_TAG_CHARS] for t in tags)),
    }
    return {k: v for k, v in fields.items() if cfg.logger.get(k) is None}


class ValidationCurve(pl.Callback):
    """Records ``(optimizer step, <metric>)`` at every validation run (sanity check excluded) for summary.json."""

    def __init__(self, metric: str = "val_acc") -> None:
        self.metric = metric
        self.points: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.metric in trainer.callback_metrics:
            self.points.append((trainer.global_step, float(trainer.callback_metrics[self.metric])))


def build_callbacks(cfg: DictConfig, out: Path, lora: LoRAConfig | None, monitor: str = "val_acc") -> list[pl.Callback]:
    mode = "min" if monitor.endswith("loss") else "max"
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            filename=f"best-{{epoch}}-{{step}}-{{{monitor}:.4f}}",
        ),
        # the weights after the latest validation, whatever their score: Lightning >= 2.6 writes save_last=True's
        # last.ckpt only when a top-k checkpoint is saved at the same step, which makes it a copy of the best
        ModelCheckpoint(
            dirpath=out / "checkpoints",
            filename=LAST_CHECKPOINT,
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
        ),
        ValidationCurve(monitor),
    ]
    if cfg.progress == "rich":
        callbacks.append(RichProgressBar(leave=True))
    elif cfg.progress == "tqdm":
        callbacks.append(TQDMProgressBar())
    if lora is not None:
        callbacks.append(LoRACallback(lora, merge_on_fit_end=bool(cfg.lora.get("merge_on_fit_end", False))))
        monitor_cfg = cfg.get("monitor")
        if monitor_cfg is not None and monitor_cfg.get("enabled", False):
            options = {k: v for k, v in OmegaConf.to_container(monitor_cfg, resolve=True).items() if k != "enabled"}
            callbacks.append(LoRAMonitor(**{"out_dir": str(out / "lora_monitor"), **options}))
    return callbacks


# --------------------------------------------------------------------------- the job
def finished_summary(cfg: DictConfig, out: Path) -> dict[str, Any] | None:
    """``skip_done=true``: the summary already in ``out`` when it belongs to this very run (same experiment,
    run_name and seed), so an interrupted sweep re-launched into the same ``hydra.sweep.dir`` only runs what is
    missing. Settings kept out of run_name (trainer group, threads, logger) are not compared."""
    path = out / "summary.json"
    if not cfg.get("skip_done") or not path.exists():
        return None
    summary = json.loads(path.read_text())
    held = (summary.get("experiment"), summary.get("run_name"), summary.get("seed"))
    if held != (cfg.experiment_name, cfg.run_name, int(cfg.seed)):
        raise AppConfigError(
            f"skip_done=true: {path} holds run {held[1]!r} seed {held[2]} of experiment {held[0]!r}, not "
            f"{cfg.run_name!r} seed {cfg.seed} of {cfg.experiment_name!r}; give the sweep its own hydra.sweep.dir "
            "or set skip_done=false"
        )
    return summary


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train + evaluate as configured; returns the summary (also written to ``summary.json``)."""
    method = cfg.lora.get("method", "lora")
    check_method(method, causal_lm=_is_causal_lm(cfg), options=cfg.lora)
    threads = cfg.threads or parallel_job_threads()
    if threads:
        torch.set_num_threads(int(threads))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    OmegaConf.update(cfg, "run_name", run_name(cfg))
    done = finished_summary(cfg, out)
    if done is not None:
        log.info("skip_done: %s already holds the summary of %s; not re-run", out, cfg.run_name)
        return done

    datamodule = instantiate(cfg.data, _convert_="all")
    if cfg.lora.get("new_tokens"):  # in the tokenizer before the data is tokenized
        if not isinstance(datamodule, GenerationDataModule):
            raise AppConfigError(
                "lora.new_tokens adds tokens for the causal-LM job (model=smollm2 data=e2e_nlg); a classifier's "
                "tokenizer is not extended: drop it"
            )
        try:
            add_new_tokens(None, datamodule.tokenizer, list(cfg.lora.new_tokens))
        except ValueError as e:
            raise AppConfigError(str(e)) from None
    datamodule.prepare_data()
    datamodule.setup("fit")
    if isinstance(datamodule, GenerationDataModule) or _is_causal_lm(cfg):
        return run_causal_lm(cfg, datamodule, out, method)
    model = instantiate(
        cfg.model, _convert_="all", num_labels=datamodule.num_labels, label_names=list(datamodule.label_names)
    )
    base_params = count_parameters(model)
    full_model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    apply_method(model, method, cfg.lora)  # a baseline's parameters and freezing; LoRA is the callback's
    lora = build_lora_config(cfg, model) if method in USES_LORA else None
    logger = build_logger(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=build_callbacks(cfg, out, lora), logger=logger)

    if cfg.get("tune") is not None:
        return find_lr(cfg, trainer, model, datamodule, out)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, out))
    fit_seconds = time.perf_counter() - start
    ckpt_cb = trainer.checkpoint_callback
    best_path = ckpt_cb.best_model_path if ckpt_cb else ""
    results: dict[str, float] = {}
    if cfg.test:
        last = last_checkpoint(out)
        last_path = str(last) if last.is_file() else ""
        if cfg.get("test_last") and last_path:  # the final weights too: selection on validation vs the schedule's end
            tested = trainer.test(model, datamodule=datamodule, ckpt_path=last_path, verbose=False)
            results = {f"last_{k}": float(v) for k, v in (tested[0] if tested else {}).items()} | correctness(
                model, "last_", trainer
            )
        tested = trainer.test(model, datamodule=datamodule, ckpt_path=best_path or None, verbose=False)
        results.update(
            {k: float(v) for k, v in (tested[0] if tested else {}).items()} | correctness(model, "", trainer)
        )

    counts = count_parameters(model)
    summary: dict[str, Any] = {
        "experiment": cfg.experiment_name,
        "run_name": cfg.run_name,
        "method": method,
        "model": str(cfg.model.get("model")),
        "seed": int(cfg.seed),
        "targets": list(lora.targets) if lora else None,
        "r": lora.r if lora else None,
        "alpha": lora.alpha if lora else None,
        "variant": str(cfg.lora.get("variant", "lora")) if lora else None,  # as asked (rslora, qlora: aliases)
        "init": lora.init if lora else None,
        "init_seed": lora.init_seed if lora else None,
        "lr": float(cfg.model.lr) if cfg.model.get("lr") is not None else None,
        "best_val_acc": float(ckpt_cb.best_model_score) if ckpt_cb and ckpt_cb.best_model_score is not None else None,
        "val_curve": next((cb.points for cb in trainer.callbacks if isinstance(cb, ValidationCurve)), []),
        "data": str(cfg.data.get("source")),
        **{k: v for k, v in results.items()},
        "params_trainable": counts.trainable,
        "params_total": counts.total,
        "params_base": base_params.total,
        "params_lora": counts.lora,
        "params_method": method_parameters(model),
        "full_model_bytes": full_model_bytes,
        "fit_seconds": round(fit_seconds, 2),
        "threads": torch.get_num_threads(),
        "precision": str(trainer.precision),
        "world_size": trainer.world_size,
        "num_nodes": trainer.num_nodes,
        "steps": trainer.global_step,
        "epochs": trainer.current_epoch,
        "train_size": len(datamodule.splits["train"]) if getattr(datamodule, "splits", None) else None,
        "best_checkpoint": best_path,
        "best_checkpoint_bytes": Path(best_path).stat().st_size if best_path else None,
        "output_dir": str(out),
    }
    if not trainer.is_global_zero:  # one writer of a multi-process run: global rank 0 (it holds what the others do)
        return summary
    if lora is not None:
        adapter = save_adapter(model, out / "adapter.safetensors", extra_metadata={"summary_run": cfg.run_name})
        summary["adapter_path"] = str(adapter)
        summary["adapter_bytes"] = adapter.stat().st_size
        summary["adapter_fraction_of_full"] = summary["adapter_bytes"] / full_model_bytes
        summary.update(variant_summary(trainer, model, lora))
        summary["delta_norm"] = delta_norm_by_type(model)
    if model.trainable_only_method is not None:  # a baseline: what it trained, in one file
        state = save_trainable_state(model, out / "trainable_state.safetensors")
        summary["trainable_state_path"], summary["trainable_state_bytes"] = str(state), state.stat().st_size
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    OmegaConf.save(cfg, out / "resolved_config.yaml", resolve=True)
    if logger:
        _log_summary(logger, summary)
    return summary


def last_checkpoint(out: Path) -> Path:
    """``<output_dir>/checkpoints/last.ckpt``: the weights after the latest validation (see build_callbacks)."""
    return out / "checkpoints" / f"{LAST_CHECKPOINT}.ckpt"


def resume_checkpoint(cfg: DictConfig, out: Path) -> str | None:
    """``resume=true``: where the fit goes on from. The checkpoint Lightning wrote on a SLURM requeue signal
    (``<output_dir>/hpc_ckpt_<n>.ckpt``, its newest) if there is one, else ``checkpoints/last.ckpt`` (written
    at every validation), else nothing: a fresh start. ``resume=false``: always a fresh start (under SLURM
    Lightning itself still resumes from an hpc checkpoint in the run folder)."""
    if not cfg.get("resume"):
        return None
    if any(out.glob("hpc_ckpt_*.ckpt")):
        log.info("resume: %s holds a SLURM requeue checkpoint; the fit goes on from it", out)
        return "hpc"
    last = last_checkpoint(out)
    if last.is_file():
        log.info("resume: the fit goes on from %s", last)
        return str(last)
    return None


def correctness(model: pl.LightningModule, prefix: str = "", trainer: pl.Trainer | None = None) -> dict[str, Any]:
    """``{prefix}test_correct``: which test examples the last test pass got right ("0"/"1" per example, data-loader
    order, the same on every run of one split), for a bootstrap over test examples; empty for other models.

    On several processes each rank scored the examples Lightning's ``DistributedSampler(shuffle=False)`` gave
    it (rank ``r``: positions ``r, r + W, ...`` of the split, the last few repeated to even the ranks out):
    the ranks' strings are gathered and interleaved back into the split's order, so every rank returns the
    whole split's string, as one process would."""
    get = getattr(model, "test_correctness", None)
    bits = get() if callable(get) else ""
    if trainer is not None and trainer.world_size > 1:
        import torch.distributed as dist

        parts: list[str] = [""] * trainer.world_size
        dist.all_gather_object(parts, bits)
        bits = interleave_ranks(parts, len(trainer.test_dataloaders.dataset))
    return {f"{prefix}test_correct": bits} if bits else {}


def interleave_ranks(parts: list[str], n: int) -> str:
    """Per-rank strings of ``DistributedSampler(shuffle=False)`` positions (rank ``r``: ``r, r + W, ...``, padded
    by repeating the first ones) -> the ``n`` positions in order."""
    return "".join(p[i] for i in range(max(map(len, parts), default=0)) for p in parts if i < len(p))[:n]


def _is_causal_lm(cfg: DictConfig) -> bool:
    return str(cfg.model.get("_target_", "")).endswith("CausalLMModule")


def run_causal_lm(cfg: DictConfig, datamodule: Any, out: Path, method: str) -> dict[str, Any]:
    """``model=smollm2 data=e2e_nlg``: the generation job (:mod:`lora_lightning.app.generation_job`)."""
    if not (isinstance(datamodule, GenerationDataModule) and _is_causal_lm(cfg)):
        raise AppConfigError(
            f"model={cfg.model.get('_target_')} and data={cfg.data.get('_target_')} do not go together: a causal LM "
            "(model=smollm2) trains on generation data (data=e2e_nlg or a JSONL of input/target), a classifier "
            "(model=minilm) on classification data"
        )
    model = instantiate(cfg.model, _convert_="all")
    apply_method(model, method, cfg.lora)
    new_tokens = list(cfg.lora.get("new_tokens") or [])
    try:  # new special tokens: in the tokenizer, rows for them in the embedding (trained as token rows with LoRA)
        new_ids = add_new_tokens(model.model, datamodule.tokenizer, new_tokens) if new_tokens else []
    except ValueError as e:
        raise AppConfigError(str(e)) from None
    lora = build_lora_config(cfg, model, new_ids) if method == "lora" else None
    logger = build_logger(cfg)
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=build_callbacks(cfg, out, lora, monitor="val_loss"), logger=logger
    )
    if cfg.get("resume"):
        raise AppConfigError("resume=true resumes the classification job; the causal-LM job starts afresh: drop it")
    if trainer.world_size > 1:  # its generation and scoring run on one process, over the whole test split
        raise AppConfigError(
            f"the causal-LM job runs on one process (trainer.devices x trainer.num_nodes = {trainer.world_size}): "
            "set trainer.devices=1 trainer.num_nodes=1"
        )
    if cfg.get("tune") is not None:
        return find_lr(cfg, trainer, model, datamodule, out)
    base = count_parameters(model)
    summary = {
        "experiment": cfg.experiment_name,
        "run_name": cfg.run_name,
        "method": method,
        "task": "causal_lm",
        "model": str(cfg.model.get("model")),
        "data": str(cfg.data.get("source")),
        "seed": int(cfg.seed),
        "targets": list(lora.targets) if lora else None,
        "r": lora.r if lora else None,
        "alpha": lora.alpha if lora else None,
        "lr": float(cfg.model.lr),
        "new_tokens": dict(zip(new_tokens, new_ids, strict=True)),
        "params_base": base.total,
        "full_model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        **run_generation(cfg, datamodule, out, lora, trainer, model),
        "output_dir": str(out),
    }
    summary["val_curve"] = next((cb.points for cb in trainer.callbacks if isinstance(cb, ValidationCurve)), [])
    summary["params_method"] = method_parameters(model)
    if model.trainable_only_method is not None:
        state = save_trainable_state(model, out / "trainable_state.safetensors")
        summary["trainable_state_path"], summary["trainable_state_bytes"] = str(state), state.stat().st_size
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    OmegaConf.save(cfg, out / "resolved_config.yaml", resolve=True)
    if logger:
        _log_summary(logger, summary)
    return summary


def find_lr(
    cfg: DictConfig, trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any, out: Path
) -> dict[str, Any]:
    """``tune=lr_find``: Lightning's learning-rate range test on the method's trainable parameters (the
    LoRA callback injects first, as in a fit); writes ``lr_find.json`` and ``lr_find.png``."""
    from lightning.pytorch.tuner import Tuner

    if cfg.tune.get("mode") != "lr_find":
        raise AppConfigError(f"tune.mode={cfg.tune.get('mode')!r} is not known; use tune=lr_find")
    trainer.fit_loop.max_epochs = -1  # the ramp runs num_training steps, over as many epochs as it takes
    finder = Tuner(trainer).lr_find(
        model,
        datamodule=datamodule,
        min_lr=float(cfg.tune.min_lr),
        max_lr=float(cfg.tune.max_lr),
        num_training=int(cfg.tune.num_training),
        update_attr=False,
    )
    if finder is None:
        raise AppConfigError("the learning-rate range test did not run (the Trainer is in fast_dev_run mode?)")
    suggestion = finder.suggestion()
    result = {
        "mode": "lr_find",
        "method": cfg.lora.get("method", "lora"),
        "suggested_lr": suggestion,
        "lr": [float(x) for x in finder.results["lr"]],
        "loss": [float(x) for x in finder.results["loss"]],
        "output_dir": str(out),
    }
    (out / "lr_find.json").write_text(json.dumps(result, indent=2))
    fig = finder.plot(suggest=suggestion is not None)
    fig.savefig(out / "lr_find.png", dpi=120)
    if suggestion is None:
        print(
            f"lr_find: no clear descent in the loss ({len(result['lr'])} points, {out / 'lr_find.png'}); widen "
            "tune.min_lr/max_lr or raise tune.num_training"
        )
    else:
        print(
            f"lr_find: suggested lr {suggestion:.3g} (loss vs lr in {out / 'lr_find.png'}); "
            f"train with lora.lr={suggestion:.3g}"
        )
    return result


def delta_norm_by_type(model: torch.nn.Module) -> dict[str, float]:
    """``{matrix type: ‖ΔW‖_F}`` of the model's adapters as they are now (the tested weights), the root of the summed
    squares over the type's matrices (``lora/<type>/delta_norm`` of :func:`lora_lightning.telemetry.aggregate`);
    per adapter name (``<adapter>/<type>``) for named adapters. Empty once merged."""
    layers = lora_layers(model)
    if not layers:
        return {}
    values = telemetry.aggregate(telemetry.model_stats(model, top_k=1), layers)
    return {
        k.replace("lora/", "").removesuffix("/delta_norm"): round(v, 6)
        for k, v in values.items()
        if k.endswith("/delta_norm") and "/matrix/" not in k and "/layer_" not in k
    }


SUMMARY_TEXT = ("run_name", "method", "model", "variant", "data", "precision")  # strings W&B's run table shows


def summary_values(summary: dict[str, Any], strings: bool) -> dict[str, Any]:
    """``summary/<key>`` for each number of the summary (a dict such as ``delta_norm`` one level deeper:
    ``summary/delta_norm/q``); with ``strings``, also the text fields and ``targets`` joined (``q,v``)."""
    out: dict[str, Any] = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update({f"summary/{k}/{kk}": vv for kk, vv in v.items() if isinstance(vv, (int, float))})
        elif (
            isinstance(v, (int, float))
            and not isinstance(v, bool)
            or strings
            and k in SUMMARY_TEXT
            and isinstance(v, str)
        ):
            out[f"summary/{k}"] = v
        elif strings and k == "targets" and isinstance(v, list):
            out[f"summary/{k}"] = ",".join(map(str, v))
    return out


def _log_summary(logger: Any, summary: dict[str, Any]) -> None:
    """The run's summary to the logger: W&B's run summary (numbers and the text fields, so a sweep's runs compare in
    W&B's runs table and parallel-coordinates view), else one metrics row of the numbers."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update(summary_values(summary, strings=True))
        logger.experiment.finish()
    else:
        logger.log_metrics(summary_values(summary, strings=False))
        logger.save()


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def mb(n: int | None) -> str:
        return "-" if n is None else f"{n / 1e6:.2f} MB"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    table = Table(title=f"lora-lightning: {summary['experiment']} / {summary['run_name']}", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    what = (
        summary["method"]
        if summary["method"] != "lora"
        else f"LoRA r={summary['r']} alpha={summary['alpha']:g} on {summary['targets']}"
    )
    rows = [
        ("method", what),
        *(
            (
                ("test BLEU-4 (merged model)", pct(summary.get("test_bleu"))),
                ("test ROUGE-L (merged model)", pct(summary.get("test_rougeL"))),
                (
                    "zero-shot BLEU-4 / ROUGE-L",
                    f"{pct(summary.get('zero_shot_bleu'))} / {pct(summary.get('zero_shot_rougeL'))}",
                ),
                ("best val loss", "-" if summary.get("best_val_loss") is None else f"{summary['best_val_loss']:.4f}"),
            )
            if summary.get("task") == "causal_lm"
            else (
                ("test accuracy", pct(summary.get("test_acc"))),
                ("test macro-F1", pct(summary.get("test_f1"))),
                ("best val accuracy", pct(summary.get("best_val_acc"))),
                *(
                    (("test accuracy (last checkpoint)", pct(summary["last_test_acc"])),)
                    if "last_test_acc" in summary
                    else ()
                ),
            )
        ),
        (
            "trainable params",
            f"{summary['params_trainable']:,} of {summary['params_total']:,} "
            f"({100 * summary['params_trainable'] / summary['params_total']:.3f}%)",
        ),
        ("adapter file", mb(summary.get("adapter_bytes"))),
        ("full model (fp32)", mb(summary["full_model_bytes"])),
        ("best checkpoint file", mb(summary.get("best_checkpoint_bytes"))),
        *(
            (("train tokens/s", f"{summary['train_tokens_per_second']:,.0f}"),)
            if summary.get("train_tokens_per_second")
            else ()
        ),
        ("fit time", f"{summary['fit_seconds']:.1f} s ({summary['steps']} steps)"),
        ("output dir", summary["output_dir"]),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Entry point; returns the best validation accuracy (the causal-LM job: minus the best validation
    loss), the objective Hydra sweepers maximise (the test split only reports the checkpoint chosen on
    validation)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    quiet_run()
    try:
        summary = run(cfg)
    except InstantiationException as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, USER_ERRORS):
            _fail(cause)
        raise
    except USER_ERRORS as exc:
        _fail(exc)
    if summary.get("mode") == "lr_find":
        return summary.get("suggested_lr")
    if rank_zero_only.rank == 0:  # a multi-process run prints one table
        print_summary(summary)
    if summary.get("task") == "causal_lm":  # sweepers maximise: the negated best validation loss
        return None if summary.get("best_val_loss") is None else -float(summary["best_val_loss"])
    return summary.get("best_val_acc")


def _fail(exc: BaseException) -> None:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
