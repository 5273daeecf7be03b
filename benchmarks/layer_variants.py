"""A/B/C measurement of the ``LoRALinear.forward`` implementations (evidence for OPTIMIZATIONS.md).

    taskset -c 1 python -m benchmarks.layer_variants [--quick] [--rounds N] [--large]

Builds the same model once per forward and times the training steps round-robin against the
frozen-base limit:

* ``composed``: ``F.linear(x, W0, b) + lora_forward(x)`` (five autograd nodes, a d_out-wide add);
* ``inplace``: the low-rank path added into the base output with ``addmm_`` (the second version);
* ``one_node``: one autograd node per layer, :class:`lora_lightning.layers.LoRALinearFunction`
  (shared-input fusion off);
* ``shared``: the library's default today: layers reading the same tensor (q, k, v) as one node,
  :class:`lora_lightning.shared_input.SharedInputLoRAFunction`.

The older two are installed per instance as patched methods (the library is not changed). All
three must give the same loss and gradients; the script checks that too.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks.common import interleaved, load_average, paired_ratio, setup_torch, summarize
from benchmarks.models import (
    bert_large_width_spec,
    build_model,
    make_batch,
    make_trainer,
    minilm_spec,
    prepare,
    tiny_bert_spec,
)

VARIANTS = ("composed", "inplace", "one_node", "shared")


def composed_forward(self, x: Tensor) -> Tensor:
    """The first forward: base output plus the separately computed low-rank output."""
    out = F.linear(x, self.weight, self.bias)
    return out if self.merged else out + self.lora_forward(x).to(out.dtype)


def inplace_forward(self, x: Tensor) -> Tensor:
    """The second forward: the low-rank path added into the base output in place (``addmm_``)."""
    out = F.linear(x, self.weight, self.bias)
    if self.merged:
        return out
    if self.dropout_p > 0:
        x = self.lora_dropout(x)
    h = F.linear(x, self.lora_A) * self.scaling  # (..., r)
    out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t())
    return out


def patch(model: torch.nn.Module, variant: str) -> int:
    from lora_lightning import lora_layers, set_shared_input_fusion

    layers = lora_layers(model)
    set_shared_input_fusion(model, variant == "shared")
    fn = {"composed": composed_forward, "inplace": inplace_forward, "one_node": None, "shared": None}[variant]
    if fn is not None:
        for layer in layers.values():
            layer.forward = types.MethodType(fn, layer)
    return len(layers)


def check_equal(spec, method: str) -> dict:
    """Loss and gradients of every forward on the same (non-zero B) model, vs ``composed``."""
    from benchmarks.models import randomize_lora_B

    res, grads = {}, {}
    for variant in VARIANTS:
        torch.manual_seed(0)
        m = prepare(build_model(spec), method)
        randomize_lora_B(m)
        m.eval()  # no dropout: deterministic
        patch(m, variant)
        m(**make_batch(spec, "cpu"))  # the shared-input groups are learnt on a first forward
        loss = m(**make_batch(spec, "cpu")).loss
        loss.backward()
        grads[variant] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        res[f"loss_{variant}"] = float(loss)
    for variant in VARIANTS[1:]:
        res[f"max_grad_abs_diff_{variant}_vs_composed"] = max(
            float((grads[variant][k] - grads["composed"][k]).abs().max()) for k in grads["composed"]
        )
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--large", action="store_true", help="also the BERT-large-width model")
    args = ap.parse_args(argv)
    setup_torch("cpu", args.threads)
    specs = (
        [tiny_bert_spec()]
        if args.quick
        else [minilm_spec(8, 128)] + ([bert_large_width_spec(3, 4, 128)] if args.large else [])
    )
    out = {"load_average_start": load_average(), "threads": args.threads, "models": {}}
    for spec in specs:
        fns = {}
        for method in ("lora_all", "lora_qv"):
            for variant in VARIANTS:
                m = prepare(build_model(spec), method)
                patch(m, variant)
                fns[f"{method}:{variant}"], _ = make_trainer(m, make_batch(spec, "cpu"))
        m = prepare(build_model(spec), "floor")
        fns["floor"], _ = make_trainer(m, make_batch(spec, "cpu"))
        times = interleaved(
            fns, rounds=3 if args.quick else args.rounds, warmup=1 if args.quick else 2, device="cpu", seed=3
        )
        ratios = {}
        for method in ("lora_all", "lora_qv"):
            for variant in VARIANTS:
                ratios[f"{method} {variant}/floor"] = paired_ratio(times[f"{method}:{variant}"], times["floor"])
            for variant in VARIANTS[1:]:
                ratios[f"{method} {variant}/composed"] = paired_ratio(
                    times[f"{method}:{variant}"], times[f"{method}:composed"]
                )
            ratios[f"{method} shared/one_node"] = paired_ratio(times[f"{method}:shared"], times[f"{method}:one_node"])
        out["models"][spec.key] = {
            "step_s": {k: summarize(v) for k, v in times.items()},
            "ratios": ratios,
            "equality": check_equal(spec, "lora_all"),
        }
    out["load_average_end"] = load_average()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
