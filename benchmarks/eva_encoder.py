"""images/s of the EVA target-encoder forward: JAX (this project) vs timm Eva, same weights, same run."""
import os, sys, time, tempfile, pathlib
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repo root
from tests import torch_shim  # noqa
import numpy as np, torch, jax, jax.numpy as jnp
from flax import nnx
from timm.models.eva import Eva
from safetensors.torch import save_file
from blip3o_jax import sharding
from blip3o_jax.models.eva_clip import EvaConfig
from blip3o_jax.models import eva_mapping
from blip3o_jax.weights import TorchCheckpoint

cfg = EvaConfig(image_size=224, patch_size=14, width=768, layers=12, head_width=64,
                mlp_ratio=8.571428571428571, pooling="early_pool2d_4")
B = int(os.environ.get("B", 4)); REPS = int(os.environ.get("REPS", 3))
torch.set_num_threads(os.cpu_count())
tm = Eva(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_ratio=cfg.mlp_ratio,
         use_post_norm=True, num_classes=0, global_pool="token").eval()
d = pathlib.Path(tempfile.mkdtemp()); save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(d / "model.safetensors"))
mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
def build(dtype):
    gd, state = nnx.split(eva_mapping.load(TorchCheckpoint(d), cfg, mesh, "replicated", dtype=dtype))
    fwd = jax.jit(lambda s, x: nnx.merge(gd, s).target_features(x))
    return lambda x: fwd(state, x).block_until_ready()

x = np.random.default_rng(0).normal(size=(B, 224, 224, 3)).astype(np.float32)
xj = jax.device_put(x, jax.devices()[0])
xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

def timm_fwd(x):
    with torch.inference_mode():
        (g,) = tm.forward_intermediates(x, indices=[cfg.layers - 1], norm=False, intermediates_only=True)
        return torch.nn.functional.avg_pool2d(g, 4, 4)

runs = {"jax_float32": (build(jnp.float32), xj), "timm_float32": (timm_fwd, xt), "jax_bfloat16": (build(jnp.bfloat16), xj)}
times = {k: [] for k in runs}
for f, arg in runs.values():
    f(arg)  # compile / warm up
for _ in range(REPS):  # interleaved so both see the same machine load
    for k, (f, arg) in runs.items():
        t = time.perf_counter(); f(arg); times[k].append(time.perf_counter() - t)
print(f"EVA {cfg.image_size}px/{cfg.patch_size}, width {cfg.width}, {cfg.layers} post-norm layers, mlp {cfg.mlp_dim}, "
      f"batch {B}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
for k, v in times.items():
    print(f"{k}: {B / np.median(v):.2f} images/s (median of {REPS})")
