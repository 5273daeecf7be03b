"""LoRA on MoE experts (``target_parameters``, PEFT's option): transformers 5.x holds the experts of Mixtral, Qwen2-MoE
and GPT-OSS as 3-D parameters (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``), which these tests adapt on
tiny random configs built here (no downloads).

What is checked: the layout (one adapter of rank ``r`` per expert, Mixtral's and Qwen2-MoE's ``[E, d_out, d_in]``
and GPT-OSS's transposed ``[E, d_in, d_out]``), outputs bit-equal to the base at injection, the forward and the
merged weights against ``W0[e] + s·B_e·A_e`` by hand in float64, PEFT 0.21.2 both ways (our export loaded by
``PeftModel``; PEFT's own adapter imported), adapter files, state-dict keys, named adapters, a Lightning fit with
``LoRACallback``, and the one-line refusals of what cannot work.
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import LoRACallback, pl
from lora_lightning import (
    LoRAConfig,
    LoRAError,
    add_adapter,
    add_weighted_adapter,
    disable_adapter,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    mixed_batch,
    save_adapter,
    set_adapter,
    unmerge_lora,
    use_adapter,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EXPERTS, R, ALPHA, VOCAB = 4, 2, 4.0, 64
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
FAMILIES = ("mixtral", "qwen2_moe", "gpt_oss")


def tiny_moe(family: str = "mixtral", seed: int = 0, experts_implementation: str | None = None) -> nn.Module:
    """A randomly initialised 2-layer causal LM of ``family`` (hidden 32, 4 experts, top-2), in eval mode."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    if experts_implementation is not None:
        common["experts_implementation"] = experts_implementation
    if family == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=24, num_local_experts=EXPERTS, **common)
        cls = transformers.MixtralForCausalLM
    elif family == "qwen2_moe":
        config = transformers.Qwen2MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=32,
            num_experts=EXPERTS,
            **common,
        )
        cls = transformers.Qwen2MoeForCausalLM
    else:
        config = transformers.GptOssConfig(
            intermediate_size=24,
            num_local_experts=EXPERTS,
            head_dim=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **common,
        )
        cls = transformers.GptOssForCausalLM
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = cls(config).eval()
        with torch.no_grad():  # GPT-OSS starts its expert biases at zero: give them values too
            for name, p in model.named_parameters():
                if "experts" in name:
                    p.normal_(0.0, 0.1)
    return model


def tokens(seed: int = 1, n: int = 2, t: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def randomize(model: nn.Module, seed: int = 3, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def adapted(family: str = "mixtral", **kw) -> nn.Module:
    model = tiny_moe(family)
    inject_lora(model, LoRAConfig(**(dict(r=R, alpha=ALPHA, targets=[], target_parameters=TARGETS) | kw)))
    randomize(model)
    return model


def per_expert_delta(layer: nn.Module, transposed: bool) -> torch.Tensor:
    """``s·B_e·A_e`` for every expert from the raw tensors, in float64, in the stored layout: the hand formula."""
    A = layer.lora_A.detach().double().reshape(EXPERTS, R, -1)  # rows e·r .. e·r + r - 1 are A_e
    B = layer.lora_B.detach().double().reshape(EXPERTS, -1, R)  # rows e·d_out .. are B_e
    delta = torch.einsum("eor,eri->eoi", B, A) * layer.scaling
    return delta.transpose(1, 2) if transposed else delta


def hand_model(family: str, model: nn.Module) -> nn.Module:
    """The plain base in float64 (eager experts) with every adapted expert stack set to ``W0 + s·B·A`` by hand."""
    plain = tiny_moe(family, experts_implementation="eager").double()
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            owner = plain.get_submodule(name.rpartition(".")[0])
            param = plain.get_parameter(name)
            param.add_(per_expert_delta(layer, bool(getattr(owner, "is_transposed", False))))
    return plain


# --------------------------------------------------------------------------- layout and forward
@pytest.mark.parametrize("family", FAMILIES)
def test_each_expert_gets_its_own_adapter_in_transformers_layout(family):
    model = tiny_moe(family)
    keys = list(model.state_dict())
    specs = inject_lora(model, LoRAConfig(r=R, alpha=ALPHA, targets=[], target_parameters=TARGETS))
    hidden, inter = 32, 24
    shapes = {"gate_up_proj": (2 * inter, hidden), "down_proj": (hidden, inter)}  # d_out x d_in of one expert
    assert len(specs) == 4
    for spec in specs:
        d_out, d_in = shapes[spec.name.rpartition(".")[2]]
        assert (spec.kind, spec.d_out, spec.d_in, len(spec.parts)) == ("experts", EXPERTS * d_out, d_in, EXPERTS)
        assert spec.num_params == EXPERTS * R * (d_in + d_out)  # PEFT's lora_A (r·E x d_in) + lora_B (d_out x r·E)
        layer = lora_layers(model)[spec.name]
        assert layer.lora_A.shape == (EXPERTS * R, d_in) and layer.lora_B.shape == (EXPERTS * d_out, R)
        assert layer.is_transposed == (family == "gpt_oss")
    stored = model.model.layers[0].mlp.experts.state_dict()
    assert stored["gate_up_proj"].shape == ((EXPERTS, hidden, 2 * inter) if family == "gpt_oss" else (4, 48, 32))
    now = list(model.state_dict())
    assert [k for k in now if ".lora_" not in k] == [k for k in keys if k in now] and set(keys) <= set(now)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{s.name}.{leaf}" for s in specs for leaf in ("lora_A", "lora_B")
    }


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", [None, "eager"])
def test_outputs_are_bit_equal_to_the_base_right_after_injection(family, impl):
    model, x = tiny_moe(family, experts_implementation=impl), tokens()
    base = logits(model, x)
    inject_lora(model, LoRAConfig(r=R, targets=[], target_parameters=TARGETS))
    assert torch.equal(logits(model, x), base)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_is_w0_plus_s_b_a_per_expert_by_hand_in_float64(family):
    model, x = adapted(family), tokens()
    y = logits(model, x)
    assert (y - logits(tiny_moe(family), x)).abs().max() > 1e-2  # the adapters do change the outputs
    torch.testing.assert_close(y.double(), logits(hand_model(family, model), x), rtol=1e-5, atol=1e-5)
    model.train()
    model(x).logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_is_exact_and_unmerge_gives_the_base_back(family):
    model, x = adapted(family), tokens()
    y = logits(model, x)
    before = {n: model.get_parameter(f"{n}.weight").detach().clone() for n in lora_layers(model)}
    merge_lora(model)
    torch.testing.assert_close(logits(model, x), y, rtol=1e-5, atol=1e-5)
    for name, layer in lora_layers(model).items():  # merged weights: W0 + s·ΔW per expert, against float64
        expected = before[name].double() + per_expert_delta(layer, family == "gpt_oss")
        torch.testing.assert_close(layer.weight.double(), expected, rtol=0, atol=1e-6)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.weight, before[name], rtol=0, atol=1e-6)
    fresh = tiny_moe(family)
    fresh.load_state_dict(merged_state_dict(model))  # strict: the base's keys exactly
    torch.testing.assert_close(logits(fresh, x), y, rtol=1e-5, atol=1e-5)
    keys = list(fresh.state_dict())
    merged = merge_and_unload(model)
    assert not lora_layers(merged) and list(merged.state_dict()) == keys  # parameter order too
    torch.testing.assert_close(logits(merged, x), y, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- PEFT
def _peft_model(family: str, directory) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(tiny_moe(family), str(directory)).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rslora", [False, True])
def test_our_adapter_in_peft_gives_our_outputs_and_merged_weights(family, rslora, tmp_path):
    targets = TARGETS + (["mlp.gate.weight"] if family != "gpt_oss" else [])  # a 2-D router weight too
    model, x = adapted(family, target_parameters=targets, targets=["q_proj"], use_rslora=rslora), tokens()
    y = logits(model, x)
    export_peft_adapter(model, tmp_path)
    theirs = _peft_model(family, tmp_path)
    forward = (logits(theirs, x) - y).abs().max().item()
    assert forward <= 1e-5, f"PEFT forward differs by {forward:.3g}"
    mine, peft_merged = merge_and_unload(model).state_dict(), theirs.merge_and_unload().state_dict()
    assert mine.keys() == peft_merged.keys()
    merged = max((mine[k] - peft_merged[k]).abs().max().item() for k in mine)
    assert merged <= 1e-6, f"merged weights differ from PEFT's by {merged:.3g}"
    print(f"{family} rslora={rslora}: max |ours - PEFT| forward {forward:.3g}, merged weights {merged:.3g}")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_peft_adapter_imports_with_peft_outputs_and_exports_back_bit_equal(family, tmp_path):
    config = peft.LoraConfig(
        r=3,
        lora_alpha=6,
        target_modules=[],
        target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"],  # any order: PEFT nests by module
        rank_pattern={"model.layers.1.mlp.experts.down_proj": 2},
        init_lora_weights=False,  # random B: a trained-looking adapter
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(4)
        theirs = peft.get_peft_model(tiny_moe(family), config).eval()
    x = tokens()
    y = logits(theirs, x)
    theirs.save_pretrained(tmp_path / "peft")
    ours = tiny_moe(family)
    imported = import_peft_adapter(ours, tmp_path / "peft")
    assert imported.targets == [] and len(imported.target_parameters) == 4
    assert lora_layers(ours)["model.layers.1.mlp.experts.down_proj"].r == 2
    diff = (logits(ours, x) - y).abs().max().item()
    assert diff <= 1e-5, f"imported adapter differs from PEFT's by {diff:.3g}"
    export_peft_adapter(ours, tmp_path / "back")
    from safetensors.torch import load_file

    original = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    back = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert original.keys() == back.keys()  # PEFT's nesting: gate_up_proj (registered first) under base_layer
    assert any(k.endswith("mlp.experts.base_layer.lora_A.weight") for k in back)
    for k, v in original.items():
        assert torch.equal(back[k], v), k


def test_peft_keys_and_nesting_equal_peft_s_own(tmp_path):
    model = adapted("gpt_oss", target_parameters=list(reversed(TARGETS)))
    export_peft_adapter(model, tmp_path)
    from safetensors.torch import load_file

    ours = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tiny_moe("gpt_oss"), config)
    expected = {
        k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items() if ".lora_" in k
    }  # base_model.model.<...>.lora_A.weight
    assert ours == expected


# --------------------------------------------------------------------------- files, copies, named adapters
def test_adapter_files_state_dict_and_copies(tmp_path):
    model, x = adapted(), tokens()
    y = logits(model, x)
    fresh = tiny_moe()
    load_adapter(fresh, save_adapter(model, tmp_path / "a.safetensors"))
    assert torch.equal(logits(fresh, x), y)
    other = tiny_moe()
    inject_lora(other, LoRAConfig(r=R, alpha=ALPHA, targets=[], target_parameters=TARGETS))
    other.load_state_dict(model.state_dict())  # strict: base keys as before, adapter keys below each parameter
    assert torch.equal(logits(other, x), y)
    assert torch.equal(logits(copy.deepcopy(model), x), y)
    assert torch.equal(logits(pickle.loads(pickle.dumps(model)), x), y)


def test_named_adapters_switch_disable_and_combine():
    model, x = adapted(), tokens()
    y = logits(model, x)
    with disable_adapter(model):
        assert torch.equal(logits(model, x), logits(tiny_moe(), x))
    add_adapter(model, "b", {"r": 1})
    with use_adapter(model, "b"):
        randomize(model, seed=9)
        y_b = logits(model, x)
    assert torch.equal(logits(model, x), y) and not torch.allclose(y_b, y)
    add_weighted_adapter(model, ["default", "b"], [0.7, -0.4], "w", combination_type="cat")
    deltas = {}
    for name in ("default", "b", "w"):
        with use_adapter(model, name):
            deltas[name] = {n: layer.delta_weight(torch.float64) for n, layer in lora_layers(model).items()}
    for n in deltas["w"]:
        torch.testing.assert_close(deltas["w"][n], 0.7 * deltas["default"][n] - 0.4 * deltas["b"][n])
    set_adapter(model, "b")
    assert torch.equal(logits(model, x), y_b)


# --------------------------------------------------------------------------- Lightning
class LitMoE(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_moe()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids).logits

    def training_step(self, batch, batch_idx):
        ids = batch[0]
        out = self(ids)
        return F.cross_entropy(out[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_lora_callback_fits_the_experts_and_reloads_from_the_checkpoint(tmp_path):
    lit = LitMoE()
    base = {k: v.clone() for k, v in lit.state_dict().items()}
    ids = torch.cat([tokens(seed) for seed in range(4)])
    callback = LoRACallback(r=R, alpha=ALPHA, targets=[], target_parameters=TARGETS, verbose=False)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(lit, DataLoader(TensorDataset(ids), batch_size=2))
    state = lit.state_dict()
    for k, v in base.items():  # every base tensor untouched, the experts' 3-D weights under their own keys
        assert torch.equal(state[k], v), k
    trained = [k for k in state if ".lora_B" in k]
    assert len(trained) == 4 and all(state[k].abs().sum() > 0 for k in trained)
    x = tokens(7)
    y = logits(lit.net, x)
    trainer.save_checkpoint(tmp_path / "moe.ckpt")
    loaded = LitMoE.load_from_checkpoint(tmp_path / "moe.ckpt").eval()
    assert torch.equal(logits(loaded.net, x), y)


# --------------------------------------------------------------------------- refusals
def _refused(model: nn.Module, call, pattern: str) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(LoRAError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and re.search(pattern, message), message
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"dropout": 0.1}, r"dropout=0\.1 cannot apply to .*experts\.(gate_up|down)_proj.*PEFT refuses it too"),
        ({"variant": "dora"}, r"adapts whole nn\.Linear layers only"),
        ({"variant": "vera", "vera_seed": 1}, r"adapts whole nn\.Linear layers only"),
        ({"quantize_base": "int8"}, r"stores nn\.Linear weights only"),
        ({"target_parameters": ["experts.nothing"]}, r"'experts\.nothing' matched no parameter .*\.gate_up_proj"),
        ({"target_parameters": ["post_attention_layernorm.weight"]}, r"a parameter of shape \(32,\); LoRA adapts"),
        (
            {"targets": ["q_proj"], "target_parameters": ["self_attn.q_proj.weight"]},
            r"q_proj\.weight is a parameter of .*q_proj, which targets adapt as a module too",
        ),
    ],
)
def test_what_cannot_work_is_refused_in_one_line_before_any_change(options, pattern):
    model = tiny_moe()
    config = dict(r=R, targets=[], target_parameters=TARGETS) | options
    _refused(model, lambda: inject_lora(model, LoRAConfig(**config)), pattern)


def test_targets_may_be_empty_only_with_target_parameters():
    with pytest.raises(LoRAError, match=r"targets=\[\] must be a non-empty list .*target_parameters"):
        LoRAConfig(targets=[])
    assert LoRAConfig(targets=[], target_parameters=TARGETS).target_parameters == TARGETS


def test_mixed_batches_and_two_targets_on_one_tensor_are_refused():
    model, x = adapted(), tokens()
    add_adapter(model, "b")

    def routed():
        with mixed_batch(model, ["b", None]):
            return logits(model, x)

    _refused(model, routed, r"mixed_batch routes Linear and GPT-2 Conv1D LoRA layers")
    shared = tiny_moe()
    layers = shared.model.layers
    layers[1].mlp.experts.gate_up_proj = layers[0].mlp.experts.gate_up_proj  # one tensor, two modules
    config = LoRAConfig(targets=[], target_parameters=TARGETS)
    _refused(shared, lambda: inject_lora(shared, config), r"hold one weight .* would add two updates")
