"""Sync by fitting: one shared decoder that reproduces every block's student on its own inputs.

Averaging the parameters of MLPs that trained apart for a round gives a decoder that none of
the blocks trained, and on real captures each block loses 1–2 dB when it loads it. Each block's
anchor features live in their own region of the decoder's input space, so one decoder can
reproduce all of them there: sync starts from the weighted average and fits it, full batch,
to each block's student outputs on a sample of that block's decoder inputs (anchor feature,
view direction and appearance latent, written by the block job into its decoder summary).
The fit matches the attributes the consistency loss matches (mgs.train.consistency_loss).
With one block the average is that block's decoder, the loss is zero and so is every step.
"""

from __future__ import annotations

import math

import torch

from mgs.model import Decoder, camera_center, decoder_inputs, visible_anchor_mask

SAMPLE_ROWS = 4096  # decoder inputs per block and round (~290 KB in float16)
SAMPLE_VIEWS = 8  # spread over the block's training views
FIT_STEPS = 300
FIT_LR = 1e-3  # the decoder MLPs' initial learning rate in training is 2-8e-3


@torch.no_grad()
def sample_decoder_inputs(trainer, rows: int = SAMPLE_ROWS, views: int = SAMPLE_VIEWS,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """A random sample of the decoder inputs the block's training views produce: rows of
    [anchor feature, unit view direction] of visible anchors, with each view's latent."""
    chosen = trainer.train_views[:: max(1, math.ceil(len(trainer.train_views) / views))]
    per_view = math.ceil(rows / max(1, len(chosen)))
    generator = torch.Generator().manual_seed(seed)
    z_parts, latent_parts = [], []
    for view in chosen:
        visible = visible_anchor_mask(trainer.anchors, view.viewmat, view.K, view.width,
                                      view.height)
        inputs = decoder_inputs(trainer.anchors, visible, camera_center(view.viewmat))
        pick = torch.randperm(inputs.z.shape[0], generator=generator)[:per_view]
        z_parts.append(inputs.z.cpu()[pick])
        latent = trainer.latent(view)
        if latent is not None:
            latent_parts.append(latent.detach().cpu().reshape(1, -1).expand(len(pick), -1))
    sample = {"z": torch.cat(z_parts).half()}
    if latent_parts:
        sample["latent"] = torch.cat(latent_parts).half()
    return sample


def decoder_outputs(decoder: Decoder, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoded attributes that do not depend on the anchor's scaling: opacity (tanh),
    colour, normalised rotation and the sigmoid scale factor, per neural Gaussian."""
    latent = sample.get("latent")
    opacity, cov, color = decoder(sample["z"].float(), None if latent is None else latent.float())
    cov = cov.reshape(-1, 7)
    return {"opacity": opacity.reshape(-1), "color": color.reshape(-1, 3),
            "quat": torch.nn.functional.normalize(cov[:, 3:7], dim=1),
            "scale": torch.sigmoid(cov[:, :3])}


def output_distance(outputs: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
                    ) -> torch.Tensor:
    """Sum of MSEs, colour/rotation/scale over the Gaussians the target renders (opacity > 0),
    opacity over all, as the consistency loss."""
    selected = target["opacity"] > 0
    mse = torch.nn.functional.mse_loss
    loss = mse(outputs["opacity"], target["opacity"])
    if selected.any():
        loss = loss + sum(mse(outputs[k][selected], target[k][selected])
                          for k in ("color", "quat", "scale"))
    return loss


def fit_shared_decoder(average: dict[str, torch.Tensor], students: list[dict[str, torch.Tensor]],
                       samples: list[dict[str, torch.Tensor]], weights: list[float],
                       feat_dim: int, n_offsets: int, appearance_dim: int = 0,
                       steps: int = FIT_STEPS, lr: float = FIT_LR
                       ) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """The decoder that starts at `average` and minimises Σ_b w_b·distance(its outputs, block
    b's student outputs) on block b's sample / Σ_b w_b. Returns its state and each block's
    distance before and after the fit."""
    def make(state):
        decoder = Decoder(feat_dim, n_offsets, appearance_dim=appearance_dim)
        decoder.load_state_dict(state)
        return decoder

    with torch.no_grad():
        targets = [decoder_outputs(make(state), sample) for state, sample in zip(students, samples)]
    decoder = make(average)
    total = float(sum(weights))
    optimizer = torch.optim.Adam(decoder.parameters(), lr=lr)

    def distances():
        return [output_distance(decoder_outputs(decoder, sample), target)
                for sample, target in zip(samples, targets)]

    with torch.no_grad():
        before = [float(d) for d in distances()]
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = sum(w / total * d for w, d in zip(weights, distances()))
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = [float(d) for d in distances()]
    state = {k: v.detach().clone() for k, v in decoder.state_dict().items()}
    return state, {"fit_before": before, "fit_after": after}
