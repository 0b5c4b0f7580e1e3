"""Fused CPU tile compositor: numba kernels for forward and backward, wrapped in autograd.

Only the compositing step lives here (inputs: means2d, conics, colors, opacities and the
packed tile list; outputs: rgb without background, alpha). Projection stays in torch.

Threads own whole tiles (`prange` over tiles). Inside a tile the loop runs over the
depth-sorted entries and, for each, only over the pixels of its radius box, keeping
per-pixel state (T, colour, contributor count) in tile-local arrays; each pixel still
sees its Gaussians in exactly gsplat's order. Gradients are written per list entry: an
entry belongs to exactly one tile, so there are no write races, and torch's
`index_add_` then sums entries into their Gaussians.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import get_num_threads, njit, prange
from torch import Tensor

from mgs.render.tiles import ALPHA_THRESHOLD, MAX_ALPHA, TILE_SIZE, TRANSMITTANCE_EPS, TileIntersections

# Columns of the per-entry parameter block gathered before each kernel call.
_X, _Y, _CONIC_A, _CONIC_B, _CONIC_C, _OPACITY, _RADIUS_X, _RADIUS_Y = range(8)


def _constants(dtype, max_opacity: float) -> np.ndarray:
    """Kernel constants as an array of the working dtype, so float32 kernels never promote to float64."""
    # alpha >= 1/255 needs sigma <= log(255 * opacity): pairs beyond this skip exp() entirely.
    # The margin keeps the shortcut from ever rejecting a pair the exact test would accept.
    sigma_cutoff = math.log(max(max_opacity, 1.0) / ALPHA_THRESHOLD) + 1e-3
    return np.array([0.5, 1.0, MAX_ALPHA, ALPHA_THRESHOLD, TRANSMITTANCE_EPS, sigma_cutoff], dtype=dtype)


@njit(inline="always")
def _box_in_tile(params, entry, x0, y0, tile_size, half, width, height):
    """Pixel range [bx0, bx1) x [by0, by1) of the tile whose centres lie in the entry's radius box.

    Outside means2d ± radius alpha < 1/255 (3.33-sigma radius), so only these pixels can
    contribute; visiting just them (not the whole tile) is most of this path's speed.
    """
    mx, my = params[entry, _X], params[entry, _Y]
    rx, ry = params[entry, _RADIUS_X], params[entry, _RADIUS_Y]
    x_end = min(x0 + tile_size, width)
    y_end = min(y0 + tile_size, height)
    # Pixel p is inside iff m - r <= p + 0.5 <= m + r. Clamped to the tile while still
    # floating point so huge radii cannot overflow int().
    bx0 = int(math.ceil(min(max(mx - rx - half, x0), x_end)))
    by0 = int(math.ceil(min(max(my - ry - half, y0), y_end)))
    bx1 = int(math.floor(min(max(mx + rx - half, x0 - 1), x_end - 1))) + 1
    by1 = int(math.floor(min(max(my + ry - half, y0 - 1), y_end - 1))) + 1
    return bx0, bx1, by0, by1


@njit(parallel=True, cache=True)
def _forward_kernel(params, colors, tile_offsets, tile_order, tiles_x, tile_size, centres_x, centres_y, consts,
                    out_rgb, out_transmittance, out_n_entries):
    """Front to back per pixel; outputs start as rgb 0, T 1, n_entries 0 (empty tiles stay so)."""
    half, one, max_alpha, alpha_threshold = consts[0], consts[1], consts[2], consts[3]
    t_eps, sigma_cutoff = consts[4], consts[5]
    n_channels = colors.shape[1]
    width, height = centres_x.shape[0], centres_y.shape[0]
    for order_index in prange(tile_order.shape[0]):
        tile = tile_order[order_index]
        start, end = tile_offsets[tile], tile_offsets[tile + 1]
        if start == end:
            continue
        x0 = (tile % tiles_x) * tile_size
        y0 = (tile // tiles_x) * tile_size
        tile_w = min(x0 + tile_size, width) - x0
        tile_h = min(y0 + tile_size, height) - y0
        # Per-pixel state of this tile, indexed (py - y0) * tile_size + (px - x0).
        transmittance = np.ones(tile_size * tile_size, dtype=params.dtype)
        rgb = np.zeros((tile_size * tile_size, n_channels), dtype=params.dtype)
        n_entries = np.zeros(tile_size * tile_size, dtype=np.int32)
        finished = np.zeros(tile_size * tile_size, dtype=np.bool_)
        n_finished = 0
        for entry in range(start, end):
            bx0, bx1, by0, by1 = _box_in_tile(params, entry, x0, y0, tile_size, half, width, height)
            for py in range(by0, by1):
                dy = params[entry, _Y] - centres_y[py]
                for px in range(bx0, bx1):
                    pixel = (py - y0) * tile_size + (px - x0)
                    if finished[pixel]:
                        continue
                    dx = params[entry, _X] - centres_x[px]
                    sigma = half * (params[entry, _CONIC_A] * dx * dx + params[entry, _CONIC_C] * dy * dy) \
                        + params[entry, _CONIC_B] * dx * dy
                    if sigma < 0 or sigma > sigma_cutoff:
                        continue
                    alpha = min(max_alpha, params[entry, _OPACITY] * np.exp(-sigma))
                    if alpha < alpha_threshold:
                        continue
                    next_transmittance = transmittance[pixel] * (one - alpha)
                    if next_transmittance <= t_eps:  # gsplat: this Gaussian and all behind it are skipped
                        finished[pixel] = True
                        n_finished += 1
                        continue
                    weight = alpha * transmittance[pixel]
                    for k in range(n_channels):
                        rgb[pixel, k] += colors[entry, k] * weight
                    transmittance[pixel] = next_transmittance
                    n_entries[pixel] = entry - start + 1
            if n_finished == tile_w * tile_h:
                break
        for py in range(y0, y0 + tile_h):
            for px in range(x0, x0 + tile_w):
                pixel = (py - y0) * tile_size + (px - x0)
                for k in range(n_channels):
                    out_rgb[py, px, k] = rgb[pixel, k]
                out_transmittance[py, px] = transmittance[pixel]
                out_n_entries[py, px] = n_entries[pixel]


@njit(parallel=True, cache=True)
def _backward_kernel(params, colors, tile_offsets, tile_order, tiles_x, tile_size, centres_x, centres_y, consts,
                     final_transmittance, n_entries_per_pixel, grad_rgb, grad_alpha,
                     grad_params, grad_colors):
    """Back to front per pixel (3DGS/gsplat order), undoing one (1 - alpha) factor per step."""
    half, one, max_alpha, alpha_threshold = consts[0], consts[1], consts[2], consts[3]
    sigma_cutoff = consts[5]
    zero = half - half  # typed like the data, unlike a literal 0.0
    n_channels = colors.shape[1]
    width, height = centres_x.shape[0], centres_y.shape[0]
    for order_index in prange(tile_order.shape[0]):
        tile = tile_order[order_index]
        start = tile_offsets[tile]
        x0 = (tile % tiles_x) * tile_size
        y0 = (tile // tiles_x) * tile_size
        transmittance = np.ones(tile_size * tile_size, dtype=params.dtype)
        n_entries = np.zeros(tile_size * tile_size, dtype=np.int32)
        color_behind = np.zeros((tile_size * tile_size, n_channels), dtype=params.dtype)
        for py in range(y0, min(y0 + tile_size, height)):
            for px in range(x0, min(x0 + tile_size, width)):
                pixel = (py - y0) * tile_size + (px - x0)
                transmittance[pixel] = final_transmittance[py, px]
                n_entries[pixel] = n_entries_per_pixel[py, px]
        grad_color_local = np.zeros(n_channels, dtype=params.dtype)
        for entry in range(start + n_entries.max() - 1, start - 1, -1):
            bx0, bx1, by0, by1 = _box_in_tile(params, entry, x0, y0, tile_size, half, width, height)
            conic_a, conic_b, conic_c = params[entry, _CONIC_A], params[entry, _CONIC_B], params[entry, _CONIC_C]
            opacity = params[entry, _OPACITY]
            g_x = g_y = g_a = g_b = g_c = g_opacity = zero
            grad_color_local[:] = 0
            for py in range(by0, by1):
                dy = params[entry, _Y] - centres_y[py]
                for px in range(bx0, bx1):
                    pixel = (py - y0) * tile_size + (px - x0)
                    if entry - start >= n_entries[pixel]:  # behind this pixel's last contributor
                        continue
                    dx = params[entry, _X] - centres_x[px]
                    sigma = half * (conic_a * dx * dx + conic_c * dy * dy) + conic_b * dx * dy
                    if sigma < 0 or sigma > sigma_cutoff:
                        continue
                    falloff = np.exp(-sigma)
                    alpha = min(max_alpha, opacity * falloff)
                    if alpha < alpha_threshold:
                        continue
                    inv_keep = one / (one - alpha)
                    transmittance[pixel] *= inv_keep
                    weight = alpha * transmittance[pixel]
                    # d(pixel)/d(alpha): own colour minus what this Gaussian hides behind it.
                    v_alpha = final_transmittance[py, px] * inv_keep * grad_alpha[py, px]
                    for k in range(n_channels):
                        grad_color_local[k] += weight * grad_rgb[py, px, k]
                        v_alpha += (colors[entry, k] * transmittance[pixel] - color_behind[pixel, k] * inv_keep) \
                            * grad_rgb[py, px, k]
                        color_behind[pixel, k] += colors[entry, k] * weight
                    if opacity * falloff <= max_alpha:  # clamped alpha has no gradient
                        v_sigma = -opacity * falloff * v_alpha
                        g_x += v_sigma * (conic_a * dx + conic_b * dy)
                        g_y += v_sigma * (conic_b * dx + conic_c * dy)
                        g_a += half * v_sigma * dx * dx
                        g_b += v_sigma * dx * dy
                        g_c += half * v_sigma * dy * dy
                        g_opacity += falloff * v_alpha
            grad_params[entry, _X] = g_x
            grad_params[entry, _Y] = g_y
            grad_params[entry, _CONIC_A] = g_a
            grad_params[entry, _CONIC_B] = g_b
            grad_params[entry, _CONIC_C] = g_c
            grad_params[entry, _OPACITY] = g_opacity
            for k in range(n_channels):
                grad_colors[entry, k] = grad_color_local[k]


def _interleaved_tile_order(n_tiles: int) -> np.ndarray:
    """Tile visiting order that deals neighbouring tiles to different threads.

    prange hands each thread one contiguous block of iterations; dealing tiles round-robin
    spreads dense image regions over all threads instead of giving them to one.
    """
    n_threads = max(1, get_num_threads())
    return np.concatenate([np.arange(t, n_tiles, n_threads) for t in range(n_threads)]).astype(np.int64)


def _pixel_centres(n: int, dtype) -> np.ndarray:
    # Pixel i is sampled at i + 0.5 (gsplat); precomputed so kernels stay in the working dtype.
    return (np.arange(n) + 0.5).astype(dtype)


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().contiguous().numpy()


class FusedTileComposite(torch.autograd.Function):
    """(means2d, conics, colors, opacities; radii_xy, tile list) -> (rgb without background, alpha), on CPU."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, radii_xy, isect: TileIntersections, width: int, height: int):
        ids = isect.gaussian_ids
        per_gaussian = torch.cat([means2d, conics, opacities[:, None], radii_xy.to(means2d.dtype)], dim=1)
        entry_params = per_gaussian.detach()[ids].contiguous()
        entry_colors = colors.detach()[ids].contiguous()
        dtype = entry_params.numpy().dtype
        ctx.constants = _constants(dtype, float(opacities.max()) if len(opacities) else 1.0)
        n_tiles = isect.tiles_x * isect.tiles_y
        tile_order = _interleaved_tile_order(n_tiles)
        rgb = np.zeros((height, width, colors.shape[1]), dtype=dtype)
        transmittance = np.ones((height, width), dtype=dtype)
        n_entries = np.zeros((height, width), dtype=np.int32)
        _forward_kernel(entry_params.numpy(), entry_colors.numpy(), _numpy(isect.tile_offsets), tile_order,
                        isect.tiles_x, TILE_SIZE, _pixel_centres(width, dtype), _pixel_centres(height, dtype),
                        ctx.constants, rgb, transmittance, n_entries)
        transmittance_t = torch.from_numpy(transmittance)
        ctx.save_for_backward(entry_params, entry_colors, ids, isect.tile_offsets, transmittance_t,
                              torch.from_numpy(n_entries))
        ctx.geometry = (isect.tiles_x, width, height, tile_order, means2d.shape[0])
        return torch.from_numpy(rgb), 1.0 - transmittance_t

    @staticmethod
    def backward(ctx, grad_rgb, grad_alpha):
        entry_params, entry_colors, ids, tile_offsets, transmittance, n_entries = ctx.saved_tensors
        tiles_x, width, height, tile_order, n_gaussians = ctx.geometry
        dtype = entry_params.numpy().dtype
        if grad_rgb is None:
            grad_rgb = torch.zeros(height, width, entry_colors.shape[1], dtype=entry_params.dtype)
        if grad_alpha is None:
            grad_alpha = torch.zeros(height, width, dtype=entry_params.dtype)
        grad_params = np.zeros(entry_params.shape, dtype=dtype)
        grad_colors = np.zeros(entry_colors.shape, dtype=dtype)
        _backward_kernel(entry_params.numpy(), entry_colors.numpy(), tile_offsets.numpy(), tile_order,
                         tiles_x, TILE_SIZE, _pixel_centres(width, dtype), _pixel_centres(height, dtype),
                         ctx.constants,
                         transmittance.numpy(), n_entries.numpy(), _numpy(grad_rgb.to(entry_params.dtype)),
                         _numpy(grad_alpha.to(entry_params.dtype)), grad_params, grad_colors)
        per_gaussian = torch.zeros(n_gaussians, 6, dtype=entry_params.dtype).index_add_(
            0, ids, torch.from_numpy(grad_params[:, :6]))
        grad_colors_g = torch.zeros(n_gaussians, entry_colors.shape[1], dtype=entry_params.dtype).index_add_(
            0, ids, torch.from_numpy(grad_colors))
        return (per_gaussian[:, 0:2], per_gaussian[:, 2:5], grad_colors_g, per_gaussian[:, 5], None, None, None, None)


def composite_tiles_fused(
    means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, radii_xy: Tensor,
    isect: TileIntersections, width: int, height: int,
) -> tuple[Tensor, Tensor]:
    """Numba compositor; returns (rgb (H, W, C) without background, alpha (H, W))."""
    return FusedTileComposite.apply(means2d, conics, colors, opacities, radii_xy, isect, width, height)
