"""Velocity networks beyond the released DiT. Every module here registers itself with
``heads.register_velocity_net`` and is imported by ``blip3o_jax.models.heads`` (no list to edit):
a new denoiser is one new file here plus its test (docs/ADDING_A_HEAD.md)."""
