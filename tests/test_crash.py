"""Crash safety: a training process SIGKILLed in the middle of writing a checkpoint leaves every file
under a final name complete, and the newest complete checkpoint resumes.

The child (this file run as a script) trains ``LitTiny`` with ``LoRACallback`` and writes a lot:
``ModelCheckpoint(every_n_train_steps=1, save_top_k=-1, save_last=True)`` (``last.ckpt`` is
overwritten every step) plus two adapter exports per step (``step{N}.safetensors`` and an
overwritten ``latest.safetensors``). Its ``lora_lightning.adapter_io.os`` is swapped for a proxy
that writes every file in 1 KiB chunks with a pause between them, and that, on the ``--hang-nth``-th
write of ``last.ckpt``, writes half the bytes, drops a ``HANG`` marker and stalls: the parent then
SIGKILLs it, deterministically mid-write, while the real ``atomic_write_bytes`` (temp file, fsync,
rename, directory fsync) is the code under test.
"""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

LORA = dict(r=2, targets=["q", "v"])
HANG_NTH = 3  # the 3rd write of last.ckpt (global step 3) is killed half-way


# ----------------------------------------------------------------------------- the child process
class _SlowFile:
    """A file object whose ``write`` goes out in 1 KiB chunks with a pause; may stall half-way."""

    def __init__(self, fh, hang: bool, marker: Path) -> None:
        self.fh, self.hang, self.marker = fh, hang, marker

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        half = len(view) // 2
        for start in range(0, len(view), 1024):
            if self.hang and start >= half:
                self.fh.flush()  # the half-written temp file is visible on disk
                self.marker.write_text(str(len(view)))
                time.sleep(120)  # killed here
            self.fh.write(view[start : start + 1024])
            time.sleep(0.0005)
        return len(view)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.fh.__exit__(*exc)


class _SlowOs:
    """Stands in for ``os`` inside ``lora_lightning.adapter_io``: remembers the temp path opened last."""

    def __init__(self, out: Path, hang_name: str, hang_nth: int) -> None:
        self.out, self.hang_name, self.hang_nth = out, hang_name, hang_nth
        self.last_opened = ""
        self.count = 0

    def open(self, path, *args, **kwargs):
        self.last_opened = os.path.basename(path)
        return os.open(path, *args, **kwargs)

    def fdopen(self, fd, *args, **kwargs):
        hang = False
        if self.last_opened.startswith(f".{self.hang_name}.") or self.last_opened == self.hang_name:
            self.count += 1
            hang = self.count == self.hang_nth
        return _SlowFile(os.fdopen(fd, *args, **kwargs), hang, self.out / "HANG")

    def __getattr__(self, name):
        return getattr(os, name)


def child_main(out: Path) -> None:
    torch.set_num_threads(1)
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    import lora_lightning.adapter_io as ll_checkpoint
    from conftest import LitTiny, tiny_loader, trainer
    from lora_lightning import LoRACallback, save_adapter

    ll_checkpoint.os = _SlowOs(out, "last.ckpt", HANG_NTH)

    class ExportEveryStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            save_adapter(pl_module, out / "adapters" / f"step{trainer.global_step}.safetensors")
            save_adapter(pl_module, out / "adapters" / "latest.safetensors")

    callbacks = [
        LoRACallback(**LORA, verbose=False),
        ExportEveryStep(),
        ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True),
    ]
    t = trainer(out, callbacks, max_steps=1000, enable_checkpointing=True)
    t.fit(LitTiny(seed=0), tiny_loader(n=32, batch_size=8))


# ----------------------------------------------------------------------------- the tests
def _lora(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    out = tmp_path_factory.mktemp("crash")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "PL_GLOBAL_SEED")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.Popen(
        [sys.executable, __file__, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180
    try:
        while not (out / "HANG").exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"child exited ({proc.returncode}) before the stalled write:\n{proc.stdout.read().decode()[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("child did not reach the stalled write in time")
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return out


def test_killed_mid_write_leaves_a_partial_temp_file_and_complete_final_files(crashed):
    from lora_lightning import read_adapter

    ckpt_dir = crashed / "ckpt"
    # every file under a final name is complete
    ckpts = sorted(ckpt_dir.glob("*.ckpt"))
    names = {p.name for p in ckpts}
    assert {"last.ckpt", "epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"} <= names
    for p in ckpts:
        ckpt = torch.load(p, weights_only=False)
        assert len(ckpt["state_dict"]) == 3 * 2 * 2 and "lora_lightning" in ckpt, p.name
    # last.ckpt is the previous complete version (step 2), not the one being written at step 3
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == HANG_NTH - 1
    adapters = sorted((crashed / "adapters").glob("*.safetensors"))
    assert {p.name for p in adapters} >= {"latest.safetensors", "step1.safetensors", "step3.safetensors"}
    assert not [p for p in (crashed / "adapters").iterdir() if p.name.endswith(".tmp")]
    for p in adapters:
        tensors, meta = read_adapter(p)
        assert len(tensors) == 3 * 2 * 2 and "lora_config" in meta
    temps = sorted(p for p in ckpt_dir.iterdir() if p.name.endswith(".tmp"))
    # the kill really hit a write in progress: one half-written hidden temp file beside last.ckpt
    assert [p.name.split(".")[1:3] for p in temps] == [["last", "ckpt"]]
    full_size = int((crashed / "HANG").read_text())
    assert 0 < temps[0].stat().st_size <= full_size // 2 + 1024
    # the partial data itself is unreadable: torch.load's errors for a cut zip archive (or a cut legacy pickle)
    with pytest.raises((RuntimeError, OSError, EOFError, pickle.UnpicklingError)):
        torch.load(temps[0], weights_only=False)
    # the step-3 adapter export and the step-3 checkpoint hold the same (complete) tensors
    tensors, _ = read_adapter(crashed / "adapters" / "step3.safetensors")
    step3 = torch.load(ckpt_dir / "epoch=0-step=3.ckpt", weights_only=False)["state_dict"]
    for k, v in tensors.items():
        assert torch.equal(v, step3[k]), k


def test_newest_complete_checkpoint_resumes_despite_leftover_temp_files(crashed, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from conftest import LitTiny, tiny_batch, tiny_loader, trainer
    from lora_lightning import LoRACallback, load_adapter

    ckpt_dir = crashed / "ckpt"
    leftovers = {p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")}
    assert leftovers
    newest = max(ckpt_dir.glob("epoch=*.ckpt"), key=lambda p: torch.load(p, weights_only=False)["global_step"])
    saved = torch.load(newest, weights_only=False)
    assert saved["global_step"] == HANG_NTH

    # restore only (max_steps reached): the model holds exactly the checkpoint's adapters
    model = LitTiny(seed=0)
    t = trainer(tmp_path / "a", [LoRACallback(**LORA, verbose=False)], max_steps=HANG_NTH)
    t.fit(model, tiny_loader(n=32, batch_size=8), ckpt_path=newest)
    assert t.global_step == HANG_NTH
    restored = _lora(model)
    assert restored.keys() == saved["state_dict"].keys()
    for k, v in saved["state_dict"].items():
        assert torch.equal(restored[k], v), k

    # keep training, writing into the same folder as the crashed run (temp files still there);
    # ckpt_path="last" must resolve to last.ckpt (step 2), never to a temp file
    model = LitTiny(seed=0)
    cb = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1, save_last=True)
    t = trainer(
        tmp_path / "b", [LoRACallback(**LORA, verbose=False), cb], max_steps=HANG_NTH + 2, enable_checkpointing=True
    )
    t.fit(model, tiny_loader(n=32, batch_size=8), ckpt_path="last")
    assert Path(t.ckpt_path) == ckpt_dir / "last.ckpt"
    assert t.global_step == HANG_NTH + 2
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=False)
    assert last["global_step"] == HANG_NTH + 2
    for k, v in _lora(model).items():
        assert torch.equal(last["state_dict"][k], v), k
    # the old temp files were left alone; the new writes left none behind
    assert {p.name for p in ckpt_dir.iterdir() if p.name.endswith(".tmp")} == leftovers
    # an adapter export made before the crash still loads onto a fresh base and gives its outputs
    fresh = LitTiny(seed=0)
    load_adapter(fresh, crashed / "adapters" / "step3.safetensors")
    again = LitTiny(seed=0)
    t = trainer(tmp_path / "c", [LoRACallback(**LORA, verbose=False)], max_steps=HANG_NTH)
    t.fit(again, tiny_loader(n=32, batch_size=8), ckpt_path=newest)
    ids, _ = tiny_batch()
    fresh.eval(), again.eval()
    assert torch.equal(fresh(ids), again(ids))


def test_atomic_write_fsyncs_the_file_before_rename_and_the_directory_after(tmp_path, monkeypatch):
    from lora_lightning.adapter_io import atomic_write_bytes

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        mode = os.fstat(fd).st_mode
        kind = "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"
        size = os.fstat(fd).st_size if kind == "file" else -1
        events.append(("fsync", f"{kind}:{size}"))
        return real_fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", f"{Path(src).name}->{Path(dst).name}"))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"x" * 5000)
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"]
    assert events[0][1] == "file:5000"  # the temp file, with all its bytes, before the rename
    src, dst = events[1][1].split("->")
    assert src.startswith(".a.bin.") and src.endswith(".tmp") and dst == "a.bin"
    assert events[2][1] == "dir:-1"  # then the directory holding the new name
    assert target.read_bytes() == b"x" * 5000
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]
    # the final file gets the usual permissions (0o666 minus umask), not mkstemp's 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


if __name__ == "__main__":
    child_main(Path(sys.argv[1]))
