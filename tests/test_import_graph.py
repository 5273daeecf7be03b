"""The library's shape: data flows one way, config -> plan -> layers -> state -> I/O -> Lightning layer -> app.

Every module of ``lora_lightning`` is parsed (imports at module level, inside functions and under
``TYPE_CHECKING`` all count) and given a stage; a module may import only modules of its own stage or an
earlier one, and the graph has no cycle. The plain-PyTorch core imports neither Lightning nor the app;
only ``lightning/compat.py`` names a private Lightning object; only the state handle writes attributes on
user modules with ``object.__setattr__``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lora_lightning"

# stage -> modules (dotted, relative to lora_lightning); a trailing ".*" takes a package's modules
STAGES: list[tuple[str, ...]] = [
    ("errors", "registry", "sharding", "analysis"),  # foundations: no lora_lightning imports but errors/registry
    ("quantization", "config"),  # storage formats; the validated options
    ("plan",),  # which matrices, at which rank
    ("layers.*", "layers", "tokens"),  # one module per base-layer kind; trainable token rows
    ("shared_input", "variants.*", "variants", "budget"),  # fusion of layers; variants of the update; rank budgets
    ("record",),  # what an adapter records about its base
    ("state",),  # the one handle per adapted model
    ("injection",),  # putting adapters in and out
    ("merging", "named", "gradients", "loraplus", "telemetry", "hotswap"),  # operations on an injected model
    ("adapter_io",),  # files
    ("peft_format",),  # PEFT's files
    ("lightning.compat",),  # the one seam to Lightning's private API
    ("lightning.checkpoints", "lightning.sharded"),
    ("fabric",),  # LoRA in a Lightning Fabric loop: setup, adapter-only checkpoints, exports
    ("lightning.routing",),
    ("lightning.callback", "lightning.monitor"),
    ("lightning.package",),
    ("lightning", "pytorch_lightning"),
    ("__init__",),
    ("app.*", "app", "app.conf"),  # the Hydra app: beside the library, never imported by it
]
CORE_STAGES = 11  # stages before lightning.compat: the plain-PyTorch core
FRAMEWORKS = (
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "lightning_utilities",
    "torchmetrics",
    "hydra",
    "omegaconf",
    "wandb",
)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "__init__"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if current != "__init__" else []
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(["lora_lightning", *base, *([node.module] if node.module else [])])


def imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """``(lora_lightning modules imported, top-level third-party packages imported)`` by one module."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    own, other = set(), set()
    known = modules()

    def add(dotted: str) -> None:
        if dotted == "lora_lightning" or dotted.startswith("lora_lightning."):
            rel = dotted[len("lora_lightning.") :] if dotted != "lora_lightning" else "__init__"
            while rel not in known and "." in rel:  # a name inside a module: the module
                rel = rel.rpartition(".")[0]
            if rel in known and rel != name:
                own.add(rel)
        elif dotted:
            other.add(dotted.split(".")[0])

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(name, is_package, node)
            subs = [f"{target}.{a.name}" for a in node.names]
            known_subs = [t for t in subs if t.startswith("lora_lightning.") and t[len("lora_lightning.") :] in known]
            for t in known_subs:
                add(t)
            if len(known_subs) < len(subs):  # names defined in the module itself
                add(target)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                add(f"lora_lightning{arg.value}" if arg.value.startswith(".") else arg.value)
    return own, other


def stage_of(name: str) -> int:
    for i, members in enumerate(STAGES):
        for m in members:
            if name == m or (m.endswith(".*") and name.startswith(m[:-2] + ".")):
                return i
    raise AssertionError(f"lora_lightning/{name} has no stage in tests/test_import_graph.py: give it one")


def graph() -> dict[str, set[str]]:
    return {name: imports(name, path)[0] for name, path in modules().items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if color.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if color.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(g):
        if color.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_every_module_has_a_stage_and_imports_only_earlier_or_equal_stages():
    bad = []
    for name, deps in graph().items():
        for dep in deps:
            if stage_of(dep) > stage_of(name):
                bad.append(f"{name} (stage {stage_of(name)}) imports {dep} (stage {stage_of(dep)})")
    assert not bad, "imports against the flow:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()) or [])}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_imports_neither_lightning_nor_the_app():
    bad = []
    for name, path in modules().items():
        if stage_of(name) >= CORE_STAGES:
            continue
        own, other = imports(name, path)
        bad += [f"{name} imports {p}" for p in sorted(other & set(FRAMEWORKS))]
        bad += [f"{name} imports {m}" for m in sorted(own) if m.startswith("app") or m.startswith("lightning")]
    assert not bad, bad


def test_no_library_module_imports_the_app():
    bad = [
        f"{name} imports {m}"
        for name, deps in graph().items()
        if not name.startswith("app")
        for m in deps
        if m.startswith("app")
    ]
    assert not bad, bad


def test_private_lightning_names_appear_only_in_compat():
    """``from lightning... import _x`` or ``<lightning module>._x`` outside lightning/compat.py."""
    pattern = re.compile(r"(?:lightning|pytorch_lightning|lightning_fabric)[\w.]*\s+import\s+\(?[^)\n]*\b_[a-z]")
    bad = []
    for name, path in modules().items():
        if name == "lightning.compat" or name.startswith("app"):
            continue
        text = path.read_text()
        if pattern.search(text) or re.search(
            r"\b_(CheckpointConnector|MultiProcessingLauncher|load_state|call_configure_model)\b", text
        ):
            bad.append(name)
    assert not bad, f"private Lightning API outside lightning/compat.py: {bad}"


def test_object_setattr_only_where_the_handle_is_attached():
    sites = {
        name: len(re.findall(r"object\.__setattr__", path.read_text()))
        for name, path in modules().items()
        if "object.__setattr__" in path.read_text()
    }
    assert sites == {"state": 1}, sites
