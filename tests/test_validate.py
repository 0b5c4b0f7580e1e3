"""mgs.validate: one spec per config key, the same as the workflow schema's, enforced alike by the
CLI and the workflow (NaN, inf, bools and wrong types rejected with the key's path and range)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from mgs.config import ExportConfig, TrainConfig
from mgs.errors import InputError
from mgs.momentum import MomentumConfig
from mgs.partition import PartitionConfig
from mgs.ingest.sfm import SfmConfig
from mgs.synthetic import SyntheticConfig
from mgs.validate import SPECS, check_scene, check_value, parse_spec

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"
CLASSES = {"synthetic": SyntheticConfig, "sfm": SfmConfig, "partition": PartitionConfig,
           "train": TrainConfig, "momentum": MomentumConfig, "export": ExportConfig}
# keys whose shape the schema states with anyOf/enum: checked by the dataclass itself
FREE_FORM = {("partition", "aabb"), ("partition", "margin")}


def schema_spec(prop: dict) -> str:
    """The spec string a schema property amounts to."""
    kind = prop.get("type")
    nullable = False
    if isinstance(kind, list):
        nullable, kind = "null" in kind, [k for k in kind if k != "null"][0]
    if kind is None:  # enum of strings (maybe with null)
        kind, nullable = "string", None in prop["enum"]
    length = ""
    if kind == "array":
        length, prop = f"[{prop['minItems']}]", prop["items"]
        kind = prop["type"]
    name = {"integer": "int", "number": "float", "boolean": "bool", "string": "str"}[kind]
    spec = name + ("?" if nullable else "") + length
    low, xlow = prop.get("minimum"), prop.get("exclusiveMinimum")
    high, xhigh = prop.get("maximum"), prop.get("exclusiveMaximum")
    if (low, xlow, high, xhigh) == (None,) * 4:
        return spec
    left = f"[{low}" if low is not None else f"({xlow}" if xlow is not None else "(-inf"
    right = f"{high}]" if high is not None else f"{xhigh})" if xhigh is not None else "inf)"
    return f"{spec} {left}, {right}"


def normalise(spec: str) -> dict:
    parsed = parse_spec(spec)
    parsed.pop("text")
    return parsed


@pytest.mark.parametrize("section", list(CLASSES))
def test_specs_match_the_schema_and_the_dataclass(section):
    schema = yaml.safe_load(SCHEMA.read_text())["$defs"][section]["properties"]
    fields = {f.name for f in dataclasses.fields(CLASSES[section])}
    assert set(SPECS[section]) | {k for s, k in FREE_FORM if s == section} == fields
    for key, spec in SPECS[section].items():
        if (section, key) not in FREE_FORM:
            assert normalise(spec) == normalise(schema_spec(schema[key])), key


def test_scene_keys_match_the_schema():
    schema = yaml.safe_load(SCHEMA.read_text())["$defs"]["scene"]["properties"]
    for key, spec in SPECS["scene"].items():
        if key != "name":  # the mapping key, not a property
            assert normalise(spec) == normalise(schema_spec(schema[key])), key


@pytest.mark.parametrize("value, spec, message", [
    (math.nan, "float [0, inf)", "finite number in [0, inf), got nan"),
    (math.inf, "float [0, inf)", "got inf"),
    (-1e-9, "float [0, inf)", "[0, inf)"),
    (0, "float (0, inf)", "(0, inf), got 0"),
    (1.0, "float [0, 1)", "[0, 1), got 1.0"),
    (True, "int [1, inf)", "an integer in [1, inf), got True"),
    (False, "float", "a finite number, got False"),
    ("four", "int [1, inf)", "got 'four'"),
    (2.5, "int", "an integer, got 2.5"),
    ("maybe", "bool", "true or false, got 'maybe'"),
    (1, "bool", "true or false"),
    (3, "str", "a string"),
    ([1, 2], "float[3] [0, 1]", "list of 3"),
    ([0, math.nan, 0], "float[3] [0, 1]", "x[1] must be a finite number"),
    (None, "int", "an integer"),
])
def test_bad_values_name_the_key_and_the_range(value, spec, message):
    with pytest.raises(InputError) as err:
        check_value(value, spec, "x")
    assert str(err.value).startswith("x") and message in str(err.value)


@pytest.mark.parametrize("value, spec, expected", [
    (5.0, "int [1, inf)", 5), (0, "float [0, 1]", 0), (None, "float? [0, 1)", None),
    ("inf", "float [0, inf]", math.inf), (math.inf, "float [0, inf]", math.inf),
    (-1, "int [-1, inf)", -1), ([0, 0.5, 1], "float[3] [0, 1]", [0, 0.5, 1]),
])
def test_good_values_pass(value, spec, expected):
    assert check_value(value, spec, "x") == expected


@pytest.mark.parametrize("cls, values, culprit", [
    (TrainConfig, {"feature_lr": math.nan}, "train.feature_lr"),
    (TrainConfig, {"scaling_lr": -0.1}, "train.scaling_lr"),
    (TrainConfig, {"iterations": True}, "train.iterations"),
    (TrainConfig, {"n_offsets": "four"}, "train.n_offsets"),
    (MomentumConfig, {"sigma": math.nan}, "momentum.sigma"),
    (MomentumConfig, {"sigma": 0}, "momentum.sigma"),
    (MomentumConfig, {"rounds": "four"}, "momentum.rounds"),
    (PartitionConfig, {"threshold": math.nan}, "partition.threshold"),
    (PartitionConfig, {"min_cameras": True}, "partition.min_cameras"),
])
def test_from_dict_uses_the_shared_checks(cls, values, culprit):
    with pytest.raises(InputError, match=culprit.replace(".", r"\.")):
        cls.from_dict(values, source="f.yaml")


def test_workflow_scene_check():
    check_scene({"source": "synthetic", "train": {"iterations": 10}}, "scenes.a")
    with pytest.raises(InputError, match=r"scenes\.a: momentum\.sigma"):
        check_scene({"momentum": {"sigma": math.nan}}, "scenes.a")
    with pytest.raises(InputError, match="train must be a mapping"):
        check_scene({"train": [1, 2]}, "scenes.a")
