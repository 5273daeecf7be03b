"""Bad inputs, one test per row of ``docs/bad_inputs.md``: what a new user might try, and the error.

Each test asserts the exception type and a key part of its message (the part that tells the user
what to fix), and, where a write or a load is involved, that nothing was overwritten or changed.
The first paragraph of each docstring (its lines joined) is the table's "input tried" column.

Regenerate the table from the real messages with::

    .venv/bin/python tests/test_bad_inputs.py > docs/bad_inputs.md
"""

from __future__ import annotations

import errno
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from conftest import LitTiny, adapted, assert_unchanged, randomize_adapters, snapshot, tiny_loader, tiny_model, trainer  # noqa: E402
from lora_lightning import (  # noqa: E402
    AdapterFileError,
    AdapterMismatchError,
    AlreadyInjectedError,
    BaseModelMismatchError,
    LoRACallback,
    LoRAConfig,
    LoRAConfigError,
    MergeStateError,
    NonFiniteError,
    NotInjectedError,
    RankTooLargeError,
    TargetNotFoundError,
    inject_lora,
    load_adapter,
    merge_lora,
    read_adapter,
    save_adapter,
    unmerge_lora,
)
from lora_lightning.record import base_fingerprint  # noqa: E402


# ----------------------------------------------------------------------------- configuration
def test_target_name_that_does_not_exist_lists_candidates(tmp_path):
    """`LoRACallback(targets=["query"])` on a model whose projections are called `q_proj`"""
    t = trainer(tmp_path, [LoRACallback(r=2, targets=["query"])], max_steps=1)
    model = LitTiny()
    before = snapshot(model)
    with pytest.raises(TargetNotFoundError, match=r"target 'query' matched no Linear module") as info:
        t.fit(model, tiny_loader())
    msg = str(info.value)
    assert "net.layers.{i}.self_attn.q_proj" in msg and "net.layers.{i}.mlp.down_proj" in msg  # candidates
    assert "Use an alias (q, k, v, o, mlp, embed, all-linear)" in msg
    assert_unchanged(model, before)


def test_target_naming_a_container_module_points_at_its_linear_children():
    """`targets=["self_attn"]`: a module that is not a Linear layer"""
    with pytest.raises(
        TargetNotFoundError, match=r"It matches \['layers.0.self_attn \(Attention\)'.*which are not layers LoRA adapts"
    ):
        inject_lora(tiny_model(), LoRAConfig(targets=["self_attn"], r=2))


def test_rank_zero():
    """`LoRACallback(r=0)`"""
    with pytest.raises(LoRAConfigError, match=r"r=0 is not a positive integer: LoRA needs a rank r >= 1"):
        LoRACallback(r=0)


def test_negative_rank():
    """`LoRAConfig(r=-4)`"""
    with pytest.raises(LoRAConfigError, match=r"r=-4 is not a positive integer"):
        LoRAConfig(r=-4)


def test_rank_larger_than_the_matrix(tmp_path):
    """`LoRACallback(r=32)` on 16x16 projections (r > min(d_in, d_out))"""
    model = LitTiny()
    before = snapshot(model)
    t = trainer(tmp_path, [LoRACallback(r=32, targets=["q", "v"])], max_steps=1)
    with pytest.raises(RankTooLargeError, match=r"r=32 is larger than min\(d_in, d_out\)=16 .*choose r <= 16"):
        t.fit(model, tiny_loader())
    assert_unchanged(model, before)  # checked before any layer was replaced


def test_alpha_zero():
    """`LoRAConfig(alpha=0)`"""
    with pytest.raises(LoRAConfigError, match=r"alpha=0 must be a positive number"):
        LoRAConfig(alpha=0)


def test_negative_alpha():
    """`LoRAConfig(alpha=-16)`"""
    with pytest.raises(LoRAConfigError, match=r"alpha=-16 must be a positive number"):
        LoRAConfig(alpha=-16)


def test_dropout_of_one():
    """`LoRAConfig(dropout=1.0)` (dropout must be in [0, 1))"""
    with pytest.raises(LoRAConfigError, match=r"dropout=1.0 is outside \[0, 1\)"):
        LoRAConfig(dropout=1.0)


def test_dropout_given_in_percent():
    """`LoRAConfig(dropout=5)` meaning 5 %"""
    with pytest.raises(LoRAConfigError, match=r"dropout=5 is outside \[0, 1\): set lora.dropout to a probability"):
        LoRAConfig(dropout=5)


def test_misspelled_option():
    """`LoRACallback(config={"rank": 8})` (the field is `r`)"""
    with pytest.raises(
        LoRAConfigError,
        match=r"unknown LoRA option\(s\) \['rank'\] \(use 'r' instead of 'rank'\); valid options are .*'r'",
    ):
        LoRACallback(config={"rank": 8})


def test_peft_option_names():
    """PEFT-style names: `LoRAConfig.from_dict({"lora_alpha": 32, "target_modules": ["q_proj"]})`"""
    with pytest.raises(
        LoRAConfigError,
        match=r"\(use 'alpha' instead of 'lora_alpha'; use 'targets' instead of 'target_modules'\)",
    ):
        LoRAConfig.from_dict({"r": 8, "lora_alpha": 32, "target_modules": ["q_proj"]})


# ----------------------------------------------------------------------------- adapter files
def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = adapted()
    return save_adapter(model, tmp_path / "a.safetensors"), model


def test_corrupt_adapter_file(tmp_path):
    """`load_adapter(model, "a.safetensors")` on a file with garbage bytes"""
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{garbage" + os.urandom(64))
    model = tiny_model()
    before = snapshot(model)
    with pytest.raises(AdapterFileError, match=r"is not a readable safetensors file \(truncated or corrupt\?\)"):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_truncated_adapter_file(tmp_path):
    """`load_adapter` on an adapter file cut short (interrupted copy/download)"""
    path, _ = _saved(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    model = tiny_model()
    with pytest.raises(AdapterFileError, match=r"truncated or corrupt\?.*Re-export the adapter"):
        load_adapter(model, path)
    assert not any(".lora_" in k for k in model.state_dict())


def test_missing_adapter_file(tmp_path):
    """`LoRACallback(init_adapter="adapter.safetensor")` (typo in the path)"""
    t = trainer(tmp_path, [LoRACallback(r=4, targets=["q", "v"], init_adapter=str(tmp_path / "adapter.safetensor"))])
    with pytest.raises(AdapterFileError, match=r"adapter.safetensor' does not exist; check the path"):
        t.fit(LitTiny(), tiny_loader())


def test_safetensors_file_that_is_not_an_adapter(tmp_path):
    """`load_adapter` on a full-model `model.safetensors` (not a LoRA adapter)"""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tiny_model().state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(AdapterFileError, match=r"is a safetensors file but not a lora_lightning adapter"):
        load_adapter(tiny_model(), tmp_path / "model.safetensors")


def test_adapter_for_another_architecture(tmp_path):
    """adapter trained on a d=16 model loaded into a d=32 model (other shapes)"""
    path, _ = _saved(tmp_path)
    wide = tiny_model(0, d=32)
    before = snapshot(wide)
    with pytest.raises(
        AdapterMismatchError,
        match=r"trained on a base with other adapted matrices: .*\[16, 16\] in adapter a.safetensors vs "
        r".*\[32, 32\] in model.*another architecture or model size",
    ):
        load_adapter(wide, path)
    assert_unchanged(wide, before)  # not even injected


def test_adapter_from_another_base_model(tmp_path):
    """adapter trained on base A loaded onto base B of the same architecture"""
    path, _ = _saved(tmp_path)
    other = tiny_model(seed=1)
    before = snapshot(other)
    with pytest.raises(
        BaseModelMismatchError,
        match=r"trained on different base weights: 39 of 51 base tensor\(s\) hold other values "
        r".*on_base_mismatch='warn'",
    ):
        load_adapter(other, path)
    assert_unchanged(other, before)


def test_adapter_from_another_base_model_with_warn(tmp_path):
    """the same with `on_base_mismatch="warn"`: loads, with a warning"""
    path, model = _saved(tmp_path)
    other = tiny_model(seed=1)
    with pytest.warns(UserWarning, match=r"trained on different base weights"):
        load_adapter(other, path, on_base_mismatch="warn")
    for k, v in model.state_dict().items():
        if ".lora_" in k:
            assert torch.equal(other.state_dict()[k], v)


def test_adapter_with_other_rank_into_an_injected_model(tmp_path):
    """`load_adapter` of an r=4 adapter into a model injected with r=2"""
    path, _ = _saved(tmp_path)
    model = tiny_model()
    inject_lora(model, LoRAConfig(r=2, targets=["q", "v"]))
    before = snapshot(model)
    with pytest.raises(AdapterMismatchError, match=r"r: 4 in adapter a.safetensors vs 2 in model"):
        load_adapter(model, path)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- Lightning checkpoints
def _checkpoint(tmp_path: Path, seed: int = 0, r: int = 2) -> Path:
    t = trainer(tmp_path / "first", [LoRACallback(r=r, targets=["q", "v"], verbose=False)], max_steps=1)
    t.fit(LitTiny(seed=seed), tiny_loader())
    t.save_checkpoint(tmp_path / "x.ckpt")
    return tmp_path / "x.ckpt"


def test_checkpoint_with_a_different_rank(tmp_path):
    """`trainer.fit(model, ckpt_path=...)` with `LoRACallback(r=8)` on an r=2 checkpoint"""
    ckpt = _checkpoint(tmp_path)
    model = LitTiny()
    t = trainer(tmp_path / "b", [LoRACallback(r=8, targets=["q", "v"])], max_steps=2)
    with pytest.raises(AdapterMismatchError, match=r"different LoRA config \(r: 2 in checkpoint vs 8 in model\)"):
        t.fit(model, tiny_loader(), ckpt_path=ckpt)


def test_checkpoint_with_other_targets(tmp_path):
    """resume a `targets=["q","v"]` checkpoint with `targets=["q","k"]`"""
    ckpt = _checkpoint(tmp_path)
    t = trainer(tmp_path / "b", [LoRACallback(r=2, targets=["q", "k"])], max_steps=2)
    with pytest.raises(AdapterMismatchError, match=r"targets: \['q', 'v'\] in checkpoint vs \['q', 'k'\] in model"):
        t.fit(LitTiny(), tiny_loader(), ckpt_path=ckpt)


def test_checkpoint_from_another_base_model(tmp_path):
    """resume an adapter-only checkpoint on a different base (`LitTiny(seed=1)`)"""
    ckpt = _checkpoint(tmp_path, seed=0)
    t = trainer(tmp_path / "b", [LoRACallback(r=2, targets=["q", "v"])], max_steps=2)
    with pytest.raises(BaseModelMismatchError, match=r"checkpoint was trained on different base weights"):
        t.fit(LitTiny(seed=1), tiny_loader(), ckpt_path=ckpt)


def test_checkpoint_from_another_base_model_with_ignore(tmp_path):
    """the same with `LoRACallback(on_base_mismatch="ignore")`: resumes silently"""
    import warnings

    ckpt = _checkpoint(tmp_path, seed=0)
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    model = LitTiny(seed=1)
    t = trainer(tmp_path / "b", [LoRACallback(r=2, targets=["q", "v"], on_base_mismatch="ignore")], max_steps=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*different base weights.*")
        t.fit(model, tiny_loader(), ckpt_path=ckpt)  # max_steps reached: restore only
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v)


def test_invalid_on_base_mismatch_value():
    """`LoRACallback(on_base_mismatch="skip")`"""
    with pytest.raises(LoRAConfigError, match=r"on_base_mismatch='skip' must be one of \('raise', 'warn', 'ignore'\)"):
        LoRACallback(on_base_mismatch="skip")


# ----------------------------------------------------------------------------- model state
def test_double_injection():
    """`inject_lora(model, cfg)` twice on the same model"""
    model = adapted()
    before = snapshot(model)
    with pytest.raises(AlreadyInjectedError, match=r"already has LoRA adapters on 6 module\(s\).*would stack adapters"):
        inject_lora(model, LoRAConfig(r=4, targets=["q", "v"]))
    assert_unchanged(model, before)


def test_merge_twice():
    """`merge_lora(model)` twice"""
    model = adapted()
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(MergeStateError, match=r"already merged .*merging again would add ΔW twice"):
        merge_lora(model)
    assert_unchanged(model, before)


def test_unmerge_when_not_merged():
    """`unmerge_lora(model)` on a model that was never merged"""
    model = adapted()
    before = snapshot(model)
    with pytest.raises(MergeStateError, match=r"are not merged .*nothing to unmerge"):
        unmerge_lora(model)
    assert_unchanged(model, before)


def test_merge_without_adapters():
    """`merge_lora(model)` on a model without adapters"""
    with pytest.raises(NotInjectedError, match=r"TinyTransformer has no LoRA adapters; call inject_lora"):
        merge_lora(tiny_model())


def test_load_adapter_into_merged_model(tmp_path):
    """`load_adapter` into a model whose adapters are merged"""
    path, _ = _saved(tmp_path)
    model = adapted(seed=0)
    merge_lora(model)
    before = snapshot(model)
    with pytest.raises(MergeStateError, match=r"adapters are merged .*Call unmerge_lora\(model\) first"):
        load_adapter(model, path)
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------- training
class LitNaNAtStep2(LitTiny):
    def training_step(self, batch, batch_idx):
        ids, y = batch
        loss = F.cross_entropy(self(ids), y)
        return loss * math.nan if self.global_step == 2 else loss


def test_nan_loss_stops_training_and_keeps_finite_checkpoints(tmp_path):
    """a loss that becomes NaN at step 2 (`check_finite=True`, the default)"""
    model = LitNaNAtStep2()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_last=True, save_top_k=-1)
    t = trainer(tmp_path, [LoRACallback(r=2, targets=["q", "v"]), ckpt], max_steps=5, enable_checkpointing=True)
    with pytest.raises(NonFiniteError, match=r"the training loss is nan at global step 2 .*stopped before backward"):
        t.fit(model, tiny_loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2  # the last good step; nothing NaN was ever written
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


class LitNormPenalty(LitTiny):
    """Adds ``1e-3 * ||B||`` as ``sqrt(sum(B**2))``: finite at B = 0, but its gradient there is 0/0 = NaN."""

    def training_step(self, batch, batch_idx):
        ids, y = batch
        penalty = sum(p.pow(2).sum().sqrt() for n, p in self.named_parameters() if n.endswith("lora_B"))
        return F.cross_entropy(self(ids), y) + 1e-3 * penalty


def test_nan_gradient_makes_adapters_non_finite(tmp_path):
    """a norm penalty `sqrt((B**2).sum())` on the zero-initialised B: finite loss, NaN gradient"""
    model = LitNormPenalty()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    t = trainer(tmp_path, [LoRACallback(r=2, targets=["q", "v"]), ckpt], max_steps=5, enable_checkpointing=True)
    with pytest.raises(
        NonFiniteError,
        match=r"NaN/inf after global step 1 .*6 tensor\(s\), e.g. \['net.layers.0.self_attn.q_proj.lora_B'"
        r".*NaN gradient.*detect_anomaly=True",
    ):
        t.fit(model, tiny_loader())
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # the NaN step was never checkpointed


# ----------------------------------------------------------------------------- nothing overwritten
def test_save_adapter_of_a_model_without_adapters_keeps_the_old_file(tmp_path):
    """`save_adapter(plain_model, "a.safetensors")` over an existing adapter"""
    path, _ = _saved(tmp_path)
    old = path.read_bytes()
    with pytest.raises(NotInjectedError, match=r"has no LoRA adapters"):
        save_adapter(tiny_model(), path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_disk_full_during_save_keeps_the_old_file(tmp_path):
    """`save_adapter` when the disk fills up mid-write (ENOSPC)"""
    path, model = _saved(tmp_path)
    old = path.read_bytes()
    randomize_adapters(model, seed=9)  # new contents that would differ
    real_fsync = os.fsync

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match=r"No space left on device") as info:
            save_adapter(model, path)
    assert "the previous file there (if any) is unchanged" in " ".join(info.value.__notes__)
    assert os.fsync is real_fsync
    assert path.read_bytes() == old
    assert len(read_adapter(path)[0]) == 2 * 2 * 3  # still a valid adapter
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # temp file removed


def test_trainer_checkpoint_failure_keeps_the_previous_checkpoint(tmp_path):
    """`trainer.save_checkpoint("x.ckpt")` failing half-way (disk full) over an existing checkpoint"""
    ckpt = _checkpoint(tmp_path)
    old = ckpt.read_bytes()
    model = LitTiny()
    t = trainer(tmp_path / "b", [LoRACallback(r=2, targets=["q", "v"], verbose=False)], max_steps=3)
    t.fit(model, tiny_loader())

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match=r"No space left on device"):
            t.save_checkpoint(ckpt)
    assert ckpt.read_bytes() == old
    assert torch.load(ckpt, weights_only=False)["global_step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ----------------------------------------------------------------------------- fingerprint recording
def test_fingerprint_is_recorded_at_injection_and_survives_merge(tmp_path):
    """(not a table row) adapter files and checkpoints carry the base fingerprint of the unmerged base"""
    import json

    base = tiny_model(0)
    names = [f"layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qv"]
    expected = base_fingerprint(base, names)
    assert expected["shapes"] == [[16, 16]] * 6 and len(expected["samples"]) == 6
    first = base.layers[0].self_attn.q_proj.weight.detach().reshape(-1)
    assert expected["samples"][0][0] == float(first[0]) and expected["samples"][0][-1] == float(first[-1])
    model = adapted(seed=0)
    merge_lora(model)  # W0 now holds W0 + ΔW: the fingerprint must still be the original base's
    path = save_adapter(model, tmp_path / "m.safetensors")
    _, meta = read_adapter(path)
    assert json.loads(meta["lora_record"])["fingerprint"] == expected
    load_adapter(tiny_model(0), path)  # loads onto the original base without complaint
    # one weight value changed, adapted matrix or not -> refused
    for where in ("layers.0.self_attn.q_proj.weight", "layers.2.mlp.up_proj.weight", "layers.1.ln1.bias"):
        changed = tiny_model(0)
        with torch.no_grad():
            changed.get_parameter(where).view(-1)[3] += 1e-6
        with pytest.raises(
            BaseModelMismatchError, match=rf"1 of 51 base tensor\(s\) hold other values \(e.g. {where}\)"
        ):
            load_adapter(changed, path)
    ckpt = torch.load(_checkpoint(tmp_path), weights_only=False)
    assert ckpt["lora_lightning"]["fingerprint"] == base_fingerprint(LitTiny(seed=0), [f"net.{n}" for n in names])


# ----------------------------------------------------------------------------- table generator
def _table() -> str:
    """Run every test, recording the message each pytest.raises/warns caught."""
    import inspect
    import tempfile
    import warnings

    records: list[str] = []
    real_raises, real_warns = pytest.raises, pytest.warns

    class Recorder:
        def __init__(self, ctx, warn: bool) -> None:
            self.ctx, self.warn = ctx, warn

        def __enter__(self):
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            result = self.ctx.__exit__(*exc)
            if self.warn:
                w = self.info[0]
                records.append(f"{w.category.__name__}: {w.message}")
            else:
                notes = " ".join(getattr(self.info.value, "__notes__", []))
                records.append(f"{self.info.type.__name__}: {self.info.value}" + (f" [note: {notes}]" if notes else ""))
            return result

    pytest.raises = lambda *a, **k: Recorder(real_raises(*a, **k), False)
    pytest.warns = lambda *a, **k: Recorder(real_warns(*a, **k), True)
    rows = []
    warnings.simplefilter("ignore")
    import test_embedding_conv
    import test_lifecycle
    import test_loraplus
    import test_multi_adapter_fit
    import test_named_adapters

    lifecycle = [
        (n, f)
        for module in (test_lifecycle, test_embedding_conv, test_loraplus, test_named_adapters, test_multi_adapter_fit)
        for n, f in vars(module).items()
        if (inspect.getdoc(f) or "").startswith("bad input: ")
    ]
    try:
        for name, fn in [*globals().items(), *lifecycle]:
            if not name.startswith("test_") or not callable(fn):
                continue
            doc = (inspect.getdoc(fn) or "").removeprefix("bad input: ")
            if doc.startswith("(not a table row)"):
                continue
            records.clear()
            params = inspect.signature(fn).parameters
            with tempfile.TemporaryDirectory() as tmp:
                fn(**({"tmp_path": Path(tmp)} if "tmp_path" in params else {}))
                message = (
                    records[-1].replace(tmp + os.sep, "").replace(tmp, "out")
                    if records
                    else "(no error, no warning: it loads)"
                )
            rows.append((" ".join(doc.split("\n\n")[0].split()), message, name))
    finally:
        pytest.raises, pytest.warns = real_raises, real_warns

    def short(text: str, limit: int = 260) -> str:
        text = " ".join(text.split()).replace("|", "\\|")
        return text if len(text) <= limit else text[: limit - 1] + "…"

    out = [
        "# Bad inputs: what you see",
        "",
        "Every row is a test in `tests/test_bad_inputs.py` (or `test_lifecycle.py`, `test_embedding_conv.py`, "
        "`test_loraplus.py`, `test_named_adapters.py`, `test_multi_adapter_fit.py`) that",
        "asserts the exception type and the key part of the message (and, where a file or model is involved, that",
        "nothing was overwritten or changed). The messages below",
        "are the real ones, shortened; regenerate with `.venv/bin/python tests/test_bad_inputs.py > "
        "docs/bad_inputs.md`.",
        "Every exception derives from `lora_lightning.LoRAError` (and from the matching built-in: `ValueError`,",
        "`RuntimeError`, `OSError` or `FloatingPointError`).",
        "",
        "| input tried | what the user sees | test |",
        "| --- | --- | --- |",
    ]
    out += [f"| {short(a, 200)} | {short(b)} | `{c}` |" for a, b, c in rows]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    sys.stdout.write(_table())
