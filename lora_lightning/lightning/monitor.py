"""``LoRAMonitor``: what LoRA itself is doing during training, in any Lightning logger (CSV, TensorBoard, W&B).

Every ``every_n_steps`` optimizer steps (and at each validation end) it logs, per adapted matrix and
aggregated per matrix type (``q``/``k``/``v``/``o``/``mlp``/...) and per layer (:mod:`lora_lightning.telemetry`):
``‖ΔW‖_F``, ``‖ΔW‖_F / ‖W0‖_F``, ``‖A‖``, ``‖B‖``, the gradient norms of the trainable adapter tensors, the
update-to-weight ratio of the last optimizer step, the top singular values of ``ΔW`` with its stable and effective
rank (from an ``r x r`` core: nothing ``d x d`` is formed), paper §7.2's subspace similarity of the current ``A``
against a reference (its state at the start of training, at a chosen step, or another run's adapter file), and
at validation ends §7.3's amplification ``‖ΔW‖_F / ‖Uᵀ W0 V‖_F``. AdaLoRA's ranks and DoRA's magnitudes come
with the matrix values; with several named adapters everything is logged per adapter (``<name>/lora/...``).

At each epoch end it draws a layer x matrix-type heatmap of ``‖ΔW‖/‖W0‖`` and the singular-value curves per type,
writes them as PNG (``out_dir``, default ``<log_dir>/lora_monitor``) and hands them to the loggers' image APIs
(``WandbLogger.log_image``, TensorBoard's ``add_image``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import telemetry
from ..adapter_io import read_adapter
from ..analysis import subspace_similarity
from ..injection import has_lora, lora_layers
from ..sharding import is_sharded
from .compat import Namespace


class MonitorImpl:
    """Log LoRA telemetry every ``every_n_steps`` optimizer steps and at validation ends (see the module doc).

    Args:
        every_n_steps: cadence of the scalars (and of the gradient norms and update ratios, which need a copy of the
            adapters before the step).
        top_k: how many singular values of each ``ΔW`` to log.
        reference: what §7.2's subspace similarity compares the current ``A`` with: ``"init"`` (at the start of the
            fit), an optimizer step (``int``) or an adapter file path (another run's adapter).
        per_matrix: also log every matrix's own values (``lora/matrix/<name>/...``), not only the aggregates.
        amplification: compute §7.3's amplification at validation ends (one ``W0·Q`` product per matrix).
        images: draw the heatmap and spectrum plots at epoch ends (needs matplotlib).
        out_dir: where the PNGs go (default ``<trainer.log_dir or default_root_dir>/lora_monitor``).
    """

    is_lora_monitor: ClassVar[bool] = True
    _ns: ClassVar[Namespace]

    def __init__(
        self,
        every_n_steps: int = 50,
        top_k: int = 4,
        reference: str | int = "init",
        per_matrix: bool = True,
        amplification: bool = True,
        images: bool = True,
        out_dir: str | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"LoRAMonitor(every_n_steps={every_n_steps!r}) must be a positive integer")
        self.every_n_steps, self.top_k, self.reference = every_n_steps, top_k, reference
        self.per_matrix, self.amplification, self.images, self.out_dir = per_matrix, amplification, images, out_dir
        self._base_norms: dict[str, float] = {}
        self._reference: dict[tuple[str | None, str], Tensor] | None = None
        self._before: dict[int, Tensor] | None = None
        self._grads: dict[str, float] = {}
        self._last: dict[tuple[str | None, str], dict[str, float]] = {}
        self.written: list[Path] = []  # PNG files written (for tests and reports)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._base_norms = {}
        self._reference = None
        if not self._active(pl_module):
            return
        if self.reference == "init":
            self._reference = self._current_A(pl_module)
        elif isinstance(self.reference, str):
            self._reference = self._file_A(pl_module, self.reference)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if not self._active(pl_module) or not self._due(trainer.global_step + 1):
            return
        self._grads = {}
        tensors = {}
        for name, layer in lora_layers(pl_module).items():
            for leaf in layer.trainable_names:
                p = getattr(layer, leaf)
                if p.grad is not None:
                    self._grads[f"lora/matrix/{name}/grad_{leaf}_norm"] = float(p.grad.detach().float().norm())
                tensors[id(p)] = p.detach().clone()
        self._before = tensors

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._active(pl_module):
            return
        if isinstance(self.reference, int) and self._reference is None and step >= self.reference:
            self._reference = self._current_A(pl_module)
        if self._before is None or not self._due(step):
            return
        metrics = self._scalars(pl_module)
        metrics.update(self._group(self._grads, pl_module))
        ratios = {}
        for name, layer in lora_layers(pl_module).items():
            for leaf in layer.trainable_names:
                p = getattr(layer, leaf)
                old = self._before.get(id(p))
                if old is not None and old.shape == p.shape:
                    denom = float(old.float().norm())
                    ratios[f"lora/matrix/{name}/update_{leaf}_ratio"] = (
                        float((p.detach() - old).float().norm()) / denom if denom > 0 else math.inf
                    )
        metrics.update(self._group(ratios, pl_module))
        self._before = None
        self._log(trainer, metrics)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not self._active(pl_module):
            return
        metrics = self._scalars(pl_module)
        if self.amplification:
            amp = {}
            for adapter in telemetry.adapter_names(pl_module):
                for name, layer in lora_layers(pl_module).items():
                    A, B, s = telemetry._factors(layer, adapter)
                    prefix = f"{adapter}/" if adapter is not None else ""
                    amp[f"{prefix}lora/matrix/{name}/amplification"] = telemetry.amplification(
                        A, B, s, telemetry.base_matrix(layer)
                    )
            metrics.update(self._group(amp, pl_module))
        self._log(trainer, metrics)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.images and self._active(pl_module) and trainer.is_global_zero:
            self._draw(trainer, pl_module)

    # ---------------------------------------------------------------- helpers
    def _active(self, pl_module: Any) -> bool:
        return has_lora(pl_module) and not is_sharded(pl_module)

    def _due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def _current_A(self, pl_module: Any) -> dict[tuple[str | None, str], Tensor]:
        out = {}
        for adapter in telemetry.adapter_names(pl_module):
            for name, layer in lora_layers(pl_module).items():
                out[(adapter, name)] = telemetry._factors(layer, adapter)[0].clone()
        return out

    def _file_A(self, pl_module: Any, path: str) -> dict[tuple[str | None, str], Tensor]:
        tensors, _ = read_adapter(path)
        out = {}
        for name in lora_layers(pl_module):
            key = next(
                (
                    k
                    for k in tensors
                    if k.endswith(".lora_A")
                    and (name.endswith(k[: -len(".lora_A")]) or k[: -len(".lora_A")].endswith(name))
                ),
                None,
            )
            if key is not None:
                A = tensors[key].to(torch.float64)
                out[(None, name)] = A.reshape(A.shape[0], -1)
        return out

    def _scalars(self, pl_module: Any) -> dict[str, float]:
        stats = telemetry.model_stats(pl_module, self._base_norms, self.top_k)
        self._last = stats
        layers = lora_layers(pl_module)
        metrics = telemetry.aggregate(stats, layers)
        if self._reference:
            sims = {}
            for (adapter, name), A_ref in self._reference.items():
                if name not in layers:
                    continue
                A = telemetry._factors(layers[name], adapter)[0]
                if A.shape[1] != A_ref.shape[1]:
                    continue
                prefix = f"{adapter}/" if adapter is not None else ""
                k = min(A.shape[0], A_ref.shape[0])
                sims[f"{prefix}lora/matrix/{name}/subspace_top1"] = subspace_similarity(A_ref, A, 1, 1)
                sims[f"{prefix}lora/matrix/{name}/subspace_all"] = subspace_similarity(A_ref, A, k, k)
            metrics.update(self._group(sims, pl_module))
        if not self.per_matrix:
            metrics = {k: v for k, v in metrics.items() if "/matrix/" not in k}
        return metrics

    def _group(self, values: dict[str, float], pl_module: Any) -> dict[str, float]:
        """``values`` keyed ``[<adapter>/]lora/matrix/<name>/<stat>``, plus their mean per matrix type."""
        layers = lora_layers(pl_module)
        out = dict(values) if self.per_matrix else {}
        sums: dict[str, list[float]] = {}
        for key, value in values.items():
            head, _, rest = key.partition("lora/matrix/")
            name, _, stat = rest.rpartition("/")
            kind = telemetry.matrix_type(name, layers.get(name))
            if math.isfinite(value):
                sums.setdefault(f"{head}lora/{kind}/{stat}", []).append(value)
        out.update({k: sum(v) / len(v) for k, v in sums.items()})
        return out

    def _log(self, trainer: Any, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        clean = {
            k: float(v) for k, v in metrics.items() if v is not None and not (isinstance(v, float) and math.isnan(v))
        }
        for logger in trainer.loggers:
            logger.log_metrics(clean, step=trainer.global_step)

    def _folder(self, trainer: Any) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "lora_monitor"

    def _draw(self, trainer: Any, pl_module: Any) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self._ns.rank_zero_warn(
                "LoRAMonitor(images=True) needs matplotlib (pip install matplotlib); images skipped"
            )
            self.images = False
            return
        stats = self._last or telemetry.model_stats(pl_module, self._base_norms, self.top_k)
        layers = lora_layers(pl_module)
        folder = self._folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        epoch = trainer.current_epoch
        for adapter in telemetry.adapter_names(pl_module):
            tag = f"{adapter}_" if adapter is not None else ""
            blocks, types, grid = telemetry.heatmap(stats, layers, adapter)
            images = []
            if blocks:
                fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(types), 1.0 + 0.35 * len(blocks)))
                im = ax.imshow(grid, aspect="auto", cmap="viridis")
                ax.set_xticks(range(len(types)), types)
                ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
                ax.set_xlabel("matrix type")
                ax.set_ylabel("layer")
                ax.set_title(f"‖ΔW‖ / ‖W0‖, epoch {epoch}" + (f" ({adapter})" if adapter else ""))
                fig.colorbar(im, ax=ax)
                images.append(("heatmap", self._save(fig, folder / f"{tag}heatmap_epoch{epoch}.png")))
                plt.close(fig)
            fig, ax = plt.subplots(figsize=(5, 3.5))
            by_type: dict[str, list[list[float]]] = {}
            for (a, name), values in stats.items():
                if a != adapter:
                    continue
                sig = [values[k] for k in sorted(values) if k.startswith("sigma_")]
                by_type.setdefault(telemetry.matrix_type(name, layers.get(name)), []).append(sig)
            for kind, curves in sorted(by_type.items()):
                n = min(len(c) for c in curves)
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
                ax.plot(range(1, n + 1), mean, marker="o", label=kind)
            ax.set_xlabel("i")
            ax.set_ylabel("σ_i of ΔW (mean over the type's matrices)")
            ax.set_title(f"spectrum of ΔW, epoch {epoch}")
            ax.legend(fontsize=7)
            images.append(("spectrum", self._save(fig, folder / f"{tag}spectrum_epoch{epoch}.png")))
            plt.close(fig)
            for kind, path in images:
                self._log_image(trainer, f"{tag}lora/{kind}", path)

    def _save(self, fig: Any, path: Path) -> Path:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        self.written.append(path)
        return path

    def _log_image(self, trainer: Any, key: str, path: Path) -> None:
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger (and others with the same API)
                logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                import numpy as np
                from PIL import Image

                logger.experiment.add_image(
                    key, np.asarray(Image.open(path).convert("RGB")), trainer.global_step, dataformats="HWC"
                )


def make_monitor_class(ns: Namespace, module: str) -> type:
    """``LoRAMonitor`` for one Lightning package: :class:`MonitorImpl` on that package's ``Callback``."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        MonitorImpl.__init__(self, *args, **kwargs)

    __init__.__doc__ = MonitorImpl.__init__.__doc__
    __init__.__signature__ = __import__("inspect").signature(MonitorImpl.__init__)  # type: ignore[attr-defined]
    return type(
        "LoRAMonitor",
        (MonitorImpl, ns.Callback),
        {
            "__init__": __init__,
            "__module__": module,
            "__qualname__": "LoRAMonitor",
            "__doc__": MonitorImpl.__doc__,
            "_ns": ns,
        },
    )


__all__ = ["MonitorImpl", "make_monitor_class"]
