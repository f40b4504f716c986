"""The survey of second derivatives through torch.nn's layers (benchmarks/second_derivatives.py).

The full survey is a benchmark (a few minutes on the CPU); here: that it covers every layer type
torch.nn exports, so a layer added to torch is noticed, and that dynlens's Hessian-vector
products pass on a few of its cases, among them the two layers dynlens computes as composites.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

SURVEY_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "second_derivatives.py"


@pytest.fixture(scope="module")
def survey() -> ModuleType:
    spec = importlib.util.spec_from_file_location("second_derivatives", SURVEY_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def exported_layer_types() -> set[str]:
    return {name for name, value in vars(nn).items() if inspect.isclass(value) and issubclass(value, nn.Module)}


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_every_layer_type_of_torch_nn_is_a_case_of_the_survey_or_excluded_with_a_reason(survey: ModuleType) -> None:
    covered: set[str] = set()
    for name, factory in survey.cases().items():
        covered |= survey.layer_types(survey.build(name, factory)[1])
    missing = exported_layer_types() - covered - set(survey.EXCLUDED)
    assert not missing, (
        f"torch.nn exports layer types the survey does not check: {sorted(missing)}; add a case "
        "to cases() in benchmarks/second_derivatives.py, or an entry with the reason to EXCLUDED"
    )
    assert all(reason for reason in survey.EXCLUDED.values())


def test_every_exclusion_names_a_layer_type_torch_nn_still_exports(survey: ModuleType) -> None:
    assert set(survey.EXCLUDED) <= exported_layer_types()


@pytest.mark.parametrize("name", [
    "Hardsigmoid",  # composite inside a measurement: its kernel has no double backward
    "EmbeddingBag, sum, offsets, per-sample weights",  # likewise
    "EmbeddingBag, max, 2-D",
    "Linear",
    "CrossEntropyLoss, label smoothing, class weights",
])
def test_dynlens_hessian_vector_products_match_finite_differences(survey: ModuleType, name: str) -> None:
    row = survey.survey(name, survey.cases()[name], torch.device("cpu"))
    assert row["gradient"] < 1e-6
    assert row["dynlens_reuse"] < 1e-6
    assert row["dynlens_forward_over_reverse"] < 1e-6
