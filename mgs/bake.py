"""Static Gaussians for splats.ply: the decoder's view-dependent Gaussians baked over the
training views.

The decoder decides per view which of an anchor's k Gaussians exist (opacity > 0), and their
opacity, shape, rotation and colour, all from the direction the anchor is seen from. A standard
3DGS viewer has one set. `bake_gaussians` decodes every anchor from the training cameras that see
it (mgs.sh's views and weights: those whose frame holds the anchor, nearest first) and keeps what
those views agree on, per Gaussian:

- opacity: the mean over the views of what the model renders, max(opacity, 0) (a Gaussian the
  decoder drops in a view counts as transparent there); Gaussians whose mean stays below
  `min_opacity` are left out;
- scale and rotation: means weighted by that rendered opacity (rotations sign-aligned to the
  most opaque view's before the sum, then normalised), so views where the Gaussian is not drawn
  do not shape it;
- colour: SH fitted to the decoder's colours with the same weights (mgs.sh.fit_sh).

No static set reproduces a view-dependent model exactly: besides the averages above, the model
drops every Gaussian of an anchor outside a view's frustum, which a viewer cannot. `refine` closes
most of what remains by fitting the baked Gaussians (positions, opacity, scale, rotation, SH) for
a few hundred steps to a target image per training view: mgs.merge gives the training photos
(its default: a short 3DGS fine-tune from the bake), the model's own renders (distillation: the
PLY then renders like the model) or a blend of the two (`export.photo_weight`).

`bake_at_center` is the single-viewpoint bake (everything decoded from one centre, the selection of
that view): the PLY without training cameras, and the reference the benchmark compares against.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mgs.config import EXPORT_REFINE_STEPS
from mgs.model import Anchors, Decoder, camera_center, decode_attributes, neural_gaussians
from mgs.render import render
from mgs.sh import (DEFAULT_RIDGE, FIT_CHUNK_FLOATS, MAX_VIEWS, SH_C0, FitCameras, check_degree,
                    coefficient_count, fit_sh, sh_colors, views_of)

log = logging.getLogger("mgs.bake")

MIN_OPACITY = 1.0 / 255  # below one 8-bit step in every view on average: nothing a viewer shows
REFINE_STEPS = EXPORT_REFINE_STEPS
# Adam rates per parameter: the 3DGS rates for opacity logits, log scales, rotations and SH, times
# REFINE_LR_SCALE (the bake starts close: 1.0 overshoots, README); positions per unit of the
# training cameras' largest distance apart, a tenth of the rate 3DGS gives per unit of extent
REFINE_LR = {"means": 1.6e-5, "opacity": 0.05, "scales": 0.005, "quats": 0.001, "sh_dc": 0.0025,
             "sh_rest": 0.0025 / 20}
REFINE_LR_SCALE = 0.3


@dataclass
class BakedGaussians:
    means: torch.Tensor  # (G, 3)
    opacities: torch.Tensor  # (G,) in (0, 1]
    scales: torch.Tensor  # (G, 3) linear
    quats: torch.Tensor  # (G, 4) normalised wxyz
    sh: torch.Tensor  # (G, (degree+1)², 3)

    def to(self, device) -> "BakedGaussians":
        return BakedGaussians(self.means.to(device), self.opacities.to(device),
                              self.scales.to(device), self.quats.to(device), self.sh.to(device))

    @staticmethod
    def cat(parts: list["BakedGaussians"], degree: int) -> "BakedGaussians":
        if not parts:
            return BakedGaussians(torch.zeros(0, 3), torch.zeros(0), torch.zeros(0, 3),
                                  torch.zeros(0, 4), torch.zeros(0, coefficient_count(degree), 3))
        return BakedGaussians(*(torch.cat([getattr(p, name) for p in parts]) for name in
                                ("means", "opacities", "scales", "quats", "sh")))


@torch.no_grad()
def bake_gaussians(decoder: Decoder, anchors: Anchors, latent, cameras: FitCameras, degree: int,
                   min_opacity: float = MIN_OPACITY, ridge: float = DEFAULT_RIDGE,
                   max_views: int = MAX_VIEWS, chunk_floats: int = FIT_CHUNK_FLOATS
                   ) -> BakedGaussians:
    """The anchors' Gaussians as the training views see them on average (module docstring), in
    chunks of anchors so memory stays bounded; anchor-major order."""
    k, count = decoder.n_offsets, coefficient_count(check_degree(degree))
    views_per_anchor = min(max_views, cameras.count)
    # per Gaussian and view: SH basis and fit temporaries, 11 decoded floats, 3 direction floats
    step = max(1, chunk_floats // (k * views_per_anchor * (count + 20)))
    parts = []
    for start in range(0, anchors.count, step):
        end = min(start + step, anchors.count)
        parts.append(_bake_chunk(decoder, anchors, slice(start, end), latent, cameras,
                                 views_per_anchor, degree, min_opacity, ridge))
    return BakedGaussians.cat([p for p in parts if len(p.means)], degree)


def _bake_chunk(decoder, anchors, rows: slice, latent, cameras, views_per_anchor, degree,
                min_opacity, ridge) -> BakedGaussians:
    k = decoder.n_offsets
    xyz, features = anchors.xyz[rows], anchors.features[rows]
    n = len(xyz)
    views, weights = views_of(xyz, cameras, views_per_anchor)  # (A, M)
    m = views.shape[1]
    centers = cameras.centers[views]  # (A, M, 3)
    view_dir = nn.functional.normalize(xyz[:, None] - centers, dim=-1)
    z = torch.cat([features[:, None].expand(-1, m, -1), view_dir], dim=-1)
    opacity, cov, color = decoder(z.reshape(n * m, -1), latent)

    def per_gaussian(values, width):  # (A·M, k·width) → (A·k, M, width)
        return values.reshape(n, m, k, width).transpose(1, 2).reshape(n * k, m, width)

    alpha = per_gaussian(opacity, 1)[..., 0].clamp_min(0.0)  # what the model renders per view
    cov = per_gaussian(cov, 7)
    base_scale = torch.exp(anchors.scaling[rows, 3:]).repeat_interleave(k, dim=0)  # (A·k, 3)
    scales = base_scale[:, None] * torch.sigmoid(cov[..., :3])
    quats = nn.functional.normalize(cov[..., 3:7], dim=-1)
    view_weight = weights.repeat_interleave(k, dim=0)  # (A·k, M)
    mean_alpha = (view_weight * alpha).sum(1) / view_weight.sum(1)
    keep = mean_alpha > min_opacity
    drawn = (view_weight * alpha)[keep]  # (G, M): a view counts as much as it shows the Gaussian
    total = drawn.sum(1, keepdim=True)
    scale = (drawn[..., None] * scales[keep]).sum(1) / total
    quats = quats[keep]
    reference = quats.gather(1, drawn.argmax(1)[:, None, None].expand(-1, 1, 4))
    aligned = torch.where((quats * reference).sum(-1, keepdim=True) < 0, -quats, quats)
    quat = nn.functional.normalize((drawn[..., None] * aligned).sum(1), dim=-1)
    offsets = anchors.offsets[rows] * torch.exp(anchors.scaling[rows, None, :3])
    means = (xyz[:, None] + offsets).reshape(-1, 3)[keep]
    dirs = nn.functional.normalize(means[:, None] - centers.repeat_interleave(k, dim=0)[keep],
                                   dim=-1)
    sh = fit_sh(dirs, per_gaussian(color, 3)[keep], drawn, degree, ridge)
    return BakedGaussians(means, mean_alpha[keep], scale, quat, sh)


@torch.no_grad()
def bake_at_center(decoder: Decoder, anchors: Anchors, latent, center: torch.Tensor
                   ) -> BakedGaussians:
    """Everything decoded from one viewpoint (its selection, its colour as degree-0 SH)."""
    everything = torch.ones(anchors.count, dtype=torch.bool)
    g = neural_gaussians(anchors, everything,
                         decode_attributes(decoder, anchors, everything, center, latent))
    sh = ((g.colors - 0.5) / SH_C0)[:, None]
    return BakedGaussians(g.means, g.opacities, g.scales, g.quats, sh)


def refine(g: BakedGaussians, cameras: list, target: Callable[[int, dict], torch.Tensor],
           background: torch.Tensor, steps: int = REFINE_STEPS, lr_scale: float = REFINE_LR_SCALE,
           seed: int = 0, progress: bool = True) -> BakedGaussians:
    """Fit `g` for `steps` Adam steps to `target(i, view)`, the image (H, W, 3) to match from
    training camera i of `cameras` (mgs.scene.Camera), given with its render() arguments (viewmat,
    K, width, height on g's device), by the L1 difference of the renders (the squared difference
    measured 0.05 dB better on Caliterra but 0.02 worse on the demo, and slower on the flickering
    decoder of the tests); views in a seeded random order, each target kept (as float16) once
    asked for. Gaussians whose opacity falls below MIN_OPACITY are left out of the result."""
    if steps <= 0 or not len(g.means):
        return g
    from tqdm import tqdm

    device = g.means.device
    views = [dict(viewmat=torch.as_tensor(c.world_to_camera, dtype=torch.float32, device=device),
                  K=torch.as_tensor(c.K, dtype=torch.float32, device=device), width=c.width,
                  height=c.height) for c in cameras]
    centers = torch.stack([camera_center(v["viewmat"]) for v in views])
    extent = float(torch.cdist(centers, centers).max()) or 1.0
    params = {"means": g.means.clone(), "opacity": torch.logit(g.opacities.clamp(1e-4, 1 - 1e-4)),
              "scales": torch.log(g.scales.clamp_min(1e-12)), "quats": g.quats.clone(),
              "sh_dc": g.sh[:, :1].clone(), "sh_rest": g.sh[:, 1:].clone()}
    rates = dict(REFINE_LR, means=REFINE_LR["means"] * extent)
    groups = [{"params": [p.requires_grad_(True)], "lr": rates[name] * lr_scale}
              for name, p in params.items() if p.numel()]
    optimizer = torch.optim.Adam(groups, eps=1e-15)
    generator = torch.Generator().manual_seed(seed)
    cache: dict[int, torch.Tensor] = {}
    order: list[int] = []
    bar = tqdm(range(steps), desc="refine splats.ply", disable=not progress, leave=False)
    for _ in bar:
        if not order:
            order = torch.randperm(len(views), generator=generator).tolist()
        i = order.pop()
        if i not in cache:
            with torch.no_grad():
                cache[i] = target(i, views[i]).to(device, torch.float16)
        with torch.enable_grad():  # callers bake under no_grad
            loss = (_render(params, views[i], background) - cache[i].float()).abs().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        loss = loss.detach()
        bar.set_postfix(l1=f"{float(loss):.4f}")
    with torch.no_grad():
        opacity = torch.sigmoid(params["opacity"])
        keep = opacity > MIN_OPACITY
        refined = BakedGaussians(params["means"][keep], opacity[keep],
                                 torch.exp(params["scales"][keep]),
                                 nn.functional.normalize(params["quats"][keep], dim=1),
                                 torch.cat([params["sh_dc"], params["sh_rest"]], 1)[keep])
    log.info("refined %d Gaussians for %d steps on %d training views (last L1 %.4f); %d kept",
             len(g.means), steps, len(views), float(loss), len(refined.means))
    return refined


def _render(params: dict, view: dict, background: torch.Tensor) -> torch.Tensor:
    """The image a 3DGS viewer shows of the parameters: SH evaluated for this camera."""
    sh = torch.cat([params["sh_dc"], params["sh_rest"]], 1)
    colors = sh_colors(sh, params["means"], camera_center(view["viewmat"]))
    return render(params["means"], nn.functional.normalize(params["quats"], dim=1),
                  torch.exp(params["scales"]), torch.sigmoid(params["opacity"]), colors,
                  background=background, **view).image
