"""Shared-input fusion (lora_lightning/shared_input.py): LoRA layers reading the same tensor run as one
autograd node. Every check compares against the unfused layers or an independent formula."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import adapted, randomize_adapters, tiny_batch, tiny_model
from lora_lightning import LoRAConfig, inject_lora, lora_layers, set_shared_input_fusion, shared_input_groups
from lora_lightning.layers import LoRALinear
from lora_lightning.shared_input import SharedInputLoRAFunction, SharedInputTracker

NONE3 = (None, None, None)


def _params(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7, 2), (4, 1)]  # (d_out, r) per member; d_in = 6
    params = []
    for i, (d_out, r) in enumerate(shapes):
        w = torch.randn(d_out, 6, generator=g, dtype=dtype)
        b = None if i == 1 else torch.randn(d_out, generator=g, dtype=dtype).requires_grad_()
        a = torch.randn(r, 6, generator=g, dtype=dtype).requires_grad_()
        bb = torch.randn(d_out, r, generator=g, dtype=dtype).requires_grad_()
        params += [w, b, a, bb]
    return params, (0.5, 2.0, 1.5), tuple(r for _, r in shapes)


@pytest.mark.parametrize("dropout", [False, True])
def test_function_equals_composed_formula_and_gradchecks(dropout):
    """Every output against the composed formula, then gradcheck and gradgradcheck; with ``dropout`` members 1
    and 3 read x through their own masks and member 2 reads x itself."""
    params, scalings, ranks = _params()
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    keeps, masks = NONE3, NONE3
    if dropout:
        g = torch.Generator().manual_seed(7)
        masks = (torch.rand(x.shape, generator=g) < 0.7, None, torch.rand(x.shape, generator=g) < 0.5)
        keeps = (0.7, None, 0.5)
    outs = SharedInputLoRAFunction.apply(x, scalings, ranks, keeps, masks, *params)
    for i, out in enumerate(outs):
        w, b, a, bb = params[4 * i : 4 * i + 4]
        xd = x if masks[i] is None else x * masks[i] / keeps[i]
        ref = F.linear(x, w, b) + scalings[i] * F.linear(F.linear(xd, a), bb)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    fn = lambda x, *p: SharedInputLoRAFunction.apply(x, scalings, ranks, keeps, masks, *p)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))


def test_unused_output_gets_no_gradient_and_the_rest_are_exact():
    """Only the second output feeds the loss: A_1, B_1, A_3, B_3 get zero gradient, and ∂x, ∂A_2, ∂B_2
    equal the single-layer formula."""
    params, scalings, ranks = _params()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    _, y2, _ = SharedInputLoRAFunction.apply(x, scalings, ranks, NONE3, NONE3, *params)
    y2.square().sum().backward()
    got = [x.grad.clone()] + [params[i].grad.clone() for i in (6, 7)]
    unused = [params[i].grad for i in (2, 3, 10, 11)]  # A_1, B_1, A_3, B_3
    for p in params:
        if p is not None and p.grad is not None:
            p.grad = None
    x.grad = None
    w, b, a, bb = params[4:8]
    (F.linear(x, w, b) + scalings[1] * F.linear(F.linear(x, a), bb)).square().sum().backward()
    for g, ref in zip(got, [x.grad, a.grad, bb.grad], strict=True):
        torch.testing.assert_close(g, ref, atol=1e-12, rtol=0)
    assert all(g is None or float(g.abs().max()) == 0.0 for g in unused)
    assert unused[1] is None and unused[3] is None  # no ∂B work for an unused output


def _loss_and_grads(model, fused: bool):
    set_shared_input_fusion(model, fused)
    ids, y = tiny_batch()
    out = {}
    for _ in range(2):  # the first forward learns the groups, the second runs them fused
        model.zero_grad()
        loss = F.cross_entropy(model(ids), y)
        loss.backward()
    out["loss"] = loss.detach()
    out |= {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out


def test_model_loss_and_gradients_equal_unfused():
    # float64: the fused and unfused sums then agree to round-off far below any real difference
    # (in float32 these large random adapters leave differences of a few 1e-6 relative)
    model = adapted(targets=["all-linear"]).to(torch.float64)
    model.eval()  # no hidden dropout: the two runs see the same computation
    unfused = _loss_and_grads(model, False)
    trackers = {id(layer.lora_shared): layer.lora_shared for layer in lora_layers(model).values()}
    assert len(trackers) == 1
    tracker = next(iter(trackers.values()))
    fused = _loss_and_grads(model, True)
    assert tracker.fused_calls == 3  # one per block, on the second forward
    assert unfused.keys() == fused.keys() and len(fused) > 10
    for k in unfused:
        torch.testing.assert_close(fused[k], unfused[k], atol=1e-11, rtol=1e-11)
    groups = shared_input_groups(model)
    assert sorted(groups) == [[f"layers.{i}.self_attn.{p}_proj" for p in "qkv"] for i in range(3)]


def test_groups_are_found_in_a_llama_without_names():
    """q,k,v and gate,up read the same tensor in a Llama block: found by watching the calls."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    inject_lora(model, LoRAConfig(r=2, targets=["all-linear"]))
    randomize_adapters(model)
    ids = torch.randint(0, 40, (2, 7))
    ref = model(ids).logits
    got = model(ids).logits  # fused
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    names = sorted(tuple(n.split(".")[-1] for n in g) for g in shared_input_groups(model))
    assert names == [("gate_proj", "up_proj")] * 2 + [("q_proj", "k_proj", "v_proj")] * 2
    set_shared_input_fusion(model, False)
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-6, rtol=1e-5)


class _TwoInputs(nn.Module):
    """q and k read x on the first call (learnt as a group), then k reads another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(6, 4), nn.Linear(6, 4)

    def forward(self, x, other=None):
        return self.q_proj(x), self.k_proj(x if other is None else other)


def test_member_called_with_another_tensor_computes_its_own_output():
    torch.manual_seed(0)
    model = _TwoInputs()
    inject_lora(model, LoRAConfig(r=2, targets=["q", "k"]))
    randomize_adapters(model)
    x, other = torch.randn(3, 6), torch.randn(3, 6)
    model(x)  # learns {q, k}
    assert shared_input_groups(model) == [["q_proj", "k_proj"]]
    q, k = model(x, other)
    k_ref = F.linear(other, model.k_proj.weight, model.k_proj.bias) + model.k_proj.scaling * F.linear(
        F.linear(other, model.k_proj.lora_A), model.k_proj.lora_B
    )
    torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=0)
    q2, k2 = model(x)  # and the group still works afterwards
    torch.testing.assert_close(k2, model.k_proj(x), atol=1e-6, rtol=0)


def test_member_skipped_by_a_forward_and_called_after_an_optimizer_step_is_not_stale():
    """The leader precomputes k's output; the forward skips k; an optimizer step changes k's adapter in place;
    then k(x) with the very same tensor must use the new adapter, not the precomputed output."""
    torch.manual_seed(0)
    model = _TwoInputs()
    inject_lora(model, LoRAConfig(r=2, targets=["q", "k"]))
    randomize_adapters(model)
    x = torch.randn(3, 6)
    model(x)  # learns {q, k}
    model.q_proj(x)  # fused: k's output for x is computed and waits for k
    assert model.q_proj.lora_shared.fused_calls == 1
    with torch.no_grad():
        model.k_proj.lora_B.add_(1.0)  # what optimizer.step() does: in place
    k = model.k_proj
    ref = F.linear(x, k.weight, k.bias) + k.scaling * F.linear(F.linear(x, k.lora_A), k.lora_B)
    torch.testing.assert_close(k(x), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["merged", "disabled_flag", "variant"])
def test_no_fused_call_where_it_cannot_be_exact(case):
    kw = dict(targets=["q", "k", "v"])
    if case == "disabled_flag":
        kw["fuse_shared_inputs"] = False
    if case == "variant":
        kw["variant"] = "dora"
    model = adapted(**kw)
    model.eval()
    if case == "merged":
        from lora_lightning import merge_lora

        merge_lora(model)
    ids, _ = tiny_batch()
    model(ids)
    model(ids)
    trackers = {layer.lora_shared for layer in lora_layers(model).values()}
    if case == "variant":
        assert trackers == {None}
        return
    (tracker,) = trackers
    assert tracker.fused_calls == 0


def test_training_with_adapter_dropout_fused_equals_unfused_from_the_same_seed():
    """With dropout active each member draws its mask as nn.Dropout would, in the same order: the fused run
    sees the very masks of the unfused run (same seed), so losses and gradients agree (float64: to round-off)."""
    results = []
    for fused in (False, True):
        model = adapted(targets=["q", "k", "v", "mlp"], dropout=0.3, fuse_shared_inputs=fused).to(torch.float64).train()
        ids, y = tiny_batch()
        torch.manual_seed(11)
        model(ids)  # learns the groups
        torch.manual_seed(12)
        loss = F.cross_entropy(model(ids), y)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        tracker = model.layers[0].self_attn.q_proj.lora_shared
        assert tracker.fused_calls == (3 if fused else 0)
    assert torch.equal(results[0][0], results[1][0])  # the forward is bit-identical
    for k in results[0][1]:
        torch.testing.assert_close(results[1][1][k], results[0][1][k], atol=1e-11, rtol=1e-11)


def test_inference_without_autograd_runs_the_separate_layers():
    """Under no_grad / inference_mode only the backward could gain: no fused call, same output bits."""
    model = adapted(targets=["q", "k", "v"]).eval()
    ids, _ = tiny_batch()
    ref = model(ids)
    with torch.no_grad():
        got = model(ids)
    with torch.inference_mode():
        got2 = model(ids)
    assert torch.equal(got, ref) and torch.equal(got2, ref)
    assert model.layers[0].self_attn.q_proj.lora_shared.fused_calls == 0


def test_dropout_in_eval_mode_fuses():
    model = adapted(targets=["q", "k", "v"], dropout=0.3).eval()
    ids, _ = tiny_batch()
    ref = model(ids)  # learns the groups (unfused)
    got = model(ids)  # fused: the forward is bit-identical to the separate layers'
    assert torch.equal(got, ref)
    assert next(iter(lora_layers(model).values())).lora_shared.fused_calls == 3


def test_compile_fullgraph_with_fusion_on():
    """dynamo does not trace the tracker's bookkeeping: the layers keep their one-node path, no graph break."""
    model = adapted(targets=["q", "k", "v"]).eval()
    ids, _ = tiny_batch()
    ref = model(ids)
    model(ids)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(ids), ref, atol=1e-6, rtol=1e-5)


def test_pickle_and_deepcopy_keep_groups_per_copy():
    model = adapted(targets=["q", "k", "v"]).eval()
    ids, _ = tiny_batch()
    ref = model(ids)
    model(ids)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        tracker = clone.layers[0].self_attn.q_proj.lora_shared
        assert isinstance(tracker, SharedInputTracker) and tracker is not model.layers[0].self_attn.q_proj.lora_shared
        assert all(m in set(clone.modules()) for members in tracker.groups.values() for m in members)
        torch.testing.assert_close(clone(ids), ref, atol=1e-6, rtol=1e-5)
        assert tracker.fused_calls == 3


def test_training_with_fusion_matches_unfused_training():
    """Five AdamW steps, fused vs unfused, from the same start: same adapters."""
    results = []
    for fused in (True, False):
        model = adapted(targets=["all-linear"], fuse_shared_inputs=fused).eval()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids, y = tiny_batch()
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(ids), y).backward()
            opt.step()
        results.append({k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k})
        if fused:
            assert model.layers[0].self_attn.q_proj.lora_shared.fused_calls == 3 * 4
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-5, rtol=1e-4)


def test_bad_member_layer_is_not_tracked():
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=2, targets=["q", "k"], quantize_base="int8"))
    assert all(isinstance(layer, LoRALinear) and layer.lora_shared is None for layer in lora_layers(model).values())


def test_groups_set_by_name_run_fused_on_the_first_forward():
    """What resuming from a checkpoint does: the recorded groups make the first forward fused already (so a
    resumed run computes exactly what the uninterrupted one did); names that do not fit are skipped."""
    from lora_lightning import set_shared_input_groups

    learnt = adapted(targets=["q", "k", "v"]).eval()
    ids, _ = tiny_batch()
    ref = learnt(ids)
    learnt(ids)
    groups = shared_input_groups(learnt)
    fresh = adapted(targets=["q", "k", "v"]).eval()
    assert (
        set_shared_input_groups(fresh, groups + [["layers.0.mlp.up_proj", "nope"], ["layers.0.self_attn.q_proj"]]) == 3
    )
    tracker = fresh.layers[0].self_attn.q_proj.lora_shared
    assert torch.equal(fresh(ids), learnt(ids)) and tracker.fused_calls == 3
    torch.testing.assert_close(fresh(ids), ref, atol=1e-6, rtol=1e-5)
