"""The conformance battery (tests/conformance): one test per case, running every operation on it.

A failing cell names the case (example|topology|variant|quantizer) and the operation. After the cases, the
committed docs/conformance.md is compared with the matrix this run saw (regenerate it with
``python -m tests.conformance.matrix > docs/conformance.md``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from conformance.cases import all_cases, check_registries_covered
from conformance.matrix import render, run_cell
from conformance.operations import OPERATIONS

CASES = all_cases()
DOC = Path(__file__).resolve().parents[1] / "docs" / "conformance.md"
OUTCOMES: dict = {}


def test_every_registered_kind_variant_and_quantizer_is_in_the_battery():
    assert check_registries_covered() == []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case):
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in OPERATIONS:
            try:
                OUTCOMES[(case.id, op.name)] = run_cell(case, op.name)
            except AssertionError as exc:
                failures.append(f"{op.name}: {exc}")
    assert not failures, "\n".join(failures)


def test_the_committed_matrix_is_what_the_battery_saw():
    if len(OUTCOMES) < len(CASES) * len(OPERATIONS):
        pytest.skip("run the whole battery (tests/test_conformance.py) to compare the matrix")
    assert DOC.read_text() == render(OUTCOMES, CASES), (
        "docs/conformance.md is out of date: regenerate it with python -m tests.conformance.matrix > "
        "docs/conformance.md"
    )
