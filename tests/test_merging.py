"""Merge / unmerge / merge_and_unload / switching adapters on one base."""

import pytest
import torch

from conftest import randomize_adapters, tiny_batch, tiny_model
from lora_lightning import (
    LoRAConfig,
    LoRALinear,
    MergeStateError,
    NotInjectedError,
    inject_lora,
    is_merged,
    load_adapter,
    merge_and_unload,
    merge_lora,
    save_adapter,
    switch_adapter,
    unmerge_lora,
)


def test_merged_model_matches_adapted_and_unmerge_round_trips():
    m = tiny_model()
    base_sd = {k: v.clone() for k, v in m.state_dict().items()}
    inject_lora(m, LoRAConfig(r=4, targets=["q", "k", "v", "o", "mlp"]))
    randomize_adapters(m)
    m.eval()
    ids, _ = tiny_batch()
    adapted = m(ids)
    assert merge_lora(m) == 3 * 6 and is_merged(m)
    torch.testing.assert_close(m(ids), adapted, atol=1e-5, rtol=0)
    with pytest.raises(MergeStateError, match="already merged"):
        merge_lora(m)
    unmerge_lora(m)
    with pytest.raises(MergeStateError, match="not merged"):
        unmerge_lora(m)
    for k, v in base_sd.items():
        assert (m.state_dict()[k] - v).abs().max() < 1e-6, k


def test_merge_and_unload_restores_base_architecture():
    m = tiny_model()
    keys = list(m.state_dict())
    types = {n: type(x) for n, x in m.named_modules()}
    inject_lora(m, LoRAConfig(r=2, targets=["q", "v"]))
    randomize_adapters(m)
    ids, _ = tiny_batch()
    adapted = m(ids)
    merge_and_unload(m)
    assert list(m.state_dict()) == keys
    assert {n: type(x) for n, x in m.named_modules()} == types
    assert not any(isinstance(x, LoRALinear) for x in m.modules())
    torch.testing.assert_close(m(ids), adapted, atol=1e-5, rtol=0)
    with pytest.raises(NotInjectedError, match="no LoRA adapters"):
        merge_lora(m)


@pytest.mark.parametrize("merged", [False, True])
def test_switch_between_two_task_adapters(tmp_path, merged):
    ids, _ = tiny_batch()
    outputs, paths = [], []
    for task_seed in (10, 20):
        m = tiny_model(0)
        inject_lora(m, LoRAConfig(r=2, targets=["q", "v"]))
        randomize_adapters(m, seed=task_seed)
        outputs.append(m(ids))
        paths.append(save_adapter(m, tmp_path / f"task{task_seed}.safetensors"))
    m = tiny_model(0)
    load_adapter(m, paths[0])
    if merged:
        merge_lora(m)
    torch.testing.assert_close(m(ids), outputs[0], atol=1e-5, rtol=0)
    switch_adapter(m, paths[1])
    assert is_merged(m) == merged
    torch.testing.assert_close(m(ids), outputs[1], atol=1e-5, rtol=0)
    switch_adapter(m, paths[0])
    torch.testing.assert_close(m(ids), outputs[0], atol=1e-5, rtol=0)


def test_switch_to_adapter_with_other_targets(tmp_path):
    ids, _ = tiny_batch()
    a = tiny_model(0)
    inject_lora(a, LoRAConfig(r=2, targets=["q"]))
    randomize_adapters(a, seed=1)
    pa = save_adapter(a, tmp_path / "a.safetensors")
    b = tiny_model(0)
    inject_lora(b, LoRAConfig(r=4, targets=["mlp"]))
    randomize_adapters(b, seed=2)
    pb = save_adapter(b, tmp_path / "b.safetensors")
    m = tiny_model(0)
    load_adapter(m, pa)
    merge_lora(m)
    switch_adapter(m, pb)
    torch.testing.assert_close(m(ids), b(ids), atol=1e-5, rtol=0)
    unmerge_lora(m)
    base = tiny_model(0)
    for k, v in base.state_dict().items():
        assert (m.state_dict()[k] - v).abs().max() < 1e-6
