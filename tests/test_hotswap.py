"""Hot-swapping adapters of other ranks and alphas under ``torch.compile`` (issue 37, item 5):
``prepare_for_hotswap`` pads every adapter to a target rank and makes the scalings tensors, ``hotswap_adapter``
writes a new adapter into the same tensors. Compilations are counted with a backend of our own, as in
test_named_adapters.py's same-rank test; outputs are compared with the eager model holding the adapter, and with
PEFT's own ``prepare_model_for_compiled_hotswap`` / ``hotswap_adapter`` on the same adapter."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import randomize_adapters, tiny_batch, tiny_model
from lora_lightning import (
    AdapterMismatchError,
    LoRAConfig,
    LoRAConfigError,
    MergeStateError,
    NotInjectedError,
    adapter_state_dict,
    add_adapter,
    export_peft_adapter,
    hotswap_adapter,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_lora,
    prepare_for_hotswap,
    read_adapter,
    read_adapter_config,
    save_adapter,
    set_adapter,
    unmerge_lora,
    use_adapter,
)

TARGETS = ["q", "v", "up_proj", "embed"]  # Linear, an MLP Linear and the embedding


def make_adapter(path, r, alpha, seed, **kw):
    """Save an adapter of rank ``r`` trained-looking (random B) on the tiny model; returns its eager outputs."""
    model = tiny_model(0).eval()
    inject_lora(model, LoRAConfig(**({"r": r, "alpha": alpha, "targets": TARGETS} | kw)))
    randomize_adapters(model, seed=seed)
    save_adapter(model, path)
    return out(model)


IDS = tiny_batch(4)[0]


@torch.no_grad()
def out(model):
    return model(IDS)


def counting_compile(model):
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(model, backend=backend), compiles


@pytest.fixture
def files(tmp_path):
    """Adapters of ranks 4 (alpha 8), 16 (alpha 5) and 2 (alpha 3, rsLoRA), and their eager outputs."""
    made = {}
    for name, (r, alpha, seed, kw) in {
        "a": (4, 8, 1, {}),
        "b": (16, 5, 2, {}),
        "c": (2, 3, 3, {"use_rslora": True}),
    }.items():
        path = tmp_path / f"{name}.safetensors"
        made[name] = (path, make_adapter(path, r, alpha, seed, **kw))
    return made


def test_padding_is_exact_and_a_smaller_rank_swaps_in_without_recompiling(files):
    model = tiny_model(0).eval()
    load_adapter(model, files["a"][0])
    before = out(model)
    prepare_for_hotswap(model, target_rank=16)
    assert all(layer.lora_A.shape[0] == 16 and layer.lora_B.shape[1] == 16 for layer in lora_layers(model).values())
    assert (out(model) - before).abs().max() <= 1e-6  # zero rows and columns add nothing
    compiled, compiles = counting_compile(model)
    with torch.no_grad():
        first = compiled(IDS)
    torch.testing.assert_close(first, files["a"][1], atol=1e-6, rtol=0)
    for name in ("b", "c", "a", "b"):  # a larger one (up to 16), a smaller one with rsLoRA, back again
        hotswap_adapter(compiled, files[name][0])
        with torch.no_grad():
            got = compiled(IDS)
        torch.testing.assert_close(got, files[name][1], atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(got, out(model), atol=1e-6, rtol=0)
    assert len(compiles) == 1, f"recompiled after a swap ({len(compiles)} compilations)"


def test_without_preparing_a_new_alpha_recompiles_and_another_rank_does_not_load(files, tmp_path):
    """What prepare_for_hotswap is for: the same swaps on an unprepared compiled model."""
    model = tiny_model(0).eval()
    load_adapter(model, files["a"][0])
    compiled, compiles = counting_compile(model)
    other_alpha = tmp_path / "a_alpha.safetensors"
    make_adapter(other_alpha, 4, 2, 7)
    with torch.no_grad():
        compiled(IDS)
        for layer in lora_layers(model).values():  # what a same-rank file of another alpha changes: a float
            layer.alpha, layer.scaling = 2.0, 0.5
        compiled(IDS)
    assert len(compiles) == 2, "the counting backend must see the recompilation a new float scaling causes"
    with pytest.raises(LoRAConfigError, match=r"not prepared .* call prepare_for_hotswap\(model, target_rank=16\)"):
        hotswap_adapter(model, files["b"][0])


def test_load_adapter_on_a_prepared_model_hot_swaps(files):
    model = tiny_model(0).eval()
    load_adapter(model, files["a"][0])
    prepare_for_hotswap(model, 16)
    compiled, compiles = counting_compile(model)
    with torch.no_grad():
        compiled(IDS)
    config = load_adapter(model, files["b"][0])
    assert config.r == 16 and config.alpha == 5
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS), files["b"][1], atol=1e-6, rtol=0)
    assert len(compiles) == 1


def test_saving_after_a_swap_writes_the_true_rank(files, tmp_path):
    model = tiny_model(0).eval()
    load_adapter(model, files["a"][0])
    prepare_for_hotswap(model, 16)
    hotswap_adapter(model, files["c"][0])
    saved = save_adapter(model, tmp_path / "again.safetensors")
    tensors, _ = read_adapter(saved)
    original, _ = read_adapter(files["c"][0])
    assert tensors.keys() == original.keys()
    for k, v in tensors.items():  # rank 2, no zero padding, the same values
        assert torch.equal(v, original[k]), k
    assert read_adapter_config(saved) == read_adapter_config(files["c"][0])
    fresh = tiny_model(0).eval()
    load_adapter(fresh, saved)
    assert torch.equal(out(fresh), files["c"][1])
    # the model is still padded afterwards, and adapter_state_dict shows the live (padded) tensors
    assert all(layer.lora_A.shape[0] == 16 for layer in lora_layers(model).values())
    assert adapter_state_dict(model)["embed.lora_B"].shape == (16, 16)


def test_merging_after_a_swap_is_exact(files):
    model = tiny_model(0).eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    load_adapter(model, files["a"][0])
    prepare_for_hotswap(model, 16)
    hotswap_adapter(model, files["b"][0])
    y = out(model)
    merge_lora(model)
    torch.testing.assert_close(out(model), y, atol=1e-6, rtol=0)
    with pytest.raises(MergeStateError, match=r"merged into the base weights; call unmerge_lora\(model\) first"):
        hotswap_adapter(model, files["c"][0])
    unmerge_lora(model)
    for k, v in base.items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)


def test_named_adapters_swap_into_an_inactive_one_and_keep_their_own_rank(files, tmp_path):
    model = tiny_model(0).eval()
    load_adapter(model, files["a"][0])
    add_adapter(model, "other", {"r": 8, "alpha": 8})
    prepare_for_hotswap(model, 16)
    compiled, compiles = counting_compile(model)
    with torch.no_grad():
        compiled(IDS)
    hotswap_adapter(compiled, files["c"][0], adapter_name="other")  # the active adapter ("default") is untouched
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS), files["a"][1], atol=1e-6, rtol=0)
    assert len(compiles) == 1
    with use_adapter(model, "other"):
        torch.testing.assert_close(out(model), files["c"][1], atol=1e-6, rtol=0)
    save_adapter(model, tmp_path / "other.safetensors", adapter_name="other")
    tensors, _ = read_adapter(tmp_path / "other.safetensors")
    assert tensors["layers.0.self_attn.q_proj.lora_A"].shape == (2, 16)  # rsLoRA r=2 at its own rank
    save_adapter(model, tmp_path / "default.safetensors")
    assert read_adapter(tmp_path / "default.safetensors")[0]["embed.lora_A"].shape == (4, 50)
    # an adapter added after preparing is not padded: swapping into it says to prepare again
    add_adapter(model, "late", {"r": 2})
    with pytest.raises(LoRAConfigError, match=r"'late' was added after prepare_for_hotswap .* prepare_for_hotswap"):
        hotswap_adapter(model, files["c"][0], adapter_name="late")
    prepare_for_hotswap(model, 16)
    hotswap_adapter(model, files["c"][0], adapter_name="late")
    set_adapter(model, "late")
    torch.testing.assert_close(out(model), files["c"][1], atol=1e-6, rtol=0)
    with pytest.raises(AdapterMismatchError, match=r"adapter 'nope' does not exist"):
        hotswap_adapter(model, files["c"][0], adapter_name="nope")


def test_tensors_with_a_config(files):
    src = tiny_model(0).eval()
    load_adapter(src, files["b"][0])
    model = tiny_model(0).eval()
    load_adapter(model, files["a"][0])
    prepare_for_hotswap(model, 16)
    with pytest.raises(LoRAConfigError, match=r"pass config=LoRAConfig"):
        hotswap_adapter(model, adapter_state_dict(src))
    hotswap_adapter(model, adapter_state_dict(src), config={"r": 16, "alpha": 5, "targets": TARGETS})
    torch.testing.assert_close(out(model), files["b"][1], atol=1e-6, rtol=0)


def test_dora_pads_too(tmp_path):
    ya = make_adapter(tmp_path / "a.safetensors", 2, 4, 1, variant="dora", targets=["q", "v"])
    yb = make_adapter(tmp_path / "b.safetensors", 4, 2, 2, variant="dora", targets=["q", "v"])
    model = tiny_model(0).eval()
    load_adapter(model, tmp_path / "a.safetensors")
    prepare_for_hotswap(model, 4)
    torch.testing.assert_close(out(model), ya, atol=1e-6, rtol=0)
    compiled, compiles = counting_compile(model)
    with torch.no_grad():
        compiled(IDS)
        hotswap_adapter(compiled, tmp_path / "b.safetensors")
        torch.testing.assert_close(compiled(IDS), yb, atol=1e-6, rtol=0)
    assert len(compiles) == 1


def test_the_same_adapter_swapped_into_peft_gives_the_same_outputs(tmp_path):
    """PEFT 0.21.2: the rank-4 adapter loaded, prepare_model_for_compiled_hotswap(target_rank=16), compiled,
    hotswap_adapter of the rank-16 one (exported to PEFT's format); ours the same from our files. PEFT pads Linear
    and Conv2d layers only (its hotswap_adapter cannot address an embedding's parameters): Linear targets here."""
    import peft
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    files = {}
    for name, r, alpha, seed in (("a", 4, 8, 1), ("b", 16, 5, 2)):
        path = tmp_path / f"{name}.safetensors"
        files[name] = (path, make_adapter(path, r, alpha, seed, targets=["q", "v", "up_proj"]))
    dirs = {}
    for name in ("a", "b"):
        m = tiny_model(0).eval()
        load_adapter(m, files[name][0])
        dirs[name] = export_peft_adapter(m, tmp_path / f"peft_{name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_model(0), str(dirs["a"])).eval()
    prepare_model_for_compiled_hotswap(theirs, target_rank=16)
    their_compiled, their_compiles = counting_compile(theirs)
    with torch.no_grad():
        their_a = their_compiled(IDS)
    peft_hotswap(their_compiled, str(dirs["b"]), adapter_name="default", torch_device="cpu")
    with torch.no_grad():
        their_b = their_compiled(IDS)
    their_count = len(their_compiles)

    ours = tiny_model(0).eval()
    load_adapter(ours, files["a"][0])
    prepare_for_hotswap(ours, 16)
    our_compiled, our_compiles = counting_compile(ours)
    with torch.no_grad():
        our_a = our_compiled(IDS)
    hotswap_adapter(our_compiled, files["b"][0])
    with torch.no_grad():
        our_b = our_compiled(IDS)
    assert their_count == 1 and len(our_compiles) == 1
    torch.testing.assert_close(our_a, their_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(our_b, their_b, atol=1e-6, rtol=0)
    # exporting after the swap gives PEFT the true rank too
    again = export_peft_adapter(ours, tmp_path / "peft_again")
    import json

    assert json.loads((again / "adapter_config.json").read_text())["r"] == 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = peft.PeftModel.from_pretrained(tiny_model(0), str(again)).eval()
    torch.testing.assert_close(out(reloaded), files["b"][1], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- refusals, one line, nothing changed
def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)


def test_refusals(files, tmp_path):
    model = tiny_model(0).eval()
    with pytest.raises(NotInjectedError, match=r"no LoRA adapters; load the first adapter") as e:
        prepare_for_hotswap(model, 8)
    _one_line(e)
    load_adapter(model, files["a"][0])
    for bad in (0, 2.5, True):
        with pytest.raises(LoRAConfigError, match=r"must be a positive int"):
            prepare_for_hotswap(model, bad)
    with pytest.raises(LoRAConfigError, match=r"adapter 'default' at .* has rank 4; use prepare_for_hotswap"):
        prepare_for_hotswap(model, 2)
    compiled, _ = counting_compile(model)
    with pytest.raises(LoRAConfigError, match=r"got a torch.compile'd model; prepare the model itself"):
        prepare_for_hotswap(compiled, 16)
    prepare_for_hotswap(model, 8)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAConfigError, match=r"already padded to rank 8; use prepare_for_hotswap"):
        prepare_for_hotswap(model, 4)
    with pytest.raises(
        LoRAConfigError,
        match=r"rank r=16 at .*, above the padded rank 8; call prepare_for_hotswap\(model, target_rank=16\)",
    ) as e:
        hotswap_adapter(model, files["b"][0])
    _one_line(e)
    other_targets = tmp_path / "qk.safetensors"
    make_adapter(other_targets, 2, 4, 5, targets=["q", "k"])
    with pytest.raises(AdapterMismatchError, match=r"adapts other modules .* a swap cannot add or remove adapters"):
        hotswap_adapter(model, other_targets)
    dora = tmp_path / "dora.safetensors"
    make_adapter(dora, 2, 4, 5, variant="dora", targets=["q", "v", "up_proj"])
    with pytest.raises(AdapterMismatchError, match=r"variant='dora', the model's adapters variant='lora'"):
        hotswap_adapter(model, dora)
    dropout = tmp_path / "dropout.safetensors"
    make_adapter(dropout, 2, 4, 5, dropout=0.1)
    with pytest.raises(LoRAConfigError, match=r"dropout=0.1, the model's adapters dropout=0.0"):
        hotswap_adapter(model, dropout)
    for k, v in snapshot.items():
        assert torch.equal(model.state_dict()[k], v), f"a refusal changed {k}"


@pytest.mark.parametrize(
    ("variant", "pattern"),
    [
        ("vera", r"variant='vera' cannot be padded to another rank"),
        ("adalora", r"variant='adalora' cannot be padded to another rank .*lora_E"),
        ("pissa", r"variant='pissa' rewrote the frozen base"),
    ],
)
def test_variants_padding_does_not_fit_are_refused(variant, pattern):
    options = {"vera": {"vera_seed": 1}, "adalora": {"adalora_target_r": 1, "adalora_total_steps": 10}}.get(variant, {})
    model = tiny_model(0).eval()
    inject_lora(model, LoRAConfig(r=2, targets=["q", "v"], variant=variant, **options))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAConfigError, match=pattern) as e:
        prepare_for_hotswap(model, 4)
    _one_line(e)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
