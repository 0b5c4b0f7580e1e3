"""Tile binning and the pure-torch tile compositor (backend "torch" on GPU, oracle on CPU).

The image is cut into 16x16 tiles. Every Gaussian is listed once per tile its
screen box (means2d ± radius) touches; the list is packed (no padding) and sorted
by (tile, depth), so each tile's Gaussians are a contiguous front-to-back run.

The torch compositor expands each list entry to the pixels of its tile that lie in
the Gaussian's box (the others cannot pass the alpha threshold), keeps the pairs that
pass it, and composites the ragged per-pixel runs with segmented sums; autograd
provides the backward. Its cost grows with the number of (pixel, Gaussian) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TILE_SIZE = 16
# gsplat's compositing rules (rasterize_to_pixels_3dgs_fwd.cu).
ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
TRANSMITTANCE_EPS = 1e-4  # stop before a Gaussian that would take T to <= this
# Bounds the temporaries of the no-grad (pixel, Gaussian) sweep.
PAIRS_PER_CHUNK = 1 << 22


@dataclass
class TileIntersections:
    """Packed (tile, Gaussian) list sorted by tile, then depth (front to back)."""

    tiles_x: int
    tiles_y: int
    tile_offsets: Tensor  # (tiles_x * tiles_y + 1,) int64; tile t owns [offsets[t], offsets[t+1])
    gaussian_ids: Tensor  # (M,) int64 index into the N Gaussians
    tile_ids: Tensor  # (M,) int64, non-decreasing


@torch.no_grad()
def build_tile_intersections(
    means2d: Tensor, radii_xy: Tensor, depths: Tensor, width: int, height: int, tile_size: int = TILE_SIZE
) -> TileIntersections:
    device = means2d.device
    tiles_x = (width + tile_size - 1) // tile_size
    tiles_y = (height + tile_size - 1) // tile_size
    n_tiles = tiles_x * tiles_y

    visible = torch.nonzero((radii_xy > 0).all(dim=-1)).squeeze(1)
    # Expanding Gaussians in depth order and then stable-sorting by tile keeps each
    # tile's run front to back; ties in depth fall back to Gaussian index like gsplat.
    visible = visible[torch.sort(depths[visible], stable=True).indices]

    # Same tile-range rule as gsplat's isect_tiles: [floor((m-r)/ts), ceil((m+r)/ts)).
    centre = means2d[visible].detach() / tile_size
    half_extent = radii_xy[visible].to(centre.dtype) / tile_size
    # Clamped while floating point so huge radii cannot overflow the integer conversion.
    limits = torch.tensor([tiles_x, tiles_y], device=device, dtype=centre.dtype)
    tile_min = torch.floor(torch.minimum((centre - half_extent).clamp(min=0), limits)).long()
    tile_max = torch.ceil(torch.minimum((centre + half_extent).clamp(min=0), limits)).long()
    span = (tile_max - tile_min).clamp(min=0)
    tiles_per_gaussian = span[:, 0] * span[:, 1]

    owner = torch.repeat_interleave(torch.arange(len(visible), device=device), tiles_per_gaussian)
    first_entry = torch.cumsum(tiles_per_gaussian, 0) - tiles_per_gaussian
    local = torch.arange(len(owner), device=device) - first_entry[owner]
    span_x = span[owner, 0]
    tile_x = tile_min[owner, 0] + local % span_x
    tile_y = tile_min[owner, 1] + local // span_x
    tile_ids = tile_y * tiles_x + tile_x

    tile_ids, order = torch.sort(tile_ids, stable=True)
    gaussian_ids = visible[owner[order]]
    tile_offsets = torch.zeros(n_tiles + 1, dtype=torch.int64, device=device)
    tile_offsets[1:] = torch.cumsum(torch.bincount(tile_ids, minlength=n_tiles), 0)
    return TileIntersections(tiles_x, tiles_y, tile_offsets, gaussian_ids, tile_ids)


def _box_pixel_counts(means2d, radii_xy, isect, width, height, tile_size):
    """Per list entry: the pixel rectangle where its tile meets the Gaussian's radius box.

    Pixel centres outside means2d ± radius have alpha < 1/255 (see RADIUS_SIGMAS), so only
    this rectangle can contribute. Returns (x0, y0, span_x, n_pixels) per entry, int64.
    """
    gauss = isect.gaussian_ids
    centre = means2d[gauss]
    radius = radii_xy[gauss].to(centre.dtype)
    tile_x0 = (isect.tile_ids % isect.tiles_x) * tile_size
    tile_y0 = (isect.tile_ids // isect.tiles_x) * tile_size
    # Pixel p is inside the box iff m - r <= p + 0.5 <= m + r. Clamp to the image while
    # still floating point so huge radii cannot overflow the integer conversion.
    def first_inside(low_edge, size):
        return torch.ceil((low_edge - 0.5).clamp(-1, size)).long()

    def last_inside_plus_one(high_edge, size):
        return torch.floor((high_edge - 0.5).clamp(-1, size)).long() + 1

    x0 = torch.maximum(tile_x0, first_inside(centre[:, 0] - radius[:, 0], width))
    y0 = torch.maximum(tile_y0, first_inside(centre[:, 1] - radius[:, 1], height))
    x1 = torch.minimum(torch.clamp(tile_x0 + tile_size, max=width),
                       last_inside_plus_one(centre[:, 0] + radius[:, 0], width))
    y1 = torch.minimum(torch.clamp(tile_y0 + tile_size, max=height),
                       last_inside_plus_one(centre[:, 1] + radius[:, 1], height))
    span_x = (x1 - x0).clamp(min=0)
    return x0, y0, span_x, span_x * (y1 - y0).clamp(min=0)


def _expand_entries(first: int, last: int, x0, y0, span_x, n_pixels):
    """(pixel_x, pixel_y, entry) for every box pixel of entries [first, last), entry-major."""
    counts = n_pixels[first:last]
    entry = torch.repeat_interleave(torch.arange(first, last, device=counts.device), counts)
    pair_base = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(entry), device=counts.device) - pair_base[entry - first]
    width_of_box = span_x[entry]
    return x0[entry] + local % width_of_box, y0[entry] + local // width_of_box, entry


def _alpha_of_pairs(means2d, conics, opacities, gauss, pixel_x, pixel_y):
    """Per-pair sigma and alpha exactly as the compositing kernels compute them."""
    dx = means2d[gauss, 0] - (pixel_x.to(means2d.dtype) + 0.5)
    dy = means2d[gauss, 1] - (pixel_y.to(means2d.dtype) + 0.5)
    conic = conics[gauss]
    sigma = 0.5 * (conic[:, 0] * dx * dx + conic[:, 2] * dy * dy) + conic[:, 1] * dx * dy
    alpha = torch.clamp_max(opacities[gauss] * torch.exp(-sigma), MAX_ALPHA)
    return sigma, alpha


def _segment_exclusive_cumsum(values: Tensor, segment_start: Tensor) -> Tensor:
    """Exclusive running sum restarting at each segment; `segment_start[i]` = first index of i's segment."""
    running = torch.cat([values.new_zeros(1), torch.cumsum(values, 0)])
    return running[:-1] - running[segment_start]


def _chunk_bounds(pairs_per_entry: Tensor) -> list[int]:
    """Entry indices splitting the list into runs of about PAIRS_PER_CHUNK pairs (>= 1 entry each)."""
    pairs_through = torch.cumsum(pairs_per_entry, 0)
    total = int(pairs_through[-1]) if len(pairs_through) else 0
    targets = torch.arange(1, total // PAIRS_PER_CHUNK + 1, device=pairs_through.device) * PAIRS_PER_CHUNK
    cuts = torch.searchsorted(pairs_through, targets, right=True).tolist()
    return sorted({0, len(pairs_per_entry), *cuts})


@torch.no_grad()
def _contributing_pairs(means2d, conics, opacities, radii_xy, isect, width, height, tile_size):
    """Find the (pixel, Gaussian) pairs that end up composited, without autograd.

    Returns pixel ids and Gaussian ids, grouped by pixel, front to back within a pixel.
    """
    x0, y0, span_x, n_pixels = _box_pixel_counts(means2d, radii_xy, isect, width, height, tile_size)
    pixel_chunks, entry_chunks, alpha_chunks = [], [], []
    bounds = _chunk_bounds(n_pixels)
    for first, last in zip(bounds[:-1], bounds[1:]):
        pixel_x, pixel_y, entry = _expand_entries(first, last, x0, y0, span_x, n_pixels)
        sigma, alpha = _alpha_of_pairs(means2d, conics, opacities, isect.gaussian_ids[entry], pixel_x, pixel_y)
        keep = (sigma >= 0) & (alpha >= ALPHA_THRESHOLD)
        pixel_chunks.append((pixel_y * width + pixel_x)[keep])
        entry_chunks.append(entry[keep])
        alpha_chunks.append(alpha[keep])
    if not pixel_chunks:
        empty = torch.zeros(0, dtype=torch.int64, device=means2d.device)
        return empty, empty
    # Entries are in (tile, depth) order; a stable sort by pixel keeps each pixel's run in depth order.
    pixel_ids, order = torch.sort(torch.cat(pixel_chunks), stable=True)
    gauss_ids = isect.gaussian_ids[torch.cat(entry_chunks)[order]]
    alpha = torch.cat(alpha_chunks)[order]

    # Early termination: drop each pixel's pairs from the first one whose next_T <= eps.
    # T via log-sums in float64 (segmented cumprod is not available in torch).
    segment_start = _segment_starts(pixel_ids)
    log_keep = torch.log1p(-alpha.double())
    next_t = torch.exp(_segment_exclusive_cumsum(log_keep, segment_start) + log_keep)
    stops = (next_t <= TRANSMITTANCE_EPS).long()
    stopped = _segment_exclusive_cumsum(stops, segment_start) + stops
    included = stopped == 0
    return pixel_ids[included], gauss_ids[included]


def _segment_starts(sorted_keys: Tensor) -> Tensor:
    """For a key array where equal keys are contiguous: index of the first element of each run."""
    n = len(sorted_keys)
    is_start = torch.ones(n, dtype=torch.bool, device=sorted_keys.device)
    is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    start_positions = torch.nonzero(is_start).squeeze(1)
    run_index = torch.cumsum(is_start.long(), 0) - 1
    return start_positions[run_index]


def composite_tiles_torch(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    radii_xy: Tensor,
    isect: TileIntersections,
    width: int,
    height: int,
    tile_size: int = TILE_SIZE,
) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing with torch ops only; autograd does the backward.

    Returns (rgb (H, W, 3) without background, alpha (H, W)).
    """
    pixel_ids, gauss_ids = _contributing_pairs(
        means2d.detach(), conics.detach(), opacities.detach(), radii_xy, isect, width, height, tile_size
    )
    _, alpha = _alpha_of_pairs(means2d, conics, opacities, gauss_ids, pixel_ids % width, pixel_ids // width)
    # Transmittance in front of each pair = prod(1 - alpha) over earlier pairs of that pixel.
    log_keep = torch.log1p(-alpha.double())
    transmittance = torch.exp(_segment_exclusive_cumsum(log_keep, _segment_starts(pixel_ids))).to(alpha.dtype)
    weights = alpha * transmittance

    n_pixels = width * height
    rgb = torch.zeros(n_pixels, colors.shape[-1], dtype=colors.dtype, device=colors.device)
    rgb = rgb.index_add(0, pixel_ids, weights[:, None] * colors[gauss_ids])
    log_final_t = torch.zeros(n_pixels, dtype=torch.float64, device=alpha.device).index_add(0, pixel_ids, log_keep)
    alpha_out = 1.0 - torch.exp(log_final_t).to(alpha.dtype)
    return rgb.reshape(height, width, -1), alpha_out.reshape(height, width)
