"""One definition per option list: the engine, the CLI, the figure routes and the clients use the schema's."""

from __future__ import annotations

from typing import Any, get_args

from client import cli, http
from service import figures, schemas, store
from worker.engine import types as engine_types


def test_engine_option_types_are_the_schemas() -> None:
    assert engine_types.Ablation is schemas.AblationKind
    assert engine_types.Positions is schemas.PositionScope
    assert engine_types.Metric is schemas.MetricName
    assert engine_types.NormScale is schemas.NormScaleMode
    assert engine_types.ResampleFrom is schemas.ResampleFrom


def test_cli_choices_are_derived_from_the_schemas() -> None:
    # Enums at runtime; type checkers see the Literals (client/cli.py), hence Any.
    pairs: list[tuple[Any, Any]] = [
        (cli.Ablation, schemas.AblationKind),
        (cli.Positions, schemas.PositionScope),
        (cli.Metric, schemas.MetricName),
        (cli.Preset, schemas.PresetName),
        (cli.Dataset, schemas.DatasetName),
        (cli.FigureName, schemas.FigureName),
        (cli.FigureFormatChoice, schemas.FigureFormat),
        (cli.Corpus, schemas.CorpusName),
        (cli.NormScale, schemas.NormScaleMode),
        (cli.ResampleFromChoice, schemas.ResampleFrom),
        (cli.ResampleWithinChoice, schemas.ResampleWithin),
        (cli.MeasureChoice, schemas.MeasurePositions),
        (cli.Target, schemas.TargetName),
        (cli.ResponseBasis, schemas.ResponseBasisName),
        (cli.PositionResponsesChoice, schemas.PositionResponses),
    ]
    for choice, literal in pairs:
        assert tuple(member.value for member in choice) == get_args(literal)


def test_figure_names_and_states_have_one_definition() -> None:
    assert figures.FIGURE_NAMES == http.FIGURE_NAMES == get_args(schemas.FigureName)
    assert store.TERMINAL_STATES is schemas.TERMINAL_STATES and http.TERMINAL_STATES is schemas.TERMINAL_STATES
    assert set(schemas.ACTIVE_STATES) | set(schemas.TERMINAL_STATES) == set(get_args(schemas.JobState))
    assert schemas.TERMINAL_STATES == ("succeeded", "failed", "cancelled")
