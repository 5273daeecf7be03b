"""The battery's operation for issue 37, item 3: trainable tokens (``trainable_token_indices``, PEFT's option).

Each case's model gets a token embedding ``tok`` (10 x 8, ``padding_idx=0``) and an output head ``tok_head`` holding
the same weight (tied, as GPT-2's ``lm_head``); the case's config trains rows 3 and 9 of ``tok`` beside the case's
adapters. Checked against a hand formula in float64 (the table with the rows written in, looked up and multiplied by
its transpose): bit-equal outputs at injection, outputs after training-like changes, gradients only in the rows (the
table gets none), merge writes the rows and unmerge puts the table back bit for bit, merge_and_unload leaves plain
modules, merged_state_dict, an adapter file holding only the 2 rows and their indices that loads onto a base whose
rows 3 and 9 were drawn anew, named adapters each training their own rows (and disable_adapter), PEFT both ways
(``peft.PeftModel`` ties ``tok_head`` to ``tok`` as for a transformers model). Naming the case's own adapted embedding
is refused in one line, nothing changed.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lora_lightning import (
    add_adapter,
    disable_adapter,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    load_adapter,
    merge_and_unload,
    merge_lora,
    merged_state_dict,
    read_adapter,
    save_adapter,
    unmerge_lora,
    use_adapter,
)
from lora_lightning.tokens import TrainableTokens, token_modules

from .cases import Case, Net, inputs, randomize
from .operations import (
    Refused,
    _plain_lora,
    _x64,
    close,
    inject_refusal,
    named_refusal,
    operation,
    out,
    peft_refusal,
    refused_as_expected,
)
from .references import reference_model

VOCAB, DIM, ROWS = 10, 8, [3, 9]
IDS = torch.tensor([[3, 1, 9, 0], [9, 9, 2, 3]])


@dataclass
class _TiedConfig:
    """What PEFT reads to tie an output head to the input embedding (a transformers model's config)."""

    tie_word_embeddings: bool = True
    model_type: str = "custom"


class TokNet(Net):
    """The case's :class:`Net` plus ``tok`` and the tied ``tok_head``; ``forward(x)`` is the case's, ``forward(x,
    ids)`` the token path ``tok_head(tok(ids))``."""

    _tied_weights_keys = {"tok_head.weight": "tok.weight"}  # noqa: RUF012 - transformers' class attribute

    def __init__(self, case: Case, seed: int = 0, token_seed: int = 100) -> None:
        super().__init__(case, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(token_seed)
            self.tok = nn.Embedding(VOCAB, DIM, padding_idx=0)
            self.tok_head = nn.Linear(DIM, VOCAB, bias=False)
        self.tok_head.weight = self.tok.weight
        self.config = _TiedConfig()

    def get_input_embeddings(self) -> nn.Module:
        return self.tok

    def forward(self, x: Tensor, ids: Tensor | None = None) -> Tensor:  # type: ignore[override]
        if ids is None:
            return super().forward(x)
        return self.tok_head(self.tok(ids))


def toks(model: nn.Module) -> Tensor:
    with torch.no_grad():
        return model(None, IDS)


def by_hand(model: nn.Module) -> Tensor:
    """``tok_head(tok(ids))`` in float64 from the base table with the trained rows written in."""
    holder = token_modules(model)["tok"]
    table = holder.original_weight().double().index_copy(0, holder.token_indices, holder.token_rows.detach().double())
    return table[IDS] @ table.T


def config(case: Case, **tokens: list[int]):  # noqa: ANN201
    return case.config(trainable_token_indices=tokens or {"tok": list(ROWS)})


@operation(
    "trainable_tokens",
    "trainable_token_indices={'tok': [3, 9]} beside the case's adapters, on an embedding whose output head is tied to "
    "it: outputs bit-equal at injection, then equal to the table with the rows written in (by hand, float64); only the "
    "rows get gradients; merge writes them, unmerge restores the table bit for bit, merge_and_unload and "
    "merged_state_dict give plain modules; the adapter file holds the 2 rows and indices and loads onto a base with "
    "those rows drawn anew; named adapters train their own rows; PEFT both ways; tokens on the case's adapted "
    "embedding refused",
    inject_refusal,
)
def op_trainable_tokens(case: Case) -> None:
    model = TokNet(case).eval()
    x = inputs(case)
    base_tokens = toks(model)
    refused_as_expected(model, lambda: inject_lora(model, config(case)), inject_refusal(case))
    assert isinstance(model.tok, TrainableTokens) and isinstance(model.tok_head, TrainableTokens)
    assert torch.equal(toks(model), base_tokens), "the token path changed at injection"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "tok.token_rows" in trainable and not any(n.startswith(("tok.weight", "tok_head")) for n in trainable)
    randomize(model)
    table = model.tok.weight.detach().clone()
    with torch.no_grad():
        model.tok.token_rows.copy_(torch.randn(len(ROWS), DIM, generator=torch.Generator().manual_seed(7)))
    y, y_tok = out(model, x), toks(model)
    close(y, out(reference_model(case, model), _x64(x)), "the case's outputs beside trainable tokens")
    close(y_tok, by_hand(model), "token path vs the table with the rows written in")
    # gradients: the rows only (none for the table, none for rows no token id used)
    model.train()
    model.zero_grad(set_to_none=True)
    model(None, torch.tensor([[3, 1]])).pow(2).sum().backward()
    assert model.tok.weight.grad is None, "the frozen table got a gradient"
    grad = model.tok.token_rows.grad
    assert grad is not None and grad[0].abs().sum() > 0, "row 3 got no gradient"
    model.zero_grad(set_to_none=True)
    model.eval()
    # merging
    merge_lora(model)
    assert torch.equal(model.tok.weight[ROWS], model.tok.token_rows.detach()), "merge did not write the rows"
    close(toks(model), y_tok, "merged token path")
    close(out(model, x), y, "merged")
    unmerge_lora(model)
    assert torch.equal(model.tok.weight, table), "unmerge did not restore the table bit for bit"
    plain = TokNet(case, seed=7).eval()
    plain.load_state_dict(merged_state_dict(model))
    close(toks(plain), y_tok, "merged_state_dict token path")
    # the adapter file: the rows and their indices only; a base whose rows 3 and 9 were drawn anew takes it
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(model, Path(tmp) / "a.safetensors")
        saved = {k: v for k, v in read_adapter(path)[0].items() if k.startswith(("tok.", "tok_head."))}
        assert {k: tuple(v.shape) for k, v in saved.items()} == {
            "tok.token_rows": (len(ROWS), DIM),
            "tok.token_indices": (len(ROWS),),
        }, f"the adapter file holds {sorted(saved)}"
        fresh = TokNet(case).eval()
        with torch.no_grad():
            fresh.tok.weight[ROWS] = torch.randn(len(ROWS), DIM)
        load_adapter(fresh, path)
        # (the tied head adds the rows' change to the base logits: equal up to round-off)
        close(toks(fresh), y_tok, "the adapter on a base with rows 3 and 9 drawn anew", rtol=1e-6, atol=1e-6)
    _named(case, model, y_tok, base_tokens)
    _peft(case, model, x, y, y_tok)
    _refused_on_adapted_embedding(case)
    merge_and_unload(model)
    assert not any(isinstance(m, TrainableTokens) for m in model.modules()), "merge_and_unload left token modules"
    assert type(model.tok) is nn.Embedding and type(model.tok_head) is nn.Linear
    close(toks(model), y_tok, "merge_and_unload token path")


def _named(case: Case, model: nn.Module, y_tok: Tensor, base_tokens: Tensor) -> None:
    """Adapter ``b`` trains rows [2, 5, 9]: its rows start as the table's, change on their own, and ``default``'s
    are untouched; disable_adapter gives the base (plain LoRA only: other variants refuse named adapters)."""
    if not _plain_lora(case):
        with contextlib.suppress(Refused):
            refused_as_expected(
                model, lambda: add_adapter(model, "b", config(case, tok=[2, 5, 9])), named_refusal(case)
            )
        return
    add_adapter(model, "b", {"r": 1, "trainable_token_indices": {"tok": [2, 5, 9]}})
    with use_adapter(model, "b"):
        assert model.tok.token_indices.tolist() == [2, 5, 9]
        assert torch.equal(model.tok.token_rows.detach(), model.tok.weight.detach()[[2, 5, 9]])
        with torch.no_grad():
            model.tok.token_rows.add_(1.0)
        close(toks(model), by_hand(model), "adapter b's token path")
    assert torch.equal(toks(model), y_tok), "adapter b changed the default adapter's rows"
    with disable_adapter(model):
        assert torch.equal(toks(model), base_tokens), "disable_adapter did not give the base token path"


def _peft(case: Case, model: nn.Module, x: Tensor, y: Tensor, y_tok: Tensor) -> None:
    import peft

    with tempfile.TemporaryDirectory() as tmp:
        if peft_refusal(case) is not None:
            with contextlib.suppress(Refused):
                refused_as_expected(model, lambda: export_peft_adapter(model, tmp), peft_refusal(case))
            return
        export_peft_adapter(model, tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(TokNet(case).eval(), tmp).eval()
        close(out(theirs, x), y, "in PEFT", rtol=1e-5, atol=1e-5)
        close(toks(theirs), y_tok, "token path in PEFT", rtol=1e-5, atol=1e-5)
        ours = TokNet(case).eval()
        import_peft_adapter(ours, tmp)
        close(toks(ours), y_tok, "token path imported back", rtol=1e-6, atol=1e-6)
        close(out(ours, x), y, "imported back", rtol=1e-6, atol=1e-6)


def _refused_on_adapted_embedding(case: Case) -> None:
    """Rows of an embedding LoRA adapts as a whole: refused in one line before anything changes."""
    if case.example.kind != "embedding" or case.topology != "plain":
        return
    fresh = TokNet(case).eval()
    name = f"first.{case.example.attr}"
    with contextlib.suppress(Refused):
        refused_as_expected(
            fresh, lambda: inject_lora(fresh, config(case, **{name: [1]})), r"adapted by LoRA targets and named by"
        )
