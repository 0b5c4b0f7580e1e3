"""Type and range checks of every config number, shared by the CLI verbs and the workflow.

One spec per key, in the schema's own terms: ``int [1, inf)``, ``float? [0, 1)`` (None allowed),
``float[3] [0, 1]`` (three numbers). NaN never passes, infinity only where the range includes
it, a bool never counts as a number (YAML ``true`` is not ``1``), and an integer must be whole.
The specs mirror workflow/schemas/config.schema.yaml (tests/test_validate.py checks every key);
jsonschema alone lets NaN through ``minimum``, so the workflow runs these checks too.
Pure Python on purpose: the workflow imports it when it reads its config.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

from mgs.errors import InputError

_LR = "float [0, inf)"
SPECS: dict[str, dict[str, str]] = {
    "scene": {"name": "str", "source": "str", "path": "str?", "resolution": "int [1, inf)",
              "up": "str?", "coarse_iterations": "int [1, inf)"},
    "synthetic": {
        "seed": "int", "num_views": "int [1, inf)", "width": "int [8, inf)",
        "height": "int [8, inf)", "num_buildings": "int [0, inf)", "extent": "float (0, inf)",
        "altitude": "float (0, inf)", "min_height": "float [0, inf)",
        "max_height": "float [0, inf)", "hfov_deg": "float [10, 150)",
        "oblique_deg": "float [0, 60)", "num_passes": "int [1, inf)",
        "num_points": "int [1, inf)", "supersample": "int [1, inf)", "sun_azimuth_deg": "float",
        "sun_elevation_deg": "float", "shadows": "bool"},
    "sfm": {
        "matching": "str", "min_registered": "float [0, 1]", "max_image_size": "int",
        "max_features": "int [64, inf)", "camera_model": "str",
        "sequential_overlap": "int [1, inf)", "spatial_neighbors": "int [1, inf)",
        "spatial_max_distance": "float [0, inf)", "seed": "int", "threads": "int [-1, inf)"},
    "partition": {
        "block_dim": "int[3] [1, inf)", "up": "str?", "assignment": "str",
        "threshold": "float? [0, 1)", "min_cameras": "int [2, inf)", "margin": "float [0, inf]",
        "coarse": "str?", "ssim_max_side": "int [16, inf)", "device": "str"},
    "train": {
        "feat_dim": "int [1, inf)", "n_offsets": "int [1, inf)", "voxel_size": "float [0, inf)",
        "max_init_anchors": "int [0, inf)", "appearance_dim": "int [0, inf)",
        "appearance_eval": "str", "iterations": "int [1, inf)",
        "lr_max_steps": "int [1, inf)", "seed": "int", "resolution": "int [1, inf)",
        "offset_lr_init": _LR, "offset_lr_final": _LR, "feature_lr": _LR, "scaling_lr": _LR,
        "mlp_opacity_lr_init": _LR, "mlp_opacity_lr_final": _LR, "mlp_cov_lr_init": _LR,
        "mlp_cov_lr_final": _LR, "mlp_color_lr_init": _LR, "mlp_color_lr_final": _LR,
        "appearance_lr_init": _LR, "appearance_lr_final": _LR,
        "lambda_dssim": "float [0, 1]", "scale_reg_weight": "float [0, inf)",
        "start_stat": "int [0, inf)", "update_from": "int [0, inf)",
        "update_interval": "int [1, inf)", "update_until": "int [0, inf)",
        "min_opacity": "float [0, inf)", "success_threshold": "float [0, 1]",
        "densify_grad_threshold": "float [0, inf)", "update_depth": "int [1, inf)",
        "update_init_factor": "int [1, inf)", "update_hierarchy_factor": "int [1, inf)",
        "max_scale_log": "float", "eval_interval": "int [1, inf)",
        "checkpoint_interval": "int [1, inf)", "device": "str", "backend": "str",
        "threads": "int [0, inf)", "background": "float[3] [0, 1]"},
    "momentum": {
        "mode": "str", "rounds": "int [1, inf)", "iterations_per_round": "int [1, inf)",
        "final_iterations": "int [0, inf)", "momentum": "float [0, 1)",
        "consistency_weight": "float [0, inf)", "sigma": "float (0, inf)",
        "ssim_scale": "float [0, inf)", "warmup_rounds": "int [0, inf)",
        "metric_ema": "float [0, 1)", "keep_rounds": "int [0, inf)", "teacher": "str",
        "teacher_sync_momentum": "float [0, 1)", "sync": "str"},
    "export": {"sh_degree": "int [0, 3]", "refine_steps": "int [0, inf)",
               "photo_weight": "float [0, 1]"},
}
# words a number key also takes (the dataclass gives them their meaning)
WORDS: dict[tuple[str, str], tuple[str, ...]] = {("partition", "margin"): ("all",)}
SECTIONS = ("synthetic", "sfm", "partition", "train", "momentum", "export")
_SPEC = re.compile(r"^(int|float|bool|str)(\?)?(?:\[(\d+)\])?"
                   r"(?: ([\[(])(-?[\d.]+|-inf), (-?[\d.]+|inf)([\])]))?$")
_INF_WORDS = ("inf", ".inf", "infinity")


def parse_spec(spec: str) -> dict[str, Any]:
    match = _SPEC.match(spec)
    if match is None:
        raise ValueError(f"bad spec {spec!r}")
    kind, nullable, length, left, low, high, right = match.groups()
    return dict(kind=kind, nullable=bool(nullable), length=int(length) if length else None,
                low=float(low) if low else None, high=float(high) if high else None,
                low_open=left == "(", high_open=right == ")",
                text=spec.split(" ", 1)[1] if " " in spec else "")


def check_value(value: Any, spec: str, where: str) -> Any:
    """`value` checked against `spec` (ints made int); InputError naming `where` otherwise."""
    s = parse_spec(spec)
    if value is None and s["nullable"]:
        return None
    if s["length"] is not None:
        if not isinstance(value, (list, tuple)) or len(value) != s["length"]:
            raise InputError(f"{where} must be a list of {s['length']} {_noun(s)}, "
                             f"got {value!r}")
        return [_scalar(v, s, f"{where}[{i}]") for i, v in enumerate(value)]
    return _scalar(value, s, where)


_NOUNS = {"int": ("an integer", "integers"), "float": ("a finite number", "finite numbers"),
          "bool": ("true or false", "true/false values"), "str": ("a string", "strings")}


def _noun(s: dict, plural: bool = True) -> str:
    noun = _NOUNS[s["kind"]][plural]
    return f"{noun} in {s['text']}" if s["text"] else noun


def _scalar(value: Any, s: dict, where: str) -> Any:
    kind, want = s["kind"], _noun(s, plural=False)
    if s["nullable"]:
        want += " (or null)"
    bad = f"{where} must be {want}, got {value!r}"
    if kind == "bool":
        if not isinstance(value, bool):
            raise InputError(bad)
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise InputError(bad)
        return value
    inf_ok = s["high"] == math.inf and not s["high_open"]
    if inf_ok and isinstance(value, str) and value.strip().lower() in _INF_WORDS:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(bad)
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not inf_ok):
        raise InputError(bad)
    if kind == "int":
        if not number.is_integer():
            raise InputError(bad)
        value = int(value)
    low, high = s["low"], s["high"]
    if low is not None and (number < low or (s["low_open"] and number == low)):
        raise InputError(bad)
    if high is not None and (number > high or (s["high_open"] and number == high)):
        raise InputError(bad)
    return value


def check_section(values: dict[str, Any], section: str, source: str) -> dict[str, Any]:
    """Every known key of `values` checked; returns a copy with the normalised values.

    Keys without a spec are left to the dataclass's own checks (unknown keys are rejected by
    mgs.config.check_known_keys).
    """
    specs = SPECS[section]
    checked = dict(values)
    for key, value in values.items():
        words = WORDS.get((section, key), ())
        if isinstance(value, str) and value.strip().lower() in words:
            checked[key] = value.strip().lower()
        elif key in specs:
            path = key if section == "scene" else f"{section}.{key}"
            try:
                checked[key] = check_value(value, specs[key], f"{source}: {path}")
            except InputError as exc:
                if not words:
                    raise
                raise InputError(f"{exc} (or {' or '.join(words)})") from None
    return checked


def check_scene(settings: dict[str, Any], source: str) -> None:
    """A workflow scene's settings: scene keys and every section (what the schema describes)."""
    check_section({k: v for k, v in settings.items() if k in SPECS["scene"]}, "scene", source)
    for section in SECTIONS:
        values = settings.get(section) or {}
        if not isinstance(values, dict):
            raise InputError(f"{source}: {section} must be a mapping of keys, got {values!r}")
        check_section(values, section, source)
