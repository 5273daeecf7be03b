"""Shared test helpers (no downloads): a tiny plain-PyTorch transformer with separate q/k/v/o
projections and a LightningModule around it, tiny random Hugging Face models, and the helpers
tests use to adapt, snapshot and compare models. Test files import them with ``from conftest import``.

The Lightning package the Lightning tests run on is ``lightning.pytorch``, or ``pytorch_lightning`` with
``LORA_LIGHTNING_TEST_PACKAGE=pytorch_lightning`` (.ci/run runs the lifecycle tests with both): tests take
``pl``, ``LoRACallback``, ``ModelCheckpoint``, ``CSVLogger`` and ``AtomicCheckpointIO`` from here."""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import LoRAConfig, inject_lora, lora_layers

PACKAGE = os.environ.get("LORA_LIGHTNING_TEST_PACKAGE", "lightning.pytorch")
pl = importlib.import_module(PACKAGE)
_LAYER = importlib.import_module(
    "lora_lightning.lightning" if PACKAGE == "lightning.pytorch" else "lora_lightning.pytorch_lightning"
)
LoRACallback = _LAYER.LoRACallback
AtomicCheckpointIO = _LAYER.AtomicCheckpointIO
LoRAMonitor = _LAYER.LoRAMonitor
ModelCheckpoint = importlib.import_module(f"{PACKAGE}.callbacks").ModelCheckpoint
CSVLogger = importlib.import_module(f"{PACKAGE}.loggers").CSVLogger

D_MODEL, N_HEADS, N_LAYERS, VOCAB, N_CLASSES, SEQ = 16, 2, 3, 50, 3, 6


class Attention(nn.Module):
    def __init__(self, d: int = D_MODEL, heads: int = N_HEADS) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.o_proj(y)


class Block(nn.Module):
    def __init__(self, d: int = D_MODEL) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d)
        self.mlp = nn.Sequential()
        self.mlp.up_proj = nn.Linear(d, 4 * d)
        self.mlp.act = nn.GELU()
        self.mlp.down_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Token classifier-ish encoder: embed -> N blocks -> mean pool -> classifier."""

    def __init__(self, n_layers: int = N_LAYERS, d: int = D_MODEL) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.classifier = nn.Linear(d, N_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.classifier(x.mean(1))


def tiny_model(seed: int = 0, **kw) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(**kw)


def tiny_batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, N_CLASSES, (n,), generator=g)


def randomize_adapters(model: nn.Module, seed: int = 3, std: float = 0.5) -> None:
    """Give ``B`` random values (or, for a variant without a trainable ``B``, every trainable adapter
    tensor) so ΔW != 0, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for name in ("lora_B",) if "lora_B" in layer.trainable_names else layer.trainable_names:
                p = getattr(layer, name)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def adapted(seed: int = 0, **kw) -> TinyTransformer:
    """A tiny transformer with LoRA (default r=4 on q, v; ``kw`` overrides) and random adapters."""
    model = tiny_model(seed)
    inject_lora(model, LoRAConfig(**(dict(r=4, targets=["q", "v"]) | kw)))
    randomize_adapters(model)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every state-dict tensor."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """``model`` holds exactly the keys and values of ``before`` (a :func:`snapshot`)."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def lora_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the ``lora_A``/``lora_B`` tensors in ``module``'s state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def tiny_bert_classifier(num_labels: int = 2, seed: int = 0, vocab_size: int = 100) -> nn.Module:
    """A randomly initialised 2-layer BertForSequenceClassification (hidden 32); global RNG untouched."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=num_labels,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.BertForSequenceClassification(config)


def tiny_gpt2(seed: int = 0, d: int = 16, heads: int = 2, vocab: int = 40, lm_head: bool = False) -> nn.Module:
    """A randomly initialised 2-layer GPT-2 (Conv1D layers, fused ``c_attn``), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return (transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model)(cfg).eval()


class LitTiny(pl.LightningModule):
    """An ordinary LightningModule that knows nothing about LoRA."""

    def __init__(self, seed: int = 0, lr: float = 1e-2, build_in_configure_model: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()  # so LitTiny.load_from_checkpoint(path) rebuilds the same base
        self.seed, self.lr = seed, lr
        self.net: TinyTransformer | None = None if build_in_configure_model else tiny_model(seed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def training_step(self, batch, batch_idx):
        ids, y = batch
        loss = F.cross_entropy(self(ids), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, y = batch
        self.log("val_loss", F.cross_entropy(self(ids), y))

    def test_step(self, batch, batch_idx):
        ids, y = batch
        self.log("test_loss", F.cross_entropy(self(ids), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        # deliberately passes ALL parameters: frozen ones get no grad and no optimizer state
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class LitTinyLate(LitTiny):
    """Builds its network in ``configure_model`` (as for FSDP / meta-device init)."""

    def __init__(self, seed: int = 0, lr: float = 1e-2) -> None:
        super().__init__(seed, lr, build_in_configure_model=True)

    def configure_model(self) -> None:
        if self.net is None:
            self.net = tiny_model(self.seed)


class LitSharded(LitTiny):
    """FSDP2 the way Lightning's ModelParallelStrategy asks for it: ``fully_shard`` each block, then the root,
    in ``configure_model`` (the layers exist after ``__init__``, so LoRACallback injects before this runs)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        for block in self.net.layers:
            fully_shard(block)
        fully_shard(self.net)


class LitShardedLate(LitTiny):
    """Builds the network in ``configure_model`` and shards it there: ``inject_before_sharding`` in between."""

    def __init__(self, seed: int = 0, lr: float = 1e-2, call_inject: bool = True) -> None:
        super().__init__(seed, lr, build_in_configure_model=True)
        self.call_inject = call_inject

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        from lora_lightning import inject_before_sharding

        if self.net is not None:
            return
        self.net = tiny_model(self.seed)
        if self.call_inject:
            inject_before_sharding(self)
        for block in self.net.layers:
            fully_shard(block)
        fully_shard(self.net)


def tiny_loader(n: int = 32, batch_size: int = 8, seed: int = 1) -> DataLoader:
    ids, y = tiny_batch(n, seed)
    return DataLoader(TensorDataset(ids, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, callbacks, **kw) -> pl.Trainer:
    defaults = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    defaults.update(kw)
    return pl.Trainer(callbacks=callbacks, **defaults)


def read_wandb_records(run_dir, wait_s: float = 60.0) -> list:
    """wandb's own protobuf ``Record`` messages of an offline W&B run, read from the ``.wandb`` file it writes (a
    LevelDB-style log: 32 KiB blocks, 7-byte chunk headers, after a 7-byte file header). wandb's service process
    may still be writing the file's tail after ``finish()`` returns (seen on a loaded machine): the file is read
    again until it ends with the run's ``exit`` record, for at most ``wait_s`` seconds."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        records = _wandb_records_now(run_dir)
        if (records and records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _wandb_records_now(run_dir) -> list:
    import struct
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2 as pb

    data = next(Path(run_dir).glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, chunks, partial = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind == 3:
            partial += chunk
        elif kind == 4:
            chunks.append(partial + chunk)
    return [pb.Record.FromString(chunk) for chunk in chunks]


def read_wandb_history(run_dir) -> list[dict]:
    """The ``history`` rows of an offline W&B run (``{key: value}`` per logged step)."""
    import json

    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in read_wandb_records(run_dir)
        if record.WhichOneof("record_type") == "history"
    ]


def read_wandb_run(run_dir) -> tuple[object, dict]:
    """The run record of an offline W&B run (``run_group``, ``job_type``, ``tags``, ...) and its final summary
    (``{key: value}``, the summary updates applied in order)."""
    import json

    run, summary = None, {}
    for record in read_wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            for item in record.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    assert run is not None, f"no run record in {run_dir}"
    return run, summary
