"""Scaffold-GS representation: block-local anchors and the shared MLP Gaussian decoder.

An anchor holds a fixed position, a feature vector, k learnable offsets and a 6-d log scaling
(dims 0-2 scale the offsets, dims 3-5 are the base scale of its Gaussians). The decoder turns
[feature, view direction] into k neural Gaussians per anchor (ALGORITHM.md §2.1-2.2).
With `appearance_dim` > 0 the colour MLP also reads a per-image appearance latent (Scaffold-GS's
appearance embedding; off in the official Momentum-GS code): the latent is an input, like the
anchor feature, so the teacher decoder reads the same latent as the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree
from torch import nn

from mgs.render import project

INIT_OPACITY = 0.1


class Decoder(nn.Module):
    """Three two-layer MLPs (35 -> 32 -> out) shared by every block: opacity, covariance, colour.
    The colour MLP's input grows by `appearance_dim` (the per-image latent) when that is > 0."""

    def __init__(self, feat_dim: int = 32, n_offsets: int = 10, hidden: int = 32,
                 appearance_dim: int = 0):
        super().__init__()
        in_dim = feat_dim + 3
        self.n_offsets = n_offsets
        self.appearance_dim = appearance_dim
        self.opacity_mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(),
                                         nn.Linear(hidden, n_offsets), nn.Tanh())
        self.cov_mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 7 * n_offsets))
        self.color_mlp = nn.Sequential(nn.Linear(in_dim + appearance_dim, hidden), nn.ReLU(),
                                       nn.Linear(hidden, 3 * n_offsets), nn.Sigmoid())

    def forward(self, z: torch.Tensor, latent: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`latent`: the image's appearance vector (appearance_dim,) or one per row of `z`,
        required when appearance_dim > 0."""
        color_in = z
        if self.appearance_dim:
            if latent is None:
                raise ValueError("this decoder has an appearance input: pass the image's latent")
            # one latent for every row (a view's), or one per row (mgs.blocks.fit's samples)
            rows = latent if latent.dim() == 2 else latent.reshape(1, -1).expand(z.shape[0], -1)
            color_in = torch.cat([z, rows], dim=1)
        return self.opacity_mlp(z), self.cov_mlp(z), self.color_mlp(color_in)


class Anchors(nn.Module):
    """Block-local anchor parameters. Positions are fixed; rotation/opacity exist only for the PLY."""

    def __init__(self, xyz: torch.Tensor, features: torch.Tensor, offsets: torch.Tensor,
                 scaling: torch.Tensor):
        super().__init__()
        self.register_buffer("xyz", xyz)
        self.features = nn.Parameter(features)
        self.offsets = nn.Parameter(offsets)
        self.scaling = nn.Parameter(scaling)

    @classmethod
    def from_points(cls, points: np.ndarray, feat_dim: int, n_offsets: int,
                    voxel_size: float) -> "Anchors":
        xyz = torch.as_tensor(voxelize(points, voxel_size), dtype=torch.float32)
        return cls.initial(xyz, initial_log_scale(xyz), feat_dim, n_offsets)

    @classmethod
    def initial(cls, xyz: torch.Tensor, log_scale: torch.Tensor, feat_dim: int,
                n_offsets: int) -> "Anchors":
        """Untrained anchors at `xyz`: zero features and offsets, `log_scale` (N,) on all 6 dims."""
        n = xyz.shape[0]
        return cls(xyz, torch.zeros(n, feat_dim), torch.zeros(n, n_offsets, 3),
                   log_scale[:, None].repeat(1, 6))

    @property
    def count(self) -> int:
        return self.xyz.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"xyz": self.xyz.detach().clone(), "features": self.features.detach().clone(),
                "offsets": self.offsets.detach().clone(), "scaling": self.scaling.detach().clone()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "Anchors":
        return cls(tensors["xyz"], tensors["features"], tensors["offsets"], tensors["scaling"])


def voxelize(points: np.ndarray, voxel_size: float) -> np.ndarray:
    """Snap points to a grid and keep one per occupied cell (positions at cell corners, as 3DGS-style
    Scaffold init does); voxel_size 0 keeps the points unchanged."""
    points = np.asarray(points, dtype=np.float64)
    if voxel_size <= 0:
        return points
    cells = np.unique(np.round(points / voxel_size).astype(np.int64), axis=0)
    return cells * voxel_size


def initial_log_scale(xyz: torch.Tensor) -> torch.Tensor:
    """log √d² per anchor, d² the mean squared distance to its 3 nearest neighbours clamped at
    1e-7 as officially (the squared distance, so no anchor starts below 3.2e-4 scene units)."""
    return torch.log(torch.sqrt(mean_knn_sq_distance(xyz, k=3).clamp_min(1e-7)))


def mean_knn_sq_distance(xyz: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Mean squared distance of each point to its k nearest neighbours (simple-knn's distCUDA2).

    A KD-tree: O(N log N) time and O(N) memory, where all-pairs distances of a city's million
    anchors would need terabytes of work and a 16 GB matrix per chunk."""
    n = xyz.shape[0]
    if n <= 1:
        return torch.full((n,), 1e-4)
    k = min(k, n - 1)
    points = xyz.detach().cpu().numpy()
    # k + 1: the nearest is the point itself (or a duplicate of it, at the same distance 0)
    distances, _ = cKDTree(points).query(points, k=k + 1)
    mean_sq = (distances[:, 1:] ** 2).mean(axis=1)
    return torch.from_numpy(mean_sq.astype(np.float32)).clamp_min(1e-14)


# anchors projected at once by the frustum cull: its ~100 floats of temporaries per anchor
# then cost a few MB, not a city-sized transient at every step
CULL_CHUNK = 1 << 16


def visible_anchor_mask(anchors: Anchors, viewmat: torch.Tensor, K: torch.Tensor,
                        width: int, height: int, chunk: int = CULL_CHUNK) -> torch.Tensor:
    """Frustum culling: anchors whose offset-extent footprint projects onto the image."""
    device = anchors.xyz.device
    parts = []
    with torch.no_grad():
        for start in range(0, anchors.count, chunk):
            xyz = anchors.xyz[start:start + chunk]
            quats = torch.zeros(xyz.shape[0], 4, device=device)
            quats[:, 0] = 1.0
            radii, *_ = project(xyz, quats, torch.exp(anchors.scaling[start:start + chunk, :3]),
                                viewmat, K, width, height)
            parts.append(radii > 0)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=device)


@dataclass
class DecoderInputs:
    """The visible anchors' rows, gathered once per view: every decoder applied to them (student
    and teacher) and the Gaussian centres read these, so the backward scatters each anchor
    tensor's gradient into one anchor-sized buffer, not one per use."""
    xyz: torch.Tensor  # (V, 3)
    scaling: torch.Tensor  # (V, 6) log scaling
    z: torch.Tensor  # (V, feat_dim + 3): feature and unit view direction


@dataclass
class DecodedAttributes:
    """Per neural Gaussian (visible anchors × k, flattened), before the α > 0 selection."""
    opacity: torch.Tensor  # raw tanh output, (M,)
    color: torch.Tensor  # (M, 3)
    quat: torch.Tensor  # normalised wxyz, (M, 4)
    scale: torch.Tensor  # linear, (M, 3)
    inputs: DecoderInputs  # what they were decoded from


def decoder_inputs(anchors: Anchors, visible: torch.Tensor,
                   camera_center: torch.Tensor) -> DecoderInputs:
    xyz = anchors.xyz[visible]
    view_dir = xyz - camera_center
    view_dir = view_dir / view_dir.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return DecoderInputs(xyz=xyz, scaling=anchors.scaling[visible],
                         z=torch.cat([anchors.features[visible], view_dir], dim=1))


def apply_decoder(decoder: Decoder, inputs: DecoderInputs,
                  latent: torch.Tensor | None = None) -> DecodedAttributes:
    """The decoder's attributes for gathered inputs (and the image's appearance `latent` for
    the colour MLP when the decoder has one)."""
    opacity, cov, color = decoder(inputs.z, latent)
    base_scale = torch.exp(inputs.scaling[:, 3:]).repeat_interleave(decoder.n_offsets, dim=0)
    cov = cov.reshape(-1, 7)
    return DecodedAttributes(
        opacity=opacity.reshape(-1),
        color=color.reshape(-1, 3),
        quat=nn.functional.normalize(cov[:, 3:7], dim=1),
        scale=base_scale * torch.sigmoid(cov[:, :3]),
        inputs=inputs,
    )


def decode_attributes(decoder: Decoder, anchors: Anchors, visible: torch.Tensor,
                      camera_center: torch.Tensor, latent: torch.Tensor | None = None
                      ) -> DecodedAttributes:
    """Apply the decoder to the visible anchors' [feature, unit view direction] inputs (and the
    image's appearance `latent` for the colour MLP when the decoder has one)."""
    return apply_decoder(decoder, decoder_inputs(anchors, visible, camera_center), latent)


@dataclass
class NeuralGaussians:
    means: torch.Tensor
    quats: torch.Tensor
    scales: torch.Tensor
    opacities: torch.Tensor
    colors: torch.Tensor
    selected: torch.Tensor  # bool over visible anchors × k: which neural Gaussians are rendered
    visible: torch.Tensor  # bool over all anchors


def neural_gaussians(anchors: Anchors, visible: torch.Tensor,
                     attrs: DecodedAttributes) -> NeuralGaussians:
    """Offsets → centres; keep Gaussians with positive opacity (the learned selection)."""
    inputs = attrs.inputs
    offsets = anchors.offsets[visible] * torch.exp(inputs.scaling[:, None, :3])
    means = (inputs.xyz[:, None, :] + offsets).reshape(-1, 3)
    selected = attrs.opacity > 0
    return NeuralGaussians(means=means[selected], quats=attrs.quat[selected],
                           scales=attrs.scale[selected], opacities=attrs.opacity[selected],
                           colors=attrs.color[selected], selected=selected, visible=visible)


def decode(decoder: Decoder, anchors: Anchors, viewmat: torch.Tensor, K: torch.Tensor,
           width: int, height: int, latent: torch.Tensor | None = None
           ) -> tuple[NeuralGaussians, DecodedAttributes]:
    """Frustum-cull the anchors, decode them for this view and select the rendered Gaussians."""
    visible = visible_anchor_mask(anchors, viewmat, K, width, height)
    center = camera_center(viewmat)
    attrs = decode_attributes(decoder, anchors, visible, center, latent)
    return neural_gaussians(anchors, visible, attrs), attrs


def camera_center(viewmat: torch.Tensor) -> torch.Tensor:
    rotation, translation = viewmat[:3, :3], viewmat[:3, 3]
    return -rotation.T @ translation
