"""A/B measurement of LoRALinear.forward variants (the evidence behind PROPOSED_PATCHES.md).

    taskset -c 1 python -m benchmarks.layer_variants [--quick] [--rounds N]

Builds the same model several times: LoRA all-linear with the current ``LoRALinear.forward``,
with the proposed fused forward (a patched subclass method, installed per instance, the library
file is not changed), and the frozen-base limit; times the training steps round-robin and checks
that both forwards give the same loss and the same gradients.
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
from benchmarks.models import bert_large_width_spec, build_model, make_batch, make_trainer, minilm_spec, prepare, tiny_bert_spec


def fused_forward(self, x: Tensor) -> Tensor:
    """Proposed: add the low-rank path into the base output in place (``addmm_``).

    Saves one output-sized temporary and one elementwise pass per adapted layer in the forward;
    autograd is unaffected (F.linear's backward does not need its output).
    """
    out = F.linear(x, self.weight, self.bias)
    if self.merged:
        return out
    if self.dropout_p > 0:
        x = self.lora_dropout(x)
    if x.dtype != self.lora_A.dtype or out.dtype != self.lora_B.dtype or not out.is_contiguous():
        return out + self.lora_forward(x).to(out.dtype)  # mixed dtypes: the current path
    h = F.linear(x, self.lora_A) * self.scaling  # (..., r)
    out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t())
    return out


def patch(model: torch.nn.Module) -> int:
    from lora_lightning import lora_layers

    layers = lora_layers(model)
    for layer in layers.values():
        layer.forward = types.MethodType(fused_forward, layer)
    return len(layers)


def check_equal(spec, method: str) -> dict:
    """Loss and A/B gradients of current vs fused forward on the same (non-zero B) model."""
    from benchmarks.models import randomize_lora_B

    res = {}
    grads = []
    for fused in (False, True):
        torch.manual_seed(0)
        m = prepare(build_model(spec), method)
        randomize_lora_B(m)
        m.eval()  # no dropout: deterministic
        if fused:
            patch(m)
        loss = m(**make_batch(spec, "cpu")).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
        res["loss_fused" if fused else "loss_current"] = float(loss)
    res["max_grad_abs_diff"] = max(float((grads[0][k] - grads[1][k]).abs().max()) for k in grads[0])
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--large", action="store_true", help="also the BERT-large-width model")
    args = ap.parse_args(argv)
    setup_torch("cpu", args.threads)
    specs = [tiny_bert_spec()] if args.quick else [minilm_spec(8, 128)] + ([bert_large_width_spec(3, 4, 128)] if args.large else [])
    out = {"load_average_start": load_average(), "threads": args.threads, "models": {}}
    for spec in specs:
        fns = {}
        for method in ("lora_all", "lora_qv"):
            for variant in ("current", "fused"):
                m = prepare(build_model(spec), method)
                if variant == "fused":
                    patch(m)
                fns[f"{method}:{variant}"], _ = make_trainer(m, make_batch(spec, "cpu"))
        m = prepare(build_model(spec), "floor")
        fns["floor"], _ = make_trainer(m, make_batch(spec, "cpu"))
        times = interleaved(fns, rounds=3 if args.quick else args.rounds, warmup=1 if args.quick else 2, device="cpu", seed=3)
        entry = {
            "step_s": {k: summarize(v) for k, v in times.items()},
            "ratios": {
                "lora_all fused/current": paired_ratio(times["lora_all:fused"], times["lora_all:current"]),
                "lora_qv fused/current": paired_ratio(times["lora_qv:fused"], times["lora_qv:current"]),
                "lora_all current/floor": paired_ratio(times["lora_all:current"], times["floor"]),
                "lora_all fused/floor": paired_ratio(times["lora_all:fused"], times["floor"]),
                "lora_qv current/floor": paired_ratio(times["lora_qv:current"], times["floor"]),
                "lora_qv fused/floor": paired_ratio(times["lora_qv:fused"], times["floor"]),
            },
            "equality": check_equal(spec, "lora_all"),
        }
        out["models"][spec.key] = entry
    out["load_average_end"] = load_average()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
