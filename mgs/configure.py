"""`mgs configure`: a run folder's flat config.yaml from one scene of the workflow config.

Every section (scene, synthetic, sfm, partition, train, momentum, export, paper) is merged over the
defaults and checked as the verb that reads it would check it, so a bad value fails here, before
any job runs. The file is left untouched when its content would not change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from mgs.atomic import refuse_overlap
from mgs.config import check_config, yaml_section
from mgs.errors import MgsError

log = logging.getLogger("mgs.configure")


def add_parser(sub) -> None:
    p = sub.add_parser("configure", help="write a run folder's flat config.yaml (sections scene, "
                                         "synthetic, sfm, partition, train, momentum, export, "
                                         "paper) from one scene of the workflow config")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--settings",
                        help="the scene's settings as JSON (what the workflow passes)")
    source.add_argument("--config", help="workflow config file (scenes: NAME: ...), with --scene")
    p.add_argument("--scene", help="scene name (required with --config)")
    p.add_argument("--out", required=True, help="file to write, e.g. results/NAME/config.yaml; "
                                                "left untouched when its content would not change")
    p.set_defaults(func=_run_configure)


# scene-level keys of the workflow config (workflow/schemas/config.schema.yaml)
SCENE_KEYS = ("name", "source", "path", "resolution", "up", "coarse_iterations")


def _flat_config(settings: dict, source: str) -> dict:
    """Every section merged over the dataclass defaults and checked like the verbs check it."""
    from mgs.config import ExportConfig, TrainConfig
    from mgs.ingest.sfm import SfmConfig
    from mgs.momentum import MomentumConfig
    from mgs.partition import PartitionConfig
    from mgs.synthetic import SyntheticConfig
    from mgs.validate import SECTIONS, check_section

    settings = dict(settings)
    sections = {name: settings.pop(name, None) or {} for name in SECTIONS}
    paper = settings.pop("paper", None)
    unknown = sorted(set(settings) - set(SCENE_KEYS))
    if unknown:
        raise MgsError(f"{source}: unknown scene key(s) {', '.join(unknown)}; known: "
                       f"{', '.join(SCENE_KEYS)}, "
                       "synthetic, sfm, partition, train, momentum, export, paper")
    settings.update(check_section(settings, "scene", source))
    for name, cls in (("synthetic", SyntheticConfig), ("sfm", SfmConfig)):
        config = cls(**check_config(cls, sections[name], name, source))
        config.validate()
        sections[name] = dataclasses.asdict(config)
    partition = PartitionConfig.from_dict(sections["partition"], source=source)
    sections["partition"] = dataclasses.asdict(partition)
    sections["train"] = TrainConfig.from_dict(sections["train"], source=source).to_dict()
    sections["momentum"] = dataclasses.asdict(MomentumConfig.from_dict(sections["momentum"],
                                                                       source=source))
    sections["export"] = ExportConfig.from_dict(sections["export"], source=source).to_dict()
    return {"scene": settings, **sections, "paper": paper}


def _run_configure(args) -> None:
    import yaml

    from mgs.atomic import write_text

    if args.settings is not None:
        try:
            settings = json.loads(args.settings)
        except json.JSONDecodeError as exc:
            raise MgsError(f"--settings is not valid JSON: {exc}") from exc
        source = "--settings"
    else:
        if not args.scene:
            raise MgsError("--config needs --scene NAME (a key under scenes:)")
        scenes = yaml_section(args.config, "scenes")
        if not isinstance(scenes.get(args.scene), dict):
            raise MgsError(f"{args.config}: no scene {args.scene!r} under scenes: "
                           f"(found: {', '.join(sorted(scenes)) or 'none'})")
        settings = dict(scenes[args.scene], name=args.scene)
        source = f"{args.config} (scene {args.scene})"
    if not isinstance(settings, dict):
        raise MgsError(f"{source}: the scene settings must be a mapping")
    flat = _flat_config(settings, source)

    class Dumper(yaml.SafeDumper):  # block mappings, one-line lists ([2, 2, 1])
        pass

    Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", value, flow_style=True))
    text = ("# Written by `mgs configure` from the workflow config; edit that instead.\n"
            + yaml.dump(flat, Dumper=Dumper, sort_keys=False, default_flow_style=False))
    out = Path(args.out)
    if args.config is not None:
        refuse_overlap(out, {"workflow config": args.config}, "output file")
    if out.is_file() and out.read_text() == text:
        log.info("%s is up to date", out)
        return
    write_text(out, text)
    log.info("wrote %s", out)
