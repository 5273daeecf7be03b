"""Adapter files: round trip, exact size, config/fingerprint checks, corrupt files, atomic writes."""

import json
import os
import struct

import pytest
import torch
from torch import nn

from conftest import N_LAYERS, adapted, randomize_adapters, tiny_batch, tiny_model
from lora_lightning import (
    AdapterFileError,
    AdapterMismatchError,
    BaseModelMismatchError,
    LoRAConfig,
    adapter_state_dict,
    describe,
    inject_lora,
    load_adapter,
    lora_parameter_count,
    merged_state_dict,
    read_adapter,
    read_adapter_config,
    save_adapter,
)
from lora_lightning.adapter_io import atomic_write_bytes


def test_round_trip_gives_identical_outputs(tmp_path):
    m = adapted(modules_to_save=["classifier"])
    with torch.no_grad():
        m.classifier.weight.add_(1.0)
    ids, _ = tiny_batch()
    path = save_adapter(m, tmp_path / "a.safetensors")
    fresh = tiny_model(0)
    cfg = load_adapter(fresh, path)
    assert cfg == LoRAConfig(r=4, targets=["q", "v"], modules_to_save=["classifier"])
    assert torch.equal(fresh(ids), m(ids))


def test_file_holds_only_adapter_and_size_matches_closed_form(tmp_path):
    m = adapted()
    specs = describe(m)
    path = save_adapter(m, tmp_path / "a.safetensors")
    tensors, meta = read_adapter(path)
    assert all(".lora_A" in k or ".lora_B" in k for k in tensors)
    assert len(tensors) == 2 * 2 * N_LAYERS
    n = lora_parameter_count(specs)
    assert n == N_LAYERS * 2 * 4 * (16 + 16)
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert len(raw) == 8 + header_len + 4 * n  # fp32: 4 bytes per parameter, nothing else
    header = json.loads(raw[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["lora_config"])["r"] == 4
    assert read_adapter_config(path).targets == ["q", "v"]
    full_bytes = sum(p.numel() * 4 for p in tiny_model().parameters())
    assert (
        len(raw) - 8 - header_len < full_bytes / 3
    )  # tensor bytes (the header holds the record: config, base identity)


def test_loading_into_mismatched_model_raises_clearly(tmp_path):
    m = adapted()
    path = save_adapter(m, tmp_path / "a.safetensors")
    other = tiny_model(0)
    inject_lora(other, LoRAConfig(r=2, targets=["q", "v"]))
    with pytest.raises(AdapterMismatchError, match=r"r: 4 in adapter a.safetensors vs 2 in model"):
        load_adapter(other, path)
    other = tiny_model(0)
    inject_lora(other, LoRAConfig(r=4, targets=["q", "k"]))
    with pytest.raises(AdapterMismatchError, match=r"targets: \['q', 'v'\] .* vs \['q', 'k'\]"):
        load_adapter(other, path)
    # another architecture (wider model): shapes differ -> raise, model left without adapters
    wide = tiny_model(0, d=32)
    with pytest.raises(AdapterMismatchError, match=r"\[16, 16\] in adapter .* \[32, 32\] in model"):
        load_adapter(wide, path)
    assert not any(".lora_" in k for k in wide.state_dict())


def test_base_fingerprint_mismatch_raise_warn_ignore(tmp_path):
    m = adapted(seed=0)
    path = save_adapter(m, tmp_path / "a.safetensors")
    with pytest.raises(BaseModelMismatchError, match="different base weights"):
        load_adapter(tiny_model(seed=1), path)
    with pytest.warns(UserWarning, match="different base weights"):
        load_adapter(tiny_model(seed=1), path, on_base_mismatch="warn")
    load_adapter(tiny_model(seed=1), path, on_base_mismatch="ignore")
    # the same weights in bf16 still match (values are hashed at bf16 precision)
    load_adapter(tiny_model(seed=0).to(torch.bfloat16), path)


def test_corrupt_truncated_and_foreign_files(tmp_path):
    m = adapted()
    path = save_adapter(m, tmp_path / "a.safetensors")
    raw = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        load_adapter(tiny_model(), tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        read_adapter(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(AdapterFileError, match="not a lora_lightning adapter"):
        read_adapter(tmp_path / "foreign.safetensors")
    with pytest.raises(AdapterFileError, match="does not exist"):
        read_adapter(tmp_path / "missing.safetensors")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]  # no temp file left


def test_keys_relative_to_a_wrapper_load_into_the_bare_model(tmp_path):
    wrapper = nn.Module()
    wrapper.net = tiny_model(0)
    inject_lora(wrapper, LoRAConfig(r=2, targets=["v"]))
    randomize_adapters(wrapper)
    path = save_adapter(wrapper, tmp_path / "w.safetensors")
    bare = tiny_model(0)
    load_adapter(bare, path)
    ids, _ = tiny_batch()
    assert torch.equal(bare(ids), wrapper.net(ids))


def test_merged_state_dict_has_base_keys_and_adapted_function():
    m = adapted()
    sd = merged_state_dict(m)
    assert set(sd) == set(tiny_model().state_dict())
    plain = tiny_model(5)
    plain.load_state_dict(sd)
    ids, _ = tiny_batch()
    torch.testing.assert_close(plain(ids), m(ids), atol=1e-5, rtol=0)


def test_adapter_state_dict_shares_storage():
    m = adapted()
    sd = adapter_state_dict(m)
    layer = m.layers[0].self_attn.q_proj
    assert sd["layers.0.self_attn.q_proj.lora_A"].data_ptr() == layer.lora_A.data_ptr()
