"""The workflow's config checked against its schema, defaults filled in, as the workflow and
`mgs plan` both read it."""

from __future__ import annotations

from pathlib import Path

import yaml

from mgs.errors import InputError, MgsError
from mgs.validate import check_scene

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA_HINT = "(keys and their meaning: workflow/schemas/config.schema.yaml)"


def check_workflow_config(config: dict, schema=SCHEMA) -> None:
    """Schema check with defaults filled in (in place); the first error names its key."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    flag = config.get("allow_full_rerun")  # --config allow_full_rerun=true arrives as text
    if isinstance(flag, str) and flag.lower() in ("true", "false"):
        config["allow_full_rerun"] = flag.lower() == "true"
    try:
        validate(config, str(schema))
    except WorkflowError as exc:
        error = exc.__cause__ or exc.__context__
        if not hasattr(error, "absolute_path"):
            raise
        where = ".".join(str(part) for part in error.absolute_path) or "top level"
        raise MgsError(f"invalid config at '{where}': {error.message} {SCHEMA_HINT}") from None
    for name, scene in config["scenes"].items():
        # the checks the mgs verbs run: jsonschema's minimum/maximum let NaN through
        try:
            check_scene(scene, f"scenes.{name}")
        except MgsError as exc:
            raise MgsError(f"invalid config: {exc} {SCHEMA_HINT}") from None
        if scene["source"] in ("synthetic", "images") and scene["resolution"] != 1:
            raise MgsError(
                f"invalid config at 'scenes.{name}.resolution': {scene['resolution']}; "
                f"{scene['source']} scenes are made at their final size, so resolution "
                "must be 1 (set train.resolution to train on smaller images)")


def _read_yaml(path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read config {path} ({exc}); fix or name another") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a YAML mapping; see config/config.yaml")
    return data


def selected_scenes(configfiles, config: dict) -> list[str]:
    """Scenes defined by the --configfile files when there are any, else every scene."""
    names = []
    for path in configfiles:
        names += [name for name in _read_yaml(path).get("scenes") or {} if name not in names]
    return names or list(config["scenes"])


def load_workflow_config(base, configfiles=()) -> tuple[dict, list[str]]:
    """The config `base` with `configfiles` merged over it in order (as Snakemake's
    --configfile), checked; and the scenes shown (selected_scenes)."""
    from snakemake.utils import update_config

    config = _read_yaml(base)
    for path in configfiles:
        update_config(config, _read_yaml(path))
    if "scenes" not in config:
        raise InputError(f"{base}: no scenes; see config/config.yaml")
    check_workflow_config(config)
    return config, selected_scenes(configfiles, config)
