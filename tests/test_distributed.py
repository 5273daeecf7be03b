"""Distributed training: DDP on the CPU (gloo, 2 processes) and FSDP (GPU only, skipped without one).

One subprocess launch (``tests/ddp_script.py``) trains 1 epoch on 2 ranks and then, in the same
processes, resumes from the checkpoint it wrote for a second epoch. Everything else runs in this
process: the single-process reference runs that the DDP numbers are checked against (2 ranks x
batch 4 with averaged gradients == 1 process x batch 8 on the same 8 samples per step, up to
float round-off), and the 1-process resume from the 2-process checkpoint.

Lightning gives every DDP training loader a ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED
or 0)``: in epoch ``e`` the ranks together take ``randperm(32, seed + e)`` in order (rank ``r``
gets positions ``r::2``), so step ``i`` sees positions ``8i..8i+7`` of that permutation.
:class:`EpochPermutation` hands one process exactly those batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler

from lora_lightning import LoRACallback, LoRAConfig, inject_lora, save_adapter
from conftest import N_LAYERS, LitTiny, randomize_adapters, tiny_loader, trainer

SCRIPT = Path(__file__).with_name("ddp_script.py")
REPO = SCRIPT.parent.parent
LORA = dict(r=2, targets=["q", "v", "mlp"])  # must match ddp_script.LORA
N_ADAPTER_TENSORS = N_LAYERS * 4 * 2  # q, v, up, down per block; A and B each
STEPS_PER_EPOCH = 4  # 32 samples: 2 ranks x batch 4, or 1 process x batch 8


def lora_tensors(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def assert_adapters_close(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert a.keys() == b.keys() and len(a) == N_ADAPTER_TENSORS
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Launch the 2-rank run once: ``train`` (1 epoch) then ``resumed`` (2nd epoch from its checkpoint)."""
    out = tmp_path_factory.mktemp("ddp")
    model = LitTiny(seed=0)
    inject_lora(model, LoRAConfig(**LORA))
    randomize_adapters(model)  # B != 0: every adapter tensor gets a gradient from step 1
    init = save_adapter(model, out / "init.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "PL_GLOBAL_SEED")}
    env["PYTHONWARNINGS"] = "ignore"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--devices", "2", "--epochs", "1", "--resume-epochs", "2",
         "--init", str(init)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"DDP run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    records = {
        (tag, rank): torch.load(out / f"{tag}-rank{rank}.pt", weights_only=False)
        for tag in ("train", "resumed")
        for rank in (0, 1)
    }
    return {"out": out, "init": init, "records": records, "seconds": time.perf_counter() - start}


class EpochPermutation(Sampler):
    """All ranks' ``DistributedSampler(shuffle=True, seed=0)`` indices of an epoch, in one stream."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _single_process_fit(root: Path, epochs: int, init: Path | None = None, ckpt: Path | None = None):
    model = LitTiny(seed=0)
    cb = LoRACallback(**LORA, init_adapter=str(init) if init else None, verbose=False)
    t = trainer(root, [cb], max_steps=-1, max_epochs=epochs)
    data = tiny_loader(n=32).dataset
    t.fit(model, DataLoader(data, batch_size=8, sampler=EpochPermutation(len(data))), ckpt_path=ckpt)
    return model, t


def test_ddp_ranks_hold_identical_adapters_equal_to_single_process_run(ddp_run, tmp_path):
    r0, r1 = ddp_run["records"][("train", 0)], ddp_run["records"][("train", 1)]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == STEPS_PER_EPOCH
    assert r0["adapter"].keys() == r1["adapter"].keys()
    for k in r0["adapter"]:
        assert torch.equal(r0["adapter"][k], r1["adapter"][k]), f"{k} differs between ranks"
    # independent computation: the same 4 optimizer steps on one process with the union batch
    ref, t = _single_process_fit(tmp_path, epochs=1, init=ddp_run["init"])
    assert t.global_step == STEPS_PER_EPOCH
    assert_adapters_close(r0["adapter"], lora_tensors(ref))
    # and training did move the adapters (so the comparison above is not init == init)
    from safetensors.torch import load_file

    start = load_file(ddp_run["init"])
    moved = max((r0["adapter"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3


def test_ddp_writes_exactly_one_adapter_only_checkpoint_from_rank0(ddp_run):
    out = ddp_run["out"]
    files = sorted(p.name for p in (out / "train-ckpt").iterdir())
    assert files == [f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"]  # no temp files left either
    log0 = (out / "writes-rank0.log").read_text().split()
    assert not (out / "writes-rank1.log").exists(), "rank 1 wrote files"
    assert [w for w in log0 if w.startswith("train-ckpt/")] == [f"train-ckpt/{files[0]}"]
    assert log0.count("train-adapter.safetensors") == 1
    ckpt = torch.load(out / "train-ckpt" / files[0], weights_only=False)
    assert set(ckpt["state_dict"]) == set(ddp_run["records"][("train", 0)]["adapter"])
    assert ckpt["lora_lightning"]["config"]["r"] == LORA["r"]
    for k, v in ckpt["state_dict"].items():  # the checkpoint holds the trained (rank-identical) tensors
        assert torch.equal(v, ddp_run["records"][("train", 0)]["adapter"][k])


def test_resume_ddp_checkpoint_on_two_processes(ddp_run):
    r0, r1 = ddp_run["records"][("resumed", 0)], ddp_run["records"][("resumed", 1)]
    assert r0["global_step"] == r1["global_step"] == 2 * STEPS_PER_EPOCH
    for k in r0["adapter"]:
        assert torch.equal(r0["adapter"][k], r1["adapter"][k]), f"{k} differs between ranks after resume"
    assert len(list((ddp_run["out"] / "resumed-ckpt").glob("*.ckpt"))) == 1


def test_resume_ddp_checkpoint_on_one_process_matches_two_process_resume(ddp_run, tmp_path):
    (ckpt,) = (ddp_run["out"] / "train-ckpt").glob("*.ckpt")
    resumed, t = _single_process_fit(tmp_path, epochs=2, ckpt=ckpt)
    assert t.global_step == 2 * STEPS_PER_EPOCH
    ddp_resumed = ddp_run["records"][("resumed", 0)]["adapter"]
    assert_adapters_close(ddp_resumed, lora_tensors(resumed))
    # the second epoch changed the adapters relative to the checkpoint
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert max((ddp_resumed[k] - saved[k]).abs().max().item() for k in saved) > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs a CUDA device")
def test_fsdp_use_orig_params_trains_only_adapters_and_checkpoints_adapter_only(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from conftest import Block

    model = LitTiny(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True)  # frozen + trainable in one unit
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    t = trainer(
        tmp_path, [LoRACallback(**LORA, verbose=False), ckpt_cb], accelerator="cuda", devices=1,
        strategy=strategy, max_steps=3, enable_checkpointing=True, deterministic=False,
    )
    t.fit(model, tiny_loader())
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False, map_location="cpu")
    sd = ckpt["state_dict"]
    assert len(sd) == N_ADAPTER_TENSORS and all(".lora_" in k for k in sd)
    assert not any("_fsdp" in k for k in sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_B"))
    # base weights untouched: compare the full (unsharded) state dict Lightning gathers
    full = t.strategy.lightning_module_state_dict()
    assert set(base) <= set(full)
    for k, v in base.items():
        assert torch.equal(full[k].cpu(), v), f"frozen {k} changed"
    # the adapter-only checkpoint resumes onto a fresh base
    fresh = LitTiny(seed=0)
    t2 = trainer(tmp_path / "b", [LoRACallback(**LORA, verbose=False)], accelerator="cuda", devices=1,
                 strategy=FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True), max_steps=4,
                 deterministic=False)
    t2.fit(fresh, tiny_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert t2.global_step == 4  # restored at step 3, one more step
