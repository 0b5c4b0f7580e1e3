"""partition.png: a top view of the partition, in world space and in contracted space.

Left: world coordinates seen from above (along the up axis). Grid cuts are drawn by inverse
contraction of the grid lines in the horizontal plane through the aabb centre: straight inside
the aabb, bent outside it (the ∞-norm shell). Right: the same in contracted space, where cells
are a regular grid and the aabb is the middle square.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from mgs.atomic import atomic_path  # noqa: E402
from mgs.partition.geometry import AXES, contract, margin_label, uncontract  # noqa: E402

MAX_PLOTTED_POINTS = 100_000
LABEL = dict(ha="center", va="center", fontsize=11, weight="bold", zorder=5,
             bbox=dict(boxstyle="round,pad=0.25", fc="white", alpha=0.8, lw=0))


def block_colours(n: int) -> np.ndarray:
    if n <= 10:
        return plt.get_cmap("tab10")(np.arange(n))
    if n <= 20:  # dark shades first, so neighbouring ids differ in hue as well
        return plt.get_cmap("tab20")(np.r_[0:20:2, 1:20:2][:n])
    return plt.get_cmap("hsv")(np.linspace(0, 1, n, endpoint=False))


def view_axes(up: str, up_sign: float) -> tuple[int, int]:
    """(right, upward) plot axes so that the view looks down the up axis, right-handed."""
    u = AXES.index(up)
    a, b = (u + 1) % 3, (u + 2) % 3
    return (a, b) if up_sign >= 0 else (b, a)


def _grid_curves(partition, a: int, b: int, up: int, samples: int = 400):
    """World polylines of the grid cuts along a and b in the plane q_up = 1/2."""
    t = np.linspace(1e-3, 1 - 1e-3, samples)
    curves = []
    for axis, other in ((a, b), (b, a)):
        n = partition.block_dim[axis]
        for k in range(1, n):
            q = np.full((samples, 3), 0.5)
            q[:, axis], q[:, other] = k / n, t
            world = uncontract(q, partition.aabb)
            curves.append(world[:, [a, b]])
    return curves


def _limits(xy: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.minimum(np.percentile(xy, 0.5, axis=0), box[0])
    hi = np.maximum(np.percentile(xy, 99.5, axis=0), box[1])
    pad = 0.06 * (hi - lo).max()
    return lo - pad, hi + pad


def plot_partition(partition, points: np.ndarray, camera_centres: np.ndarray,
                   camera_blocks: np.ndarray, path, up_sign: float = 1.0) -> None:
    """Draw the partition; points coloured by block, cameras by the block of their centre."""
    up = AXES.index(partition.up)
    a, b = view_axes(partition.up, up_sign)
    colours = block_colours(partition.num_blocks)
    if len(points) > MAX_PLOTTED_POINTS:
        points = points[np.random.default_rng(0).choice(len(points), MAX_PLOTTED_POINTS,
                                                         replace=False)]
    point_blocks = partition.block_of_points(points)
    box = partition.aabb[:, [a, b]]

    fig, (world, squashed) = plt.subplots(1, 2, figsize=(13, 6.4),
                                          gridspec_kw={"width_ratios": [1, 1]})
    size = max(0.3, min(4.0, 8000 / max(len(points), 1)))
    for ax, p_xy, c_xy in ((world, points[:, [a, b]], camera_centres[:, [a, b]]),
                           (squashed, contract(points, partition.aabb)[:, [a, b]],
                            contract(camera_centres, partition.aabb)[:, [a, b]])):
        ax.scatter(p_xy[:, 0], p_xy[:, 1], s=size, c=colours[point_blocks], linewidths=0,
                   rasterized=True)
        ax.scatter(c_xy[:, 0], c_xy[:, 1], s=28, marker="^", c=colours[camera_blocks],
                   edgecolors="black", linewidths=0.5, zorder=3)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{AXES[a]}{'' if ax is world else ' (contracted)'}")
        ax.set_ylabel(f"{AXES[b]}{'' if ax is world else ' (contracted)'}")

    # world: cuts by inverse contraction, aabb outline
    for curve in _grid_curves(partition, a, b, up):
        world.plot(curve[:, 0], curve[:, 1], color="0.15", lw=1.0)
    world.add_patch(Rectangle(box[0], *(box[1] - box[0]), fill=False, ls="--", lw=1.4,
                              edgecolor="crimson", zorder=4))
    lo, hi = _limits(np.concatenate([points[:, [a, b]], camera_centres[:, [a, b]]]), box)
    world.set_xlim(lo[0], hi[0])
    world.set_ylim(lo[1], hi[1])
    world.set_title("world, top view (cuts at the aabb's mid-height)", fontsize=10)
    for index in range(partition.num_blocks):
        mine = points[point_blocks == index][:, [a, b]]
        if len(mine):
            world.text(*np.median(mine, axis=0), f"B{partition.blocks[index].id}", **LABEL)

    # contracted: the regular grid, the aabb square, cell labels
    for axis, line in ((a, squashed.axvline), (b, squashed.axhline)):
        for k in range(1, partition.block_dim[axis]):
            line(k / partition.block_dim[axis], color="0.15", lw=1.0)
    squashed.add_patch(Rectangle((0.25, 0.25), 0.5, 0.5, fill=False, ls="--", lw=1.4,
                                 edgecolor="crimson", zorder=4))
    na, nb = partition.block_dim[a], partition.block_dim[b]
    for ia in range(na):
        for ib in range(nb):
            column = sorted({int(partition.cell_to_block[_cell(partition.block_dim, a, b, up,
                                                                  ia, ib, iu)])
                             for iu in range(partition.block_dim[up])})
            squashed.text((ia + 0.5) / na, (ib + 0.5) / nb, "/".join(f"B{c}" for c in column),
                          **LABEL)
    squashed.set_xlim(0, 1)
    squashed.set_ylim(0, 1)
    squashed.set_title("contracted space (aabb = middle square, outer cells unbounded)",
                       fontsize=10)

    handles = [Line2D([], [], marker="o", ls="", color=colours[i],
                      label=f"B{blk.id}: {len(blk.train_cameras)}+{len(blk.validation_cameras)} cams, "
                            f"{blk.points_in_cell} pts")
               for i, blk in enumerate(partition.blocks)]
    handles += [Line2D([], [], marker="^", ls="", mfc="white", mec="black",
                       label="camera (block of its centre)"),
                Line2D([], [], ls="--", color="crimson", label="aabb"),
                Line2D([], [], color="0.15", label="cell boundary")]
    ncol = min(4, len(handles))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    rows = int(np.ceil(len(handles) / ncol))
    margin = margin_label(partition.margin).replace("inf", "∞")
    fig.suptitle(f"{partition.num_blocks} blocks, grid {'×'.join(map(str, partition.block_dim))}, "
                 f"up {partition.up}, assignment {partition.assignment}"
                 f"{'' if partition.threshold is None else f' > {partition.threshold:g}'}, "
                 f"margin {margin}", fontsize=11)
    fig.tight_layout(rect=(0, min(0.4, 0.035 * rows + 0.02), 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _cell(block_dim, a: int, b: int, up: int, ia: int, ib: int, iu: int) -> int:
    index = [0, 0, 0]
    index[a], index[b], index[up] = ia, ib, iu
    return index[2] * block_dim[0] * block_dim[1] + index[1] * block_dim[0] + index[0]
