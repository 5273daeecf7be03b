"""LoRA in Lightning Fabric loops (:mod:`lora_lightning.fabric`): inject before ``fabric.setup``, adapter-only
checkpoints with the LoRA record through ``fabric.save`` / ``fabric.load``, exact resume, exports from the set-up
model, bad inputs; on one process, on DDP (2 CPU processes, gloo) and on FSDP2 (``ModelParallelStrategy``, 2 CPU
processes), each checked against the one-process run.

The 2-process runs: this file is also the script Fabric launches (``python tests/test_fabric.py OUT --strategy
ddp|fsdp2``; Fabric re-runs it for rank 1). In one launch every rank trains ``N`` steps from the same start
(the uninterrupted run), exports the adapter and the merged model, then for each checkpoint format trains ``K``
steps, saves, builds a fresh model with fresh adapters, loads, trains ``N - K`` steps (the resumed run), resumes
a checkpoint one process wrote after ``K`` steps the same way, and writes what it holds to ``OUT/{tag}-rank{R}.pt``.
The tests also resume the 2-process checkpoints on one process. Step ``i`` of a 2-process run gives rank ``r`` samples
``8i + 4r ... 8i + 4r + 3``; the one-process run takes samples ``8i ... 8i + 7`` in one batch, so averaged
gradients agree up to float round-off (the tolerance ``ATOL`` below).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lora_lightning.fabric as lf  # noqa: E402
from conftest import N_LAYERS, randomize_adapters, tiny_batch, tiny_model  # noqa: E402
from lora_lightning import (  # noqa: E402
    AdapterFileError,
    AdapterMismatchError,
    BaseModelMismatchError,
    LoRAConfig,
    LoRAConfigError,
    NotInjectedError,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merged_state_dict,
    read_adapter,
    save_adapter,
    save_merged_model,
)

LORA = dict(r=2, targets=["q", "v", "mlp"], modules_to_save=["classifier"])
N, K = 4, 2  # the uninterrupted run's steps; the step the resumed run saves at
ATOL = 1e-5  # 2 processes (averaged gradients) vs 1 process (one batch of 8): float round-off (measured 2.4e-7)
N_ADAPTER_TENSORS = N_LAYERS * 4 * 2 + 2  # q, v, up, down per block (A and B each) + the classifier's weight and bias
SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parent.parent


# --------------------------------------------------------------------------- one training loop for every run
def make_fabric(devices: int = 1, strategy: str = "auto", distributed_checkpoint: bool = True):
    from lightning.fabric import Fabric

    if strategy == "fsdp2":
        from lightning.fabric.strategies import ModelParallelStrategy

        return Fabric(
            accelerator="cpu",
            devices=devices,
            strategy=ModelParallelStrategy(
                parallelize_fn=shard_blocks,
                data_parallel_size=devices,
                tensor_parallel_size=1,
                save_distributed_checkpoint=distributed_checkpoint,
            ),
        )
    return Fabric(accelerator="cpu", devices=devices, strategy=strategy)


def shard_blocks(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 the usual way: ``fully_shard`` each block, then the root (the adapters are in the blocks by now)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block, mesh=mesh["data_parallel"])
    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def optimizer_factory(params):
    return torch.optim.AdamW(params, lr=0.02)


def start(fabric):
    """The run's start: base seed 0, adapters injected (before ``fabric.setup``) and given random ``B`` so every
    tensor has a gradient from step 1; the same on every rank and in every run."""
    model = tiny_model(seed=0)
    torch.manual_seed(1)
    lf.inject(model, LoRAConfig(**LORA))
    randomize_adapters(model)
    return lf.setup(fabric, model, None, optimizer_factory)


def fresh(fabric, seed: int = 7):
    """A fresh process-like setup: the same base, fresh adapters (another seed: load must overwrite them)."""
    torch.manual_seed(seed)
    return lf.setup(fabric, tiny_model(seed=0), LoRAConfig(**LORA), optimizer_factory)


def train(fabric, model, optimizer, first: int, last: int) -> None:
    """Steps ``first .. last - 1``; each takes the 8 samples ``8i .. 8i + 7``, split between the ranks."""
    ids, y = tiny_batch(n=8 * N, seed=1)
    per_rank = 8 // fabric.world_size
    for i in range(first, last):
        lo = 8 * i + per_rank * fabric.global_rank
        optimizer.zero_grad()
        fabric.backward(F.cross_entropy(model(ids[lo : lo + per_rank]), y[lo : lo + per_rank]))
        optimizer.step()


def adapters(model) -> dict[str, torch.Tensor]:
    """The full adapter tensors (gathered under FSDP2: call on every rank)."""
    from lora_lightning import adapter_param_names, gathered

    module = lf.unwrap(model)
    with gathered(module, adapter_param_names(module)):
        return {k: v.detach().clone() for k, v in module.state_dict().items() if k in set(adapter_param_names(module))}


def assert_close(a: dict, b: dict, atol: float) -> float:
    """Same keys, every tensor within ``atol``; returns the largest difference."""
    assert a.keys() == b.keys() and len(a) == N_ADAPTER_TENSORS, sorted(set(a) ^ set(b))[:4]
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"max |difference| {worst:.3g} > {atol}"
    return worst


# --------------------------------------------------------------------------- the 2-process launch (script mode)
def worker(out: Path, strategy: str, from_one: Path) -> None:
    """One launch (see the module docstring); every rank writes ``OUT/{tag}-rank{R}.pt``. ``from_one``: a
    checkpoint one process wrote after ``K`` steps, resumed here on 2 processes."""
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    fabric = make_fabric(2, strategy)
    fabric.launch()
    rank = fabric.global_rank
    model, optimizer = start(fabric)
    module = lf.unwrap(model)
    train(fabric, model, optimizer, 0, N)
    record = {"world_size": fabric.world_size, "full": adapters(model)}
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    record["optimized"] = sorted(n for n, p in module.named_parameters() if id(p) in held)
    record["trainable"] = sorted(n for n, p in module.named_parameters() if p.requires_grad)
    record["sharded"] = sorted(n for n, p in module.named_parameters() if isinstance(p, DTensor))
    lf.export_adapter(fabric, model, out / f"{strategy}-adapter.safetensors")
    lf.export_merged(fabric, model, out / f"{strategy}-merged.safetensors")
    for fmt in ("file",) if strategy == "ddp" else ("sharded", "file"):
        one_file = fmt == "file" and strategy == "fsdp2"
        run = make_fabric(2, strategy, distributed_checkpoint=False) if one_file else fabric
        run.launch()  # the processes exist already: nothing is started again
        model, optimizer = start(run)
        train(run, model, optimizer, 0, K)
        path = lf.save(run, out / f"{strategy}-{fmt}.ckpt", model, optimizer, step=K)
        model, optimizer = fresh(run)
        extra = lf.load(run, path, model, optimizer)
        train(run, model, optimizer, extra["step"], N)
        record[f"resumed-{fmt}"] = adapters(model)
        record[f"extra-{fmt}"] = extra
    model, optimizer = fresh(fabric)
    train(fabric, model, optimizer, lf.load(fabric, from_one, model, optimizer)["step"], N)
    record["from-one"] = adapters(model)
    torch.save(record, out / f"{strategy}-rank{rank}.pt")


def launch(out: Path, strategy: str) -> dict:
    """Run :func:`worker` on 2 processes in a clean environment; returns both ranks' records. Writes the
    1-process checkpoint it resumes first."""
    fabric = make_fabric()
    model, optimizer = start(fabric)
    train(fabric, model, optimizer, 0, K)
    lf.save(fabric, out / "one-process.ckpt", model, optimizer, step=K)
    launcher_vars = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "PL_GLOBAL_SEED")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["PYTHONWARNINGS"] = "ignore"
    one = out / "one-process.ckpt"
    command = [sys.executable, str(SCRIPT), str(out), "--strategy", strategy, "--from-one", str(one)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{strategy} launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {rank: torch.load(out / f"{strategy}-rank{rank}.pt", weights_only=False) for rank in (0, 1)}


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def one_process():
    """The single-process reference: ``N`` steps with batches of 8; and its adapters after ``K`` steps."""
    fabric = make_fabric()
    model, optimizer = start(fabric)
    train(fabric, model, optimizer, 0, K)
    at_k = adapters(model)
    train(fabric, model, optimizer, K, N)
    return {"fabric": fabric, "model": model, "at_k": at_k, "full": adapters(model)}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fabric-ddp")
    return {"out": out, "records": launch(out, "ddp")}


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fabric-fsdp2")
    return {"out": out, "records": launch(out, "fsdp2")}


# --------------------------------------------------------------------------- one process
def test_setup_injects_before_fabric_setup_so_the_optimizer_holds_only_adapters():
    fabric = make_fabric()
    model, optimizer = lf.setup(fabric, tiny_model(seed=0), LoRAConfig(**LORA), optimizer_factory)
    module = lf.unwrap(model)
    assert module is not model and type(model).__name__ == "_FabricModule" and lora_layers(module)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in module.named_parameters()}
    assert sorted(names[i] for i in held) == sorted(n for n, p in module.named_parameters() if p.requires_grad)
    assert len(held) == N_ADAPTER_TENSORS and all(".lora_" in names[i] or "classifier" in names[i] for i in held)
    base = {k: v.clone() for k, v in module.state_dict().items() if ".lora_" not in k and "classifier" not in k}
    before = adapters(model)
    train(fabric, model, optimizer, 0, 2)
    after = adapters(model)
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith(("lora_B", "lora_A")))
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in base.items())  # the frozen base did not move


def test_resume_in_a_fresh_setup_is_bit_equal_to_the_uninterrupted_run(one_process, tmp_path):
    fabric = make_fabric()
    model, optimizer = start(fabric)
    train(fabric, model, optimizer, 0, K)
    path = lf.save(fabric, tmp_path / "k.ckpt", model, optimizer, step=K, note="any")
    model, optimizer = fresh(fabric)  # new base object, new adapters (other random A), new optimizer
    a = "layers.0.self_attn.q_proj.lora_A"
    assert not torch.equal(adapters(model)[a], one_process["at_k"][a])
    extra = lf.load(fabric, path, model, optimizer)
    assert extra == {"step": K, "note": "any"}
    assert_close(adapters(model), one_process["at_k"], atol=0)
    train(fabric, model, optimizer, extra["step"], N)
    assert_close(adapters(model), one_process["full"], atol=0)  # bit-equal: adapters and optimizer state restored
    moved = max((one_process["full"][k] - one_process["at_k"][k]).abs().max().item() for k in one_process["full"])
    assert moved > 1e-3  # the last N - K steps did change the adapters


def test_the_lightning_fabric_package_works_alike(one_process, tmp_path):
    """``pip install lightning-fabric`` users: setup, save, load and resume with ``lightning_fabric.Fabric``."""
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model, optimizer = start(fabric)
    train(fabric, model, optimizer, 0, K)
    path = lf.save(fabric, tmp_path / "k.ckpt", model, optimizer, step=K)
    model, optimizer = fresh(fabric)
    train(fabric, model, optimizer, lf.load(fabric, path, model, optimizer)["step"], N)
    assert_close(adapters(model), one_process["full"], atol=0)
    with pytest.raises(LoRAConfigError):
        lf.inject(model, LoRAConfig(**LORA))  # its _FabricModule is refused too


def test_checkpoint_holds_only_adapter_tensors_the_record_and_named_optimizer_state(one_process, tmp_path):
    fabric, model = one_process["fabric"], one_process["model"]
    module = lf.unwrap(model)
    path = lf.save(fabric, tmp_path / "a.ckpt", model, None, epoch=3)
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"state_dict", "lora_lightning", "epoch"}  # no optimizer given: no optimizer state
    assert set(ckpt["state_dict"]) == set(one_process["full"])  # adapters + modules_to_save, no base tensor
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(v, one_process["full"][k])
    record = ckpt["lora_lightning"]
    assert record["config"]["r"] == LORA["r"] and len(record["modules"]) == N_LAYERS * 4
    base_keys = {k for k in module.state_dict() if k not in ckpt["state_dict"]}
    assert set(record["fingerprint"]["tensors"]) == base_keys  # the identity of every base tensor
    # fabric.save(path, lora_state(...)) by hand writes the same checkpoint; the optimizer state keyed by name
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=0.02)
    fabric.save(tmp_path / "b.ckpt", lf.lora_state(model, optimizer, epoch=3))
    by_hand = torch.load(tmp_path / "b.ckpt", weights_only=True)
    assert set(by_hand) == {"state_dict", "lora_lightning", "epoch", "optimizer_states"}
    groups = by_hand["optimizer_states"][0]["param_groups"]
    assert sorted(groups[0]["params"]) == sorted(ckpt["state_dict"])


def test_a_plain_fabric_checkpoint_of_the_same_run_loads_with_lora_state(one_process, tmp_path):
    """``fabric.save(path, lora_state(...))`` written by hand, then :func:`lf.load`: the same exact resume."""
    fabric = make_fabric()
    model, optimizer = start(fabric)
    train(fabric, model, optimizer, 0, K)
    fabric.save(tmp_path / "c.ckpt", lf.lora_state(model, optimizer, step=K))
    model, optimizer = fresh(fabric)
    train(fabric, model, optimizer, lf.load(fabric, tmp_path / "c.ckpt", model, optimizer)["step"], N)
    assert_close(adapters(model), one_process["full"], atol=0)


def test_merge_and_export_work_on_the_set_up_model(one_process, tmp_path):
    fabric, model = one_process["fabric"], one_process["model"]
    ids = tiny_batch(n=8, seed=5)[0]
    with torch.no_grad():
        expected = model(ids)
    # the core functions on the unwrapped module
    save_adapter(lf.unwrap(model), tmp_path / "core.safetensors")
    save_merged_model(lf.unwrap(model), tmp_path / "core-merged.safetensors")
    # and the Fabric exports (rank 0 writes; gathered under FSDP2)
    lf.export_adapter(fabric, model, tmp_path / "a.safetensors")
    lf.export_merged(fabric, model, tmp_path / "m.safetensors")
    assert lora_layers(lf.unwrap(model))  # exports leave the model as it was
    for adapter in ("core.safetensors", "a.safetensors"):
        other = tiny_model(seed=0)
        load_adapter(other, tmp_path / adapter)
        with torch.no_grad():
            torch.testing.assert_close(other(ids), expected, atol=0, rtol=0)
    from safetensors.torch import load_file

    for merged in ("core-merged.safetensors", "m.safetensors"):
        plain = tiny_model(seed=0)
        plain.load_state_dict(load_file(tmp_path / merged))
        with torch.no_grad():
            torch.testing.assert_close(plain(ids), expected, atol=1e-5, rtol=0)
    # merge_and_unload of the set-up model: the Fabric model now runs the plain, merged network
    copy_model, _ = fresh(fabric)
    lf.load(fabric, lf.save(fabric, tmp_path / "x.ckpt", model), copy_model)
    merge_and_unload(lf.unwrap(copy_model))
    assert not lora_layers(lf.unwrap(copy_model)) and not any(".lora_" in k for k in lf.unwrap(copy_model).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(copy_model(ids), expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- bad inputs
def one_line(error: pytest.ExceptionInfo, *needles: str) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    return text


def test_injecting_after_fabric_setup_is_refused_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fabric = make_fabric()
    cfg = LoRAConfig(**LORA)
    set_up = fabric.setup(tiny_model(seed=0))
    with pytest.raises(LoRAConfigError) as e:
        lf.inject(set_up, cfg)
    one_line(
        e,
        "fabric.setup",
        "inject before fabric.setup",
        "lora_lightning.fabric.setup(fabric, model, config, optimizer_factory)",
    )
    assert not lora_layers(set_up)  # nothing changed
    with pytest.raises(LoRAConfigError) as e:
        lf.setup(fabric, set_up, cfg, optimizer_factory)
    one_line(e, "already set up by fabric.setup", "lora_lightning.fabric.setup")
    # the core inject_lora on the set-up model is refused at injection (the Lightning layer's injection guard)
    model, optimizer = fabric.setup(tiny_model(seed=0), torch.optim.AdamW(tiny_model(seed=0).parameters()))
    with pytest.raises(LoRAConfigError) as e:
        inject_lora(model, cfg)
    one_line(e, "already set up by fabric.setup", "inject before fabric.setup", "lora_lightning.fabric.setup")
    assert not lora_layers(model)
    # ... and on a module inside torch's DataParallel / DistributedDataParallel (the core refuses those itself)
    holder = torch.nn.Module()
    holder.net = torch.nn.DataParallel(tiny_model(seed=0))
    with pytest.raises(LoRAConfigError) as e:
        inject_lora(holder, cfg)
    one_line(e, "net is already wrapped in DataParallel", "Inject before wrapping")
    assert not lora_layers(holder)
    # the module set up with an optimizer over its base, then injected: the optimizer lacks the adapters
    raw = tiny_model(seed=0)
    model, optimizer = fabric.setup(raw, torch.optim.AdamW(raw.parameters()))
    inject_lora(raw, cfg)
    with pytest.raises(LoRAConfigError) as e:
        lf.save(fabric, "never-written.ckpt", model, optimizer)
    one_line(
        e,
        "save: the optimizer holds 2 of the model's 26 trainable adapter tensors",
        "built before the adapters were injected",
        "lora_lightning.fabric.setup",
    )


def test_loading_onto_another_base_raises_or_warns_as_asked(one_process, tmp_path):
    fabric, model = one_process["fabric"], one_process["model"]
    path = lf.save(fabric, tmp_path / "a.ckpt", model)
    torch.manual_seed(0)
    other, optimizer = lf.setup(fabric, tiny_model(seed=1), LoRAConfig(**LORA), optimizer_factory)  # another base
    before = adapters(other)
    with pytest.raises(BaseModelMismatchError) as e:
        lf.load(fabric, path, other, optimizer)
    one_line(e, "different base weights", "on_base_mismatch='warn'", "lora_lightning.fabric.load")
    assert_close(adapters(other), before, atol=0)  # nothing loaded
    with pytest.warns(UserWarning, match="different base weights"):
        lf.load(fabric, path, other, on_base_mismatch="warn")
    assert_close(adapters(other), one_process["full"], atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lf.load(fabric, path, other, on_base_mismatch="ignore")
    with pytest.raises(LoRAConfigError) as e:
        lf.load(fabric, path, other, on_base_mismatch="maybe")
    one_line(e, "on_base_mismatch='maybe'")


@pytest.mark.parametrize("change", [{"r": 4}, {"targets": ["q", "v"]}, {"modules_to_save": []}])
def test_loading_a_checkpoint_of_another_adapter_structure_raises(one_process, tmp_path, change):
    fabric, model = one_process["fabric"], one_process["model"]
    path = lf.save(fabric, tmp_path / "a.ckpt", model)
    other, optimizer = lf.setup(fabric, tiny_model(seed=0), LoRAConfig(**(LORA | change)), optimizer_factory)
    before = adapters(other)
    with pytest.raises(AdapterMismatchError) as e:
        lf.load(fabric, path, other, optimizer)
    assert not isinstance(e.value, BaseModelMismatchError)
    one_line(e, "different LoRA config", "use the same LoRA settings")
    assert all(torch.equal(v, adapters(other)[k]) for k, v in before.items())  # nothing loaded


def test_loading_a_checkpoint_without_lora_record_raises(tmp_path):
    fabric = make_fabric()
    raw = tiny_model(seed=0)
    plain, plain_opt = fabric.setup(raw, torch.optim.AdamW(raw.parameters()))
    fabric.save(tmp_path / "full.ckpt", {"model": plain, "optimizer": plain_opt, "step": 3})  # Fabric without LoRA
    model, optimizer = lf.setup(fabric, tiny_model(seed=0), LoRAConfig(**LORA), optimizer_factory)
    with pytest.raises(AdapterFileError) as e:
        lf.load(fabric, tmp_path / "full.ckpt", model, optimizer)
    one_line(e, "holds no LoRA record", "load them into the model before setup", "lora_lightning.fabric.setup")


def test_other_bad_inputs_fail_in_one_line(one_process, tmp_path):
    fabric, model = one_process["fabric"], one_process["model"]
    with pytest.raises(AdapterFileError) as e:
        lf.load(fabric, tmp_path / "missing.ckpt", model)
    one_line(e, "does not exist")
    with pytest.raises(LoRAConfigError) as e:
        lf.save(fabric, tmp_path / "a.ckpt", model, state_dict={})
    one_line(e, "reserved")
    path = lf.save(fabric, tmp_path / "a.ckpt", model)  # no optimizer state in it
    other, optimizer = fresh(fabric)
    with pytest.raises(AdapterFileError) as e:
        lf.load(fabric, path, other, optimizer)
    one_line(e, "holds 0 optimizer state(s) and 1 optimizer(s) were given")
    with pytest.raises(NotInjectedError) as e:
        lf.load(fabric, path, fabric.setup(tiny_model(seed=0)))
    one_line(e, "holds no LoRA adapters", "lora_lightning.fabric.setup")
    with pytest.raises(NotInjectedError) as e:
        lf.setup(fabric, tiny_model(seed=0), None, optimizer_factory)
    one_line(e, "config=None")
    injected = tiny_model(seed=0)
    inject_lora(injected, LoRAConfig(r=4))
    with pytest.raises(AdapterMismatchError) as e:
        lf.setup(fabric, injected, LoRAConfig(**LORA), optimizer_factory)
    one_line(e, "already holds other LoRA adapters", "config=None")
    # a checkpoint cut short: an adapter tensor missing (loading the rest would leave that one at its fresh init)
    cut = torch.load(path, weights_only=True)
    del cut["state_dict"]["layers.1.mlp.up_proj.lora_B"]
    torch.save(cut, tmp_path / "cut.ckpt")
    with pytest.raises(AdapterFileError) as e:
        lf.load(fabric, tmp_path / "cut.ckpt", other)
    one_line(e, "lacks 1 adapter tensor(s)", "layers.1.mlp.up_proj.lora_B")
    # an optimizer built otherwise than the saving run's (other parameter groups)
    path = lf.save(fabric, tmp_path / "b.ckpt", *start(fabric))
    other, _ = fresh(fabric)
    params = [p for p in lf.unwrap(other).parameters() if p.requires_grad]
    grouped = torch.optim.AdamW([{"params": params[:4]}, {"params": params[4:]}], lr=0.02)
    with pytest.raises(AdapterFileError) as e:
        lf.load(fabric, path, other, grouped)
    one_line(e, "parameter groups", "same optimizer_factory")


def test_strategies_other_than_single_ddp_and_fsdp2_are_refused():
    from types import SimpleNamespace

    from lightning.fabric.strategies import FSDPStrategy

    fabric = SimpleNamespace(strategy=FSDPStrategy())  # Fabric builds FSDP1 on GPUs only: its strategy is what counts
    with pytest.raises(LoRAConfigError) as e:
        lf.setup(fabric, tiny_model(seed=0), LoRAConfig(**LORA), optimizer_factory)
    one_line(e, "not FSDPStrategy", "ModelParallelStrategy")


# --------------------------------------------------------------------------- DDP: 2 processes
def test_ddp_equals_one_process_and_resumes_exactly(ddp_run, one_process):
    r0, r1 = ddp_run["records"][0], ddp_run["records"][1]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["optimized"] == r0["trainable"] and len(r0["trainable"]) == N_ADAPTER_TENSORS
    assert_close(r0["full"], r1["full"], atol=0)  # the replicas agree
    print(f"DDP vs 1 process: max |diff| {assert_close(r0['full'], one_process['full'], ATOL):.3g}")
    for r in (r0, r1):
        assert_close(r["resumed-file"], r0["full"], atol=0)  # save + fresh setup + load + N - K steps: bit-equal
        assert r["extra-file"] == {"step": K}
        worst = assert_close(r["from-one"], one_process["full"], ATOL)
        print(f"1-process checkpoint resumed on DDP vs 1 process: max |diff| {worst:.3g}")
    ckpt = torch.load(ddp_run["out"] / "ddp-file.ckpt", weights_only=True)
    assert set(ckpt["state_dict"]) == set(r0["full"]) and "lora_lightning" in ckpt


def test_ddp_exports_hold_the_trained_adapter(ddp_run):
    from safetensors.torch import load_file

    full = ddp_run["records"][0]["full"]
    tensors, _ = read_adapter(ddp_run["out"] / "ddp-adapter.safetensors")
    assert_close(tensors, full, atol=0)
    reference = tiny_model(seed=0)
    inject_lora(reference, LoRAConfig(**LORA))
    reference.load_state_dict(full, strict=False)
    expected = merged_state_dict(reference)
    merged = load_file(ddp_run["out"] / "ddp-merged.safetensors")
    assert merged.keys() == expected.keys()
    assert max((merged[k] - expected[k]).abs().max().item() for k in merged) == 0


# --------------------------------------------------------------------------- FSDP2: 2 processes
def test_fsdp2_shards_the_adapters_equals_one_process_and_resumes_exactly(fsdp2_run, one_process):
    r0, r1 = fsdp2_run["records"][0], fsdp2_run["records"][1]
    assert r0["world_size"] == 2
    assert r0["optimized"] == r0["trainable"] and len(r0["trainable"]) == N_ADAPTER_TENSORS
    assert set(r0["trainable"]) <= set(r0["sharded"])  # the adapters were sharded with their layers
    assert_close(r0["full"], r1["full"], atol=0)
    print(f"FSDP2 vs 1 process: max |diff| {assert_close(r0['full'], one_process['full'], ATOL):.3g}")
    for fmt in ("sharded", "file"):
        for r in (r0, r1):
            assert_close(r[f"resumed-{fmt}"], r0["full"], atol=0)
            assert r[f"extra-{fmt}"] == {"step": K}
    for r in (r0, r1):  # a 1-process checkpoint resumed on 2 FSDP2 processes
        worst = assert_close(r["from-one"], one_process["full"], ATOL)
        print(f"1-process checkpoint resumed on FSDP2 vs 1 process: max |diff| {worst:.3g}")


def test_fsdp2_checkpoints_are_adapter_only_in_both_formats(fsdp2_run):
    from torch.distributed.checkpoint import FileSystemReader

    keys = set(fsdp2_run["records"][0]["full"])
    folder = fsdp2_run["out"] / "fsdp2-sharded.ckpt"
    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    assert {k.removeprefix("state_dict.") for k in stored if k.startswith("state_dict.")} == keys
    optimizer_keys = {k.removeprefix("optimizer_0.state.") for k in stored if k.startswith("optimizer_0.state.")}
    assert {k.rsplit(".", 1)[0] for k in optimizer_keys} == keys  # exp_avg, exp_avg_sq, step of the adapters only
    meta = torch.load(folder / "meta.pt", weights_only=True)
    assert set(meta) == {"lora_lightning", "step"} and meta["lora_lightning"]["fingerprint"]["tensors"]
    single = torch.load(fsdp2_run["out"] / "fsdp2-file.ckpt", weights_only=True)
    assert set(single["state_dict"]) == keys
    assert set(single) == {"state_dict", "optimizer_states", "lora_lightning", "step"}


def test_fsdp2_exports_gather_the_full_tensors(fsdp2_run):
    from safetensors.torch import load_file

    full = fsdp2_run["records"][0]["full"]
    assert_close(read_adapter(fsdp2_run["out"] / "fsdp2-adapter.safetensors")[0], full, atol=0)
    reference = tiny_model(seed=0)
    inject_lora(reference, LoRAConfig(**LORA))
    reference.load_state_dict(full, strict=False)
    merged, expected = load_file(fsdp2_run["out"] / "fsdp2-merged.safetensors"), merged_state_dict(reference)
    assert merged.keys() == expected.keys()
    assert max((merged[k] - expected[k]).abs().max().item() for k in merged) <= 1e-6


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # a sharded folder read by one process
@pytest.mark.parametrize("source", ["ddp-file", "fsdp2-sharded", "fsdp2-file"])
def test_two_process_checkpoints_resume_on_one_process(request, source, one_process):
    run = request.getfixturevalue("ddp_run" if source.startswith("ddp") else "fsdp2_run")
    fabric = make_fabric()
    model, optimizer = fresh(fabric)
    extra = lf.load(fabric, run["out"] / f"{source}.ckpt", model, optimizer)
    assert extra == {"step": K}
    assert_close(adapters(model), one_process["at_k"], ATOL)
    train(fabric, model, optimizer, K, N)
    worst = assert_close(adapters(model), one_process["full"], ATOL)
    print(f"{source} resumed on 1 process vs 1 process: max |diff| {worst:.3g}")


if __name__ == "__main__":  # the launch of the 2-process tests (Fabric runs this file again for rank 1)
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], required=True)
    parser.add_argument("--from-one", type=Path, required=True, help="a 1-process checkpoint after K steps, to resume")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    worker(args.out, args.strategy, args.from_one)
