"""Two nodes on one machine, started as a cluster starts them: two ``torchrun`` launchers (``--nnodes=2
--nproc-per-node=1``, c10d rendezvous on 127.0.0.1), each the agent of one "node".

Lightning must pick its ``TorchElasticEnvironment`` and take node rank, global rank and world size from
torchrun; the adapters must equal a one-process run on the same batches (``distributed_helpers``), global
rank 0 alone writes the adapter-only checkpoint, and the checkpoint resumes on another topology: on the
2 nodes, on 1 node x 2 processes and on 1 process. The same for FSDP2 (``ModelParallelStrategy``) and for
the Hydra app (``trainer=multinode``). The rendezvous elects node ranks in order of arrival: the tests
check the set of ranks, not which launcher got which.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_helpers import (
    LORA,
    REPO,
    SCRIPT,
    STEPS_PER_EPOCH,
    assert_adapters_close,
    clean_env,
    free_port,
    initial_adapter,
    launch,
    lora_tensors,
    single_process_fit,
)

NODES = 2


def torchrun_nodes(cwd: Path, run_id: str, *command: str, timeout: float = 600) -> list[str]:
    """Start ``NODES`` torchrun agents (one per simulated node) on one rendezvous and wait for all of them;
    returns each agent's console output. ``command``: a script and its arguments, or ``-m module ...``."""
    rendezvous = [
        f"--nnodes={NODES}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--rdzv-id={run_id}",
        "--max-restarts=0",
    ]
    env = clean_env() | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *rendezvous, *command],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(NODES)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for p in procs:
        assert p.returncode == 0, f"a torchrun node failed ({p.returncode}):\n" + "\n----\n".join(
            t[-4000:] for t in outputs
        )
    return outputs


def load_records(out: Path, tag: str, ranks=(0, 1)) -> dict[int, dict]:
    return {r: torch.load(out / f"{tag}-rank{r}.pt", weights_only=False) for r in ranks}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same batches (batch 8 = 2 ranks x 4): after epoch 1 and after epoch 2; and the
    1-process resumes of the 2-node checkpoints are made by the tests."""
    root = tmp_path_factory.mktemp("reference")
    init = initial_adapter(root)
    one, _ = single_process_fit(root / "1", epochs=1, init=init)
    two, _ = single_process_fit(root / "2", epochs=2, init=init)
    return {"init": init, "epoch1": lora_tensors(one), "epoch2": lora_tensors(two)}


@pytest.fixture(scope="module")
def ddp_nodes(reference, tmp_path_factory):
    """DDP on 2 nodes: 1 epoch, then (same processes) a resume to 2 epochs; then the 2-node checkpoint
    resumed on 1 node x 2 processes."""
    out = tmp_path_factory.mktemp("ddp_nodes")
    init = str(reference["init"])
    logs = torchrun_nodes(
        REPO, "ddp", str(SCRIPT), str(out), "--devices", "1", "--num-nodes", str(NODES), "--epochs", "1",
        "--resume-epochs", "2", "--init", init,
    )  # fmt: skip
    (ckpt,) = (out / "train-ckpt").glob("*.ckpt")
    launch(out, "--devices", "2", "--resume-from", f"one-node={ckpt}", "--resume-epochs", "2", "--init", init)
    return {
        "out": out,
        "ckpt": ckpt,
        "logs": logs,
        "train": load_records(out, "train"),
        "resumed": load_records(out, "resumed"),
        "one-node": load_records(out, "one-node"),
    }


def test_lightning_takes_ranks_from_torchrun(ddp_nodes):
    records = ddp_nodes["train"]
    for rank, r in records.items():
        assert r["environment"] == "TorchElasticEnvironment"
        assert (r["global_rank"], r["world_size"], r["num_nodes"], r["local_rank"]) == (rank, 2, NODES, 0)
        assert r["env"]["RANK"] == str(rank) and r["env"]["WORLD_SIZE"] == "2" and r["env"]["LOCAL_RANK"] == "0"
        assert r["env"]["TORCHELASTIC_RUN_ID"] == "ddp"
        assert r["node_rank"] == int(r["env"]["GROUP_RANK"])  # the node rank torchrun's rendezvous gave
    assert sorted(r["node_rank"] for r in records.values()) == [0, 1]  # one process per node: node = global rank
    assert all(r["node_rank"] == rank for rank, r in records.items())
    assert sum("Initializing distributed: GLOBAL_RANK: " in log for log in ddp_nodes["logs"]) == NODES


def test_two_nodes_train_the_adapters_of_one_process(ddp_nodes, reference):
    r0, r1 = ddp_nodes["train"][0], ddp_nodes["train"][1]
    assert r0["global_step"] == r1["global_step"] == STEPS_PER_EPOCH
    assert_adapters_close(r0["adapter"], r1["adapter"], atol=0)
    assert_adapters_close(r0["adapter"], reference["epoch1"])
    from safetensors.torch import load_file

    start = load_file(reference["init"])
    assert max((r0["adapter"][k] - start[k]).abs().max().item() for k in start) > 1e-3  # training moved them


def test_global_rank0_alone_writes_one_adapter_only_checkpoint(ddp_nodes):
    out = ddp_nodes["out"]
    files = sorted(p.name for p in (out / "train-ckpt").iterdir())
    assert files == [f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"]
    assert not (out / "writes-rank1.log").exists(), "global rank 1 (the other node) wrote files"
    writes = (out / "writes-rank0.log").read_text().split()
    assert [w for w in writes if w.startswith("train-ckpt/")] == [f"train-ckpt/{files[0]}"]
    ckpt = torch.load(ddp_nodes["ckpt"], weights_only=False)
    assert set(ckpt["state_dict"]) == set(ddp_nodes["train"][0]["adapter"])  # adapters only, nothing frozen
    assert ckpt["lora_lightning"]["config"]["r"] == LORA["r"]


def test_two_node_checkpoint_resumes_on_two_nodes_one_node_and_one_process(ddp_nodes, reference, tmp_path):
    expected = reference["epoch2"]  # an uninterrupted 2-epoch run on one process
    for tag in ("resumed", "one-node"):
        r0, r1 = ddp_nodes[tag][0], ddp_nodes[tag][1]
        assert r0["global_step"] == r1["global_step"] == 2 * STEPS_PER_EPOCH, tag
        assert_adapters_close(r0["adapter"], r1["adapter"], atol=0)
        assert_adapters_close(r0["adapter"], expected)
    assert ddp_nodes["resumed"][0]["num_nodes"] == NODES and ddp_nodes["one-node"][0]["num_nodes"] == 1
    assert ddp_nodes["one-node"][0]["environment"] == "LightningEnvironment"
    one, t = single_process_fit(tmp_path, epochs=2, ckpt=ddp_nodes["ckpt"])
    assert t.global_step == 2 * STEPS_PER_EPOCH
    assert_adapters_close(lora_tensors(one), expected)


@pytest.fixture(scope="module")
def fsdp2_nodes(reference, tmp_path_factory):
    """FSDP2 on 2 nodes (one full-state checkpoint file), then that checkpoint resumed on 1 node x 2 processes
    and on 1 process (ModelParallelStrategy on one device, batch 8)."""
    out = tmp_path_factory.mktemp("fsdp2_nodes")
    fsdp = ("--strategy", "fsdp2", "--format", "file", "--init", str(reference["init"]), "--resume-epochs", "2")
    torchrun_nodes(
        REPO, "fsdp2", str(SCRIPT), str(out), "--devices", "1", "--num-nodes", str(NODES), "--epochs", "1",
        "--tag", "fsdp", *fsdp,
    )  # fmt: skip
    (ckpt,) = (out / "fsdp-ckpt").glob("*.ckpt")
    launch(out, "--devices", "2", "--resume-from", f"one-node={ckpt}", *fsdp)
    launch(out, "--devices", "1", "--batch", "8", "--resume-from", f"one-process={ckpt}", *fsdp)
    return {
        "out": out,
        "train": load_records(out, "fsdp"),
        "resumed": load_records(out, "fsdp-resumed"),
        "one-node": load_records(out, "one-node"),
        "one-process": load_records(out, "one-process", ranks=(0,)),
    }


def test_fsdp2_on_two_nodes_shards_over_both_and_equals_one_process(fsdp2_nodes, reference):
    r0, r1 = fsdp2_nodes["train"][0], fsdp2_nodes["train"][1]
    names = sorted(reference["epoch1"])
    for rank, r in ((0, r0), (1, r1)):
        assert r["environment"] == "TorchElasticEnvironment" and (r["global_rank"], r["num_nodes"]) == (rank, NODES)
        assert r["trainable"] == names and r["with_optimizer_state"] == names and r["optimizer_state_sharded"]
        assert set(names) <= set(r["sharded"])
    full = {k: v.numel() for k, v in (r0["base"] | r0["adapter"]).items()}
    assert {k: r0["local_numel"][k] + r1["local_numel"][k] for k in full} == full  # each node holds its shard
    assert_adapters_close(r0["adapter"], r1["adapter"], atol=0)
    assert_adapters_close(r0["adapter"], reference["epoch1"])
    assert not (fsdp2_nodes["out"] / "writes-rank1.log").exists()


def test_fsdp2_two_node_checkpoint_resumes_on_every_topology(fsdp2_nodes, reference):
    for tag, ranks in (("resumed", (0, 1)), ("one-node", (0, 1)), ("one-process", (0,))):
        for rank in ranks:
            r = fsdp2_nodes[tag][rank]
            assert r["global_step"] == 2 * STEPS_PER_EPOCH, tag
            assert_adapters_close(r["adapter"], reference["epoch2"])
    assert [fsdp2_nodes[t][0]["world_size"] for t in ("resumed", "one-node", "one-process")] == [2, 2, 1]


# --------------------------------------------------------------------------- the Hydra app
APP_TEST_SIZE = 31  # odd: Lightning's DistributedSampler pads one test example for 2 ranks


@pytest.fixture(scope="module")
def app_nodes(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("app_nodes")
    logs = torchrun_nodes(
        cwd, "apptest", "-m", "lora_lightning.app.train", "trainer=multinode", f"trainer.num_nodes={NODES}",
        "trainer.devices=1", "scale=smoke", "test=true", f"data.test_size={APP_TEST_SIZE}", "progress=none",
    )  # fmt: skip
    return {"cwd": cwd, "logs": logs}


def test_app_on_two_nodes_writes_one_run_folder_once(app_nodes):
    runs = sorted((app_nodes["cwd"] / "outputs" / "default").iterdir())
    assert [p.name for p in runs] == ["torchrun-apptest"]  # ${run_stamp:}: one folder for both nodes
    run = runs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["world_size"], summary["num_nodes"], summary["steps"]) == (2, NODES, 1)
    assert len(summary["test_correct"]) == APP_TEST_SIZE  # both nodes' test examples, in the split's order
    assert abs(summary["test_acc"] - summary["test_correct"].count("1") / APP_TEST_SIZE) <= 1 / APP_TEST_SIZE
    assert (run / "adapter.safetensors").is_file()
    console = "".join(app_nodes["logs"])
    assert console.count("trainable params") == 1  # one summary table, from global rank 0
    ckpt = torch.load(next((run / "checkpoints").glob("best-*.ckpt")), weights_only=False)
    head = {k for k in ckpt["state_dict"] if ".lora_" not in k}  # adapters + the trained head (pooler, classifier)
    assert head and all(k.startswith(("model.bert.pooler.", "model.classifier.")) for k in head)


def test_interleaving_the_ranks_restores_the_split_order():
    """What each rank scored under DistributedSampler(shuffle=False), put back in the split's order."""
    from torch.utils.data import DistributedSampler

    from lora_lightning.app.train import interleave_ranks

    for n, world in ((31, 2), (32, 2), (10, 3), (7, 4)):
        truth = "".join("1" if (i * 7) % 3 else "0" for i in range(n))
        parts = [
            "".join(truth[i] for i in DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False))
            for r in range(world)
        ]
        assert interleave_ranks(parts, n) == truth


def test_run_stamp_is_the_same_on_every_process_of_a_launch(monkeypatch):
    from lora_lightning.app.train import run_stamp
    from lora_lightning.errors import AppConfigError

    for k in ("LORA_RUN_STAMP", "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert len(run_stamp()) == len("2026-12-07_15-44-39")  # one process: the start time
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    assert run_stamp() == "torchrun-job7"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default --rdzv-id: nothing shared to name it by
    with pytest.raises(AppConfigError, match=r"--rdzv-id=<name>.*hydra\.run\.dir=<dir>"):
        run_stamp()
    monkeypatch.setenv("LORA_RUN_STAMP", "mine")
    assert run_stamp() == "mine"
    monkeypatch.delenv("LORA_RUN_STAMP")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert run_stamp() == "slurm-4242"  # any SLURM job: a requeued job finds its folder (and its checkpoint) again
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert run_stamp() == "slurm-77_3"


# --------------------------------------------------------------------------- SLURM pre-emption and requeue
REQUEUE_SCRIPT = Path(__file__).with_name("slurm_requeue_script.py")
PREEMPT_AT = 3  # mid-epoch: 4 steps per epoch, 8 in all


@pytest.fixture(scope="module")
def slurm_requeue(tmp_path_factory):
    """A fit in a simulated SLURM batch job is pre-empted after step 3 (the requeue signal, then SIGKILL); the
    requeued job (the same command, the same job id) starts again; a third run resumes from the same
    checkpoint by ``ckpt_path`` outside SLURM, for reference."""
    out = tmp_path_factory.mktemp("slurm")
    bin_dir = out / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {out / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lora", "SLURM_NTASKS": "1", "SLURM_NNODES": "1"}
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    env = clean_env() | slurm | {"PATH": f"{bin_dir}:{clean_env()['PATH']}"}

    def run(*args: str, environment: dict) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REQUEUE_SCRIPT), str(out), *args],
            cwd=REPO,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )

    root = out / "root"
    first = run(str(root), "--preempt-at", str(PREEMPT_AT), "--tag", "first", environment=env)
    requeued = run(str(root), "--tag", "requeued", environment=env)
    ckpt = root / "hpc_ckpt_1.ckpt"
    explicit = run(str(out / "explicit"), "--ckpt", str(ckpt), "--tag", "explicit", environment=clean_env())
    load = lambda name: torch.load(out / name, weights_only=False)  # noqa: E731
    return {"out": out, "ckpt": ckpt, "first": first, "requeued": requeued, "explicit": explicit, "load": load}


def test_preempted_slurm_job_saves_an_adapter_only_checkpoint_and_asks_to_be_requeued(slurm_requeue):
    first = slurm_requeue["first"]
    assert first.returncode == -9, first.stderr[-3000:]  # killed, as a pre-empted job is
    start = slurm_requeue["load"]("first-start.pt")
    assert start["environment"] == "SLURMEnvironment" and start["global_step"] == 0
    assert (slurm_requeue["out"] / "scontrol.log").read_text().split() == ["requeue", "4242"]
    ckpt = torch.load(slurm_requeue["ckpt"], weights_only=False)
    preempted = slurm_requeue["load"]("preempted.pt")
    assert ckpt["global_step"] == preempted["global_step"] == PREEMPT_AT
    assert set(ckpt["state_dict"]) == set(preempted["adapter"])  # adapter-only: no frozen tensor in it
    for k, v in preempted["adapter"].items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert ckpt["optimizer_states"] and ckpt["lora_lightning"]["config"]["r"] == 2


def test_requeued_slurm_job_resumes_from_its_checkpoint(slurm_requeue):
    requeued, explicit = slurm_requeue["requeued"], slurm_requeue["explicit"]
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert explicit.returncode == 0, explicit.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {slurm_requeue['ckpt']}" in requeued.stdout + requeued.stderr
    start, preempted = slurm_requeue["load"]("requeued-start.pt"), slurm_requeue["load"]("preempted.pt")
    assert start["global_step"] == PREEMPT_AT
    for k, v in preempted["adapter"].items():
        assert torch.equal(start["adapter"][k], v), k  # it goes on from the pre-empted adapters
    end, reference = slurm_requeue["load"]("requeued-end.pt"), slurm_requeue["load"]("explicit-end.pt")
    assert end["global_step"] == reference["global_step"] == 8
    assert end["adapter"].keys() == reference["adapter"].keys()
    for k, v in reference["adapter"].items():  # == resuming the same checkpoint by ckpt_path
        assert torch.equal(end["adapter"][k], v), k
    assert max((end["adapter"][k] - preempted["adapter"][k]).abs().max().item() for k in end["adapter"]) > 1e-4
