"""Training of one set of anchors with a decoder: the single-block trainer.

`Trainer` owns one block's anchors, its student decoder copy, Adam state, densification
statistics and sampling RNG, and takes one optimisation step at a time; the loop that runs it
(validation, checkpoints, stop on SIGTERM) and the whole-scene driver are in mgs.training_loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mgs.appearance import AppearanceImages, choose_row, latent_for
from mgs.config import TrainConfig
from mgs.densify import DensifyState, adjust_anchors
from mgs.errors import TrainingError
from mgs.metrics import channel_mean_psnr, ssim
from mgs.model import Anchors, Decoder, apply_decoder, camera_center, decode
from mgs.momentum import ema_update_
from mgs.render import render
from mgs.scene import Camera, image_to_float, load_image_array


@dataclass
class View:
    """A training/validation camera at training resolution, with its image, as tensors."""
    name: str
    viewmat: torch.Tensor
    K: torch.Tensor
    width: int
    height: int
    # (H, W, 3) uint8: a NumPy array (possibly memory-mapped) on the CPU, a tensor on a GPU;
    # a quarter of float32's memory, converted for each step that uses it
    pixels: np.ndarray | torch.Tensor

    @property
    def image(self) -> torch.Tensor:
        """(H, W, 3) float32 in [0, 1] on the view's device."""
        if isinstance(self.pixels, np.ndarray):
            return torch.from_numpy(image_to_float(self.pixels))
        return self.pixels.to(torch.float32) / 255.0


def make_view(name: str, width: int, height: int, K, world_to_camera, pixels: np.ndarray,
              device: torch.device) -> View:
    """A View from a camera at training resolution and its uint8 pixels."""
    return View(name=name,
                viewmat=torch.tensor(world_to_camera, dtype=torch.float32, device=device),
                K=torch.tensor(K, dtype=torch.float32, device=device), width=width, height=height,
                pixels=pixels if device.type == "cpu" else torch.from_numpy(
                    np.ascontiguousarray(pixels)).to(device))


def load_views(cameras: list[Camera], factor: int, cache_dir: Path, device: torch.device,
               desc: str = "images", background=None) -> list[View]:
    """`background`: what transparent pixels are composited onto (the config's; black if None)."""
    views = []
    for camera in tqdm(cameras, desc=f"loading {desc}", leave=False, mininterval=2.0):
        scaled = camera.scaled(factor)
        views.append(make_view(camera.name, scaled.width, scaled.height, scaled.K,
                               scaled.world_to_camera,
                               load_image_array(camera, factor, cache_dir, background), device))
    return views


def expon_lr(step: int, lr_init: float, lr_final: float, max_steps: int) -> float:
    """Log-linear decay from lr_init to lr_final over max_steps, then held (3DGS schedule)."""
    if lr_init == lr_final:
        return lr_init
    t = min(max(step / max_steps, 0.0), 1.0)
    return math.exp(math.log(lr_init) * (1 - t) + math.log(lr_final) * t)


def spatial_lr_scale(cameras: list[Camera]) -> float:
    """1.1 × the largest distance of a camera centre from their mean (3DGS's scene extent)."""
    centers = np.stack([camera.center for camera in cameras])
    radius = float(np.linalg.norm(centers - centers.mean(0), axis=1).max())
    return 1.1 * max(radius, 1e-6)


def consistency_loss(student, teacher, selected: torch.Tensor) -> torch.Tensor:
    """Sum of MSEs between student and teacher decoded attributes (ALGORITHM.md §3). The
    teacher's outputs keep their graph: its parameters are frozen, but the gradient reaches the
    anchor features through both branches, ≈ 0 when teacher ≈ student, as officially."""
    mse = torch.nn.functional.mse_loss
    return (mse(student.color[selected], teacher.color[selected])
            + mse(student.quat[selected], teacher.quat[selected])
            + mse(student.scale[selected], teacher.scale[selected])
            + mse(student.opacity, teacher.opacity))


class Trainer:
    def __init__(self, anchors: Anchors, decoder: Decoder, config: TrainConfig,
                 train_views: list[View], lr_scale: float, device: torch.device,
                 teacher: Decoder | None = None, consistency_weight: float = 0.0,
                 loss_weight: float = 1.0, stream: int = 0, freeze_decoder: bool = False,
                 teacher_momentum: float = 0.9, appearance: AppearanceImages | None = None):
        """`stream` separates the random streams of blocks trained from one seed;
        `freeze_decoder` trains the anchors only (the finalize phase, latents frozen too);
        `teacher_momentum` m blends the teacher toward the student before every step;
        `appearance`: the rows of the latent table (the scene's training images), required
        when config.appearance_dim > 0."""
        self.config = config
        self.stream = stream
        self.freeze_decoder = freeze_decoder
        self.device = device
        self.anchors = anchors.to(device)
        self.decoder = decoder.to(device).requires_grad_(not freeze_decoder)
        self.teacher = teacher.to(device).requires_grad_(False) if teacher is not None else None
        self.consistency_weight = consistency_weight
        self.teacher_momentum = teacher_momentum
        self.loss_sums = new_loss_sums()
        self.loss_weight = loss_weight
        self.train_views = train_views
        self.lr_scale = lr_scale
        self.background = torch.tensor(config.background, dtype=torch.float32, device=device)
        self.densify = DensifyState(anchors.count, config.n_offsets, device)
        self.appearance_images = appearance
        self.appearance = None  # nn.Embedding over the training images when appearance_dim > 0
        if config.appearance_dim:
            if appearance is None:
                raise ValueError("appearance_dim > 0 needs the training images' table rows")
            self.appearance = torch.nn.Embedding(len(appearance.names), config.appearance_dim,
                                                 device=device)
            torch.nn.init.zeros_(self.appearance.weight)
            self.appearance.requires_grad_(not freeze_decoder)
            self.appearance_rows = appearance.rows()
            # the rows this trainer learns; sync averages each image over the blocks holding it
            self.appearance_held = appearance.mask(view.name for view in train_views)
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + stream)
        self.step = 0
        self.optimizer = self._make_optimizer()

    def _make_optimizer(self) -> torch.optim.Adam:
        groups = [
            {"params": [self.anchors.offsets], "name": "offsets"},
            {"params": [self.anchors.features], "name": "features"},
            {"params": [self.anchors.scaling], "name": "scaling"},
            {"params": list(self.decoder.opacity_mlp.parameters()), "name": "mlp_opacity"},
            {"params": list(self.decoder.cov_mlp.parameters()), "name": "mlp_cov"},
            {"params": list(self.decoder.color_mlp.parameters()), "name": "mlp_color"},
        ]
        if self.appearance is not None:  # no group when off: optimizer state as without it
            groups.append({"params": [self.appearance.weight], "name": "appearance"})
        # fused: one pass over each tensor, no parameter-sized temporaries (on a CPU ~5x faster
        # than the per-tensor loop at a block's million-anchor scale)
        optimizer = torch.optim.Adam(groups, lr=0.0, eps=1e-15, fused=True)
        self._set_learning_rates(optimizer, 0)
        return optimizer

    def _set_learning_rates(self, optimizer, step: int) -> None:
        c = self.config
        rates = {
            "offsets": expon_lr(step, c.offset_lr_init * self.lr_scale,
                                c.offset_lr_final * self.lr_scale, c.lr_max_steps),
            "features": c.feature_lr,
            "scaling": c.scaling_lr,
            "mlp_opacity": expon_lr(step, c.mlp_opacity_lr_init, c.mlp_opacity_lr_final,
                                    c.lr_max_steps),
            "mlp_cov": expon_lr(step, c.mlp_cov_lr_init, c.mlp_cov_lr_final, c.lr_max_steps),
            "mlp_color": expon_lr(step, c.mlp_color_lr_init, c.mlp_color_lr_final,
                                  c.lr_max_steps),
            "appearance": expon_lr(step, c.appearance_lr_init, c.appearance_lr_final,
                                   c.lr_max_steps),
        }
        if self.freeze_decoder:
            rates.update(mlp_opacity=0.0, mlp_cov=0.0, mlp_color=0.0, appearance=0.0)
        for group in optimizer.param_groups:
            group["lr"] = rates[group["name"]]

    def view_for_step(self, step: int) -> View:
        """Views in a fresh random order every epoch; a pure function of (seed, step) so resume
        needs no sampler state."""
        n = len(self.train_views)
        epoch, index = divmod(step, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            (self.config.seed * 1_000_003 + self.stream) * 1_000_003 + epoch))
        return self.train_views[int(order[index])]

    def latent(self, view: View) -> torch.Tensor | None:
        """The view's appearance latent: its own row for a training image, else the row chosen
        by config.appearance_eval (nearest training camera, or the mean)."""
        if self.appearance is None:
            return None
        row = self.appearance_rows.get(view.name)
        if row is None:
            row = choose_row(self.appearance_images, self.appearance_held,
                             camera_center(view.viewmat), self.config.appearance_eval)
        return latent_for(self.appearance.weight, self.appearance_held, row)

    def render_view(self, view: View, latent: torch.Tensor | None = None):
        if latent is None:
            latent = self.latent(view)
        gaussians, attrs = decode(self.decoder, self.anchors, view.viewmat, view.K,
                                  view.width, view.height, latent)
        out = render(gaussians.means, gaussians.quats, gaussians.scales, gaussians.opacities,
                     gaussians.colors, view.viewmat, view.K, view.width, view.height,
                     background=self.background, backend=self.config.backend)
        return out, gaussians, attrs

    def train_step(self) -> dict[str, float]:
        c = self.config
        step = self.step + 1  # 1-based like the official schedule
        self._set_learning_rates(self.optimizer, step)
        view = self.view_for_step(self.step)
        if self.teacher is not None and self.teacher_momentum < 1.0:  # 1: fixed for the round
            ema_update_(self.teacher, self.decoder, self.teacher_momentum)
        latent = self.latent(view)
        out, gaussians, attrs = self.render_view(view, latent)
        target = view.image
        l1 = (out.image - target).abs().mean()
        ssim_value = ssim(out.image, target)
        scale_reg = gaussians.scales.prod(dim=1).mean() if gaussians.scales.numel() else l1 * 0
        photometric = (1 - c.lambda_dssim) * l1 + c.lambda_dssim * (1 - ssim_value)
        loss = photometric + c.scale_reg_weight * scale_reg
        cons = torch.zeros((), device=self.device)
        if self.teacher is not None and self.consistency_weight > 0:
            teacher_attrs = apply_decoder(self.teacher, attrs.inputs, latent)
            cons = consistency_loss(attrs, teacher_attrs, gaussians.selected)
            loss = loss + self.consistency_weight * cons
        loss = self.loss_weight * loss
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became non-finite ({loss.item()}) at step {step} "
                                f"(view {view.name}); the last good checkpoint is kept — lower the "
                                "learning rates or check the input images")
        loss.backward()

        with torch.no_grad():
            in_window = c.start_stat < step < c.update_until  # the statistics window
            if in_window and out.means2d_grad is not None:
                self.densify.accumulate(gaussians, attrs, out.means2d_grad, out.radii,
                                        view.width, view.height)
            # adjustments nested in that window as officially: from the first multiple of
            # update_interval past both start_stat and update_from (525 by default); before the
            # Adam step, which then skips the anchors (adjust_anchors)
            if in_window and step > c.update_from and step % c.update_interval == 0:
                adjust_anchors(self.anchors, self.densify, self.optimizer, c, self.generator)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step = step
        self.loss_sums["photometric"] += photometric.item()
        self.loss_sums["consistency"] += self.consistency_weight * cons.item()
        self.loss_sums["steps"] += 1
        return {"loss": loss.item(), "l1": l1.item(), "consistency": cons.item(),
                "gaussians": int(gaussians.means.shape[0])}

    @torch.no_grad()
    def evaluate(self, views: list[View]) -> dict[str, float]:
        """Validation as in the official training reports: mean over views of the per-channel-mean
        PSNR and of SSIM (clamped renders). `mgs evaluate` scores test views per image instead."""
        if not views:
            return {"psnr": float("nan"), "ssim": float("nan")}
        psnrs, ssims = [], []
        for view in views:
            out, _, _ = self.render_view(view)
            image, target = out.image.clamp(0, 1), view.image
            psnrs.append(channel_mean_psnr(image, target).item())  # as the official validation
            ssims.append(ssim(image, target).item())
        return {"psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}

    # ---- checkpoint state
    def state(self) -> dict:
        state = {
            "step": self.step,
            "anchors": self.anchors.tensors(),
            "decoder": _module_state(self.decoder),
            "optimizer": self.optimizer.state_dict(),
            "densify": self.densify.tensors(),
            "generator": self.generator.get_state(),
            "lr_scale": self.lr_scale,
            "loss_sums": dict(self.loss_sums),
        }
        if self.teacher is not None:
            state["teacher"] = _module_state(self.teacher)
        if self.appearance is not None:
            state["appearance"] = self.appearance.weight.detach().cpu().clone()
            state["appearance_held"] = self.appearance_held.clone()
        return state

    def load_state(self, state: dict) -> None:
        self.step = int(state["step"])
        self.anchors = Anchors.from_tensors(state["anchors"]).to(self.device)
        self.decoder.load_state_dict(state["decoder"])
        if self.appearance is not None:
            self.load_appearance(state["appearance"])
        self.optimizer = self._make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        self.densify = DensifyState.from_tensors(state["densify"], self.config.n_offsets,
                                                 self.device)
        # a CPU generator takes only a CPU ByteTensor (a checkpoint mapped to CUDA would not do)
        self.generator.set_state(state["generator"].cpu())
        self.lr_scale = float(state["lr_scale"])
        self.loss_sums = dict(state.get("loss_sums", new_loss_sums()))
        if self.teacher is not None and "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])

    def load_appearance(self, table: torch.Tensor) -> None:
        with torch.no_grad():
            self.appearance.weight.copy_(table.to(self.device))


def new_loss_sums() -> dict:
    """Running sums of a job's losses (λ_c·L_cons as a share of the photometric loss)."""
    return {"photometric": 0.0, "consistency": 0.0, "steps": 0}


def _module_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
