"""Fused CPU tile compositor: numba kernels for forward and backward, wrapped in autograd.

Only the compositing step lives here (inputs: means2d, conics, colors, opacities and the
packed tile list; outputs: rgb without background, alpha). Projection stays in torch.

Threads own whole tiles (`prange` over tiles). Inside a tile the loop runs over the
depth-sorted entries and, for each, only over the pixels where its alpha can reach 1/255
(its opacity-aware box: the ellipse sigma <= log(255·opacity), inside its radius box),
keeping per-pixel state (T, colour, contributor count) in tile-local arrays; each pixel
still sees its Gaussians in exactly gsplat's order. A tile stops once all its pixels are
finished; the backward starts at the tile's last contributor the forward recorded.
Gradients are written per list entry: an entry belongs to exactly one tile, so there are
no write races, and torch's `index_add_` then sums entries into their Gaussians.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import get_num_threads, njit, prange
from torch import Tensor

from mgs.render.tiles import ALPHA_THRESHOLD, MAX_ALPHA, TILE_SIZE, TRANSMITTANCE_EPS, TileIntersections

# Columns of the per-entry parameter block gathered before each kernel call.
_X, _Y, _CONIC_A, _CONIC_B, _CONIC_C, _OPACITY = range(6)
# Columns of the per-entry pixel box: [x0, x1) x [y0, y1) in pixel indices, over the image.
_BOX_X0, _BOX_X1, _BOX_Y0, _BOX_Y1 = range(4)
# Safety margins of the opacity-aware box: it must hold every pixel the exact alpha test (run
# in the kernels' dtype) accepts, so it is computed in float64 and grown a little.
_SIGMA_MARGIN = 1e-2  # relative, on the sigma bound
_PIXEL_MARGIN = 0.05  # absolute, in pixels


def _constants(dtype) -> np.ndarray:
    """Kernel constants as an array of the working dtype, so float32 kernels never promote to float64."""
    return np.array([0.5, 1.0, MAX_ALPHA, ALPHA_THRESHOLD, TRANSMITTANCE_EPS], dtype=dtype)


@torch.no_grad()
def _pixel_boxes(means2d: Tensor, conics: Tensor, opacities: Tensor, radii_xy: Tensor,
                 width: int, height: int) -> tuple[Tensor, Tensor]:
    """Per Gaussian: the pixels that can pass the alpha test, and the per-Gaussian sigma bound.

    alpha = min(0.999, o·exp(-sigma)) >= 1/255 needs sigma <= log(255·o); the pixels with
    sigma <= s lie in an ellipse whose bounding box has half-sides sqrt(2·s·c/det) and
    sqrt(2·s·a/det) for the conic [[a, b], [b, c]]. That box, intersected with the radius box
    the tile list was built from (pixels outside it are never composited), is what the
    kernels visit: faint and thin Gaussians touch far fewer pixels than their radius box.
    Returns (boxes (N, 4) int32 [x0, x1, y0, y1) clamped to the image, sigma bound (N,)).
    """
    mean = means2d.double()
    a, b, c = conics.double().unbind(-1)
    opacity = opacities.double()
    sigma_max = torch.log(opacity.clamp_min(1e-30) / ALPHA_THRESHOLD)
    det = a * c - b * b
    bound = sigma_max.clamp_min(0) * (1 + _SIGMA_MARGIN) + _SIGMA_MARGIN
    well_formed = (det > 0) & (a > 0) & torch.isfinite(det)
    safe_det = torch.where(well_formed, det, torch.ones_like(det))
    radius = radii_xy.double()
    ext_x = torch.where(well_formed, torch.sqrt(2 * bound * c.abs() / safe_det) + _PIXEL_MARGIN,
                        radius[:, 0])
    ext_y = torch.where(well_formed, torch.sqrt(2 * bound * a.abs() / safe_det) + _PIXEL_MARGIN,
                        radius[:, 1])
    ext_x, ext_y = torch.minimum(ext_x, radius[:, 0]), torch.minimum(ext_y, radius[:, 1])
    # Pixel p is inside iff m - e <= p + 0.5 <= m + e; clamped while floating point so huge
    # extents cannot overflow the integer conversion.
    x0 = torch.ceil((mean[:, 0] - ext_x - 0.5).clamp(0, width))
    x1 = torch.floor((mean[:, 0] + ext_x - 0.5).clamp(-1, width - 1)) + 1
    y0 = torch.ceil((mean[:, 1] - ext_y - 0.5).clamp(0, height))
    y1 = torch.floor((mean[:, 1] + ext_y - 0.5).clamp(-1, height - 1)) + 1
    boxes = torch.stack([x0, x1, y0, y1], dim=1).to(torch.int32)
    # faint Gaussians (o < 1/255) reach no pixel at all: an empty box
    boxes[sigma_max < 0] = 0
    sigma_bound = (sigma_max * (1 + _SIGMA_MARGIN) + _SIGMA_MARGIN).to(means2d.dtype)
    return boxes, sigma_bound


@njit(parallel=True, cache=True)
def _forward_kernel(params, sigma_bound, boxes, colors, tile_offsets, tile_order, tiles_x,
                    tile_size, centres_x, centres_y, consts, out_rgb, out_transmittance,
                    out_n_entries):
    """Front to back per pixel; outputs start as rgb 0, T 1, n_entries 0 (empty tiles stay so).

    Each entry visits only the pixels of its opacity-aware box inside this tile; the tile ends
    as soon as every pixel is finished (T would drop to <= eps).
    """
    half, one, max_alpha, alpha_threshold = consts[0], consts[1], consts[2], consts[3]
    t_eps = consts[4]
    n_channels = colors.shape[1]
    width, height = centres_x.shape[0], centres_y.shape[0]
    for order_index in prange(tile_order.shape[0]):
        tile = tile_order[order_index]
        start, end = tile_offsets[tile], tile_offsets[tile + 1]
        if start == end:
            continue
        x0 = (tile % tiles_x) * tile_size
        y0 = (tile // tiles_x) * tile_size
        x_end = min(x0 + tile_size, width)
        y_end = min(y0 + tile_size, height)
        n_pixels = (x_end - x0) * (y_end - y0)
        # Per-pixel state of this tile, indexed (py - y0) * tile_size + (px - x0).
        transmittance = np.ones(tile_size * tile_size, dtype=params.dtype)
        rgb = np.zeros((tile_size * tile_size, n_channels), dtype=params.dtype)
        n_entries = np.zeros(tile_size * tile_size, dtype=np.int32)
        finished = np.zeros(tile_size * tile_size, dtype=np.bool_)
        n_finished = 0
        for entry in range(start, end):
            bx0, bx1 = max(boxes[entry, 0], x0), min(boxes[entry, 1], x_end)
            by0, by1 = max(boxes[entry, 2], y0), min(boxes[entry, 3], y_end)
            if bx0 >= bx1 or by0 >= by1:
                continue
            mx, my = params[entry, _X], params[entry, _Y]
            conic_a, conic_b = params[entry, _CONIC_A], params[entry, _CONIC_B]
            conic_c = params[entry, _CONIC_C]
            opacity, cutoff = params[entry, _OPACITY], sigma_bound[entry]
            for py in range(by0, by1):
                dy = my - centres_y[py]
                row = (py - y0) * tile_size - x0
                for px in range(bx0, bx1):
                    pixel = row + px
                    if finished[pixel]:
                        continue
                    dx = mx - centres_x[px]
                    sigma = half * (conic_a * dx * dx + conic_c * dy * dy) + conic_b * dx * dy
                    if sigma < 0 or sigma > cutoff:
                        continue
                    alpha = min(max_alpha, opacity * np.exp(-sigma))
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
            if n_finished == n_pixels:
                break
        for py in range(y0, y_end):
            for px in range(x0, x_end):
                pixel = (py - y0) * tile_size + (px - x0)
                for k in range(n_channels):
                    out_rgb[py, px, k] = rgb[pixel, k]
                out_transmittance[py, px] = transmittance[pixel]
                out_n_entries[py, px] = n_entries[pixel]


@njit(parallel=True, cache=True)
def _backward_kernel(params, sigma_bound, boxes, colors, tile_offsets, tile_order, tiles_x,
                     tile_size, centres_x, centres_y, consts, final_transmittance,
                     n_entries_per_pixel, grad_rgb, grad_alpha, grad_params, grad_colors):
    """Back to front per pixel (3DGS/gsplat order), undoing one (1 - alpha) factor per step.

    Starts at the tile's last contributing entry (the forward recorded each pixel's); entries
    behind a pixel's last contributor, and pixels outside an entry's box, are skipped.
    """
    half, one, max_alpha, alpha_threshold = consts[0], consts[1], consts[2], consts[3]
    zero = half - half  # typed like the data, unlike a literal 0.0
    n_channels = colors.shape[1]
    width, height = centres_x.shape[0], centres_y.shape[0]
    for order_index in prange(tile_order.shape[0]):
        tile = tile_order[order_index]
        start = tile_offsets[tile]
        x0 = (tile % tiles_x) * tile_size
        y0 = (tile // tiles_x) * tile_size
        x_end = min(x0 + tile_size, width)
        y_end = min(y0 + tile_size, height)
        transmittance = np.ones(tile_size * tile_size, dtype=params.dtype)
        n_entries = np.zeros(tile_size * tile_size, dtype=np.int32)
        color_behind = np.zeros((tile_size * tile_size, n_channels), dtype=params.dtype)
        last = 0
        for py in range(y0, y_end):
            for px in range(x0, x_end):
                pixel = (py - y0) * tile_size + (px - x0)
                transmittance[pixel] = final_transmittance[py, px]
                n_entries[pixel] = n_entries_per_pixel[py, px]
                last = max(last, n_entries[pixel])
        grad_color_local = np.zeros(n_channels, dtype=params.dtype)
        for entry in range(start + last - 1, start - 1, -1):
            bx0, bx1 = max(boxes[entry, 0], x0), min(boxes[entry, 1], x_end)
            by0, by1 = max(boxes[entry, 2], y0), min(boxes[entry, 3], y_end)
            if bx0 >= bx1 or by0 >= by1:
                continue  # reaches no pixel of this tile: its gradients stay 0
            mx, my = params[entry, _X], params[entry, _Y]
            conic_a, conic_b = params[entry, _CONIC_A], params[entry, _CONIC_B]
            conic_c = params[entry, _CONIC_C]
            opacity, cutoff = params[entry, _OPACITY], sigma_bound[entry]
            local = entry - start
            g_x = g_y = g_a = g_b = g_c = g_opacity = zero
            grad_color_local[:] = 0
            for py in range(by0, by1):
                dy = my - centres_y[py]
                row = (py - y0) * tile_size - x0
                for px in range(bx0, bx1):
                    pixel = row + px
                    if local >= n_entries[pixel]:  # behind this pixel's last contributor
                        continue
                    dx = mx - centres_x[px]
                    sigma = half * (conic_a * dx * dx + conic_c * dy * dy) + conic_b * dx * dy
                    if sigma < 0 or sigma > cutoff:
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
        boxes, sigma_bound = _pixel_boxes(means2d, conics, opacities, radii_xy, width, height)
        per_gaussian = torch.cat([means2d, conics, opacities[:, None]], dim=1)
        entry_params = per_gaussian.detach()[ids].contiguous()
        entry_colors = colors.detach()[ids].contiguous()
        entry_boxes = boxes[ids].contiguous()
        entry_bound = sigma_bound[ids].contiguous()
        dtype = entry_params.numpy().dtype
        ctx.constants = _constants(dtype)
        n_tiles = isect.tiles_x * isect.tiles_y
        tile_order = _interleaved_tile_order(n_tiles)
        rgb = np.zeros((height, width, colors.shape[1]), dtype=dtype)
        transmittance = np.ones((height, width), dtype=dtype)
        n_entries = np.zeros((height, width), dtype=np.int32)
        _forward_kernel(entry_params.numpy(), entry_bound.numpy(), entry_boxes.numpy(),
                        entry_colors.numpy(), _numpy(isect.tile_offsets), tile_order,
                        isect.tiles_x, TILE_SIZE, _pixel_centres(width, dtype),
                        _pixel_centres(height, dtype), ctx.constants, rgb, transmittance,
                        n_entries)
        transmittance_t = torch.from_numpy(transmittance)
        ctx.save_for_backward(entry_params, entry_bound, entry_boxes, entry_colors, ids,
                              isect.tile_offsets, transmittance_t, torch.from_numpy(n_entries))
        ctx.geometry = (isect.tiles_x, width, height, tile_order, means2d.shape[0])
        return torch.from_numpy(rgb), 1.0 - transmittance_t

    @staticmethod
    def backward(ctx, grad_rgb, grad_alpha):
        (entry_params, entry_bound, entry_boxes, entry_colors, ids, tile_offsets, transmittance,
         n_entries) = ctx.saved_tensors
        tiles_x, width, height, tile_order, n_gaussians = ctx.geometry
        dtype = entry_params.numpy().dtype
        if grad_rgb is None:
            grad_rgb = torch.zeros(height, width, entry_colors.shape[1], dtype=entry_params.dtype)
        if grad_alpha is None:
            grad_alpha = torch.zeros(height, width, dtype=entry_params.dtype)
        grad_params = np.zeros(entry_params.shape, dtype=dtype)
        grad_colors = np.zeros(entry_colors.shape, dtype=dtype)
        _backward_kernel(entry_params.numpy(), entry_bound.numpy(), entry_boxes.numpy(),
                         entry_colors.numpy(), tile_offsets.numpy(), tile_order, tiles_x,
                         TILE_SIZE, _pixel_centres(width, dtype), _pixel_centres(height, dtype),
                         ctx.constants, transmittance.numpy(), n_entries.numpy(),
                         _numpy(grad_rgb.to(entry_params.dtype)),
                         _numpy(grad_alpha.to(entry_params.dtype)), grad_params, grad_colors)
        per_gaussian = torch.zeros(n_gaussians, 6, dtype=entry_params.dtype).index_add_(
            0, ids, torch.from_numpy(grad_params))
        grad_colors_g = torch.zeros(n_gaussians, entry_colors.shape[1], dtype=entry_params.dtype).index_add_(
            0, ids, torch.from_numpy(grad_colors))
        return (per_gaussian[:, 0:2], per_gaussian[:, 2:5], grad_colors_g, per_gaussian[:, 5], None, None, None, None)


def composite_tiles_fused(
    means2d: Tensor, conics: Tensor, colors: Tensor, opacities: Tensor, radii_xy: Tensor,
    isect: TileIntersections, width: int, height: int,
) -> tuple[Tensor, Tensor]:
    """Numba compositor; returns (rgb (H, W, C) without background, alpha (H, W))."""
    return FusedTileComposite.apply(means2d, conics, colors, opacities, radii_xy, isect, width, height)
