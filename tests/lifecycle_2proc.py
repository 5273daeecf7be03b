"""Two-process cells of tests/test_lifecycle.py (docs/lifecycle.md), one strategy per run:

    python tests/lifecycle_2proc.py <out_dir> ddp|ddp_spawn

On 2 CPU processes (gloo): fit with an adapter export, merge_on_fit_end and an adapter-only
ModelCheckpoint; a weights-only save; test with ckpt_path with a new LoRACallback and validate with
ckpt_path without one; a second fit of the same module; fit resumed from the checkpoint. Rank 0 (the
main process for ddp_spawn) writes results.json and the module's outputs on a fixed batch after each
step; the test compares them with single-process computations.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

torch.set_num_threads(1)  # 2 ranks on 2 cores: no oversubscription

from conftest import LitTiny, LoRACallback, ModelCheckpoint, tiny_batch, tiny_loader, trainer  # noqa: E402
from lora_lightning import has_lora, is_merged  # noqa: E402

LORA = dict(r=2, targets=["q", "v"])


def main(out: Path, strategy: str) -> None:
    ids, _ = tiny_batch()
    results: dict = {}
    rank0 = os.environ.get("LOCAL_RANK", "0") == "0"

    def record(name: str, module: LitTiny, **extra) -> None:
        if rank0:
            module.eval()
            with torch.no_grad():
                torch.save(module(ids), out / f"{name}.pt")
            results[name] = {"has_lora": has_lora(module), "merged": is_merged(module), **extra}
            (out / "results.json").write_text(json.dumps(results, indent=1))

    kw = dict(strategy=strategy, devices=2, enable_checkpointing=True)
    model = LitTiny()
    cb = LoRACallback(**LORA, export_adapter=str(out / "adapter.safetensors"), merge_on_fit_end=True)
    fit = trainer(out, [cb, ModelCheckpoint(dirpath=out / "ckpt", save_last=True)], max_steps=4, **kw)
    fit.fit(model, tiny_loader())
    record("fit", model, step=fit.global_step)
    fit.save_checkpoint(out / "weights.ckpt", weights_only=True)
    last = str(out / "ckpt" / "last.ckpt")

    tester = trainer(out, [LoRACallback(**LORA)], max_steps=1, **kw)
    metrics = tester.test(model, tiny_loader(seed=2), ckpt_path=last, verbose=False)
    record("test_with_callback", model, loss=metrics[0]["test_loss"])

    fresh = LitTiny()
    metrics = trainer(out, [], max_steps=1, **kw).validate(fresh, tiny_loader(seed=2), ckpt_path=last, verbose=False)
    record("validate_without_callback", fresh, loss=metrics[0]["val_loss"])

    again = trainer(out, [cb], max_steps=3, **kw)
    again.fit(model, tiny_loader())
    record("second_fit", model, step=again.global_step)

    resumed_model = LitTiny()
    resumed = trainer(out, [LoRACallback(**LORA), ModelCheckpoint(dirpath=out / "ckpt2")], max_steps=6, **kw)
    resumed.fit(resumed_model, tiny_loader(), ckpt_path=last)
    record("resume", resumed_model, step=resumed.global_step)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
