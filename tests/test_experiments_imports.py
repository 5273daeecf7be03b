"""experiments/ is a one-way lab: runs -> statistics -> claims -> tables and plots -> README sections -> reports ->
the command line. Every ``experiments/*.py`` is parsed with ``ast`` (nothing is imported or run), the imports between
the lab's modules are collected (at module level and inside functions alike: a deferred import is still an import)
and the graph is checked: no cycle, and every import goes to a module of an earlier stage."""

from __future__ import annotations

import ast
from pathlib import Path

LAB = Path(__file__).resolve().parent.parent / "experiments"
PACKAGE = LAB.name

# The stages of the flow, first to last; a module may import only modules of earlier stages.
STAGES: list[set[str]] = [
    {"__init__"},  # the package: imports nothing
    {"records"},  # reading the run records
    {"collect", "recover"},  # runs: multirun/ -> experiments/runs, records from logs
    {"stats", "power"},  # statistics; power and the seeds a check needs
    {"claims"},  # the paper's claims and their verdicts
    {"tables", "plots"},  # markdown and PNGs
    {"ablations", "schedule", "recipe", "primary"},  # the README's sections
    {"report", "subspace", "precision", "decoder", "two_tasks", "lora_fa", "baselines"},  # the reports
    {"__main__"},  # the command line
    {"summarize"},  # the alias running every report through the command line
]


def lab_imports(source: str, modules: set[str]) -> set[str]:
    """The modules of the lab that ``source`` imports: ``import experiments.x``, ``from experiments.x import y``,
    ``from experiments import x``, relative imports and ``importlib.import_module("experiments.x")``, anywhere in
    the file."""
    found: set[str] = set()

    def add(dotted: str, names: list[str] = ()) -> None:
        parts = dotted.split(".") if dotted else []
        if parts and parts[0] != PACKAGE:
            return
        if len(parts) > 1:
            found.add(parts[1])
        else:  # the package: its submodules when named (``from experiments import collect``), else __init__
            found.update(n if n in modules else "__init__" for n in names or ["__init__"])

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:  # relative, within the package
                add(f"{PACKAGE}.{node.module}" if node.module else PACKAGE, names)
            elif node.module:
                add(node.module, names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node.args[0].value)
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """Module name -> the lab modules it imports (only those among ``sources``)."""
    modules = set(sources)
    return {name: lab_imports(text, modules) & modules for name, text in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or None: depth-first search for an edge back into the current path."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def lab_sources() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(LAB.glob("*.py"))}


def test_every_module_of_the_lab_has_a_stage():
    staged = [m for stage in STAGES for m in stage]
    assert len(staged) == len(set(staged)), "a module is listed in two stages"
    assert set(lab_sources()) == set(staged), "place a new module of experiments/ in STAGES (or drop a deleted one)"


def test_imports_go_to_earlier_stages_only():
    stage = {m: i for i, names in enumerate(STAGES) for m in names}
    graph = import_graph(lab_sources())
    wrong = sorted(
        f"{a} (stage {stage[a]}) imports {b} (stage {stage[b]})"
        for a, bs in graph.items()
        for b in bs
        if stage[b] >= stage[a]
    )
    assert not wrong, "\n".join(wrong)
    # the flow is really there: the report builds on the sections, which build on tables, claims, stats and records
    assert {"ablations", "schedule", "recipe", "records"} <= graph["report"]
    assert graph["stats"] == {"records"} and graph["records"] == set()


def test_the_lab_has_no_import_cycle():
    assert find_cycle(import_graph(lab_sources())) is None


def test_the_check_finds_the_cycles_of_the_old_layout():
    # the layout before the lab was made one-way: report imported summarize at module level and schedule inside
    # write_readme; schedule imported report and summarize; summarize imported report (and collect) inside main
    old = {
        "summarize": "import json\n\ndef main():\n    from experiments import collect, report  # noqa\n",
        "report": "from experiments.collect import FAMILIES\nfrom experiments.summarize import ALPHA\n\n"
        "def write_readme():\n    from experiments.schedule import longer_schedule_section\n",
        "schedule": "from experiments.report import STD_NOTE\nfrom experiments.summarize import MARGIN\n",
        "collect": "import json\n",
    }
    graph = import_graph(old)
    assert graph == {
        "summarize": {"collect", "report"},
        "report": {"collect", "summarize", "schedule"},
        "schedule": {"report", "summarize"},
        "collect": set(),
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"report"} < set(cycle)
    # relative and importlib imports count too; a module outside the lab does not
    assert lab_imports(
        "from . import stats\nfrom .records import load_runs\nimport importlib\n"
        "importlib.import_module('experiments.claims')\nimport experimental\nfrom scipy import stats\n",
        {"stats", "records", "claims"},
    ) == {"stats", "records", "claims"}
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
