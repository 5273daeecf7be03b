"""Every report of the lab from the committed records, in the order they depend on each other:

    python -m experiments.summarize

runs ``python -m experiments subspace``, ``... subspace --experiment convergence`` (the README includes both), then
``report``, ``decoder``, ``precision``, ``lora-fa`` and ``baselines``, each with its defaults. Nothing is trained.
The last stage of the flow, after ``__main__``, whose command line it runs.
"""

from __future__ import annotations

import sys

COMMANDS = (
    ["subspace"],
    ["subspace", "--experiment", "convergence"],
    ["report"],
    ["decoder"],
    ["precision"],
    ["lora-fa"],
    ["baselines"],
)


def main(argv: list[str] | None = None) -> None:
    if argv:
        raise SystemExit(f"python -m experiments.summarize takes no arguments (got {' '.join(argv)})")
    from experiments.__main__ import main as cli  # noqa: PLC0415

    for command in COMMANDS:
        cli(command)


if __name__ == "__main__":
    main(sys.argv[1:])
