"""The diffusers pixel-decoder references (docs/model.md 9): a tiny SDXL-layout UNet2DConditionModel config,
the Euler scheduler as configured in the released ``diffusion-decoder/scheduler``, and the parameter
perturbation that moves norm scales and biases away from their init so that every path of a tiny random
UNet / VAE is exercised."""

import torch

# The SDXL layout features at toy widths: both block kinds, per-block transformer depths (1, 2, 3), the
# text_time addition embedding, linear projections.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 3),
    attention_head_dim=(2, 2, 4),
    cross_attention_dim=32,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=8,
    use_linear_projection=True,
)
EULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


# The diffusion decoder of the tiny released-layout checkpoint (tests/test_inference.py, tests/test_precision.py):
# an SDXL-layout UNet on 8x8 latents and a 2-level VAE (16 px images).
PIPELINE_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                     attention_head_dim=(2, 2), cross_attention_dim=32, addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8, use_linear_projection=True)
PIPELINE_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                   sample_size=16, scaling_factor=0.13025)
