"""Per-rank training memory on 2 CPU processes (gloo): LoRA and full fine-tuning, under DDP and under
FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` per block).

    python -m benchmarks.sharded_memory            # 4 configurations, ~2-4 min on 2 cores

Each configuration is its own 2-process launch. After the 2nd optimizer step (gradients still
held) every rank counts the bytes of the tensors it holds itself — parameters, gradients and
optimizer state, each the local shard for a ``DTensor`` — and reads its resident set size
(``VmRSS``) and peak (``VmHWM``) from /proc. Writes ``benchmarks/sharded_memory.json``;
``python -m benchmarks.run --render`` puts the table into RESULTS.md.

Counted, not modelled: the tensor bytes are what the processes hold. Not counted in them: DDP's
gradient buckets (a second copy of every trainable gradient during the all-reduce), FSDP2's
unsharded parameters during a block's forward/backward (freed after), activations; RSS includes
everything (and the Python/torch runtime, ~0.4 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = {  # name: (strategy, method)
    "DDP, full fine-tuning": ("ddp", "full"),
    "DDP, LoRA": ("ddp", "lora"),
    "FSDP2, full fine-tuning": ("fsdp2", "full"),
    "FSDP2, LoRA": ("fsdp2", "lora"),
}
D, FFN, LAYERS, VOCAB, SEQ, BATCH = 1024, 4096, 6, 8192, 64, 2
LORA = dict(r=8, alpha=16, targets=["q", "v"])


def _model():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(D, D) for _ in range(4))
            self.up_proj, self.down_proj = nn.Linear(D, FFN), nn.Linear(FFN, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln1(x)
            b, t, _ = h.shape
            q, k, v = (p(h).view(b, t, 16, D // 16).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, D)
            x = x + self.o_proj(a)
            return x + self.down_proj(torch.nn.functional.gelu(self.up_proj(self.ln2(x))))

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, D)
            self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
            self.head = nn.Linear(D, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.embed(ids)
            for block in self.layers:
                x = block(x)
            return self.head(x.mean(1))

    return Net()


def worker(name: str, out: Path) -> None:
    """One configuration on 2 processes (Lightning re-runs this command for rank 1)."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from lora_lightning import LoRACallback

    torch.set_num_threads(1)
    strategy_name, method = CONFIGS[name]

    class Lit(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = _model()

        def configure_model(self) -> None:
            if strategy_name == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                for block in self.net.layers:
                    fully_shard(block)
                fully_shard(self.net)

        def training_step(self, batch, batch_idx):
            ids, y = batch
            return F.cross_entropy(self.net(ids), y)

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx != 1:
                return
            from torch.distributed.tensor import DTensor

            local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
            nbytes = lambda ts: sum(local(t).numel() * t.element_size() for t in ts)  # noqa: E731
            params = list(pl_module.parameters())
            state = [t for st in trainer.optimizers[0].state.values() for t in st.values() if torch.is_tensor(t)]
            status = dict(
                line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line
            )
            record = {
                "rank": trainer.global_rank,
                "params": nbytes(params),
                "grads": nbytes([p.grad for p in params if p.grad is not None]),
                "optimizer": nbytes(state),
                "trainable": sum(p.numel() for p in params if p.requires_grad),  # a DTensor's numel is the full one
                "total_params": sum(p.numel() for p in params),
                "rss": int(status["VmRSS"].split()[0]) * 1024,
                "peak_rss": int(status["VmHWM"].split()[0]) * 1024,
            }
            with open(out / f"rank{trainer.global_rank}.json", "w") as fh:
                json.dump(record, fh)

    if strategy_name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = "ddp"
    callbacks = [Count()] + ([LoRACallback(**LORA, verbose=False)] if method == "lora" else [])
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randint(0, VOCAB, (4 * BATCH * 2, SEQ), generator=g), torch.randint(0, 2, (4 * BATCH * 2,), generator=g)
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(Lit(), DataLoader(data, batch_size=BATCH))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=HERE / "sharded_memory.json")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.dir)
        return 0
    import tempfile

    import torch

    results = []
    start = time.time()
    for name in CONFIGS:
        with tempfile.TemporaryDirectory() as tmp:
            env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
            env["PYTHONWARNINGS"] = "ignore"
            cmd = [sys.executable, "-m", "benchmarks.sharded_memory", "--worker", name, "--dir", tmp]
            proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in (0, 1)]
        results.append({"config": name, "ranks": ranks})
        print(name, [r["params"] + r["grads"] + r["optimizer"] for r in ranks], flush=True)
    model = {
        "d_model": D,
        "ffn": FFN,
        "layers": LAYERS,
        "vocab": VOCAB,
        "seq": SEQ,
        "batch_per_rank": BATCH,
        "parameters": results[0]["ranks"][0]["total_params"],
        "lora": LORA,
    }
    software = {"torch": torch.__version__, "lightning": __import__("lightning").__version__}
    args.out.write_text(
        json.dumps(
            {
                "model": model,
                "results": results,
                "software": software,
                "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - start),
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
