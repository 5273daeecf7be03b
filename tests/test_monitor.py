"""LoRAMonitor: the telemetry it logs equals an independent computation from the saved adapter, in W&B (read back
from the offline run's own files) and CSV alike, per matrix and per matrix type; images reach the loggers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CSVLogger, LitTiny, LoRACallback, LoRAMonitor, pl, read_wandb_history, tiny_loader, trainer
from lora_lightning import read_adapter_config
from lora_lightning.analysis import subspace_similarity
from lora_lightning.telemetry import amplification, delta_frobenius, spectrum

OPTS = dict(r=2, alpha=4, targets=["q", "v", "mlp"])


def _csv_rows(folder: Path) -> list[dict]:
    return list(csv.DictReader(open(next(folder.rglob("metrics.csv")))))


def _by_step(rows: list[dict], key: str) -> dict[int, float]:
    """``{global step: value}`` from CSV rows (``step``) or W&B rows (``trainer/global_step``, WandbLogger's key)."""
    step_key = lambda r: r.get("trainer/global_step", r.get("step"))  # noqa: E731
    return {int(float(step_key(r))): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def test_logged_delta_norms_equal_the_saved_adapter_in_wandb_and_csv(tmp_path):
    wandb = pytest.importorskip("wandb")
    del wandb
    WandbLogger = __import__(f"{pl.__name__}.loggers", fromlist=["WandbLogger"]).WandbLogger
    loggers = [CSVLogger(tmp_path / "csv"), WandbLogger(offline=True, save_dir=str(tmp_path / "wb"), project="mon")]
    adapter = tmp_path / "a.safetensors"
    mon = LoRAMonitor(every_n_steps=2)
    t = trainer(
        tmp_path, [LoRACallback(**OPTS, export_adapter=str(adapter), verbose=False), mon], max_steps=4, logger=loggers
    )
    t.fit(LitTiny(), tiny_loader(), tiny_loader(seed=2))  # validation at the epoch end: the amplification
    loggers[1].experiment.finish()
    # the independent computation: ΔW = (alpha/r)·B·A from the file, formed in full, float64
    tensors, config = load_file(adapter), read_adapter_config(adapter)
    s = config.alpha / config.r
    expected = {}
    for key in tensors:
        if key.endswith(".lora_A"):
            name = key[: -len(".lora_A")]
            A, B = tensors[key].double(), tensors[f"{name}.lora_B"].double()
            expected[name] = float(torch.linalg.matrix_norm(s * B @ A))
    assert len(expected) == 12
    csv_rows = _csv_rows(tmp_path / "csv")
    wb_rows = read_wandb_history(next((tmp_path / "wb" / "wandb").glob("offline-run-*")))
    for name, value in expected.items():
        key = f"lora/matrix/{name}/delta_norm"
        assert math.isclose(_by_step(csv_rows, key)[4], value, rel_tol=1e-5), (key, _by_step(csv_rows, key), value)
        assert math.isclose(_by_step(wb_rows, key)[4], value, rel_tol=1e-5), key
    for kind, suffix in (("q", "q_proj"), ("v", "v_proj"), ("mlp", "_proj")):
        names = [n for n in expected if n.endswith(suffix) and (kind != "mlp" or ".mlp." in n)]
        total = math.sqrt(sum(expected[n] ** 2 for n in names))
        assert math.isclose(_by_step(csv_rows, f"lora/{kind}/delta_norm")[4], total, rel_tol=1e-5), kind
    csv_keys = {k for r in csv_rows for k, v in r.items() if k.startswith("lora/") and v not in (None, "")}
    images = {k for r in wb_rows for k in r if k.startswith(("lora/heatmap/", "lora/spectrum/"))}  # W&B image entries
    wb_keys = {k for r in wb_rows for k in r if k.startswith("lora/")} - images
    assert csv_keys == wb_keys  # one set of scalars for every logger
    for stat in (
        "rel_delta",
        "stable_rank",
        "grad_lora_A_norm",
        "update_lora_B_ratio",
        "subspace_top1",
        "amplification",
    ):
        assert f"lora/q/{stat}" in csv_keys, stat
    assert "lora/heatmap/filenames" in images and "lora/spectrum/filenames" in images  # the images reached W&B
    assert {p.name for p in mon.written} == {"heatmap_epoch0.png", "spectrum_epoch0.png"}


def test_spectrum_and_amplification_match_full_matrices():
    g = torch.Generator().manual_seed(0)
    A, B, W = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((4, 30), (20, 4), (20, 30)))
    dW = 0.5 * B @ A
    U, S, Vh = torch.linalg.svd(dW)
    assert torch.allclose(spectrum(A, B, 0.5), S[:4])
    assert math.isclose(delta_frobenius(A, B, 0.5), float(torch.linalg.matrix_norm(dW)), rel_tol=1e-12)
    projected = torch.linalg.matrix_norm(U[:, :4].T @ W @ Vh[:4].T)
    assert math.isclose(amplification(A, B, 0.5, W), float(torch.linalg.matrix_norm(dW) / projected), rel_tol=1e-10)


def test_subspace_similarity_against_the_start_and_a_reference_file(tmp_path):
    adapter = tmp_path / "ref.safetensors"
    mon = LoRAMonitor(every_n_steps=1, images=False)
    model = LitTiny()
    trainer(
        tmp_path / "a",
        [LoRACallback(**OPTS, export_adapter=str(adapter), init_seed=3, verbose=False), mon],
        max_steps=2,
        logger=CSVLogger(tmp_path / "a"),
    ).fit(model, tiny_loader())
    rows = _csv_rows(tmp_path / "a")
    name = "net.layers.0.self_attn.q_proj"
    start = LitTiny()
    from lora_lightning import LoRAConfig, inject_lora

    inject_lora(start, LoRAConfig(**OPTS, init_seed=3))
    A0 = start.net.layers[0].self_attn.q_proj.lora_A.detach().double()
    A_now = model.net.layers[0].self_attn.q_proj.lora_A.detach().double()
    assert math.isclose(
        _by_step(rows, f"lora/matrix/{name}/subspace_top1")[2], subspace_similarity(A0, A_now, 1, 1), rel_tol=1e-6
    )
    mon2 = LoRAMonitor(every_n_steps=1, images=False, reference=str(adapter))  # against the file of the run above
    trainer(
        tmp_path / "b",
        [LoRACallback(**OPTS, init_adapter=str(adapter), verbose=False), mon2],
        max_steps=1,
        logger=CSVLogger(tmp_path / "b"),
    ).fit(LitTiny(), tiny_loader())
    assert _by_step(_csv_rows(tmp_path / "b"), f"lora/matrix/{name}/subspace_all")[1] > 0.99  # one step from the file


def test_named_adapters_adalora_and_dora_values(tmp_path):
    mon = LoRAMonitor(every_n_steps=1, images=False)
    trainer(
        tmp_path / "m",
        [LoRACallback(**OPTS, adapters=["a", "b"], verbose=False), mon],
        max_steps=1,
        logger=CSVLogger(tmp_path / "m"),
    ).fit(LitTiny(), {"a": tiny_loader(), "b": tiny_loader(seed=2)})
    keys = set(_csv_rows(tmp_path / "m")[0])
    assert {"a/lora/q/delta_norm", "b/lora/q/delta_norm"} <= keys
    for variant, extra, stat in (
        ("adalora", dict(adalora_target_r=1, adalora_total_steps=4), "rank"),
        ("dora", {}, "magnitude_mean"),
    ):
        mon = LoRAMonitor(every_n_steps=1, images=False)
        opts = OPTS | dict(targets=["q", "v"], variant=variant, **extra)
        trainer(
            tmp_path / variant,
            [LoRACallback(**opts, verbose=False), mon],
            max_steps=2,
            logger=CSVLogger(tmp_path / variant),
        ).fit(LitTiny(), tiny_loader())
        assert f"lora/matrix/net.layers.0.self_attn.q_proj/{stat}" in set(_csv_rows(tmp_path / variant)[0]), variant
