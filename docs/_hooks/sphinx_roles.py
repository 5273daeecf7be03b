"""Griffe extension for the API reference: the library's docstrings use Sphinx roles (``:class:`~a.B```,
``:func:`.x```, ``:mod:`lora_lightning.pytorch_lightning```), which Markdown would show verbatim. Each role
becomes inline code, linked to the object's API entry when the site documents it (an optional cross-reference:
no warning when it does not). The library's files are not changed; only the text the site renders."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`<>]+?)`")


def _public_names() -> set[str]:
    """``lora_lightning.__all__``, read without importing: the API pages document these as ``lora_lightning.<name>``."""
    init = Path(__file__).resolve().parents[2] / "lora_lightning" / "__init__.py"
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


PUBLIC = _public_names()


def _identifier(target: str, module: str) -> str | None:
    """The full dotted path a role's target names, as seen from ``module``; None if it is not this library's."""
    if target.startswith("."):
        dots = len(target) - len(target.lstrip("."))
        base = module.split(".")
        base = base[: len(base) - (dots - 1)] if dots > 1 else base
        target = ".".join([*base, target.lstrip(".")])
    elif "." not in target:
        target = f"{module}.{target}"
    if not target.startswith("lora_lightning"):
        return None
    name = target.rsplit(".", 1)[-1]
    return f"lora_lightning.{name}" if name in PUBLIC else target


class SphinxRoles(Extension):
    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is None or ":" not in obj.docstring.value:
            return
        module = obj.module.path if not obj.is_module else obj.path

        def replace(m: re.Match) -> str:
            tilde, target = m.group(1), m.group(2).strip()
            title = target.rsplit(".", 1)[-1] if tilde else target.lstrip(".")
            identifier = _identifier(target, module)
            if identifier is None:
                return f"`{title}`"
            return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'

        obj.docstring.value = ROLE.sub(replace, obj.docstring.value)
