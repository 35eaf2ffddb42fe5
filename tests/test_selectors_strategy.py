"""Strategy grammar (ALGORITHMS §9.2): parsing, canonical names, errors that say what to type."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from detloop.config import ConfigError, build_config
from detloop.selectors.scores import registered_scores
from detloop.selectors.strategy import (
    COLUMN_SCORES,
    StrategyError,
    StrategySpec,
    explain,
    format_strategy,
    parse_strategy,
)

# Every strategy named in the reference README's Active Learning section (scores, stacked
# modifiers as its text describes them, and the examples it gives).
SEED_NAMES = [
    "random",
    "entropy",
    "mcbox",
    "albox",
    "mcclass",
    "combo",
    "ental",
    "alluncert",
    "highep_lowal",
    "epuncert",
    "sota",
    "perc_entropy",
    "calib_entropy",
    "calib_albox",
    "norm_albox",
    "box_albox",
    "norm_box_mcbox",
    "prune_entropy",
    "full_prune_entropy",
    "bottomk_entropy",
    "nee_entropy",
    "mean_entropy",
    "perc_calib_norm_bottomk_mean_albox",
    "perc_calib_norm_albox",
    "nee_mean_entropy",
    "prune_rand_random",
    "highep_lowal_alluncert",
    "score",
    "entropy_cal",
]


@pytest.mark.parametrize("name", SEED_NAMES)
def test_every_reference_name_parses(name: str) -> None:
    spec = parse_strategy(name)
    assert parse_strategy(format_strategy(spec)) == spec


@pytest.mark.parametrize(
    "name",
    [
        "perc_calib_norm_albox",
        "nee_mean_entropy",
        "prune_rand_random",
        "full_prune_entropy",
        "highep_lowal_alluncert",
        "perc_calib_norm_bottomk_mean_albox",
    ],
)
def test_canonical_names_round_trip(name: str) -> None:
    assert format_strategy(parse_strategy(name)) == name


def test_parsed_fields() -> None:
    spec = parse_strategy("perc_calib_norm_bottomk_mean_albox")
    assert spec == StrategySpec(
        score="albox", perc=True, calib=True, norm=True, aggregation="mean", ordering="bottomk"
    )
    assert parse_strategy("prune_rand_random") == StrategySpec(
        score="random", prune="prune", prune_random=True
    )
    assert parse_strategy("full_prune_entropy").prune == "full_prune"
    # bare highep_lowal is shorthand for highep_lowal_alluncert
    assert parse_strategy("highep_lowal") == parse_strategy("highep_lowal_alluncert")
    # box is accepted and has no effect
    assert parse_strategy("box_albox") == parse_strategy("albox")
    # modifier order does not matter; the canonical name fixes it
    assert format_strategy(parse_strategy("mean_perc_entropy")) == "perc_mean_entropy"
    # rand (pruning) and random (score) never collide
    assert parse_strategy("random").prune_random is False


def test_mapping_form() -> None:
    spec = parse_strategy({"score": "albox", "perc": True, "ordering": "nee"})
    assert format_strategy(spec) == "perc_nee_albox"
    with pytest.raises(StrategyError, match="unknown key"):
        parse_strategy({"score": "albox", "percc": True})
    with pytest.raises(StrategyError, match="'score' is required"):
        parse_strategy({"perc": True})


_scores = st.sampled_from([*registered_scores(), *COLUMN_SCORES])


@st.composite
def specs(draw: st.DrawFn) -> StrategySpec:
    prune = draw(st.sampled_from(["none", "prune", "full_prune"]))
    return StrategySpec(
        score=draw(_scores),
        prune=prune,
        prune_random=prune != "none" and draw(st.booleans()),
        perc=draw(st.booleans()),
        calib=draw(st.booleans()),
        norm=draw(st.booleans()),
        aggregation=draw(st.sampled_from(["max", "mean"])),
        ordering=draw(st.sampled_from(["topk", "bottomk", "nee"])),
    )


@given(specs())
def test_parse_format_property(spec: StrategySpec) -> None:
    assert parse_strategy(format_strategy(spec)) == spec


@pytest.mark.parametrize(
    ("name", "fragments"),
    [
        ("entropyy", ["'entropyy'", "position 0", "'entropy'"]),
        ("perc_calib_nrom_albox", ["'nrom'", "position 2", "'norm'"]),
        ("perc_albx", ["'albx'", "position 1", "'albox'"]),
        ("bottomk_nee_entropy", ["'nee'", "position 1", "conflicts"]),
        ("prune_full_prune_entropy", ["'full_prune'", "position 1", "conflicts"]),
        ("entropy_albox", ["'albox'", "position 1", "only one score"]),
        ("entropy_perc", ["'perc'", "position 1", "score must be last"]),
        ("rand_entropy", ["'rand'", "position 0", "prune"]),
        ("highep_lowal_entropy", ["'entropy'", "conflicts"]),
        ("baseline_entropy", ["'baseline'", "position 0", "model.uncertainty"]),
        ("lossatt_albox", ["'lossatt'", "training setup"]),
        ("pseudoscore_entropy", ["'pseudoscore'", "ssl.selection_strategy"]),
        ("perc_calib", ["no score"]),
        ("perc_perc_entropy", ["repeated"]),
        ("", ["single '_'"]),
        ("perc__entropy", ["single '_'"]),
    ],
)
def test_errors_name_token_position_and_fix(name: str, fragments: list[str]) -> None:
    with pytest.raises(StrategyError) as info:
        parse_strategy(name)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_invalid_spec_values() -> None:
    with pytest.raises(StrategyError, match="needs 'prune'"):
        StrategySpec(score="entropy", prune_random=True)
    with pytest.raises(StrategyError, match="unknown score"):
        StrategySpec(score="nope")


def _explained_stages(name: str) -> dict[str, str]:
    """``explain``'s lines below the canonical name, as {stage: what it does}."""
    lines = explain(parse_strategy(name))
    assert lines[0] == f"canonical name: {format_strategy(parse_strategy(name))}"
    stages = dict(line.split(": ", 1) for line in lines[1:])
    assert len(stages) == len(lines) - 1  # one line per stage
    return stages


def test_explain_lists_enabled_stages() -> None:
    """Each modifier shows on its own stage's line, and a stage that is off has no line (or
    says so): the words of the name alone, e.g. in the canonical name, prove nothing."""
    on = _explained_stages("prune_perc_calib_nee_mean_entropy")
    assert on["before the loop"].startswith("prune by perceptual-hash duplicates")
    assert on["prepare"].startswith("calibrated")
    assert on["score"].startswith("entropy")
    assert on["aggregate per image"] == "mean"
    assert on["class weights"].startswith("perc")
    assert on["ordering"].startswith("nee")
    off = _explained_stages("entropy")
    assert "before the loop" not in off and "class weights" not in off
    assert off["prepare"].startswith("uncalibrated") and "relative" not in off["prepare"]
    assert off["aggregate per image"] == "max" and off["ordering"].startswith("top-k")
    other = _explained_stages("full_prune_rand_norm_bottomk_albox")
    assert other["before the loop"].startswith("full_prune randomly")
    assert other["prepare"].endswith("box stds relative to box size")
    assert other["score"].startswith("albox") and other["ordering"].startswith("bottom-k")


def test_config_rejects_bad_strategy_with_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        build_config({"al": {"strategy": "perc_entrpy"}})
    assert "al.strategy" in str(info.value) and "'entropy'" in str(info.value)
    assert build_config({"al": {"strategy": "perc_calib_norm_albox"}}).al.strategy
