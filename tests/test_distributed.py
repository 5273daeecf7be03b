"""Distributed training on the CPU (gloo): DDP and FSDP2 (Lightning's ModelParallelStrategy) on 2
processes, and FSDP1 (GPU only, skipped without one).

DDP: one subprocess launch (``tests/ddp_script.py``) trains 1 epoch on 2 ranks and then, in the same
processes, resumes from the checkpoint it wrote for a second epoch. Everything else runs in this
process: the single-process reference runs that the DDP numbers are checked against (2 ranks x
batch 4 with averaged gradients == 1 process x batch 8 on the same 8 samples per step, up to
float round-off), and the 1-process resume from the 2-process checkpoint.

FSDP2: the same on 2 ranks with ``fully_shard`` per block, once per checkpoint format (a sharded
folder, one file), then a 1-process launch that resumes both checkpoints and runs the cases that
must refuse. Sharded or not, the adapters must equal the same single-process reference.

The launch helper and the single-process references are in ``distributed_helpers.py``; the same runs
across two simulated nodes (torchrun) are in ``test_multinode.py``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import LitTiny, LoRACallback, ModelCheckpoint, tiny_loader, trainer
from distributed_helpers import (
    LORA,
    N_ADAPTER_TENSORS,
    STEPS_PER_EPOCH,
    assert_adapters_close,
    initial_adapter,
    launch,
    lora_tensors,
    single_process_fit,
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Launch the 2-rank run once: ``train`` (1 epoch) then ``resumed`` (2nd epoch from its checkpoint)."""
    out = tmp_path_factory.mktemp("ddp")
    init = initial_adapter(out)
    seconds = launch(out, "--devices", "2", "--epochs", "1", "--resume-epochs", "2", "--init", str(init))
    records = {
        (tag, rank): torch.load(out / f"{tag}-rank{rank}.pt", weights_only=False)
        for tag in ("train", "resumed")
        for rank in (0, 1)
    }
    return {"out": out, "init": init, "records": records, "seconds": seconds}


def test_ddp_ranks_hold_identical_adapters_equal_to_single_process_run(ddp_run, tmp_path):
    r0, r1 = ddp_run["records"][("train", 0)], ddp_run["records"][("train", 1)]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == STEPS_PER_EPOCH
    assert r0["adapter"].keys() == r1["adapter"].keys()
    for k in r0["adapter"]:
        assert torch.equal(r0["adapter"][k], r1["adapter"][k]), f"{k} differs between ranks"
    # independent computation: the same 4 optimizer steps on one process with the union batch
    ref, t = single_process_fit(tmp_path, epochs=1, init=ddp_run["init"])
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
    resumed, t = single_process_fit(tmp_path, epochs=2, ckpt=ckpt)
    assert t.global_step == 2 * STEPS_PER_EPOCH
    ddp_resumed = ddp_run["records"][("resumed", 0)]["adapter"]
    assert_adapters_close(ddp_resumed, lora_tensors(resumed))
    # the second epoch changed the adapters relative to the checkpoint
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert max((ddp_resumed[k] - saved[k]).abs().max().item() for k in saved) > 1e-3


# --------------------------------------------------------------------------- FSDP2 (ModelParallelStrategy)
@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    """Two launches: 2 ranks train 1 epoch and resume a 2nd, once per checkpoint format; then 1 process
    (batch 8 = 2 x 4) resumes each 2-rank checkpoint and runs the cases that must refuse."""
    out = tmp_path_factory.mktemp("fsdp2")
    init = initial_adapter(out)
    fsdp = ("--strategy", "fsdp2", "--init", str(init), "--resume-epochs", "2")
    launch(out, "--devices", "2", "--epochs", "1", "--tag", "fsdp", "--format", "sharded", "--format", "file", *fsdp)
    (sharded,) = (out / "fsdp-sharded-ckpt").glob("*.ckpt")
    (single,) = (out / "fsdp-file-ckpt").glob("*.ckpt")
    launch(
        out,
        "--devices",
        "1",
        "--batch",
        "8",
        "--resume-from",
        f"one-sharded={sharded}",
        "--resume-from",
        f"one-file={single}",
        "--refusals",
        *fsdp,
    )
    load = lambda name: torch.load(out / name, weights_only=False)  # noqa: E731
    records = {
        (tag, rank): load(f"{tag}-rank{rank}.pt")
        for tag in ("fsdp-sharded", "fsdp-file", "fsdp-sharded-resumed", "fsdp-file-resumed")
        for rank in (0, 1)
    }
    records |= {(tag, 0): load(f"{tag}-rank0.pt") for tag in ("one-sharded", "one-file")}
    return {
        "out": out,
        "init": init,
        "records": records,
        "sharded": sharded,
        "file": single,
        "refusals": load("refusals-rank0.pt"),
    }


@pytest.fixture(scope="module")
def single_process_reference(fsdp2_runs, tmp_path_factory):
    """The same data on one process, unsharded: after epoch 1 and after epoch 2."""
    root = tmp_path_factory.mktemp("reference")
    one, _ = single_process_fit(root / "1", epochs=1, init=fsdp2_runs["init"])
    two, _ = single_process_fit(root / "2", epochs=2, init=fsdp2_runs["init"])
    return {"epoch1": one, "epoch2": two}


def test_fsdp2_shards_and_trains_only_adapters_equal_to_single_process_run(fsdp2_runs, single_process_reference):
    ref = single_process_reference["epoch1"]
    adapter_names = sorted(lora_tensors(ref))
    for fmt in ("sharded", "file"):
        r0, r1 = fsdp2_runs["records"][(f"fsdp-{fmt}", 0)], fsdp2_runs["records"][(f"fsdp-{fmt}", 1)]
        assert r0["world_size"] == 2 and r0["global_step"] == r1["global_step"] == STEPS_PER_EPOCH
        for r in (r0, r1):
            assert r["trainable"] == adapter_names  # only adapters (LitTiny hands AdamW every parameter)
            assert set(adapter_names) <= set(r["sharded"]) and r["sharded_after_fit"]  # adapters sharded too
            assert r["with_optimizer_state"] == adapter_names and r["optimizer_state_sharded"]
        # each rank holds about half of every sharded tensor: together exactly the full model
        full = {k: v.numel() for k, v in (r0["base"] | r0["adapter"]).items()}
        assert {k: r0["local_numel"][k] + r1["local_numel"][k] for k in full} == full
        assert max(sum(r["local_numel"].values()) for r in (r0, r1)) < 0.52 * sum(full.values())
        assert_adapters_close(r0["adapter"], r1["adapter"], atol=0)
        assert_adapters_close(r0["adapter"], lora_tensors(ref))  # FSDP2's averaged gradients == one process
        base = LitTiny(seed=0).state_dict()
        for k, v in r0["base"].items():
            assert torch.equal(v, base[k]), f"frozen {k} changed"


def test_fsdp2_exports_gather_full_tensors_on_rank0(fsdp2_runs, single_process_reference):
    from safetensors.torch import load_file

    from lora_lightning import merged_state_dict

    ref = single_process_reference["epoch1"]
    out = fsdp2_runs["out"]
    writes = (out / "writes-rank0.log").read_text().split()
    assert not (out / "writes-rank1.log").exists(), "rank 1 wrote files"
    assert writes.count("fsdp-sharded-adapter.safetensors") == writes.count("fsdp-sharded-merged.safetensors") == 1
    for fmt in ("sharded", "file"):
        assert_adapters_close(load_file(out / f"fsdp-{fmt}-adapter.safetensors"), lora_tensors(ref))
        merged, expected = load_file(out / f"fsdp-{fmt}-merged.safetensors"), merged_state_dict(ref)
        assert merged.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(merged[k], expected[k], atol=2e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_fsdp2_checkpoints_hold_only_adapter_state_in_both_formats(fsdp2_runs):
    from torch.distributed.checkpoint import FileSystemReader

    trained = fsdp2_runs["records"][("fsdp-sharded", 0)]["adapter"]
    stored = FileSystemReader(fsdp2_runs["sharded"]).read_metadata().state_dict_metadata
    tensors = {k.removeprefix("state_dict.") for k in stored if k.startswith("state_dict.")}
    assert tensors == set(trained)
    optimizer_params = {
        k.removeprefix("optimizer_0.state.").rsplit(".", 1)[0] for k in stored if k.startswith("optimizer_0.state.")
    }
    assert optimizer_params == set(trained)
    meta = torch.load(fsdp2_runs["sharded"] / "meta.pt", weights_only=False)
    assert meta["lora_lightning"]["config"]["r"] == LORA["r"] and "state_dict" not in meta
    single = torch.load(fsdp2_runs["file"], weights_only=False)
    assert set(single["state_dict"]) == set(trained) and single["lora_lightning"]["config"]["r"] == LORA["r"]
    file_trained = fsdp2_runs["records"][("fsdp-file", 0)]["adapter"]
    for k, v in single["state_dict"].items():
        assert torch.equal(v, file_trained[k])


def test_fsdp2_checkpoints_resume_on_two_processes_and_on_one(fsdp2_runs, single_process_reference):
    ref = lora_tensors(single_process_reference["epoch2"])
    records = fsdp2_runs["records"]
    for fmt in ("sharded", "file"):
        r0, r1 = records[(f"fsdp-{fmt}-resumed", 0)], records[(f"fsdp-{fmt}-resumed", 1)]
        one = records[(f"one-{fmt}", 0)]
        assert r0["global_step"] == r1["global_step"] == one["global_step"] == 2 * STEPS_PER_EPOCH
        assert one["world_size"] == 1
        assert_adapters_close(r0["adapter"], r1["adapter"], atol=0)
        assert_adapters_close(r0["adapter"], ref)  # == an uninterrupted 2-epoch run on one process
        assert_adapters_close(one["adapter"], ref)


def test_fsdp2_network_built_in_configure_model(fsdp2_runs, single_process_reference):
    refusals = fsdp2_runs["refusals"]
    assert_adapters_close(refusals["late"], lora_tensors(single_process_reference["epoch1"]))  # inject_before_sharding
    assert refusals["late_without_inject"].startswith("LoRAConfigError: ")
    assert (
        "already sharded" in refusals["late_without_inject"]
        and "inject_before_sharding(self)" in refusals["late_without_inject"]
    )
    assert (
        refusals["merge_on_fit_end"].startswith("LoRAConfigError: ") and "export_merged" in refusals["merge_on_fit_end"]
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDPStrategy needs a CUDA device")
def test_fsdp_use_orig_params_trains_only_adapters_and_checkpoints_adapter_only(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    from conftest import Block

    model = LitTiny(seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True)  # frozen + trainable in one unit
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    t = trainer(
        tmp_path,
        [LoRACallback(**LORA, verbose=False), ckpt_cb],
        accelerator="cuda",
        devices=1,
        strategy=strategy,
        max_steps=3,
        enable_checkpointing=True,
        deterministic=False,
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
    t2 = trainer(
        tmp_path / "b",
        [LoRACallback(**LORA, verbose=False)],
        accelerator="cuda",
        devices=1,
        strategy=FSDPStrategy(auto_wrap_policy={Block}, use_orig_params=True),
        max_steps=4,
        deterministic=False,
    )
    t2.fit(fresh, tiny_loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert t2.global_step == 4  # restored at step 3, one more step
