"""Follow ``LoRACallback.setup`` on a tiny LightningModule through lora_lightning's code and count the moves
between its modules, and the moves to a module that sits above the caller in the import stages of
tests/test_import_graph.py (a call into a module that imports the caller: registry dispatch, callbacks).

    .venv/bin/python scripts/call_moves.py            # prints the counts and the sequence of moves

A move is a call from a function of one lora_lightning module into a function of another (calls within a
module, returns and calls outside lora_lightning are not moves).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_import_graph import stage_of  # noqa: E402

PKG = str(ROOT / "lora_lightning")


def module_of(filename: str) -> str | None:
    if not filename.startswith(PKG):
        return None
    rel = Path(filename).relative_to(PKG).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts) or "__init__"


def main() -> None:
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from conftest import LitTiny, LoRACallback, trainer

    model = LitTiny()
    cb = LoRACallback(r=2, targets=["q", "v"], verbose=False)
    t = trainer("/tmp/call_moves", [cb], max_steps=1)
    t.strategy.connect(model)
    t.state.fn = "fit"
    moves: list[tuple[str, str]] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = module_of(frame.f_code.co_filename)
        caller = module_of(frame.f_back.f_code.co_filename) if frame.f_back else None
        if callee and caller and callee != caller:
            moves.append((caller, callee))

    sys.setprofile(profile)
    try:
        cb.setup(t, model, "fit")
    finally:
        sys.setprofile(None)
    up = [(a, b) for a, b in moves if stage_of(b) > stage_of(a)]
    print(f"moves between modules: {len(moves)}; to a module above the caller: {len(up)}")
    distinct = sorted(set(moves))
    print(f"distinct edges: {len(distinct)}; upward: {sorted(set(up))}")


if __name__ == "__main__":
    main()
