"""Issue 37, items 1 and 2: ``add_weighted_adapter``'s pruning merges (TIES, DARE, magnitude pruning and their
``_svd`` forms) against PEFT 0.21.2's ``add_weighted_adapter`` on the same adapters, and ``safe_merge``.

The adapters are made in PEFT (random values), saved, and imported here, so both sides combine the same tensors.
DARE's masks: PEFT draws them from torch's global generator after initialising its new adapter (which consumes
that generator too), ours are the first draws of the call; the tests record the generator's state when PEFT draws
its first mask and start our call from that state."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from conftest import adapted, snapshot, tiny_bert_classifier, tiny_gpt2
from lora_lightning import (
    AdapterMismatchError,
    LoRAConfigError,
    NonFiniteError,
    add_weighted_adapter,
    export_peft_adapter,
    import_peft_adapter,
    is_merged,
    list_adapters,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    save_adapter,
    set_adapter,
    unmerge_lora,
    use_adapter,
)
from lora_lightning.layers import is_lora_module
from lora_lightning.merging import merge_task_tensors

peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGNED = ("ties", "dare_ties")


class Mixed(nn.Module):
    """One of each kind PEFT adapts: an embedding, a 3x3 and a 1x1 Conv2d, a Conv1d and a Linear."""

    def __init__(self, conv1d: bool = True) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.emb = nn.Embedding(12, 8)
            self.conv = nn.Conv2d(8, 6, 3, padding=1)
            self.pw = nn.Conv2d(6, 6, 1)
            self.conv1 = nn.Conv1d(6, 5, 3, padding=1) if conv1d else nn.Identity()
            self.lin = nn.Linear(5 if conv1d else 6, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        b = ids.shape[0]
        h = self.emb(ids).transpose(1, 2).reshape(b, 8, 4, 4)
        h = self.conv1(self.pw(self.conv(h).relu()).flatten(2))
        return self.lin(h.transpose(1, 2))


# model -> (build, PEFT targets, a batch). PEFT's svd merges crash on Conv1d (its 3-D ΔW is not flattened), so the
# _svd forms run on "mixed" without it.
def _ids(vocab: int, n: int):
    return lambda g: torch.randint(0, vocab, (2, n), generator=g)


MODELS = {
    "mixed": (lambda: Mixed(), ["emb", "conv", "pw", "conv1", "lin"], _ids(12, 16)),
    "mixed-svd": (lambda: Mixed(conv1d=False), ["emb", "conv", "pw", "lin"], _ids(12, 16)),
    "bert": (lambda: tiny_bert_classifier(3).eval(), ["query", "value"], _ids(100, 6)),
    "gpt2": (lambda: tiny_gpt2(), ["c_attn", "c_proj"], _ids(40, 6)),
}


def peft_and_ours(tmp_path, model: str, ranks=(2, 2, 3), alphas=(4, 3, 5)):
    """A PEFT model holding adapters a0, a1, a2 (random values) and our copy of the same base with them imported."""
    build, targets, batch = MODELS[model]
    fan = model == "gpt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = [
            peft.LoraConfig(r=r, lora_alpha=a, target_modules=targets, fan_in_fan_out=fan)
            for r, a in zip(ranks, alphas, strict=True)
        ]
        pm = peft.get_peft_model(build(), cfg[0], adapter_name="a0")
        for i, c in enumerate(cfg[1:], 1):
            pm.add_adapter(f"a{i}", c)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path))
    ours = build()
    for i in range(len(ranks)):
        import_peft_adapter(ours, tmp_path / f"a{i}", adapter_name=f"a{i}")
    return pm.eval(), ours.eval(), batch(torch.Generator().manual_seed(1))


def peft_merge(pm, monkeypatch, *args, **kwargs):
    """PEFT's add_weighted_adapter; returns the global generator's state when PEFT drew its first DARE mask, or
    None."""
    seen = []
    real = merge_utils.random_pruning

    def recording(*a, **k):
        if not seen:
            seen.append(torch.get_rng_state())
        return real(*a, **k)

    monkeypatch.setattr(merge_utils, "random_pruning", recording)
    torch.manual_seed(1234)  # whatever PEFT's initialisation of the new adapter draws comes from here
    pm.add_weighted_adapter(*args, **kwargs)
    monkeypatch.setattr(merge_utils, "random_pruning", real)
    return seen[0] if seen else None


def peft_factors(pm, name):
    out = {}
    for n, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A") and name in m.lora_A:
            out[n] = (m.lora_A[name].weight.detach(), m.lora_B[name].weight.detach())
        elif hasattr(m, "lora_embedding_A") and name in m.lora_embedding_A:
            out[n] = (m.lora_embedding_A[name].detach(), m.lora_embedding_B[name].detach())
    return out


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def compare(pm, ours, name, ids, svd: bool) -> tuple[float, float]:
    """Max abs differences between PEFT's adapter ``name`` and ours: of the adapter tensors (of ΔW = B·A for the svd
    forms), and of the model outputs relative to their largest magnitude (at least 1): the two forwards differ in
    their order of operations (PEFT's convolution path), not in the merge."""
    theirs = peft_factors(pm, name)
    layers = lora_layers(ours)
    assert set(theirs) == set(layers)
    worst = 0.0
    with use_adapter(ours, name):
        for n, layer in layers.items():
            A, B = layer.lora_A.detach(), layer.lora_B.detach()
            pA, pB = theirs[n]
            assert layer.scaling == 1.0 and layer.r == pA.shape[0]  # alpha = r, as PEFT
            if svd:
                diff = (as_matrix(B) @ as_matrix(A) - as_matrix(pB) @ as_matrix(pA)).abs().max()
            else:
                assert A.shape == pA.shape and B.shape == pB.shape
                diff = torch.maximum((A - pA).abs().max(), (B - pB).abs().max())
            worst = max(worst, float(diff))
        with torch.no_grad():
            y = ours(ids)
    pm.set_adapter(name)
    with torch.no_grad():
        py = pm(ids)
    py = getattr(py, "logits", getattr(py, "last_hidden_state", py))
    y = getattr(y, "logits", getattr(y, "last_hidden_state", y))
    return worst, float((y - py).abs().max() / max(1.0, float(py.abs().max())))


def cases(kinds):
    return [
        (how, m)
        for how in kinds
        for m in (("total", "frequency") if how.removesuffix("_svd") in SIGNED else ("total",))
    ]


# --------------------------------------------------------------------------- equal to PEFT
@pytest.mark.parametrize("model", ["mixed", "bert", "gpt2"])
@pytest.mark.parametrize(("how", "sign"), cases(PRUNING))
def test_pruning_merges_equal_peft(tmp_path, monkeypatch, model, how, sign):
    """A and B pruned separately (√|w·s| on each), adapters of equal ranks (PEFT's condition): 2, then 3."""
    pm, ours, ids = peft_and_ours(tmp_path, model, ranks=(2, 2, 2), alphas=(4, 3, 5))
    for adapters, weights in ((["a0", "a1"], [0.7, -0.4]), (["a0", "a1", "a2"], [0.7, -0.4, 1.3])):
        name = f"m{len(adapters)}"
        kw = dict(density=0.5, majority_sign_method=sign)
        state = peft_merge(pm, monkeypatch, adapters, weights, name, combination_type=how, **kw)
        assert (state is not None) == how.startswith("dare")
        if state is not None:
            torch.set_rng_state(state)
        add_weighted_adapter(ours, adapters, weights, name, combination_type=how, **kw)
        tensors, outputs = compare(pm, ours, name, ids, svd=False)
        assert tensors <= 1e-6 and outputs <= 1e-5, (tensors, outputs)


@pytest.mark.parametrize("model", ["mixed-svd", "bert", "gpt2"])
@pytest.mark.parametrize(("how", "sign"), cases([f"{p}_svd" for p in PRUNING]))
def test_svd_forms_equal_peft(tmp_path, monkeypatch, model, how, sign):
    """ΔW_i pruned (in PEFT's layout), merged, truncated by SVD; adapters of different ranks (2, 2, 3)."""
    pm, ours, ids = peft_and_ours(tmp_path, model)
    for adapters, weights, svd_rank in ((["a0", "a1"], [0.7, -0.4], None), (["a0", "a1", "a2"], [0.7, -0.4, 1.3], 2)):
        name = f"m{len(adapters)}"
        kw = dict(density=0.6, majority_sign_method=sign, svd_rank=svd_rank)
        state = peft_merge(pm, monkeypatch, adapters, weights, name, combination_type=how, **kw)
        if state is not None:
            torch.set_rng_state(state)
        add_weighted_adapter(ours, adapters, weights, name, combination_type=how, **kw)
        tensors, outputs = compare(pm, ours, name, ids, svd=True)
        assert tensors <= 1e-5 and outputs <= 1e-5, (tensors, outputs)


def test_pruning_merges_need_equal_ranks_as_peft(tmp_path, monkeypatch):
    """bad input: combination_type='ties' over adapters of different ranks (PEFT refuses too)"""
    pm, ours, _ = peft_and_ours(tmp_path, "mixed")
    with pytest.raises(ValueError, match="same r value"):
        pm.add_weighted_adapter(["a0", "a2"], [1, 1], "t", combination_type="ties", density=0.5)
    before = snapshot(ours)
    with pytest.raises(
        AdapterMismatchError, match=r"combination_type='ties' needs adapters of the same ranks.*'ties_svd'"
    ):
        add_weighted_adapter(ours, ["a0", "a2"], [1, 1], "t", combination_type="ties", density=0.5)
    assert list_adapters(ours) == ["a0", "a1", "a2"]
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


# --------------------------------------------------------------------------- the maths by hand
def test_ties_sign_election_by_hand():
    """One entry, three tensors 5, -1, -1 (weights 1): 'total' elects + (sum 3) and keeps 5; 'frequency' elects -
    (two of three) and averages -1, -1. Magnitude pruning keeps the top int(density·numel) entries."""
    ts = [torch.tensor([5.0, 2.0]), torch.tensor([-1.0, 3.0]), torch.tensor([-1.0, -4.0])]
    w = torch.ones(3)
    assert merge_task_tensors("ties", ts, w, 1.0, "total").tolist() == [5.0, 2.5]  # (2+3)/2; -4 disagrees with +1
    assert merge_task_tensors("ties", ts, w, 1.0, "frequency").tolist() == [-1.0, 2.5]
    assert merge_task_tensors("linear", ts, w).tolist() == [3.0, 1.0]
    # density 0.5 keeps the larger entry of each tensor: [5, 0], [0, 3], [0, -4]; weights 1, 2, 1
    assert merge_task_tensors("magnitude_prune", ts, torch.tensor([1.0, 2.0, 1.0]), 0.5).tolist() == [5.0, 2.0]
    # TIES elects on the pruned, unweighted tensors: second entry 3 - 4 < 0 elects -, so only -4 (weight 1) is kept
    assert merge_task_tensors("ties", ts, torch.tensor([1.0, 2.0, 1.0]), 0.5, "total").tolist() == [5.0, -4.0]
    # 'frequency': one + and one - (pruned zeros have no sign) is a tie, elected +: only 3 (weight 2) is kept
    assert merge_task_tensors("ties", ts, torch.tensor([1.0, 2.0, 1.0]), 0.5, "frequency").tolist() == [5.0, 6.0]


def test_dare_seeds():
    """DARE's masks come from torch's global generator, or from generator= (the same stream for the same seed);
    with generator= the global generator is not used at all (the new adapter's initialisation, overwritten, leaves
    it as it was)."""
    base = adapted(r=4)
    from lora_lightning import add_adapter

    add_adapter(base, "b", {"r": 4})
    results = {}
    for how in ("dare_linear", "dare_ties_svd"):
        for seed_how in ("global", "generator", "global-other"):
            model = copy.deepcopy(base)
            torch.manual_seed(11 if seed_how != "global-other" else 12)
            before = torch.get_rng_state()
            gen = torch.Generator().manual_seed(11) if seed_how == "generator" else None
            add_weighted_adapter(model, ["default", "b"], [1.0, 0.5], "m", how, density=0.3, generator=gen)
            if gen is not None:
                assert torch.equal(torch.get_rng_state(), before), "generator= still drew from the global generator"
            with use_adapter(model, "m"):
                results[how, seed_how] = {n: layer.lora_B.detach().clone() for n, layer in lora_layers(model).items()}
        same = results[how, "global"]
        assert all(torch.equal(same[n], v) for n, v in results[how, "generator"].items())
        assert not all(torch.equal(same[n], v) for n, v in results[how, "global-other"].items())


def test_one_adapter_is_pruned_too(tmp_path, monkeypatch):
    """PEFT turns any merge of one adapter into 'linear'; here the one adapter is pruned (documented)."""
    model = adapted(r=4)
    add_weighted_adapter(model, ["default"], [1.0], "p", "magnitude_prune", density=0.25)
    with use_adapter(model, "p"):
        for layer in lora_layers(model).values():
            assert int((layer.lora_A != 0).sum()) == layer.lora_A.numel() // 4


# --------------------------------------------------------------------------- the result is a named adapter
@pytest.mark.parametrize("how", ["ties", "dare_ties_svd"])
def test_merged_adapter_is_a_named_adapter(tmp_path, how):
    """set_adapter, merge/unmerge, save_adapter/load_adapter and PEFT's format round trip all work on the result."""
    pm, ours, ids = peft_and_ours(tmp_path / "src", "mixed-svd")
    torch.manual_seed(3)
    adapters, weights = (["a0", "a1", "a2"], [0.6, 0.5, -0.3]) if how.endswith("svd") else (["a0", "a1"], [0.6, 0.5])
    add_weighted_adapter(ours, adapters, weights, "mix", how, density=0.5)
    set_adapter(ours, "mix")
    with torch.no_grad():
        y = ours(ids)
        merge_lora(ours, safe_merge=True)
        torch.testing.assert_close(ours(ids), y, atol=1e-5, rtol=0)
        unmerge_lora(ours)
    path = save_adapter(ours, tmp_path / "mix.safetensors", adapter_name="mix")
    fresh = Mixed(conv1d=False).eval()
    load_adapter(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(ids), y)
    export_peft_adapter(ours, tmp_path / "peft_mix", adapter_name="mix")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(Mixed(conv1d=False).eval(), str(tmp_path / "peft_mix")).eval()
    back = Mixed(conv1d=False).eval()
    import_peft_adapter(back, tmp_path / "peft_mix")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids), y, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(ids), y, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- bad settings
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(combination_type="ties"), r"combination_type='ties' needs density="),
        (dict(combination_type="ties", density=0), r"density=0 must be a number in \(0, 1\]"),
        (dict(combination_type="dare_linear", density=1.5), r"density=1.5 must be a number in \(0, 1\]"),
        (dict(combination_type="svd", density=0.5), r"density=0.5 is for the pruning merges"),
        (
            dict(combination_type="ties", density=0.5, majority_sign_method="mean"),
            r"majority_sign_method='mean' is not",
        ),
        (
            dict(combination_type="dare_linear", density=0.5, majority_sign_method="frequency"),
            r"is for the sign-electing",
        ),
        (
            dict(combination_type="ties", density=0.5, generator=torch.Generator()),
            r"generator= draws DARE's random masks",
        ),
        (dict(combination_type="ties_avg"), r"combination_type='ties_avg' is not one of"),
    ],
)
def test_bad_merge_settings_change_nothing(kw, match):
    model = adapted(r=4)
    from lora_lightning import add_adapter

    add_adapter(model, "b", {"r": 4})
    before = snapshot(model)
    with pytest.raises(LoRAConfigError, match=match) as info:
        add_weighted_adapter(model, ["default", "b"], [1.0, 1.0], "m", **kw)
    assert "\n" not in str(info.value)
    assert list_adapters(model) == ["default", "b"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- safe_merge
def test_safe_merge_of_a_healthy_adapter_is_the_plain_merge():
    model = adapted(r=4)
    twin = copy.deepcopy(model)
    assert merge_lora(model, safe_merge=True) == merge_lora(twin)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), twin.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    plain = merge_and_unload(copy.deepcopy(twin), safe_merge=True)  # already merged: its merged weights are checked
    assert not any(is_lora_module(m) for m in plain.modules())
    fresh = adapted(r=4)
    out = merge_and_unload(fresh, safe_merge=True)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in out.state_dict().items())


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("how", ["merge_lora", "merge_and_unload"])
def test_safe_merge_refuses_a_non_finite_adapter_before_changing_anything(bad, how):
    """bad input: merge_lora(model, safe_merge=True) with an inf in one adapter's lora_B"""
    model = adapted(r=4)
    layers = lora_layers(model)
    last = list(layers)[-1]  # every other layer would be merged before it
    with torch.no_grad():
        layers[last].lora_B[3, 1] = bad
    before = snapshot(model)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    call = {"merge_lora": merge_lora, "merge_and_unload": merge_and_unload}[how]
    with pytest.raises(NonFiniteError, match=rf"safe_merge: merging into {last} gives \d+ non-finite.*lora_B") as info:
        call(model, safe_merge=True)
    assert "\n" not in str(info.value)
    assert not is_merged(model) and [(n, type(m)) for n, m in model.named_modules()] == modules
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True, msg=f"{k} changed")
    merge_lora(model)  # without safe_merge (the default, as PEFT) the inf goes in
    assert not torch.isfinite(layers[last].weight).all()


def test_safe_merge_names_an_overflow_of_the_base_dtype():
    """W0 + ΔW finite in fp32 but beyond float16's range: the overflow is named."""
    model = adapted(r=4).half()
    name, layer = next(iter(lora_layers(model).items()))
    with torch.no_grad():
        layer.weight.fill_(60000.0)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(10000.0)
    with pytest.raises(NonFiniteError, match=rf"merging into {name} .*W0 \+ ΔW overflows torch.float16"):
        merge_lora(model, safe_merge=True)
    assert not is_merged(model)
