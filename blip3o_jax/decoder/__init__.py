"""The diffusion decoder (docs/model.md 9): target features -> pixels. The SDXL-layout UNet, the VAE, the
Euler scheduler and sampling loop, and the diffusers weight mapping of both networks."""
