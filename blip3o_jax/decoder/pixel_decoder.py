"""The pixel decoder as one object (docs/model.md 9): UNet, optional VAE (None = the UNet works on
pixels directly) and the Euler scheduler's config. ``checkpoints.save_decoder`` / ``load_decoder`` write
and read it; ``inference.Pipeline.decode`` samples with it."""

from __future__ import annotations

import dataclasses

from blip3o_jax.decoder import scheduler as sched_lib
from blip3o_jax.decoder.unet import UNet2DConditionModel
from blip3o_jax.decoder.vae import AutoencoderKL


@dataclasses.dataclass
class Decoder:
    """The diffusion decoder: UNet, optional VAE (None = pixel space), scheduler."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL | None = None
    scheduler: sched_lib.SchedulerConfig = sched_lib.SchedulerConfig()
    pixel_patch: int = 1  # pixel space only: the UNet sees pixel_patch**2 pixels per position (space_to_depth)

    @property
    def downscale(self) -> int:
        """Pixels per UNet position along a side: the VAE's downscale, or the pixel patch."""
        return self.vae.cfg.downscale if self.vae is not None else self.pixel_patch

    @property
    def default_size(self) -> int:
        """The UNet's native image side in pixels (1024 for the released decoder)."""
        return self.unet.cfg.sample_size * self.downscale
