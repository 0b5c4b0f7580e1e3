"""Merge finalized blocks into one model and export it.

Each block keeps only the anchors inside its own cells (half-open, so every anchor lands in
exactly one block); the decoder is the last student average (or one decoder per block in the
`independent` ablation mode). Exports: `anchors.ply` (Scaffold-GS property layout),
`decoder.pt`, and `splats.ply`, a standard 3DGS PLY of the decoded Gaussians baked over the
training views (mgs.bake: which Gaussians exist, their opacity, shape and rotation as those views
see them on average, colour as spherical harmonics `f_dc_*`, `f_rest_*` of degree `sh_degree`
fitted to the decoder's colours), then refined on those views' photos or the model's renders of
them (`photo_weight`). With appearance latents, decoder.pt also carries the table (the last sync's
per-image average, or one table per block when blocks keep their own decoders) with the training
cameras' names and centres, and splats.ply bakes the mean latent in.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from mgs.appearance import AppearanceImages, choose_row, latent_for
from mgs.atomic import atomic_path, ensure_writable_dir
from mgs.bake import MIN_OPACITY, BakedGaussians, bake_at_center, bake_gaussians, refine
from mgs.checkpoint import load_checkpoint, save_checkpoint
from mgs.device import resolve_device
from mgs.errors import InputError
from mgs.model import INIT_OPACITY, Anchors, Decoder, camera_center, decode
from mgs.render import render
from mgs.scene import load_image
from mgs.sh import SH_C0, FitCameras, check_degree, sh_colors

log = logging.getLogger("mgs.merge")

@dataclass
class ModelAppearance:
    """The merged model's latents: one table per decoder over the training images."""
    images: AppearanceImages
    tables: list[torch.Tensor]  # (n_images, dim) each
    held: torch.Tensor  # bool over the rows: trained by some block

    def choose(self, center: torch.Tensor, rule: str) -> int | None:
        """The training image a test view at `center` takes its latent from (None = mean)."""
        return choose_row(self.images, self.held, center, rule)

    def latents(self, row: int | None) -> list[torch.Tensor]:
        return [latent_for(table, self.held, row) for table in self.tables]


@dataclass
class MergedModel:
    anchors: Anchors
    anchor_block: torch.Tensor  # (N,) index into `decoders`
    decoders: list[Decoder]
    appearance: ModelAppearance | None = None

    def groups(self):
        """(anchors, decoder) per decoder, for rendering with several decoders."""
        if len(self.decoders) == 1:
            return [(self.anchors, self.decoders[0])]
        tensors = self.anchors.tensors()
        return [(Anchors.from_tensors({k: v[self.anchor_block == i] for k, v in tensors.items()}),
                 decoder) for i, decoder in enumerate(self.decoders)]


def merge_blocks(run, out_dir: str | Path, sh_degree: int | None = None,
                 refine_steps: int | None = None, photo_weight: float | None = None
                 ) -> MergedModel:
    """Crop each finalized block to its own cells and concatenate (see module docstring).
    `sh_degree`, `refine_steps` and `photo_weight` of splats.ply: None = the run's `export`
    settings (mgs.config.ExportConfig)."""
    sh_degree = run.export.sh_degree if sh_degree is None else sh_degree
    refine_steps = run.export.refine_steps if refine_steps is None else refine_steps
    photo_weight = run.export.photo_weight if photo_weight is None else photo_weight
    partition = run.partition()
    n = len(partition.blocks)
    parts: dict[str, list[torch.Tensor]] = {"xyz": [], "features": [], "offsets": [], "scaling": []}
    anchor_block, decoders, tables = [], [], []
    for b in range(n):
        state = run.load(run.final_path(b))
        tensors = state["anchors"]
        own = torch.as_tensor(partition.block_of_points(tensors["xyz"].numpy()) == b)
        for key in parts:
            parts[key].append(tensors[key][own])
        decoder_index = 0 if run.momentum.shares_decoder else b
        anchor_block.append(torch.full((int(own.sum()),), decoder_index))
        decoders.append(state["decoder"])
        tables.append(state.get("appearance"))
        log.info("block %d: kept %d of %d anchors inside its cells", b, int(own.sum()), len(own))
    shared = run.load(run.shared_path(run.momentum.rounds))
    if run.momentum.shares_decoder:
        decoders, tables = [shared["student"]], [shared.get("appearance")]
    appearance = None
    if run.train.appearance_dim:
        appearance = ModelAppearance(AppearanceImages.from_scene(run.scene()), tables,
                                     shared["appearance_held"])
    merged = {key: torch.cat(values) for key, values in parts.items()}
    model = MergedModel(Anchors.from_tensors(merged), torch.cat(anchor_block),
                        [_decoder_from_state(state, run.train) for state in decoders],
                        appearance)
    out_dir = ensure_writable_dir(out_dir)
    save_model(model, out_dir / "decoder.pt")
    write_anchor_ply(model.anchors, out_dir / "anchors.ply")
    scene, factor = run.scene(), run.train.resolution
    originals = scene.train_cameras()
    cameras = [c.scaled(factor) for c in originals]
    center = torch.as_tensor(np.mean([c.center for c in cameras], axis=0), dtype=torch.float32)
    device = resolve_device(run.train.device) if refine_steps > 0 else torch.device("cpu")
    count = export_splats(model, out_dir / "splats.ply", center, cameras, sh_degree,
                          refine_steps=refine_steps, background=run.train.background,
                          device=device, photo_weight=photo_weight,
                          photos=lambda i: load_image(originals[i], factor, scene.scene_dir,
                                                      run.train.background))
    log.info("merged %d anchors from %d blocks; %d Gaussians in splats.ply (SH degree %d, "
             "%d refinement steps, photo weight %g)", model.anchors.count, n, count, sh_degree,
             refine_steps, photo_weight)
    return model


def _decoder_from_state(state: dict, config) -> Decoder:
    decoder = Decoder(config.feat_dim, config.n_offsets, appearance_dim=config.appearance_dim)
    decoder.load_state_dict(state)
    return decoder.requires_grad_(False)


def model_to(model: MergedModel, device: torch.device) -> MergedModel:
    if device.type == "cpu":
        return model
    return MergedModel(model.anchors.to(device), model.anchor_block.to(device),
                       [d.to(device) for d in model.decoders], model.appearance)


def save_model(model: MergedModel, path: Path) -> None:
    """decoder.pt: the decoder(s) plus the merged anchors, enough to render the model."""
    first = model.decoders[0]
    feat_dim = first.opacity_mlp[0].in_features - 3
    payload = {"feat_dim": feat_dim, "n_offsets": first.n_offsets,
               "decoders": [d.state_dict() for d in model.decoders],
               "anchors": model.anchors.tensors(), "anchor_block": model.anchor_block}
    if model.appearance is not None:
        a = model.appearance
        payload.update(appearance_dim=first.appearance_dim, appearance_tables=a.tables,
                       appearance_held=a.held, appearance_names=a.images.names,
                       appearance_centers=a.images.centers)
    save_checkpoint(path, payload, config_hash="merged")


def load_model(path: str | Path) -> MergedModel:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file {path} does not exist; run `mgs merge` first")
    data = load_checkpoint(path)
    decoders = []
    appearance_dim = int(data.get("appearance_dim", 0))
    for state in data["decoders"]:
        decoder = Decoder(int(data["feat_dim"]), int(data["n_offsets"]),
                          appearance_dim=appearance_dim)
        decoder.load_state_dict(state)
        decoders.append(decoder.requires_grad_(False))
    appearance = None
    if appearance_dim:
        images = AppearanceImages(list(data["appearance_names"]), data["appearance_centers"])
        appearance = ModelAppearance(images, list(data["appearance_tables"]),
                                     data["appearance_held"])
    return MergedModel(Anchors.from_tensors(data["anchors"]), data["anchor_block"], decoders,
                       appearance)


@torch.no_grad()
def render_model(model: MergedModel, viewmat, K, width, height, background=None, backend="auto",
                 appearance_row: int | None = None):
    """Render the merged model: decode each decoder's anchors for this view, composite once.
    `appearance_row`: the training image whose latent to use (None = the mean latent)."""
    latents = _latents(model, appearance_row)
    parts = [decode(decoder, anchors, viewmat, K, width, height, latent)[0]
             for (anchors, decoder), latent in zip(model.groups(), latents)]
    cat = {name: torch.cat([getattr(p, name) for p in parts])
           for name in ("means", "quats", "scales", "opacities", "colors")}
    return render(cat["means"], cat["quats"], cat["scales"], cat["opacities"], cat["colors"],
                  viewmat, K, width, height, background=background, backend=backend)


def _latents(model: MergedModel, row: int | None) -> list[torch.Tensor | None]:
    if model.appearance is None:
        return [None] * len(model.decoders)
    return [latent.to(model.anchors.xyz.device) for latent in model.appearance.latents(row)]


def write_anchor_ply(anchors: Anchors, path: Path) -> None:
    """Scaffold-GS anchor PLY: x y z nx ny nz f_offset_* f_anchor_feat_* opacity scale_* rot_*."""
    n, k = anchors.count, anchors.offsets.shape[1]
    feat_dim = anchors.features.shape[1]
    # offsets stored as [N, 3, k] flattened: index = axis * k + i
    offsets = anchors.offsets.detach().transpose(1, 2).reshape(n, 3 * k)
    columns = {"x": anchors.xyz[:, 0], "y": anchors.xyz[:, 1], "z": anchors.xyz[:, 2],
               "nx": torch.zeros(n), "ny": torch.zeros(n), "nz": torch.zeros(n)}
    columns.update({f"f_offset_{i}": offsets[:, i] for i in range(3 * k)})
    columns.update({f"f_anchor_feat_{i}": anchors.features[:, i] for i in range(feat_dim)})
    columns["opacity"] = torch.full((n,), math.log(INIT_OPACITY / (1 - INIT_OPACITY)))
    columns.update({f"scale_{i}": anchors.scaling[:, i] for i in range(6)})
    columns.update({f"rot_{i}": torch.full((n,), 1.0 if i == 0 else 0.0) for i in range(4)})
    _write_ply(columns, path)


def _read_vertices(path: str | Path, required: tuple[str, ...]):
    """The PLY's vertex element; a damaged file or a missing column is one clear error."""
    try:
        vertex = PlyData.read(str(path))["vertex"]
        names = vertex.data.dtype.names or ()
    except Exception as exc:  # noqa: BLE001 - plyfile raises many types on damaged files
        raise InputError(f"cannot read PLY file {path} ({exc.__class__.__name__}: {exc}); "
                         "it is damaged or truncated: export it again") from exc
    if missing := [name for name in required if name not in names]:
        raise InputError(f"PLY file {path} lacks the column(s) {', '.join(missing)}; "
                         "it is not an mgs/Scaffold-GS export of this kind")
    return vertex


def read_anchor_ply(path: str | Path) -> Anchors:
    vertex = _read_vertices(path, ("x", "y", "z") + tuple(f"scale_{i}" for i in range(6)))
    names = vertex.data.dtype.names
    k = sum(name.startswith("f_offset_") for name in names) // 3
    feat_dim = sum(name.startswith("f_anchor_feat_") for name in names)

    def stack(fmt, count):
        return torch.as_tensor(np.stack([vertex[fmt.format(i)] for i in range(count)], 1))

    xyz = torch.as_tensor(np.stack([vertex["x"], vertex["y"], vertex["z"]], 1))
    offsets = stack("f_offset_{}", 3 * k).reshape(-1, 3, k).transpose(1, 2).contiguous()
    return Anchors(xyz, stack("f_anchor_feat_{}", feat_dim), offsets, stack("scale_{}", 6))


@torch.no_grad()
def export_splats(model: MergedModel, path: Path, view_center: torch.Tensor, cameras=None,
                  sh_degree: int = 0, min_opacity: float = MIN_OPACITY, refine_steps: int = 0,
                  background=None, device: str | torch.device = "cpu", photos=None,
                  photo_weight: float = 0.0) -> int:
    """Bake the model into static Gaussians and write a 3DGS PLY. With `cameras` (the training
    cameras): which Gaussians exist, their opacity, shape and rotation as those views see them on
    average and SH of degree `sh_degree` fitted to their colours, then `refine_steps` steps of
    fitting them on `device` (mgs.bake) to the model's renders of those views on `background`
    blended with `photos(i)`, training photo i, by `photo_weight` (1: the photos alone);
    without, everything as seen from `view_center` (degree 0). Returns the number of Gaussians
    written."""
    check_degree(sh_degree)
    if cameras is None and sh_degree:
        raise ValueError("a view-dependent export needs the training cameras to fit on")
    if photo_weight and photos is None:
        raise ValueError("a photo_weight above 0 needs the training photos")
    fit = FitCameras(cameras) if cameras is not None else None
    parts = [bake_at_center(decoder, anchors, latent, view_center) if fit is None else
             bake_gaussians(decoder, anchors, latent, fit, sh_degree, min_opacity)
             for (anchors, decoder), latent in zip(model.groups(), _latents(model, None))]
    baked = BakedGaussians.cat(parts, sh_degree)
    if fit is not None and refine_steps > 0:
        device = torch.device(device)
        background = torch.as_tensor([0.0, 0.0, 0.0] if background is None else background,
                                     dtype=torch.float32, device=device)
        on_device = model_to(model, device) if photo_weight < 1 else None

        def target(i, view):
            if photo_weight == 1:
                return photos(i).to(device)
            image = render_model(on_device, background=background, **view).image.clamp(0, 1)
            return torch.lerp(image, photos(i).to(device), photo_weight) if photo_weight else image

        baked = refine(baked.to(device), cameras, target, background, refine_steps)
    write_splats(baked.to("cpu"), path)
    return len(baked.means)


def write_splats(g: BakedGaussians, path: Path) -> None:
    """The 3DGS PLY layout: position, normal (zero), SH (f_dc, f_rest channel-major), opacity
    logit, log scales, rotation wxyz."""
    n = len(g.means)
    sh = g.sh
    opacity = g.opacities.clamp(1e-6, 1 - 1e-6)
    columns = {"x": g.means[:, 0], "y": g.means[:, 1], "z": g.means[:, 2],
               "nx": torch.zeros(n), "ny": torch.zeros(n), "nz": torch.zeros(n)}
    columns.update({f"f_dc_{i}": sh[:, 0, i] for i in range(3)})
    # f_rest channel-major (all R coefficients, then G, then B), as the 3DGS PLY layout
    rest = sh[:, 1:].transpose(1, 2).reshape(n, -1)
    columns.update({f"f_rest_{i}": rest[:, i] for i in range(rest.shape[1])})
    columns["opacity"] = torch.log(opacity / (1 - opacity))
    columns.update({f"scale_{i}": torch.log(g.scales[:, i].clamp_min(1e-12)) for i in range(3)})
    columns.update({f"rot_{i}": g.quats[:, i] for i in range(4)})
    _write_ply(columns, path)


def read_splats(path: str | Path) -> dict[str, torch.Tensor]:
    """A 3DGS PLY back as render() inputs (means, quats, scales, opacities, colors: the
    degree-0 colour) plus its SH coefficients `sh` (N, (degree+1)², 3); see render_splats."""
    vertex = _read_vertices(path, ("x", "y", "z", "rot_0", "rot_1", "rot_2", "rot_3", "scale_0",
                                   "scale_1", "scale_2", "opacity", "f_dc_0", "f_dc_1", "f_dc_2"))
    names = vertex.data.dtype.names
    rest = sum(name.startswith("f_rest_") for name in names)
    if rest % 3 or int(round((rest // 3 + 1) ** 0.5)) ** 2 != rest // 3 + 1:
        raise InputError(f"PLY file {path} has {rest} f_rest_* columns, not 3 × ((degree+1)² - 1)"
                         " for a degree of 1 to 3; export it again")

    def cols(*names):
        return torch.as_tensor(np.stack([vertex[name] for name in names], 1))

    dc = cols("f_dc_0", "f_dc_1", "f_dc_2")
    sh = dc[:, None]
    if rest:
        sh = torch.cat([sh, cols(*[f"f_rest_{i}" for i in range(rest)])
                        .reshape(-1, 3, rest // 3).transpose(1, 2)], dim=1)
    return {"means": cols("x", "y", "z"),
            "quats": cols("rot_0", "rot_1", "rot_2", "rot_3"),
            "scales": torch.exp(cols("scale_0", "scale_1", "scale_2")),
            "opacities": torch.sigmoid(cols("opacity")[:, 0]),
            "colors": (dc * SH_C0 + 0.5).clamp_min(0.0), "sh": sh.contiguous()}


def render_splats(splats: dict[str, torch.Tensor], viewmat, K, width, height, background=None,
                  backend="auto"):
    """Render read_splats' Gaussians as a 3DGS viewer does: SH evaluated for this camera."""
    colors = sh_colors(splats["sh"], splats["means"], camera_center(viewmat))
    return render(splats["means"], splats["quats"], splats["scales"], splats["opacities"], colors,
                  viewmat, K, width, height, background=background, backend=backend)


def _write_ply(columns: dict[str, torch.Tensor], path: Path) -> None:
    n = len(next(iter(columns.values())))
    data = np.empty(n, dtype=[(name, "f4") for name in columns])
    for name, values in columns.items():
        data[name] = values.detach().cpu().numpy()
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(data, "vertex")]).write(str(tmp))
