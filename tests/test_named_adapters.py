"""Named adapters on one base (issue 16): add / set / delete / disable, files and checkpoints,
weighted combinations against PEFT's own ``add_weighted_adapter``, mixed batches against per-sample
merged models, hot swap under ``torch.compile``."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import LitTiny, randomize_adapters, tiny_batch, tiny_loader, tiny_model, trainer
from lora_lightning import (
    AdapterMismatchError,
    LoRAConfig,
    LoRAConfigError,
    MergeStateError,
    active_adapter,
    add_adapter,
    add_weighted_adapter,
    delete_adapter,
    disable_adapter,
    import_peft_adapter,
    inject_lora,
    list_adapters,
    load_adapter,
    merge_lora,
    mixed_batch,
    save_adapter,
    set_adapter,
    use_adapter,
)

CFG = dict(r=2, targets=["q", "v"], modules_to_save=["classifier"])


def two_adapters(seed: int = 0):
    """A tiny model with ``default`` (r=2) and ``other`` (r=4), both trained-looking, and its base output."""
    model = tiny_model(seed)
    ids, _ = tiny_batch(6)
    with torch.no_grad():
        base = model(ids)
    inject_lora(model, LoRAConfig(**CFG))
    randomize_adapters(model, seed=1)
    with torch.no_grad():
        model.classifier.weight.add_(0.3)
    add_adapter(model, "other", LoRAConfig(**(CFG | {"r": 4, "alpha": 8})))
    set_adapter(model, "other")
    randomize_adapters(model, seed=2)
    with torch.no_grad():
        model.classifier.bias.add_(0.7)
    set_adapter(model, "default")
    return model, ids, base


@torch.no_grad()
def out(model, ids):
    return model(ids)


def test_named_adapters_switch_train_only_the_active_one_and_disable_gives_the_base():
    model, ids, base = two_adapters()
    assert list_adapters(model) == ["default", "other"] and active_adapter(model) == "default"
    y_default = out(model, ids)
    set_adapter(model, "other")
    y_other = out(model, ids)
    assert (y_other - y_default).abs().max() > 1e-2
    # only the active adapter (and its own classifier copy) trains; the bank is frozen
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable and all("lora_bank" not in n for n in trainable)
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"lora_A", "lora_B", "weight", "bias"}
    assert model.layers[0].self_attn.q_proj.lora_A.shape[0] == 4  # other's rank is in the slot now
    set_adapter(model, "default")
    torch.testing.assert_close(out(model, ids), y_default, atol=0, rtol=0)
    with disable_adapter(model):
        torch.testing.assert_close(out(model, ids), base, atol=0, rtol=0)  # exactly the model before injection
    torch.testing.assert_close(out(model, ids), y_default, atol=0, rtol=0)
    # a new adapter starts at the base output (B = 0, classifier copied from before injection)
    add_adapter(model, "fresh")
    with use_adapter(model, "fresh"):
        torch.testing.assert_close(out(model, ids), base, atol=1e-6, rtol=0)
    assert active_adapter(model) == "default"
    delete_adapter(model, "fresh")
    delete_adapter(model, "default")  # the active one: the next remaining becomes active
    assert list_adapters(model) == ["other"] and active_adapter(model) == "other"
    torch.testing.assert_close(out(model, ids), y_other, atol=0, rtol=0)
    assert not any("lora_bank" in k for k in model.state_dict())


def test_training_a_named_adapter_leaves_the_others_untouched(tmp_path):
    model = LitTiny(seed=0)
    inject_lora(model, LoRAConfig(**CFG))
    add_adapter(model, "other")
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_bank" in k}
    # the callback reuses the adapters the module holds; training updates the active one only
    from lora_lightning import LoRACallback

    trainer(tmp_path, [LoRACallback(**CFG, verbose=False)], max_steps=3).fit(model, tiny_loader())
    after = {k: v for k, v in model.state_dict().items() if "lora_bank" in k}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.net.layers[0].self_attn.q_proj.lora_B.abs().sum() > 0


def test_named_adapter_files_and_lightning_checkpoints_keep_every_adapter(tmp_path):
    model, ids, _ = two_adapters()
    y = {name: out(model, ids) for name in ("default", "other") if not set_adapter(model, name)}
    set_adapter(model, "default")
    save_adapter(model, tmp_path / "other.safetensors", adapter_name="other")
    assert active_adapter(model) == "default"
    fresh = tiny_model(0)
    inject_lora(fresh, LoRAConfig(**CFG))
    load_adapter(fresh, tmp_path / "other.safetensors", adapter_name="other")
    assert list_adapters(fresh) == ["default", "other"] and active_adapter(fresh) == "default"
    set_adapter(fresh, "other")
    torch.testing.assert_close(out(fresh, ids), y["other"], atol=1e-6, rtol=0)

    # a Lightning checkpoint carries every adapter (adapter-only) and which one was active
    from lora_lightning import LoRACallback

    lit = LitTiny(seed=0)
    t = trainer(tmp_path / "fit", [LoRACallback(**CFG, verbose=False)], max_steps=2)
    t.fit(lit, tiny_loader())
    add_adapter(lit, "other", LoRAConfig(**(CFG | {"r": 4, "alpha": 8})))
    with use_adapter(lit, "other"):
        randomize_adapters(lit, seed=5)
    set_adapter(lit, "other")
    ids_t = ids
    expected = {n: None for n in ("default", "other")}
    for n in expected:
        with use_adapter(lit, n):
            expected[n] = out(lit, ids_t)
    t.save_checkpoint(tmp_path / "two.ckpt")
    ckpt = torch.load(tmp_path / "two.ckpt", weights_only=False)
    assert ckpt["lora_lightning"]["adapters"]["active"] == "other"
    assert any(".lora_bank.default.lora_A" in k for k in ckpt["state_dict"])
    assert not any(k.endswith("k_proj.weight") for k in ckpt["state_dict"])  # still adapter-only
    loaded = LitTiny.load_from_checkpoint(tmp_path / "two.ckpt")
    assert list_adapters(loaded) == ["default", "other"] and active_adapter(loaded) == "other"
    for n in expected:
        with use_adapter(loaded, n):
            torch.testing.assert_close(out(loaded, ids_t), expected[n], atol=1e-6, rtol=0)


def test_mixed_batch_equals_each_sample_through_its_own_merged_model():
    model, ids, base = two_adapters()
    names = ["other", None, "default", "other", "default", None]
    with torch.no_grad(), mixed_batch(model, names, batch_dim=0):  # 6 samples of 6 tokens: dim 0 named explicitly
        mixed = model(ids)
    for name in ("default", "other"):
        merged = copy.deepcopy(model)
        set_adapter(merged, name)
        merge_lora(merged)
        rows = [i for i, n in enumerate(names) if n == name]
        torch.testing.assert_close(mixed[rows], out(merged, ids)[rows], atol=1e-5, rtol=0)
    rows = [i for i, n in enumerate(names) if n is None]
    torch.testing.assert_close(mixed[rows], base[rows], atol=1e-6, rtol=0)
    assert model.layers[0].self_attn.q_proj.lora_route is None  # the routing ends with the block


def test_mixed_batch_on_gpt2_fused_attention():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    inject_lora(model, LoRAConfig(r=2, targets=["q", "v"]))  # q and v blocks of the fused c_attn
    assert model.transformer.h[0].attn.c_attn.fused is not None
    randomize_adapters(model, seed=1)
    add_adapter(model, "b", LoRAConfig(r=3, alpha=5, targets=["q", "v"]))
    with use_adapter(model, "b"):
        randomize_adapters(model, seed=2)
    ids = torch.randint(0, 64, (4, 7), generator=torch.Generator().manual_seed(3))
    names = ["b", "default", None, "b"]
    with torch.no_grad(), mixed_batch(model, names):
        mixed = model(input_ids=ids).logits
    for name in ("default", "b", None):
        ref = copy.deepcopy(model)
        if name is None:
            with disable_adapter(ref), torch.no_grad():
                expected = ref(input_ids=ids).logits
        else:
            set_adapter(ref, name)
            merge_lora(ref)
            with torch.no_grad():
                expected = ref(input_ids=ids).logits
        rows = [i for i, n in enumerate(names) if n == name]
        torch.testing.assert_close(mixed[rows], expected[rows], atol=1e-5, rtol=0)


@pytest.mark.parametrize("how", ["cat", "svd", "linear"])
def test_add_weighted_adapter_equals_peft(tmp_path, how):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    def bert():
        torch.manual_seed(0)
        cfg = transformers.BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=3,
        )
        return transformers.BertForSequenceClassification(cfg).eval()

    r_b, alpha_b = (2, 3) if how == "linear" else (3, 5)
    pm = peft.get_peft_model(
        bert(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"]), adapter_name="first"
    )
    pm.add_adapter("second", peft.LoraConfig(r=r_b, lora_alpha=alpha_b, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path))  # tmp/first, tmp/second (neither is "default")
    weights, svd_rank = [0.7, -0.4], (2 if how == "svd" else None)
    pm.add_weighted_adapter(["first", "second"], weights, "mix", combination_type=how, svd_rank=svd_rank)
    pm.set_adapter("mix")
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = pm(input_ids=ids).logits

    ours = bert()
    import_peft_adapter(ours, tmp_path / "first", adapter_name="first")
    import_peft_adapter(ours, tmp_path / "second", adapter_name="second")
    add_weighted_adapter(ours, ["first", "second"], weights, "mix", combination_type=how, svd_rank=svd_rank)
    set_adapter(ours, "mix")
    q = ours.bert.encoder.layer[0].attention.self.query
    assert q.r == {"cat": 2 + r_b, "svd": 2, "linear": 2}[how] and q.scaling == 1.0  # alpha = r, as PEFT
    with torch.no_grad():
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    if how == "cat":  # exact: ΔW = Σ w_i ΔW_i
        with use_adapter(ours, "first"):
            da = q.delta_weight()
        with use_adapter(ours, "second"):
            db = q.delta_weight()
        torch.testing.assert_close(q.delta_weight(), 0.7 * da - 0.4 * db, atol=1e-6, rtol=0)


def test_hot_swap_under_torch_compile_does_not_recompile(tmp_path):
    model = tiny_model(0).eval()
    inject_lora(model, LoRAConfig(r=2, targets=["q", "v"]))
    randomize_adapters(model, seed=1)
    save_adapter(model, tmp_path / "a.safetensors")
    randomize_adapters(model, seed=2)
    save_adapter(model, tmp_path / "b.safetensors")
    load_adapter(model, tmp_path / "a.safetensors")
    ids, _ = tiny_batch(4)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        ya = compiled(ids)
        load_adapter(model, tmp_path / "b.safetensors")  # copies into the same tensors
        yb = compiled(ids)
        eager_b = model(ids)
    assert len(compiles) == 1, f"recompiled after the swap ({len(compiles)} compilations)"
    torch.testing.assert_close(yb, eager_b, atol=1e-6, rtol=0)
    assert (ya - yb).abs().max() > 1e-3


def test_unknown_adapter_name():
    """bad input: set_adapter (or use_adapter, delete_adapter) with a name the model does not hold"""
    model, _, _ = two_adapters()
    with pytest.raises(
        AdapterMismatchError, match=r"adapter 'nope' does not exist; the model holds \['default', 'other'\]"
    ):
        set_adapter(model, "nope")


def test_adapter_name_collision():
    """bad input: add_adapter with a name already in use"""
    model, _, _ = two_adapters()
    with pytest.raises(AdapterMismatchError, match="an adapter named 'other' already exists"):
        add_adapter(model, "other")


def test_adapter_name_with_a_dot():
    """bad input: an adapter name that cannot be a module or file key (a dot)"""
    model, _, _ = two_adapters()
    with pytest.raises(LoRAConfigError, match="is not valid"):
        add_adapter(model, "a.b")


def test_named_adapter_on_other_targets():
    """bad input: add_adapter whose targets differ from the model's adapters"""
    model, _, _ = two_adapters()
    with pytest.raises(AdapterMismatchError, match="adapt other modules than the model's adapters"):
        add_adapter(model, "kv", LoRAConfig(**(CFG | {"targets": ["k", "v"]})))


def test_named_adapter_without_the_models_modules_to_save():
    """bad input: add_adapter whose modules_to_save differ from the model's adapters"""
    model, _, _ = two_adapters()
    with pytest.raises(AdapterMismatchError, match="modules_to_save"):
        add_adapter(model, "nohead", LoRAConfig(r=2, targets=["q", "v"]))


def test_named_adapter_of_a_variant():
    """bad input: add_adapter with a variant (DoRA, VeRA, ...) as a named adapter"""
    model, _, _ = two_adapters()
    with pytest.raises(LoRAConfigError, match="named adapters are plain LoRA"):
        add_adapter(model, "dora", LoRAConfig(**(CFG | {"variant": "dora"})))


def test_linear_combination_of_different_ranks():
    """bad input: add_weighted_adapter(combination_type="linear") over adapters of different ranks"""
    model, _, _ = two_adapters()
    with pytest.raises(AdapterMismatchError, match="'linear' needs adapters of the same ranks"):
        add_weighted_adapter(model, ["default", "other"], [1, 1], "lin", combination_type="linear")


def test_svd_rank_larger_than_the_sum():
    """bad input: add_weighted_adapter(combination_type="svd") with svd_rank above the sum of the ranks"""
    model, _, _ = two_adapters()
    with pytest.raises(LoRAConfigError, match=r"svd_rank=99 does not fit"):
        add_weighted_adapter(model, ["default", "other"], [1, 1], "s", combination_type="svd", svd_rank=99)


def test_weights_and_adapters_of_different_lengths():
    """bad input: add_weighted_adapter with fewer weights than adapters"""
    model, _, _ = two_adapters()
    with pytest.raises(LoRAConfigError, match="2 adapters and 1 weights"):
        add_weighted_adapter(model, ["default", "other"], [1], "s")


def test_unknown_combination_type():
    """bad input: add_weighted_adapter with a combination type that neither this library nor PEFT has"""
    model, _, _ = two_adapters()
    with pytest.raises(LoRAConfigError, match="combination_type='average' is not one of"):
        add_weighted_adapter(model, ["default", "other"], [1, 1], "t", combination_type="average")


def test_pruning_merge_without_density():
    """bad input: add_weighted_adapter(combination_type="ties") without density="""
    model, _, _ = two_adapters()
    with pytest.raises(LoRAConfigError, match=r"combination_type='ties' needs density="):
        add_weighted_adapter(model, ["default", "other"], [1, 1], "t", combination_type="ties")


def test_pruning_merge_density_out_of_range():
    """bad input: add_weighted_adapter(combination_type="dare_linear", density=0)"""
    model, _, _ = two_adapters()
    with pytest.raises(LoRAConfigError, match=r"density=0 must be a number in \(0, 1\]"):
        add_weighted_adapter(model, ["default", "other"], [1, 1], "t", combination_type="dare_linear", density=0)


def test_pruning_merge_of_different_ranks():
    """bad input: add_weighted_adapter(combination_type="ties") over adapters of different ranks"""
    model, _, _ = two_adapters()
    with pytest.raises(AdapterMismatchError, match=r"'ties' needs adapters of the same ranks.*use 'ties_svd'"):
        add_weighted_adapter(model, ["default", "other"], [1, 1], "t", combination_type="ties", density=0.5)


def test_unknown_majority_sign_method():
    """bad input: add_weighted_adapter(combination_type="ties", majority_sign_method="sum")"""
    model, _, _ = two_adapters()
    with pytest.raises(LoRAConfigError, match=r"majority_sign_method='sum' is not 'total' or 'frequency'"):
        add_weighted_adapter(
            model, ["default", "other"], [1, 1], "t", combination_type="ties", density=0.5, majority_sign_method="sum"
        )


def test_combining_an_adapter_of_another_model():
    """bad input: add_weighted_adapter naming an adapter that lives on another model (another base)"""
    model, _, _ = two_adapters()
    with pytest.raises(AdapterMismatchError, match=r"adapter 'elsewhere' does not exist"):
        add_weighted_adapter(model, ["default", "elsewhere"], [1, 1], "mix")


def test_mixed_batch_with_the_wrong_number_of_names():
    """bad input: mixed_batch with fewer adapter names than samples"""
    model, ids, _ = two_adapters()
    with (
        pytest.raises(
            LoRAConfigError, match="mixed batch: 2 adapter names were given but a LoRA layer received 6 rows"
        ),
        mixed_batch(model, ["default", "other"]),
    ):
        model(ids)


def test_mixed_batch_with_an_unknown_name():
    """bad input: mixed_batch naming an adapter the model does not hold"""
    model, _, _ = two_adapters()
    with pytest.raises(AdapterMismatchError, match=r"unknown adapter name\(s\) \['x'\]"), mixed_batch(model, ["x"] * 6):
        pass


def test_switching_adapters_while_merged():
    """bad input: set_adapter while the active adapter is merged into the base"""
    model, _, _ = two_adapters()
    merge_lora(model)
    with pytest.raises(MergeStateError, match="set_adapter\\('other'\\): the active adapter is merged"):
        set_adapter(model, "other")


def test_deleting_the_only_adapter():
    """bad input: delete_adapter on the model's only adapter"""
    model, _, _ = two_adapters()
    delete_adapter(model, "other")
    with pytest.raises(AdapterMismatchError, match="it is the model's only adapter; call remove_lora"):
        delete_adapter(model, "default")
    assert list_adapters(model) == ["default"]
