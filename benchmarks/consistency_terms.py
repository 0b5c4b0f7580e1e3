"""Which consistency terms carry the cost of the momentum teacher? (one seed, ablation schedule)

Runs `momentum` (per-step teacher, λ_c 50) on the ablation scene with the consistency loss
restricted to some of its four attribute terms, and one variant where the opacity term covers
only the rendered Gaussians (officially it covers all k Gaussians of every visible anchor, so
anchors whose Gaussians are all transparent get a gradient from the teacher alone, which Adam
turns into full-size steps). Compare with `shared` and `momentum` of benchmarks/ablation.py at
the same seed (reused from its --work folder when present).

    python benchmarks/consistency_terms.py [--work results/ablation] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import ablation  # noqa: E402

TERMS = {"color": ("color",), "rotation_scale": ("quat", "scale"),
         "opacity": ("opacity",), "opacity_rendered": ("opacity_rendered",),
         "all_opacity_rendered": ("color", "quat", "scale", "opacity_rendered")}


def restricted_loss(terms: tuple[str, ...]):
    mse = torch.nn.functional.mse_loss

    def loss(student, teacher, selected):
        parts = {"color": lambda: mse(student.color[selected], teacher.color[selected]),
                 "quat": lambda: mse(student.quat[selected], teacher.quat[selected]),
                 "scale": lambda: mse(student.scale[selected], teacher.scale[selected]),
                 "opacity": lambda: mse(student.opacity, teacher.opacity),
                 "opacity_rendered": lambda: mse(student.opacity[selected],
                                                 teacher.opacity[selected])}
        return sum(parts[t]() for t in terms)
    return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("results/ablation"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(TERMS), choices=list(TERMS))
    parser.add_argument("--job", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.job:  # worker: patch the loss, then the ablation's job
        import mgs.train

        spec = json.loads(opts.job)
        mgs.train.consistency_loss = restricted_loss(tuple(spec["terms"]))
        row = ablation.run_job(Path(spec["root"]), Path(spec["scene"]), spec["config"], False)
        (Path(spec["root"]) / "result.json").write_text(json.dumps(row, indent=2))
        return
    defaults = ablation.build_parser().parse_args([])
    scene_dir = opts.work / "scene"
    ablation.make_scene(scene_dir)
    jobs = []
    for name in opts.variants:
        root = opts.work / f"terms_{name}" / f"seed{opts.seed}"
        config = ablation.job_config("momentum", opts.seed, defaults)
        spec = {"root": str(root), "scene": str(scene_dir), "config": config,
                "terms": TERMS[name]}
        jobs.append((f"terms_{name}", root, [sys.executable, __file__, "--job", json.dumps(spec)]))
    results = ablation.run_all([(n, r, None, None, None, cmd) for n, r, cmd in jobs],
                               opts.workers)
    rows = {n: r for (n, _, _), r in zip(jobs, results)}
    for reference in ("shared", "momentum"):
        path = opts.work / reference / f"seed{opts.seed}" / "result.json"
        if path.exists():
            rows[reference] = json.loads(path.read_text())
    print(f"\n{'variant':<22}{'PSNR':>7}{'SSIM':>8}{'LPIPS':>8}{'anchors':>9}{'cons share':>12}")
    for name, r in rows.items():
        print(f"{name:<22}{r['psnr']:>7.2f}{r['ssim']:>8.4f}{r['lpips_vgg']:>8.4f}"
              f"{r['anchors']:>9}{r.get('consistency_share', 0):>12.4f}")


if __name__ == "__main__":
    main()
