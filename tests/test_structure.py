"""One definition per option list: the engine, the CLI, the figure routes and the clients use the vocabulary's."""

from __future__ import annotations

from typing import Any, get_args

import msgspec

from cli import main as cli_main
from hydra_ablate_client import http, vocabulary, wire
from service.core import store
from service.rendering import figures
from worker.engine import types as engine_types


def test_engine_option_types_are_the_vocabulary() -> None:
    hints = engine_types.SweepSpec.__annotations__
    pairs = {
        "ablation": "AblationKind",
        "positions": "PositionScope",
        "metric": "MetricName",
        "norm_scale": "NormScaleMode",
        "resample_from": "ResampleFrom",
        "measure_positions": "MeasurePositions",
        "target": "TargetName",
        "response_basis": "ResponseBasisName",
    }
    for field, name in pairs.items():
        assert hints[field] == name  # the vocabulary's name, not a local alias (annotations are strings here)
        assert getattr(engine_types, name) is getattr(vocabulary, name)
    assert wire.AblationKind is vocabulary.AblationKind and wire.MetricName is vocabulary.MetricName


def test_cli_choices_are_derived_from_the_vocabulary() -> None:
    # Enums at runtime; type checkers see the Literals (cli/main.py), hence Any.
    pairs: list[tuple[Any, Any]] = [
        (cli_main.Ablation, vocabulary.AblationKind),
        (cli_main.Positions, vocabulary.PositionScope),
        (cli_main.Metric, vocabulary.MetricName),
        (cli_main.Preset, vocabulary.PresetName),
        (cli_main.Dataset, vocabulary.DatasetName),
        (cli_main.FigureName, vocabulary.FigureName),
        (cli_main.FigureFormatChoice, vocabulary.FigureFormat),
        (cli_main.Corpus, vocabulary.CorpusName),
        (cli_main.NormScale, vocabulary.NormScaleMode),
        (cli_main.ResampleFromChoice, vocabulary.ResampleFrom),
        (cli_main.ResampleWithinChoice, vocabulary.ResampleWithin),
        (cli_main.MeasureChoice, vocabulary.MeasurePositions),
        (cli_main.Target, vocabulary.TargetName),
        (cli_main.ResponseBasis, vocabulary.ResponseBasisName),
        (cli_main.PositionResponsesChoice, vocabulary.PositionResponses),
    ]
    for choice, literal in pairs:
        assert tuple(member.value for member in choice) == get_args(literal)


def test_figure_names_and_states_have_one_definition() -> None:
    assert figures.FIGURE_NAMES is http.FIGURE_NAMES is vocabulary.FIGURE_NAMES
    assert vocabulary.FIGURE_NAMES == get_args(vocabulary.FigureName)
    assert store.TERMINAL_STATES is vocabulary.TERMINAL_STATES and http.TERMINAL_STATES is vocabulary.TERMINAL_STATES
    assert set(vocabulary.ACTIVE_STATES) | set(vocabulary.TERMINAL_STATES) == set(get_args(vocabulary.JobState))
    assert vocabulary.TERMINAL_STATES == ("succeeded", "failed", "cancelled")


def test_one_component_grammar_and_one_per_position_rule() -> None:
    assert vocabulary.parse_component("head.3.5") == ("head", 3, 5)
    assert vocabulary.parse_component("attn.12") == ("attn", 12, None)
    assert vocabulary.parse_component("mlp") == ("mlp", None, None)
    for bad in ("attn.1\n", "bogus.1", "head.1.2.3", "attn.x", ""):
        try:
            vocabulary.parse_component(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} parsed")
    component_name: Any = wire.ComponentName
    assert component_name.__metadata__[0].pattern == vocabulary.COMPONENT_PATTERN
    spec = wire.JobSpec(
        model="m", prompts=["p"], answers=None, counterfactuals=None, components=["attn.0"], ablation="zero",
        positions="all", metric="logit", norm_scale="clean", resample_samples=1, resample_from="next",
        mean_reference_prompts=None, seed=0,
    )
    for options, expected in [
        ({}, False),
        ({"measure_positions": "all"}, True),
        ({"target": "next_token"}, True),
        ({"response_basis": "heads"}, False),  # the head basis applies to final-position jobs too
        ({"response_basis": "heads", "target": "next_token"}, True),
    ]:
        changed = msgspec.structs.replace(spec, **options)
        assert changed.per_position is expected
        assert vocabulary.is_per_position(changed.measure_positions, changed.target) is expected
