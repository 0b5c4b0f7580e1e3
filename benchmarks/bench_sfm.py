"""SfM on all Caliterra drone photos: exhaustive vs GPS-spatial matching.

Prints the time of each stage, registered / total images, points, reprojection error and how
the model was oriented, for each matching mode. Reads ../shared/data/caliterra/images relative
to the repository (or --images). Expect minutes on 2 CPU cores.

    python benchmarks/bench_sfm.py [--images DIR] [--max-features 4096] [--modes exhaustive spatial]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from mgs.ingest.sfm import REPORT_JSON, SfmConfig, run_sfm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "caliterra" / "images"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    # 4096 features, as in the PLATFORM.md measurement this is compared with
    parser.add_argument("--max-features", type=int, default=4096)
    parser.add_argument("--max-image-size", type=int, default=3200)
    parser.add_argument("--modes", nargs="+", default=["exhaustive", "spatial"])
    parser.add_argument("--threads", type=int, default=-1)
    args = parser.parse_args(argv)
    if not args.images.is_dir():
        print(f"no images at {args.images}; pass --images", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    rows = []
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix=f"bench_sfm_{mode}_") as tmp:
            config = SfmConfig(matching=mode, max_features=args.max_features,
                               max_image_size=args.max_image_size, threads=args.threads,
                               min_registered=0.0)
            tic = time.perf_counter()
            run_sfm(args.images, Path(tmp) / "scene", config)
            total = time.perf_counter() - tic
            report = json.loads((Path(tmp) / "scene" / REPORT_JSON).read_text())
        rows.append(dict(mode=mode, total_s=round(total, 1), **report["seconds"],
                         registered=f"{report['registered']}/{report['total']}",
                         points=report["points"], reproj_px=report["reprojection_error_px"],
                         orientation=report["orientation"]))
    keys = list(rows[0])
    print("\n" + "\t".join(keys))
    for row in rows:
        print("\t".join(str(row[k]) for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
