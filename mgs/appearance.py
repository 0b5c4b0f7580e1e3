"""Per-image appearance latents (`train.appearance_dim` > 0): the table, sync and test-time choice.

Every table has one row per training image of the scene (scene order), so the tables of all
blocks line up and a sync can average them row by row: an image held by several blocks gets
the average of their rows, weighted like the decoders (the block weights); a row no block
trained keeps its previous value. Rows start at zero, so at step 0 every image has the same
colour and the mean of the table stays a meaningful neutral latent.

Views without a row of their own (the test views) use the rule `train.appearance_eval`:
`nearest` — the row of the training image whose camera centre is closest; `mean` — the mean
of the rows that some block trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mgs.config import APPEARANCE_RULES as RULES


@dataclass
class AppearanceImages:
    """The table's rows: training image names and camera centres, in scene order."""
    names: list[str]
    centers: torch.Tensor  # (n, 3) float64

    @classmethod
    def from_scene(cls, scene) -> "AppearanceImages":
        cameras = scene.train_cameras()
        centers = np.stack([camera.center for camera in cameras]) if cameras else np.zeros((0, 3))
        return cls([camera.name for camera in cameras],
                   torch.as_tensor(centers, dtype=torch.float64))

    def rows(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.names)}

    def mask(self, names) -> torch.Tensor:
        """Bool over the rows: which of them `names` holds."""
        rows = self.rows()
        held = torch.zeros(len(self.names), dtype=torch.bool)
        held[[rows[name] for name in names if name in rows]] = True
        return held


def choose_row(images: AppearanceImages, held: torch.Tensor, center: torch.Tensor,
               rule: str) -> int | None:
    """The row a view without its own row uses: the nearest held training camera (`nearest`),
    or None for the mean of the held rows (`mean`)."""
    if rule == "mean":
        return None
    if rule != "nearest":
        raise ValueError(f"appearance rule must be one of {', '.join(RULES)}, got {rule!r}")
    distance = (images.centers - center.detach().double().cpu().reshape(1, 3)).norm(dim=1)
    distance[~held] = float("inf")
    return int(distance.argmin())


def latent_for(table: torch.Tensor, held: torch.Tensor, row: int | None) -> torch.Tensor:
    """Row `row` of the table, or the mean of its held rows when `row` is None."""
    if row is not None:
        return table[row]
    return table[held.to(table.device)].mean(dim=0)


def average_tables(tables: list[torch.Tensor], held: list[torch.Tensor], weights: list[float],
                   previous: torch.Tensor) -> torch.Tensor:
    """Row i = Σ_b w_b T_b[i] / Σ_b w_b over the blocks b that hold image i; rows no block
    holds keep `previous`."""
    numerator = torch.zeros_like(previous, dtype=torch.float64)
    denominator = torch.zeros(previous.shape[0], dtype=torch.float64)
    for table, mask, weight in zip(tables, held, weights):
        mask = mask.to(torch.float64)
        numerator += weight * mask[:, None] * table.double()
        denominator += weight * mask
    averaged = numerator / denominator.clamp_min(1e-300)[:, None]
    kept = denominator == 0
    averaged[kept] = previous[kept].double()
    return averaged.to(previous.dtype)
