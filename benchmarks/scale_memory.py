"""Scale on paper: per-rank training memory of Llama-2-7B and Llama-2-70B shapes under DDP, FSDP2 and LoRA.

    python -m benchmarks.scale_memory              # compute, write benchmarks/scale_memory.json, print the tables
    python -m benchmarks.scale_memory --markdown   # print the tables only (the block in docs/scale.md)

Nothing here runs a 7B model. Parameter counts come from ``meta``-device skeletons (transformers'
``LlamaForCausalLM`` built by :func:`benchmarks.models.build_llama_meta`), with LoRA injected by the library's
own :func:`lora_lightning.inject_lora` and counted by its :func:`lora_lightning.count_parameters` (checked
against :func:`lora_lightning.lora_parameter_count` of the injection plan). Bytes per rank then follow from
stated precisions (``BYTES``) and the sharding (FSDP2: everything over ``N_RANKS``; DDP: replicated).

Activations are a formula (:func:`activation_bytes`): every tensor the Llama decoder saves for its
backward, by shape, derived from the code path of transformers' Llama (RMSNorm's fp32 upcast, SDPA with a
flash kernel, SwiGLU MLP, HF's causal-LM loss) and the library's LoRA layers (shared-input fusion of q/k/v
and gate/up). :func:`measure_saved_bytes` checks it on tiny Llama-shaped models on the CPU: the bytes of
the distinct storages autograd packs (``saved_tensors_hooks``, :func:`benchmarks.suites.saved_activation_bytes`),
which the formula must reproduce before it is trusted at 7B/70B (docs/scale.md).

The tables add the loss's transient fp32 logit gradients (:func:`logits_transient_bytes`, derived, not measured)
and compare each rank's total with a 72 GiB budget per 80 GB GPU (``BUDGET_GIB``).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "scale_memory.json"
GIB = 2**30

# ----------------------------------------------------------------------------- assumptions
N_RANKS = 8  # 8 GPUs, one node
SEQ = 4096  # Llama-2's context length
MICRO_BATCH = 1  # sequences per rank per step (activations scale linearly with it)
GPU_GIB = 79.6  # what an "80 GB" H100 SXM shows to CUDA (nvidia-smi: 81,559 MiB)
RESERVE_GIB = 7.6  # CUDA context, NCCL, cuBLAS workspaces, allocator fragmentation, uncounted transients
BUDGET_GIB = GPU_GIB - RESERVE_GIB  # 72 GiB for what is counted here
BYTES = {
    "frozen_weight": 2,  # a frozen base weight, bf16; no gradient, no optimizer state
    "trainable_weight": 4,  # a trainable weight's fp32 copy (FSDP2's sharded parameter = the master weights)
    "grad": 4,  # fp32 gradient (FSDP2: reduce_dtype=fp32; DDP: the gradient of the fp32 parameter)
    "adam": 8,  # AdamW exp_avg + exp_avg_sq, fp32
    "compute_copy": 2,  # bf16 copy a trainable fp32 weight is computed with (FSDP2 param_dtype; DDP autocast)
    "ddp_bucket": 4,  # DDP's gradient bucket: a second fp32 copy of every trainable gradient
    "activation": 2,  # bf16 activations
}

MODELS = {
    "llama-2-7b": {"label": "Llama-2-7B", "layers": 32, "hidden": 4096, "ffn": 11008, "heads": 32, "kv_heads": 32},
    "llama-2-70b": {"label": "Llama-2-70B", "layers": 80, "hidden": 8192, "ffn": 28672, "heads": 64, "kv_heads": 8},
}
KNOWN_TOTALS = {"llama-2-7b": 6_738_415_616, "llama-2-70b": 68_976_648_192}  # the released checkpoints' sizes
VOCAB = 32000
# (key, label, LoRA (r, targets) or None for full fine-tuning)
TRAININGS = [
    ("full", "full fine-tuning", None),
    ("lora-r8-qkvo", "LoRA r=8 q,k,v,o", (8, "q,k,v,o")),
    ("lora-r16-qkvo", "LoRA r=16 q,k,v,o", (16, "q,k,v,o")),
    ("lora-r8-all", "LoRA r=8 all-linear", (8, "all-linear")),
    ("lora-r16-all", "LoRA r=16 all-linear", (16, "all-linear")),
]
STRATEGIES = {"ddp": "DDP", "fsdp2": "FSDP2"}
TARGETS = {"q,k,v,o": ["q", "k", "v", "o"], "all-linear": ["all-linear"]}
# the matrices of a Llama block each target setting adapts (what the formula needs)
ADAPTED = {
    "q,k,v,o": ("q", "k", "v", "o"),
    "all-linear": ("q", "k", "v", "o", "gate", "up", "down"),
}

# tiny shapes the formula is checked on (CPU, random init): (label, LlamaShape kwargs, batch, seq)
VALIDATION_SHAPES = [
    (
        "2 layers, d 64, 4 heads / 2 KV, MLP 176, vocab 320; batch 2 x 24",
        dict(layers=2, hidden=64, ffn=176, heads=4, kv_heads=2, vocab=320),
        2,
        24,
    ),
    (
        "3 layers, d 96, 6 heads / 6 KV, MLP 256, vocab 500; batch 1 x 40",
        dict(layers=3, hidden=96, ffn=256, heads=6, kv_heads=6, vocab=500),
        1,
        40,
    ),
]


def _method(label: str, lora, dropout: float = 0.0, fused: bool = True, mixed: bool = False) -> dict:
    """A measured configuration: lora (r, targets) or None; fused: shared-input fusion; mixed: fp32 adapters on
    the base, the forward under bf16 autocast."""
    return {"label": label, "lora": lora, "dropout": dropout, "fused": fused, "mixed": mixed}


VALIDATION_METHODS = [
    _method("full fine-tuning", None),
    _method("LoRA r=4 q,k,v,o", (4, "q,k,v,o")),
    _method("LoRA r=4 all-linear", (4, "all-linear")),
    _method("LoRA r=4 all-linear, dropout 0.1", (4, "all-linear"), dropout=0.1),
    _method("LoRA r=4 all-linear, dropout 0.1, unfused", (4, "all-linear"), dropout=0.1, fused=False),
    _method("LoRA r=4 q,k,v,o, fp32 adapters, bf16 autocast", (4, "q,k,v,o"), mixed=True),
    _method("LoRA r=4 all-linear, fp32 adapters, bf16 autocast", (4, "all-linear"), mixed=True),
]


@dataclass(frozen=True)
class LlamaShape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def config(self):
        """transformers' LlamaConfig of this shape (untied embeddings, as Llama-2)."""
        from benchmarks.models import llama_1b_config

        cfg = llama_1b_config(self.layers, self.hidden, self.ffn, self.heads, self.kv_heads)
        cfg.vocab_size = self.vocab
        return cfg


def shape_of(key: str) -> LlamaShape:
    return LlamaShape(**{k: v for k, v in MODELS[key].items() if k != "label"})


def lora_config(r: int, targets: str):
    from lora_lightning import LoRAConfig

    return LoRAConfig(r=r, alpha=2 * r, targets=TARGETS[targets])


# ----------------------------------------------------------------------------- parameters (meta skeletons)
def skeleton_counts(shape: LlamaShape) -> dict[str, dict]:
    """Every training setting's parameter counts on a meta-device skeleton: total, trainable (the library's
    :func:`count_parameters`), the adapters (also :func:`lora_parameter_count` of the plan), and per FSDP2
    unit: one decoder block, and the root (embeddings, final norm, LM head)."""
    from benchmarks.models import build_llama_meta
    from lora_lightning import count_parameters, inject_lora, lora_parameter_count, remove_lora

    model = build_llama_meta(shape.config())
    out: dict[str, dict] = {}
    for key, _label, lora in TRAININGS:
        n_matrices = planned = 0
        if lora is not None:
            specs = inject_lora(model, lora_config(*lora))
            n_matrices, planned = len(specs), lora_parameter_count(specs)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
        whole = count_parameters(model)
        block = count_parameters(model.model.layers[0])
        out[key] = {
            "total": whole.total,
            "trainable": whole.trainable,
            "lora": whole.lora,
            "lora_planned": planned,
            "adapted_matrices": n_matrices,
            "block_total": block.total,
            "block_trainable": block.trainable,
            "root_total": whole.total - shape.layers * block.total,
            "root_trainable": whole.trainable - shape.layers * block.trainable,
        }
        if lora is not None:
            remove_lora(model)
    return out


def hand_lora_params(shape: LlamaShape, r: int, targets: str) -> int:
    """``Σ r·(d_in + d_out)`` over the adapted matrices, from the shape alone."""
    h, f, kv = shape.hidden, shape.ffn, shape.kv_dim
    dims = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, f), "up": (h, f), "down": (f, h)}
    return shape.layers * sum(r * sum(dims[m]) for m in ADAPTED[targets])


def state_bytes(counts: dict, strategy: str, n_ranks: int = N_RANKS) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients, optimizer state and the strategy's buffers (see BYTES).

    FSDP2 shards parameters, gradients and optimizer state over ``n_ranks``; its buffers are the unsharded
    bf16 parameters it all-gathers (the root unit, held for the whole step as FSDP2 does for the root, plus two
    decoder blocks: the one computing and the one prefetched) and one unit's unsharded gradient (bf16, and its
    fp32 copy for the reduce-scatter). DDP replicates everything; its buffers are the gradient buckets and the
    bf16 compute copies of the trainable weights."""
    b = BYTES
    trainable, frozen = counts["trainable"], counts["total"] - counts["trainable"]
    shards = n_ranks if strategy == "fsdp2" else 1
    out = {
        "params": (frozen * b["frozen_weight"] + trainable * b["trainable_weight"]) / shards,
        "grads": trainable * b["grad"] / shards,
        "optimizer": trainable * b["adam"] / shards,
    }
    if strategy == "fsdp2":
        gathered = b["compute_copy"] * (counts["root_total"] + 2 * counts["block_total"])
        unsharded_grad = (b["compute_copy"] + b["grad"]) * max(counts["block_trainable"], counts["root_trainable"])
        out["buffers"] = gathered + unsharded_grad
    else:
        out["buffers"] = trainable * (b["ddp_bucket"] + b["compute_copy"])
    return out


# ----------------------------------------------------------------------------- activations (formula)
def layer_activation_bytes(
    shape: LlamaShape,
    tokens: int,
    lora: tuple[int, str] | None,
    e: int = BYTES["activation"],
    first: bool = False,
    dropout: bool = False,
    dropout_mask_bytes: int = 1,
    fused: bool = True,
    mixed: bool = False,
) -> dict[str, int]:
    """Bytes one decoder layer saves for its backward, by part (``tokens`` = batch x sequence).

    Full fine-tuning, with ``T`` tokens, width ``h``, KV width ``h_kv``, MLP width ``f``, ``a`` heads,
    activation bytes ``e``::

        2 RMSNorms   2 x T(4h + 4)        fp32 upcast (saved by pow) + fp32 rsqrt
                     2 x T·e·h            normalised input (for the norm weight's gradient)
        attention    T·e·(2h + 2h_kv)     SDPA's q, k, v, output (the output is also o_proj's input)
                     4·T·a                the flash kernel's fp32 logsumexp
        SwiGLU       3 x T·e·f            gate out (SiLU input), SiLU out, up out
        GEMM inputs  2 x T·e·h + T·e·f    norm outputs (one storage for q/k/v, one for gate/up), the product
                                          (down's input)

    LoRA (frozen base): the norms keep only the fp32 upcast (none in the first layer, whose input needs no
    gradient); a frozen GEMM saves nothing of its own, an adapted one its input (for A's gradient) and ``x·Aᵀ``
    (``T·e·r``); SDPA and the SwiGLU are saved either way. Which input storages an adapted layer keeps:

    * bf16 adapters (FSDP2's bf16 compute copies, or a bf16 model): q/k/v share one ``x``, gate/up one, o reads
      SDPA's output, down the product, so the GEMM inputs are as in full fine-tuning for the groups adapted;
    * ``mixed`` (fp32 adapters under bf16 autocast, DDP's ``bf16-mixed``): the layer casts ``x`` to the adapters'
      fp32 and autocast back to bf16, so every adapted matrix keeps a copy of its own (``T·e·d_in`` each);
    * adapter dropout: the fused q/k/v and gate/up groups (shared-input fusion, ``fused``) keep ``x`` and a
      1-byte mask per member; a separate layer (o and down always, every layer with ``fused=False`` or ``mixed``)
      keeps its dropped input (``e``) and, where its input needs a gradient, ``nn.Dropout``'s mask
      (``dropout_mask_bytes``: 1 on CUDA, ``e`` on the CPU).
    """
    T, h, f, kv, a = tokens, shape.hidden, shape.ffn, shape.kv_dim, shape.heads
    full = lora is None
    r, adapted = (0, ()) if full else (lora[0], ADAPTED[lora[1]])
    grad_in = full or not first  # does the layer's input need a gradient?
    mask = dropout_mask_bytes if dropout else 0
    parts = {
        "norms": 2 * T * (4 * h + 4) - (0 if grad_in else T * (4 * h + 4)) + (2 * T * e * h if full else 0),
        "attention": T * e * (2 * h + 2 * kv) + 4 * T * a,
        "mlp": 3 * T * e * f,
        "gemm_inputs": 2 * T * e * h + T * e * f if full else 0,
        "lora": T * e * r * len(adapted),
    }
    if not full:
        groups = (([m for m in "qkv" if m in adapted], grad_in), ([m for m in ("gate", "up") if m in adapted], True))
        for members, needs_grad in groups:
            if not members:
                continue
            if fused and not mixed:  # one node: the shared x, and a bool mask per member
                parts["gemm_inputs"] += T * e * h + (T * h * len(members) if dropout else 0)
            elif dropout or mixed:  # separate layers, each with its own (dropped / cast) input
                parts["gemm_inputs"] += len(members) * T * h * (e + (mask if needs_grad else 0))
            else:  # separate layers saving the same x
                parts["gemm_inputs"] += T * e * h
        if "o" in adapted and (dropout or mixed):
            parts["gemm_inputs"] += T * h * (e + mask)
        if "down" in adapted:
            parts["gemm_inputs"] += T * f * (e + mask)
    parts["total"] = sum(parts.values())
    return parts


def activation_bytes(
    shape: LlamaShape,
    batch: int,
    seq: int,
    lora: tuple[int, str] | None,
    e: int = BYTES["activation"],
    checkpoint: bool = False,
    dropout: bool = False,
    dropout_mask_bytes: int = 1,
    fused: bool = True,
    mixed: bool = False,
) -> dict[str, int]:
    """Bytes saved for the backward of one forward of the whole causal LM (labels given, no padding mask).

    Besides the layers (:func:`layer_activation_bytes`): the token ids (int64, saved by the embedding when it
    trains), RoPE's cos/sin (one ``seq x head_dim`` pair, shared by every layer and sequence), the final norm
    (as a layer's norm; full fine-tuning also saves the LM head's input), and the loss: HF upcasts the logits to
    fp32 and ``cross_entropy`` keeps the fp32 log-softmax ``T x vocab``, the int64 targets and a scalar.

    ``checkpoint``: every decoder layer under (non-reentrant) activation checkpointing, as
    ``gradient_checkpointing_enable()`` does: each layer keeps its input (``T·e·h``) and, during its backward, one
    layer's saved tensors exist again (the recomputation): the figure is that peak.
    """
    T, h, V = batch * seq, shape.hidden, shape.vocab
    full = lora is None
    kw = dict(e=e, dropout=dropout, dropout_mask_bytes=dropout_mask_bytes, fused=fused, mixed=mixed)
    first = layer_activation_bytes(shape, T, lora, first=True, **kw)["total"]
    rest = layer_activation_bytes(shape, T, lora, **kw)["total"]
    model = {
        "embedding": 8 * T if full else 0,
        "rope": 2 * seq * shape.head_dim * e,
        "final_norm": T * (4 * h + 4) + (2 * T * e * h if full else 0),
        # HF shifts the labels with F.pad(labels, (0, 1))[..., 1:]: flattening copies them (8·T bytes) unless
        # batch is 1, where the view keeps the padded storage (8·(seq + 1))
        "loss": 4 * T * V + 8 * (T if batch > 1 else seq + 1) + 4,
    }
    if checkpoint:
        layers = shape.layers * T * e * h + max(first, rest)
    else:
        layers = first + (shape.layers - 1) * rest
    return {"layers": layers, **model, "total": layers + sum(model.values())}


# ----------------------------------------------------------------------------- activations (measured)
def measure_saved_bytes(shape: LlamaShape, batch: int, seq: int, method: dict, dtype: str = "bf16") -> int:
    """The distinct bytes autograd saves in one training forward of a tiny Llama (CPU, random init), after a
    warm-up step (the first forward learns the shared-input groups). ``method``: a VALIDATION_METHODS entry;
    ``mixed``: fp32 adapters on the ``dtype`` base, the forward under ``torch.autocast(bfloat16)`` (DDP's
    ``bf16-mixed``)."""
    import torch
    from transformers import LlamaForCausalLM

    from benchmarks.models import DTYPES
    from benchmarks.suites import saved_activation_bytes
    from lora_lightning import LoRAConfig, inject_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.config()).to(DTYPES[dtype])
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    lora = method["lora"]
    if lora is None:
        model.requires_grad_(True)
    else:
        config = LoRAConfig(
            r=lora[0],
            alpha=2 * lora[0],
            targets=TARGETS[lora[1]],
            dropout=method["dropout"],
            fuse_shared_inputs=method["fused"],
            adapter_dtype="float32" if method["mixed"] else None,
        )
        inject_lora(model, config)
    ids = torch.randint(0, shape.vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    batch_ = {"input_ids": ids, "labels": ids}
    mode = "lora_all+bf16mixed" if method["mixed"] else ""  # saved_activation_bytes reads the modifier only
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=method["mixed"]):
        model(**batch_).loss.backward()
    return saved_activation_bytes(model, batch_, mode)


def predicted_saved_bytes(shape: LlamaShape, batch: int, seq: int, method: dict, dtype: str = "bf16") -> int:
    """:func:`activation_bytes` for a measured configuration (the CPU's dropout keeps its mask in the activation
    dtype, CUDA's in one byte). Under autocast the bf16 casts of the fp32 adapters are saved too: every A and B
    (``e`` bytes a parameter) but the first layer's q/k/v A, whose input needs no gradient (the tables count these
    copies in DDP's "buffers")."""
    e = 2 if dtype == "bf16" else 4
    lora, mixed = method["lora"], method["mixed"]
    out = activation_bytes(
        shape,
        batch,
        seq,
        lora,
        e=e,
        dropout=method["dropout"] > 0,
        dropout_mask_bytes=e,
        fused=method["fused"],
        mixed=mixed,
    )["total"]
    if mixed:
        qkv = sum(1 for m in ADAPTED[lora[1]] if m in "qkv")
        out += e * (hand_lora_params(shape, *lora) - qkv * lora[0] * shape.hidden)
    return out


def validation() -> list[dict]:
    """Formula vs measurement on the tiny shapes: every method in bf16 on both shapes, and in fp32 (no autocast
    row) on the first."""
    rows = []
    for i, (label, kw, batch, seq) in enumerate(VALIDATION_SHAPES):
        shape = LlamaShape(**kw)
        for dtype in ("bf16", "fp32") if i == 0 else ("bf16",):
            for method in VALIDATION_METHODS:
                if dtype == "fp32" and method["mixed"]:
                    continue
                measured = measure_saved_bytes(shape, batch, seq, method, dtype)
                predicted = predicted_saved_bytes(shape, batch, seq, method, dtype)
                rows.append(
                    {
                        "shape": label,
                        "dtype": dtype,
                        "method": method["label"],
                        "measured_bytes": measured,
                        "predicted_bytes": predicted,
                        "relative_error": (predicted - measured) / measured,
                    }
                )
    return rows


# ----------------------------------------------------------------------------- the tables
def rank_activation_bytes(shape: LlamaShape, batch: int, lora, strategy: str, checkpoint: bool) -> int:
    """A rank's saved activations for ``batch`` sequences of SEQ tokens: bf16 compute copies of every weight under
    FSDP2 (``MixedPrecisionPolicy(param_dtype=bfloat16)``); fp32 adapters under bf16 autocast with DDP."""
    mixed = strategy == "ddp" and lora is not None
    return activation_bytes(shape, batch, SEQ, lora, checkpoint=checkpoint, mixed=mixed)["total"]


def logits_transient_bytes(shape: LlamaShape, batch: int) -> int:
    """The loss's transient peak on top of the saved tensors: at the start of the backward, ``cross_entropy``'s
    fp32 gradient of the log-probabilities and log-softmax's fp32 gradient of the logits (``8·T·vocab``), while the
    saved log-softmax (counted in the activations) still exists. Derived, not measured."""
    return 8 * batch * SEQ * shape.vocab


def rank_dynamic_bytes(shape: LlamaShape, batch: int, lora, strategy: str, checkpoint: bool) -> int:
    return rank_activation_bytes(shape, batch, lora, strategy, checkpoint) + logits_transient_bytes(shape, batch)


def largest_batch(static: float, shape: LlamaShape, lora, strategy: str, checkpoint: bool, limit: int = 4096) -> int:
    """The largest micro-batch (sequences of SEQ tokens) whose total fits BUDGET_GIB; 0 if none."""
    best = 0
    for batch in range(1, limit + 1):
        if static + rank_dynamic_bytes(shape, batch, lora, strategy, checkpoint) > BUDGET_GIB * GIB:
            break
        best = batch
    return best


def smallest_fsdp2_world(counts: dict, shape: LlamaShape, lora, checkpoint: bool, limit: int = 4096) -> int:
    """The fewest FSDP2 ranks (80 GB GPUs) on which a rank's total at MICRO_BATCH fits BUDGET_GIB; 0 if none."""
    dynamic = rank_dynamic_bytes(shape, MICRO_BATCH, lora, "fsdp2", checkpoint)
    for n in range(1, limit + 1):
        if sum(state_bytes(counts, "fsdp2", n).values()) + dynamic <= BUDGET_GIB * GIB:
            return n
    return 0


def compute(with_validation: bool = True) -> dict:
    models: dict[str, dict] = {}
    rows: list[dict] = []
    for mkey, meta in MODELS.items():
        shape = shape_of(mkey)
        counts = skeleton_counts(shape)
        per_token = {}
        for tkey, _label, lora in TRAININGS:
            per_token[tkey] = layer_activation_bytes(shape, 1, lora)["total"]
            if lora is not None:
                per_token[tkey + "+mixed"] = layer_activation_bytes(shape, 1, lora, mixed=True)["total"]
        models[mkey] = {
            "label": meta["label"],
            "shape": asdict(shape),
            "known_total": KNOWN_TOTALS[mkey],
            "counts": counts,
            "layer_activation_bytes_per_token": per_token,
        }
        for skey in STRATEGIES:
            for tkey, _tlabel, lora in TRAININGS:
                state = state_bytes(counts[tkey], skey)
                static = sum(state.values())
                act = rank_activation_bytes(shape, MICRO_BATCH, lora, skey, False)
                act_ckpt = rank_activation_bytes(shape, MICRO_BATCH, lora, skey, True)
                logits = logits_transient_bytes(shape, MICRO_BATCH)
                rows.append(
                    {
                        "model": mkey,
                        "strategy": skey,
                        "training": tkey,
                        "trainable": counts[tkey]["trainable"],
                        **{f"{k}_bytes": v for k, v in state.items()},
                        "logits_bytes": logits,
                        "activation_bytes": act,
                        "activation_ckpt_bytes": act_ckpt,
                        "total_bytes": static + logits + act,
                        "total_ckpt_bytes": static + logits + act_ckpt,
                        "fits": static + logits + act <= BUDGET_GIB * GIB,
                        "fits_ckpt": static + logits + act_ckpt <= BUDGET_GIB * GIB,
                        "max_micro_batch": largest_batch(static, shape, lora, skey, False),
                        "max_micro_batch_ckpt": largest_batch(static, shape, lora, skey, True),
                    }
                )
                if skey == "fsdp2":
                    rows[-1]["min_fsdp2_gpus"] = smallest_fsdp2_world(counts[tkey], shape, lora, False)
                    rows[-1]["min_fsdp2_gpus_ckpt"] = smallest_fsdp2_world(counts[tkey], shape, lora, True)
    return {
        "assumptions": {
            "n_ranks": N_RANKS,
            "seq": SEQ,
            "micro_batch": MICRO_BATCH,
            "gpu_gib": GPU_GIB,
            "reserve_gib": RESERVE_GIB,
            "budget_gib": BUDGET_GIB,
            "bytes": BYTES,
            "lora_alpha": "2r",
            "lora_dropout": 0.0,
        },
        "models": models,
        "rows": rows,
        "validation": validation() if with_validation else [],
    }


def _gib(x: float) -> str:
    return f"{x / GIB:.2f}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def markdown(report: dict) -> str:
    a = report["assumptions"]
    labels = {k: label for k, label, _ in TRAININGS}
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    batch = lambda n: str(n) if n else "—"  # noqa: E731
    L = [
        f"GiB (2^30 bytes) per rank, {a['n_ranks']} ranks. Activations and logits: micro-batch {a['micro_batch']} x "
        f"{a['seq']} tokens, bf16, without / with activation checkpointing (AC). Fits: total ≤ "
        f"{a['budget_gib']:.0f} GiB ({a['gpu_gib']} GiB of an 80 GB GPU less {a['reserve_gib']} GiB reserved). "
        "Max micro-batch: the most "
        f"sequences of {a['seq']} tokens per rank that fit.",
        "",
        "| model | strategy | training | trainable | params | grads | optimizer | buffers | logits | activations "
        "| activations, AC | total | total, AC | fits 8×80 GB (no AC / AC) | max micro-batch (no AC / AC) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in report["rows"]:
        m = report["models"][row["model"]]
        L.append(
            f"| {m['label']} | {STRATEGIES[row['strategy']]} | {labels[row['training']]} | {_params(row['trainable'])} "
            f"| {_gib(row['params_bytes'])} | {_gib(row['grads_bytes'])} | {_gib(row['optimizer_bytes'])} "
            f"| {_gib(row['buffers_bytes'])} | {_gib(row['logits_bytes'])} | {_gib(row['activation_bytes'])} "
            f"| {_gib(row['activation_ckpt_bytes'])} | {_gib(row['total_bytes'])} | {_gib(row['total_ckpt_bytes'])} "
            f"| {yes(row['fits'])} / {yes(row['fits_ckpt'])} "
            f"| {batch(row['max_micro_batch'])} / {batch(row['max_micro_batch_ckpt'])} |"
        )
    L += [
        "",
        f"The fewest 80 GB GPUs on which FSDP2 fits at micro-batch {a['micro_batch']} x {a['seq']} (the world size "
        "shards the states; activations stay per rank):",
        "",
        "| model | training | GPUs, no AC | GPUs, AC |",
        "|---|---|---:|---:|",
    ]
    for row in report["rows"]:
        if row["strategy"] == "fsdp2":
            label = report["models"][row["model"]]["label"]
            L.append(
                f"| {label} | {labels[row['training']]} | {batch(row['min_fsdp2_gpus'])} "
                f"| {batch(row['min_fsdp2_gpus_ckpt'])} |"
            )
    L += [
        "",
        "Parameters counted on the meta skeletons (`count_parameters` after `inject_lora`):",
        "",
        "| model | total | known total | LoRA r=8 q,k,v,o | r=16 q,k,v,o | r=8 all-linear | r=16 all-linear |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report["models"].values():
        c = m["counts"]
        L.append(
            f"| {m['label']} | {c['full']['total']:,} | {m['known_total']:,} | "
            + " | ".join(f"{c[k]['trainable']:,}" for k, _, lora in TRAININGS if lora)
            + " |"
        )
    L += [
        "",
        "Saved activations per decoder layer and token, bytes (bf16; the first layer of a LoRA model saves 4h + 4 "
        "fewer). FSDP2: bf16 compute copies of the adapters; DDP: fp32 adapters under bf16 autocast:",
        "",
        "| model | adapters | " + " | ".join(labels[k] for k, _, _ in TRAININGS) + " |",
        "|---|---|" + "---:|" * len(TRAININGS),
    ]
    for m in report["models"].values():
        per = m["layer_activation_bytes_per_token"]
        for suffix, what in (("", "bf16 (FSDP2)"), ("+mixed", "fp32, autocast (DDP)")):
            cells = [f"{per[k + suffix]:,}" if k + suffix in per else f"{per[k]:,}" for k, _, _ in TRAININGS]
            L.append(f"| {m['label']} | {what} | " + " | ".join(cells) + " |")
    if report["validation"]:
        worst = max(abs(v["relative_error"]) for v in report["validation"])
        L += [
            "",
            f"Formula vs measurement (bytes saved for backward, CPU, `saved_tensors_hooks`); largest relative "
            f"error {worst:.2%}:",
            "",
            "| shape | dtype | training | measured | formula | error |",
            "|---|---|---|---:|---:|---:|",
        ]
        for v in report["validation"]:
            L.append(
                f"| {v['shape']} | {v['dtype']} | {v['method']} | {v['measured_bytes']:,} "
                f"| {v['predicted_bytes']:,} | {v['relative_error']:.2%} |"
            )
    return "\n".join(L)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--markdown", action="store_true", help="print the tables only (write no JSON)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    report = compute()
    if not args.markdown:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
