"""Training of one set of anchors with a decoder: the single-block trainer.

`Trainer` owns one block's anchors, its student decoder copy, Adam state, densification
statistics and sampling RNG; `train_scene` runs it on a whole scene (one block = the scene) with
periodic validation, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mgs.appearance import AppearanceImages, choose_row, latent_for
from mgs.atomic import ensure_writable_dir, json_text, write_text, write_tsv
from mgs.checkpoint import load_checkpoint, save_checkpoint
from mgs.config import TrainConfig
from mgs.device import resolve_device
from mgs.densify import DensifyState, adjust_anchors
from mgs.errors import InputError, StopRequested, TrainingError
from mgs.metrics import psnr, ssim
from mgs.model import Anchors, Decoder, camera_center, decode, decode_attributes
from mgs.momentum import ema_update_
from mgs.render import render
from mgs.scene import Camera, Scene, image_to_float, load_image_array, load_scene

log = logging.getLogger("mgs.train")

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.tsv"


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
        optimizer = torch.optim.Adam(groups, lr=0.0, eps=1e-15)
        self._set_learning_rates(optimizer, 0)
        return optimizer

    def _set_learning_rates(self, optimizer, step: int) -> None:
        c = self.config
        rates = {
            "offsets": expon_lr(step, c.offset_lr_init * self.lr_scale,
                                c.offset_lr_final * self.lr_scale, c.lr_max_steps),
            "features": c.feature_lr,
            "scaling": c.scaling_lr,
            "mlp_opacity": expon_lr(step, c.mlp_opacity_lr_init, c.mlp_opacity_lr_final, c.lr_max_steps),
            "mlp_cov": expon_lr(step, c.mlp_cov_lr_init, c.mlp_cov_lr_final, c.lr_max_steps),
            "mlp_color": expon_lr(step, c.mlp_color_lr_init, c.mlp_color_lr_final, c.lr_max_steps),
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
        if self.teacher is not None:
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
            teacher_attrs = decode_attributes(self.teacher, self.anchors, gaussians.visible,
                                              camera_center(view.viewmat), latent)
            cons = consistency_loss(attrs, teacher_attrs, gaussians.selected)
            loss = loss + self.consistency_weight * cons
        loss = self.loss_weight * loss
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became non-finite ({loss.item()}) at step {step} "
                                f"(view {view.name}); the last good checkpoint is kept — lower the "
                                "learning rates or check the input images")
        loss.backward()

        with torch.no_grad():
            if c.start_stat < step < c.update_until and out.means2d_grad is not None:
                self.densify.accumulate(gaussians, attrs, out.means2d_grad, out.radii,
                                        view.width, view.height)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if c.update_from < step < c.update_until and step % c.update_interval == 0:
                adjust_anchors(self.anchors, self.densify, self.optimizer, c, self.generator)
        self.step = step
        self.loss_sums["photometric"] += photometric.item()
        self.loss_sums["consistency"] += self.consistency_weight * cons.item()
        self.loss_sums["steps"] += 1
        return {"loss": loss.item(), "l1": l1.item(), "consistency": cons.item(),
                "gaussians": int(gaussians.means.shape[0])}

    @torch.no_grad()
    def evaluate(self, views: list[View]) -> dict[str, float]:
        if not views:
            return {"psnr": float("nan"), "ssim": float("nan")}
        psnrs, ssims = [], []
        for view in views:
            out, _, _ = self.render_view(view)
            image, target = out.image.clamp(0, 1), view.image
            psnrs.append(psnr(image, target).item())
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
        self.densify = DensifyState.from_tensors(state["densify"], self.config.n_offsets, self.device)
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


def initial_anchors(scene: Scene, config: TrainConfig) -> Anchors:
    if len(scene.points_xyz) == 0:
        raise InputError(f"scene {scene.scene_dir} has no 3D points to place anchors on; "
                         "rerun SfM or check the COLMAP model's points3D")
    points = scene.points_xyz
    if config.max_init_anchors and len(points) > config.max_init_anchors:
        rng = np.random.default_rng(config.seed)
        points = points[np.sort(rng.choice(len(points), config.max_init_anchors, replace=False))]
    return Anchors.from_points(points, config.feat_dim, config.n_offsets, config.voxel_size)


def train_scene(scene_dir: str | Path, out_dir: str | Path, config: TrainConfig,
                resume: bool = False, stop_after: int | None = None) -> dict:
    """Train one model on the whole scene; returns the final summary (also in summary.json).

    `stop_after` ends the run early at that step after checkpointing, as an interruption would.
    """
    if resume and not (Path(out_dir) / CHECKPOINT_NAME).is_file():
        raise InputError(f"--resume: there is no checkpoint {Path(out_dir) / CHECKPOINT_NAME} to "
                         "continue from; run without --resume to start training")
    out_dir = ensure_writable_dir(out_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    scene = load_scene(scene_dir)
    if not scene.train_names:
        raise InputError(f"scene {scene.scene_dir} has no training views")
    cache_dir = scene.scene_dir
    train_views = load_views(scene.train_cameras(), config.resolution, cache_dir, device,
                             "train images", config.background)
    val_views = load_views(scene.test_cameras(), config.resolution, cache_dir, device,
                           "test images", config.background)

    torch.manual_seed(config.seed)
    anchors = initial_anchors(scene, config)
    decoder = Decoder(config.feat_dim, config.n_offsets, appearance_dim=config.appearance_dim)
    trainer = Trainer(anchors, decoder, config, train_views,
                      spatial_lr_scale(scene.train_cameras()), device,
                      appearance=AppearanceImages.from_scene(scene))
    history: list[dict] = []
    checkpoint_path = out_dir / CHECKPOINT_NAME
    if resume and checkpoint_path.exists():
        # loaded on the CPU: load_state moves the tensors that belong on `device` there
        state = load_checkpoint(checkpoint_path, config.shape_hash())
        trainer.load_state(state)
        history = list(state.get("history", []))
        log.info("resumed from %s at step %d", checkpoint_path, trainer.step)
    elif checkpoint_path.exists() and not resume:
        log.info("starting over; %s will be replaced", checkpoint_path)

    log.info("training %d anchors on %d views (%d test) for %d steps on %s",
             trainer.anchors.count, len(train_views), len(val_views), config.iterations, device)

    def save(step_history):
        save_checkpoint(checkpoint_path, dict(trainer.state(), history=step_history,
                                              config=config.to_dict()), config.shape_hash())
        write_tsv(out_dir / HISTORY_NAME, step_history)

    if not history:  # the untrained model's score anchors the trend
        history.append(dict(step=0, loss=float("nan"), **_scores(trainer, val_views),
                            anchors=trainer.anchors.count, seconds=0.0))
    run_training(trainer, config.iterations, val_views, history, save, stop_after)

    last = history[-1]  # run_training validated at its last step
    summary = {"step": trainer.step, "test_psnr": last["val_psnr"], "test_ssim": last["val_ssim"],
               "anchors": trainer.anchors.count, "test_views": len(val_views),
               "train_views": len(train_views), "device": str(device),
               "seconds": history[-1]["seconds"]}
    write_text(out_dir / "summary.json", json_text(summary))
    return summary


class StopSignal:
    """Set by the CLI's SIGTERM handler (what `scancel` sends): training stops after the
    current step with a checkpoint instead of dying mid-step."""

    active = False  # a training loop is running and will look at `requested`
    requested = False


def check_finite_parameters(trainer: Trainer) -> None:
    """Stop when any optimised parameter holds NaN/inf (the loss alone misses NaN anchors,
    which are culled while the loss stays finite); the last checkpoint is left as it is."""
    groups = trainer.optimizer.param_groups
    flags = [torch.isfinite(p).all() for group in groups for p in group["params"]]
    if not flags or bool(torch.stack(flags).all()):  # one device sync per step
        return
    bad = [group["name"] for group in groups
           if not all(bool(torch.isfinite(p).all()) for p in group["params"])]
    raise TrainingError(
        f"parameters of {', '.join(bad)} became non-finite (NaN/inf) at step {trainer.step}; "
        "stopped without saving, so the last good checkpoint is kept. Lower the learning "
        f"rate(s) of {', '.join(bad)} or check the input images, then rerun")


def _after_step(trainer: Trainer, history: list[dict], save) -> None:
    check_finite_parameters(trainer)
    if StopSignal.requested:
        save(history)
        raise StopRequested(f"stopped on SIGTERM after step {trainer.step} with a checkpoint; "
                            "rerun the same command (`mgs train` with --resume) to continue")


def _scores(trainer: Trainer, views: list[View]) -> dict[str, float]:
    """Validation PSNR/SSIM, plus PSNR on a fixed sample of training views (overfitting check)."""
    metrics = trainer.evaluate(views)
    sample = trainer.train_views[:: max(1, len(trainer.train_views) // 8)]
    return {"val_psnr": metrics["psnr"], "val_ssim": metrics["ssim"],
            "train_psnr": trainer.evaluate(sample)["psnr"]}


def run_training(trainer: Trainer, until: int, val_views: list[View], history: list[dict],
                 save, stop_after: int | None = None, desc: str = "training") -> None:
    """Step `trainer` up to global step `until`, validating every eval_interval steps (rows
    appended to `history`) and calling `save(history)` every checkpoint_interval steps and at
    the end. `stop_after` ends early (after saving), as an interruption would."""
    config = trainer.config
    last = min(until, stop_after) if stop_after is not None else until
    start = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    running = float("nan")
    progress = tqdm(total=until, initial=trainer.step, desc=desc, mininterval=2.0)
    StopSignal.active = True
    try:
        while trainer.step < last:
            stats = trainer.train_step()
            _after_step(trainer, history, save)
            loss = stats["loss"]
            running = loss if math.isnan(running) else 0.9 * running + 0.1 * loss
            step = trainer.step
            progress.update(1)
            if step % config.eval_interval == 0 or step == until:
                history.append(dict(step=step, loss=running, **_scores(trainer, val_views),
                                    anchors=trainer.anchors.count,
                                    seconds=time.perf_counter() - start))
                log.info("step %d: loss %.4f, validation PSNR %.2f dB, SSIM %.4f, %d anchors",
                         step, running, history[-1]["val_psnr"], history[-1]["val_ssim"],
                         trainer.anchors.count)
            progress.set_postfix(loss=f"{running:.4f}", anchors=trainer.anchors.count,
                                 refresh=False)
            if step % config.checkpoint_interval == 0 or step == last:
                save(history)
    finally:  # an error leaves no loop for the SIGTERM handler to wait on
        StopSignal.active = False
        progress.close()
