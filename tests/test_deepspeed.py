"""``LoRACallback`` under Lightning's ``DeepSpeedStrategy`` (docs/distributed.md, "DeepSpeed").

1. **Refusals** (no deepspeed needed): the callback's ``setup`` refuses, in one line naming the setting and the
   fix, what it cannot guarantee under DeepSpeed (ZeRO stage 3, offload, several adapters, LoRA+, a quantized
   base, fp32 adapters on a half-precision model), before it changes anything. Without deepspeed installed
   ``DeepSpeedStrategy()`` cannot be constructed, so those tests give the strategy object the config its
   constructor would build (with deepspeed installed, the real constructor's).
2. **CPU, 2 processes** (skipped without deepspeed): Lightning's ``DeepSpeedStrategy`` refuses the CPU in three
   places, none of them in DeepSpeed: :class:`CPUDeepSpeedStrategy` lifts exactly those three and nothing else,
   so DeepSpeed's engine, ZeRO optimizer, checkpoint writer and loader run as they do on a GPU (gloo instead of
   NCCL). This file, run as a script, is the 2-rank run (Lightning's launcher re-runs it for rank 1); the test
   process checks it against a single-process run on the same batches.
3. **GPU** (skipped without CUDA): the same script with the stock ``DeepSpeedStrategy(stage=2)`` on 1 GPU::

       python -m pytest -q tests/test_deepspeed.py -k gpu

The script::

    python tests/test_deepspeed.py OUT --init INIT.safetensors [--devices 2] [--stage 2] [--accelerator cpu|gpu]

trains ``LitTiny`` 1 epoch (batch ``8 // devices`` per rank), checkpoints it (``OUT/ckpt/epoch1.ckpt``, a
DeepSpeed folder), resumes it in the same processes for a 2nd epoch with ``merge_on_fit_end``, then tries to
resume it with another adapter structure and onto another base (both must be refused); every rank writes
``OUT/rank{R}.pt`` (what it saw) and rank 0 the adapter and merged exports.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Sampler

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import PACKAGE, LitTiny, LoRACallback, ModelCheckpoint, randomize_adapters, tiny_loader, trainer  # noqa: E402
from lora_lightning import LoRAConfig, LoRAConfigError, has_lora, inject_lora, save_adapter  # noqa: E402
from lora_lightning.lightning.callback import prepare_deepspeed  # noqa: E402

STRATEGIES = importlib.import_module(f"{PACKAGE}.strategies")
DeepSpeedStrategy, DDPStrategy = STRATEGIES.DeepSpeedStrategy, STRATEGIES.DDPStrategy
FABRIC = "lightning.fabric" if PACKAGE == "lightning.pytorch" else "lightning_fabric"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
LORA = dict(r=2, targets=["q", "v", "mlp"])
N_ADAPTER_TENSORS = 3 * 4 * 2  # 3 blocks x (q, v, up, down) x (A, B)
STEPS_PER_EPOCH = 4  # 32 samples: 2 ranks x batch 4, or 1 process x batch 8
ATOL = {"cpu": 2e-5, "gpu": 1e-4}  # float round-off (CPU: the same kernels in another order; GPU: other kernels)


# --------------------------------------------------------------------------- the strategy
def ds_config(stage: int = 2, **zero) -> dict:
    """The config ``DeepSpeedStrategy(stage=stage, ...)`` builds (the ZeRO part of it)."""
    return {"zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage, **zero}}


def make_strategy(config: dict):
    """A ``DeepSpeedStrategy`` holding ``config``: the real one when deepspeed is installed, else the object its
    constructor would give, minus the ``import deepspeed`` that makes it fail."""
    if HAS_DEEPSPEED:
        return DeepSpeedStrategy(config=config)
    strategy = object.__new__(DeepSpeedStrategy)
    DDPStrategy.__init__(strategy)  # what DeepSpeedStrategy.__init__ calls after importing deepspeed
    strategy.config, strategy.exclude_frozen_parameters = config, False
    return strategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` with Lightning's three CUDA-only lines lifted (see the module doc), for the CPU run."""

    def setup_environment(self) -> None:  # Lightning: "only supported on CUDA GPUs but `CPUAccelerator` is used"
        DDPStrategy.setup_environment(self)  # what DeepSpeedStrategy's calls after that check

    def setup_distributed(self) -> None:  # Lightning checks device indices, which CPU devices lack (None)
        import deepspeed.ops

        # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce (C++, minutes) used only for inference
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        importlib.import_module(f"{FABRIC}.utilities.seed").reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed  # Lightning passes device_rank=root_device.index: None on the CPU, which DeepSpeed rejects

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


# --------------------------------------------------------------------------- 1. refusals (no deepspeed needed)
def fake_trainer(strategy, precision: str = "32-true"):
    """What ``LoRACallback.setup`` reads of a Trainer."""
    return types.SimpleNamespace(strategy=strategy, precision=precision, precision_plugin=None)


REFUSALS = [
    (ds_config(3), {}, "32-true", "ZeRO stage 3"),
    (ds_config(2, offload_optimizer={"device": "cpu"}), {}, "32-true", "offload_optimizer"),
    (ds_config(2, offload_param={"device": "nvme"}), {}, "32-true", "offload_param"),
    (ds_config(2, cpu_offload=True), {}, "32-true", "cpu_offload"),
    (ds_config(2), {"adapters": ["a", "b"]}, "32-true", "adapters=['a', 'b']"),
    (ds_config(2), {"loraplus_lr_ratio": 16}, "32-true", "loraplus_lr_ratio"),
    (ds_config(2), {"quantize_base": "int8"}, "32-true", "quantize_base='int8'"),
    (ds_config(2), {"adapter_dtype": "float32"}, "bf16-mixed", "adapter_dtype='float32' with precision='bf16-mixed'"),
]


@pytest.mark.parametrize("config,options,precision,named", REFUSALS, ids=[r[3] for r in REFUSALS])
def test_refused_at_setup_before_anything_changes(config, options, precision, named):
    strategy = make_strategy(config)
    module = LitTiny()
    cb = LoRACallback(**(LORA | options), verbose=False)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(LoRAConfigError, match="with DeepSpeedStrategy") as err:
        cb.setup(fake_trainer(strategy, precision), module, "fit")
    message = str(err.value)
    assert named in message and "\n" not in message
    assert "; use " in message or "; drop " in message  # names the fix
    assert not has_lora(module) and module.state_dict().keys() == before.keys()
    assert strategy.exclude_frozen_parameters is False and "load_checkpoint" not in vars(strategy)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_stage_0_to_2_accepted_with_adapter_only_checkpoints(stage):
    """Stages 0-2 pass; the callback makes DeepSpeed's checkpoint folder adapter-only and wraps its loader."""
    strategy = make_strategy(ds_config(stage))
    assert prepare_deepspeed(LoRACallback(**LORA, verbose=False), fake_trainer(strategy, "bf16-mixed")) is True
    assert strategy.exclude_frozen_parameters is True and "load_checkpoint" in vars(strategy)
    full = make_strategy(ds_config(stage))
    prepare_deepspeed(LoRACallback(**LORA, verbose=False, adapter_only_checkpoints=False), fake_trainer(full))
    assert full.exclude_frozen_parameters is False  # full checkpoints asked for: DeepSpeed writes the whole model


def test_other_strategies_untouched():
    assert prepare_deepspeed(LoRACallback(**LORA, verbose=False), fake_trainer(DDPStrategy())) is False


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed")
def test_accepted_on_a_real_trainer(tmp_path):
    t, module = trainer(tmp_path, [], strategy="deepspeed_stage_2"), LitTiny()
    LoRACallback(**LORA, verbose=False).setup(t, module, "fit")
    assert has_lora(module) and t.strategy.exclude_frozen_parameters is True


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed")
def test_refused_on_a_real_trainer_before_the_checkpoint_writer_changes(tmp_path):
    """With deepspeed installed: a Trainer built with ``strategy="deepspeed_stage_3"`` (Lightning's registry name)."""
    t = trainer(tmp_path, [], strategy="deepspeed_stage_3")
    io_before, module = t.strategy.checkpoint_io, LitTiny()
    with pytest.raises(LoRAConfigError, match=r"ZeRO stage 3 .* use DeepSpeedStrategy\(stage=2\) or FSDP2"):
        LoRACallback(**LORA, verbose=False).setup(t, module, "fit")
    assert t.strategy.checkpoint_io is io_before and not has_lora(module)


# --------------------------------------------------------------------------- 2. and 3.: the runs
class EpochPermutation(Sampler):
    """All ranks' ``DistributedSampler(shuffle=True, seed=0)`` indices of an epoch, in one stream: step ``i`` of
    the 2-rank run (rank ``r`` takes positions ``r::2``) sees positions ``8i..8i+7``, as batch ``i`` here."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def lora_tensors(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def assert_adapters_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys() and len(a) == N_ADAPTER_TENSORS
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def initial_adapter(out: Path) -> Path:
    model = LitTiny(seed=0)
    inject_lora(model, LoRAConfig(**LORA))
    randomize_adapters(model)  # B != 0: every adapter tensor gets a gradient from step 1
    return save_adapter(model, out / "init.safetensors")


def reference(root: Path, init: Path) -> dict:
    """One process, plain Lightning, batch 8 on the batches the 2 ranks see together: adapters after each epoch."""
    seen: dict = {}

    class Record(pl_callback()):
        def on_train_epoch_end(self, trainer, module):
            seen[f"epoch{trainer.current_epoch + 1}"] = lora_tensors(module)

    model = LitTiny(seed=0)
    cb = LoRACallback(**LORA, init_adapter=str(init), verbose=False)
    t = trainer(root, [cb, Record()], max_steps=-1, max_epochs=2)
    data = tiny_loader(n=32).dataset
    t.fit(model, DataLoader(data, batch_size=8, sampler=EpochPermutation(len(data))))
    from lora_lightning import merged_state_dict

    return seen | {"merged": merged_state_dict(model.net)}


def pl_callback():
    return importlib.import_module(PACKAGE).Callback


def launch(out: Path, *args: str, timeout: int = 540) -> None:
    """Run this file as the script, in its own process group (a rank left waiting is killed with it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.Popen(
        [sys.executable, __file__, str(out), *args],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the DeepSpeed run {args} timed out:\n{output[-6000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a rank left behind by a failure
    assert proc.returncode == 0, f"the DeepSpeed run {args} failed:\n{output[-8000:]}"


def run_and_reference(tmp_path_factory, accelerator: str, devices: int, stage: int = 2) -> dict:
    out = tmp_path_factory.mktemp(f"deepspeed-{accelerator}-stage{stage}")
    init = initial_adapter(out)
    launch(out, "--init", str(init), "--devices", str(devices), "--accelerator", accelerator, "--stage", str(stage))
    ranks = {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)}
    return {"out": out, "ranks": ranks, "ref": reference(out / "reference", init), "devices": devices, "stage": stage}


def check_trained_only_adapters_equal_to_one_process(run: dict, atol: float) -> None:
    from safetensors.torch import load_file

    ref, ranks = run["ref"], run["ranks"]
    names = sorted(ref["epoch1"])
    base = {k: v for k, v in LitTiny(seed=0).state_dict().items() if ".lora_" not in k}
    for r, rec in ranks.items():
        assert rec["world_size"] == run["devices"] and rec["global_step"] == STEPS_PER_EPOCH
        assert rec["trainable"] == names, f"rank {r} trained more than the adapters"
        assert rec["optimized_numel"] == sum(v.numel() for v in ref["epoch1"].values())  # only adapters optimized
        for k, v in base.items():
            assert torch.equal(rec["base"][k], v), f"frozen {k} changed on rank {r}"
        assert_adapters_close(rec["epoch1"], ranks[0]["epoch1"], atol=0)  # every rank holds the same adapters
    assert_adapters_close(ranks[0]["epoch1"], ref["epoch1"], atol)  # ZeRO's averaged gradients == one process
    assert_adapters_close(load_file(run["out"] / "epoch1.safetensors"), ref["epoch1"], atol)  # the export


def check_checkpoint_folder_holds_only_adapter_tensors(run: dict) -> None:
    folder = run["out"] / "ckpt" / "epoch1.ckpt"
    names, adapter_numel = set(run["ref"]["epoch1"]), sum(v.numel() for v in run["ref"]["epoch1"].values())
    files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    shards = [f"checkpoint/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(run["devices"])]
    scripts = {"zero_to_fp32.py", "zero_to_torch.py"} & files  # DeepSpeed's conversion scripts (ZeRO stages)
    assert files == {"latest", "checkpoint/mp_rank_00_model_states.pt", *scripts, *(shards if run["stage"] else [])}
    model_states = torch.load(folder / "checkpoint/mp_rank_00_model_states.pt", weights_only=False)
    assert set(model_states["module"]) == names  # DeepSpeed's model file: the adapters, no base weight
    assert not model_states.get("frozen_param_fragments")
    assert model_states["lora_lightning"]["config"]["r"] == LORA["r"]  # the LoRA record, as in every checkpoint
    if not run["stage"]:  # no ZeRO: torch's AdamW state, in the model file, for the adapters only
        assert sum(s["exp_avg"].numel() for s in model_states["optimizer"]["state"].values()) == adapter_numel
        return
    numel = 0
    for shard in shards:  # ZeRO's fp32 master weights and Adam states: partitions of the adapters only
        state = torch.load(folder / shard, weights_only=False)["optimizer_state_dict"]
        numel += sum(p.numel() for p in state["single_partition_of_fp32_groups"]) - sum(state["group_paddings"])
        adam = state["base_optimizer_state"]["state"].values()
        assert [s["exp_avg"].numel() for s in adam] == [p.numel() for p in state["single_partition_of_fp32_groups"]]
    assert numel == adapter_numel


def check_resume(run: dict, atol: float) -> None:
    from safetensors.torch import load_file

    ref, ranks = run["ref"], run["ranks"]
    for rec in ranks.values():
        assert rec["resumed_step"] == 2 * STEPS_PER_EPOCH
        # refused before DeepSpeed loaded anything (the folder's LoRA record is checked first)
        assert rec["refused"].startswith("AdapterMismatchError") and "r: 2 in checkpoint vs 4" in rec["refused"]
        assert rec["other_base"].startswith("BaseModelMismatchError"), rec["other_base"]  # another base: refused
    assert_adapters_close(ranks[0]["epoch2"], ref["epoch2"], atol)  # resumed adapters and optimizer states
    merged = load_file(run["out"] / "merged.safetensors")
    assert merged.keys() == ref["merged"].keys()
    for k, v in ref["merged"].items():
        torch.testing.assert_close(merged[k], v, atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- 2. CPU, 2 processes
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return run_and_reference(tmp_path_factory, "cpu", 2)


def test_cpu_zero2_trains_only_adapters_equal_to_one_process(cpu_run):
    check_trained_only_adapters_equal_to_one_process(cpu_run, ATOL["cpu"])


def test_cpu_zero2_checkpoint_folder_holds_only_adapter_tensors(cpu_run):
    check_checkpoint_folder_holds_only_adapter_tensors(cpu_run)


def test_cpu_zero2_resumes_and_merges_and_refuses_another_structure(cpu_run):
    check_resume(cpu_run, ATOL["cpu"])


def test_cpu_zero2_folder_converted_by_lightning_loads_as_lora_checkpoint(cpu_run, tmp_path):
    """Lightning's ``convert_zero_checkpoint_to_fp32_state_dict`` turns the folder into one adapter-only Lightning
    checkpoint that ``load_lora_checkpoint`` loads onto the base (the way to deploy a DeepSpeed run)."""
    from lora_lightning import load_lora_checkpoint

    convert = importlib.import_module(f"{PACKAGE}.utilities.deepspeed").convert_zero_checkpoint_to_fp32_state_dict
    convert(cpu_run["out"] / "ckpt" / "epoch1.ckpt", tmp_path / "epoch1.ckpt")
    saved = torch.load(tmp_path / "epoch1.ckpt", weights_only=False)
    assert set(saved["state_dict"]) == set(cpu_run["ref"]["epoch1"])
    model = load_lora_checkpoint(LitTiny, tmp_path / "epoch1.ckpt")
    assert_adapters_close(lora_tensors(model), cpu_run["ranks"][0]["epoch1"], atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_cpu_stage_0_and_1_same_checks(stage, tmp_path_factory):
    """Stage 2's checks at stage 0 (no ZeRO: torch's optimizer) and 1 (ZeRO partitions the optimizer states only)."""
    pytest.importorskip("deepspeed")
    run = run_and_reference(tmp_path_factory, "cpu", 2, stage)
    check_trained_only_adapters_equal_to_one_process(run, ATOL["cpu"])
    check_checkpoint_folder_holds_only_adapter_tensors(run)
    check_resume(run, ATOL["cpu"])


# --------------------------------------------------------------------------- 3. GPU
@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    return run_and_reference(tmp_path_factory, "gpu", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the stock DeepSpeedStrategy)")
def test_gpu_zero2_trains_only_adapters_checkpoints_adapter_only_and_resumes(gpu_run):
    """The stock ``DeepSpeedStrategy(stage=2)`` on 1 GPU: the CPU run's checks (not run here: no GPU was lent)."""
    check_trained_only_adapters_equal_to_one_process(gpu_run, ATOL["gpu"])
    check_checkpoint_folder_holds_only_adapter_tensors(gpu_run)
    check_resume(gpu_run, ATOL["gpu"])


# --------------------------------------------------------------------------- the script
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--init", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    out: Path = args.out

    def strategy():  # buckets of 2**20 elements, not 2e8: DeepSpeed allocates them in full every step
        buckets = dict(reduce_bucket_size=2**20, allgather_bucket_size=2**20)
        cls = CPUDeepSpeedStrategy if args.accelerator == "cpu" else DeepSpeedStrategy
        return cls(stage=args.stage, **buckets)

    def fit(callbacks, epochs, ckpt=None, seed=0):
        module = LitTiny(seed=seed)
        t = trainer(
            out / "root",
            callbacks,
            accelerator=args.accelerator,
            devices=args.devices,
            strategy=strategy(),
            max_steps=-1,
            max_epochs=epochs,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
            deterministic=args.accelerator == "cpu",  # CUDA attention kernels have no deterministic backward
        )
        t.fit(module, tiny_loader(n=32, batch_size=8 // args.devices), ckpt_path=ckpt)
        return module, t

    record: dict = {}

    class Optimized(pl_callback()):
        def on_train_end(self, trainer, module):  # what DeepSpeed's optimizer updates: ZeRO's groups, else with state
            opt = trainer.optimizers[0]
            held = [p for g in opt.bit16_groups for p in g] if args.stage else [p for p in opt.state if opt.state[p]]
            record["optimized_numel"] = sum(p.numel() for p in held)

    cb = LoRACallback(**LORA, init_adapter=args.init, export_adapter=str(out / "epoch1.safetensors"), verbose=False)
    ckpt = ModelCheckpoint(dirpath=out / "ckpt", filename="epoch1")
    module, t = fit([cb, ckpt, Optimized()], epochs=1)
    record |= {
        "world_size": t.world_size,
        "global_step": t.global_step,
        "trainable": sorted(n for n, p in module.named_parameters() if p.requires_grad),
        "base": {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if ".lora_" not in k},
        "epoch1": lora_tensors(module),
    }
    cb = LoRACallback(
        **LORA, merge_on_fit_end=True, export_merged=str(out / "merged.safetensors"), export_module="net", verbose=False
    )
    module, t = fit([cb], epochs=2, ckpt=out / "ckpt" / "epoch1.ckpt")
    record |= {"resumed_step": t.global_step, "epoch2": lora_tensors(module)}
    for key, options, seed in (("refused", {"r": 4}, 0), ("other_base", {}, 1)):  # must not resume
        try:
            fit([LoRACallback(**(LORA | options), verbose=False)], 2, ckpt=out / "ckpt" / "epoch1.ckpt", seed=seed)
            record[key] = "nothing: resumed"
        except Exception as err:  # noqa: BLE001 - recorded for the test to read
            record[key] = f"{type(err).__name__}: {err}"
    torch.save(record, out / f"rank{t.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
