"""Memory and throughput planner: will a config fit a slice, on which mesh, and how fast will it step?

    python -m blip3o_jax.plan --config configs/blip3o_8b.py --mesh data=4,fsdp=8,tensor=1 --device v5p
    python -m blip3o_jax.plan --config configs/blip3o_4b.py --mesh auto --device v4-32     (recommends a mesh)
    python -m blip3o_jax.plan --config configs/blip3o_8b.py --slices v4-32,v5p-64,v5e-256,8xh100  (a table)

Nothing is allocated: the model is traced abstractly (``nnx.eval_shape``) and every figure comes from
parameter shapes, the config's logical-axis rule tables (``config.sharding``) and the mesh.

Per device, for the stage's trainable/frozen split (``model.trainable_filter``):

* parameters: trainable ones in ``model.param_dtype``, frozen ones in the stage's frozen dtype
  (``model.frozen_param_dtype``: the compute dtype in the generation stages), divided over the mesh
  axes their PartitionSpec names (a dimension that does not divide is padded, as GSPMD does). Frozen
  parameters the stage never reads (IDLE_PARAMS) are listed apart: the trainer holds them, but jit
  prunes them from the step, so XLA's figures (and the total) leave them out; "fits" counts them;
* the batch: this device's slice of the global batch (an argument of the step);
* gradients: trainable parameters only, float32 (frozen parts have none); one more float32 copy when
  ``train.grad_accum`` > 1 (the accumulator);
* optimizer state: AdamW's m and v in float32 for trainable parameters only, sharded like them (the
  update itself runs in place in the donated buffers: XLA fuses it, no extra copies);
* activations: an analytic estimate for the stage's micro-batch on one device (global batch /
  (data * fsdp) / grad_accum). A scanned transformer stack keeps, for every layer, its input (the scan
  carry, width H) plus what the remat policy saves inside the block, per token:

      none           4H + 2K + 3I in the compute dtype + attention scores in float32
      dots           4H + 2K + 2I                       + attention scores in float32
      dots_no_batch  3H + 2K + 2I   (weight matmul outputs only)
      full           nothing (the block is recomputed in the backward pass)

  (H width, K key+value width, I FFN hidden; the I and heads terms are divided by the tensor axis).
  Attention scores (attention_scores) follow the backend each component's attention resolves to on the
  device (models/attention.select_backend): heads x kv_len for ``xla``, one softmax statistic per head
  for the fused kernels (``splash``, ``cudnn``). On top comes the working set of the one block being
  differentiated (its "none" figure), and for a forward-only part (the frozen target encoder, under
  stop_gradient) only that working set. The understanding loss adds float32 logits and their
  gradient (2 x tokens x vocab x 4 bytes);
* temporaries: the largest scanned block the step runs, its weights as gathered for its matmuls
  (all-gathered over fsdp, in the compute dtype, x2 for the next block's prefetch), and the largest
  frozen stack stored outside the compute dtype once more in it (XLA converts it outside the layer loop).

FLOPs per step are ``model.step_flops`` (weight matmuls, attention, the ViT and the LM head; flops.py);
the predicted step time is FLOPs / (devices x peak bf16 FLOP/s x MFU). "fits" means the total (the
figures above) plus the idle parameters <= 90% of the device's HBM (the rest for what the estimate
misses and fragmentation). tests/test_plan_tpu.py and benchmarks/tpu_plans.py check the total against
XLA's compiled peak.
Where jax can describe a TPU topology without chips (``jax.experimental.topologies``, needs libtpu),
the train step is also compiled ahead of time for it and XLA's memory figures are shown;
otherwise the planner says it skipped that. ``--aot`` does the same on local devices (e.g. 8 fake CPU
devices) when the mesh fits them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.experimental import topologies

from blip3o_jax import cli, configlib, optim, sharding, training
from blip3o_jax import flops as flops_lib
from blip3o_jax.models import blip3o as model_lib
from blip3o_jax.models import attention, heads
from blip3o_jax.models.layers import dtype_of

GiB = 1024**3
USABLE_FRACTION = 0.9
COMFORT = 0.75  # recommend() prefers meshes that leave a quarter of the HBM free

# JAX device kind -> (peak dense bf16 FLOP/s key in flops.DEVICE_PEAK_FLOPS, HBM bytes per JAX device).
# TPU v4 and v5p chips are one JAX device each (megacore); vendor figures.
DEVICES: dict[str, tuple[str, float]] = {
    "v4": ("tpu v4", 32 * GiB),
    "v5e": ("tpu v5e", 16 * GiB),
    "v5p": ("tpu v5p", 95 * GiB),
    "v6e": ("tpu v6e", 32 * GiB),
    "h100": ("nvidia h100", 80 * GiB),
    "a100": ("nvidia a100", 80 * GiB),
    "cpu": ("cpu", 24 * GiB),  # this repo's CI machines
}
# Common slices -> (device kind, number of JAX devices). v4/v5p slice names count TensorCores (2 per chip).
SLICES: dict[str, tuple[str, int]] = {
    "v4-8": ("v4", 4), "v4-32": ("v4", 16), "v4-128": ("v4", 64),
    "v5p-8": ("v5p", 4), "v5p-64": ("v5p", 32), "v5p-128": ("v5p", 64),
    "v5e-8": ("v5e", 8), "v5e-64": ("v5e", 64), "v5e-256": ("v5e", 256),
    "v6e-8": ("v6e", 8), "v6e-64": ("v6e", 64), "v6e-256": ("v6e", 256),
    "8xh100": ("h100", 8), "16xh100": ("h100", 16), "32xh100": ("h100", 32), "8xa100": ("a100", 8),
}
# Slice -> (topology name, chip config) for jax.experimental.topologies.get_topology_desc, as in
# MaxText's accelerator_to_spec_map (chips per host 2x2x1 for all of these).
TOPOLOGIES = {
    "v4-8": ("v4:2x2x1", "megacore"), "v4-32": ("v4:2x2x4", "megacore"), "v4-128": ("v4:4x4x4", "megacore"),
    "v5p-8": ("v5:2x2x1", "megacore"), "v5p-64": ("v5:2x4x4", "megacore"), "v5p-128": ("v5:4x4x4", "megacore"),
    "v5e-8": ("v5e:2x4", "default"), "v5e-64": ("v5e:8x8", "default"), "v5e-256": ("v5e:16x16", "default"),
    "v6e-8": ("v6e:2x4", "default"), "v6e-64": ("v6e:8x8", "default"), "v6e-256": ("v6e:16x16", "default"),
}


def device_spec(name: str) -> tuple[str, float, float, int | None]:
    """(kind, peak FLOP/s, HBM bytes, device count or None) for a device kind or a slice name."""
    key = name.lower()
    count = None
    if key in SLICES:
        key, count = SLICES[key]
    if key not in DEVICES:
        raise ValueError(f"unknown device {name!r}; kinds: {sorted(DEVICES)}; slices: {sorted(SLICES)}")
    peak_key, hbm = DEVICES[key]
    return key, flops_lib.DEVICE_PEAK_FLOPS[peak_key], hbm, count


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in text.split(","):
        axis, _, value = part.partition("=")
        if axis.strip() not in sizes:
            raise ValueError(f"--mesh: unknown axis {axis!r}; allowed: data, fsdp, tensor")
        sizes[axis.strip()] = int(value)
    return sizes


# ---------------------------------------------------------------------------------------------
# Parameters


def abstract_parameters(cfg):
    """(abstract Blip3o module, {parameter path: PartitionSpec}) without allocating anything."""
    mcfg = model_lib.Blip3oConfig.from_config(cfg)
    with nnx.use_eager_sharding(False):
        module = nnx.eval_shape(lambda: model_lib.Blip3o(mcfg, rngs=nnx.Rngs(0)))
    specs = sharding.state_specs(nnx.state(module, nnx.Param), model_lib.component_rules(cfg))
    return module, specs


def _shard_elements(shape: tuple[int, ...], spec, mesh: dict[str, int]) -> int:
    n = 1
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        n *= -(-dim // math.prod(mesh[a] for a in axes))
    return n


def _paths(state) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves_with_path(
        state, is_leaf=lambda x: isinstance(x, (nnx.Variable, jax.sharding.PartitionSpec)))
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): v for p, v in leaves}


def _component(path: str) -> str:
    if path.startswith("backbone/visual"):
        return "vision"
    if path.startswith("backbone"):
        return "llm"
    return path.split("/")[0]  # gen_head, latent_queries, target_encoder


@dataclasses.dataclass
class Plan:
    config: str
    stage: str
    mesh: dict
    device: str
    num_devices: int
    micro_batch_per_device: float
    grad_accum: int
    remat: str
    params_by_component: dict  # component -> (total, trainable)
    bytes_params: float  # parameters the step reads
    bytes_idle_params: float  # frozen parameters the stage never reads (IDLE_PARAMS): held beside the step
    bytes_batch: float  # this device's slice of the global batch (an argument of the step)
    bytes_grads: float
    bytes_opt_state: float
    bytes_activations: float
    bytes_temporaries: float  # one block's gathered weights (x2: prefetch) + a converted frozen stack
    flops_per_step: float
    mfu: float
    step_seconds: float
    hbm_bytes: float
    aot: dict | None = None

    @property
    def bytes_total(self) -> float:
        """What the step's program holds at once: the figure XLA's peak (compile_train_step) measures."""
        return (self.bytes_params + self.bytes_batch + self.bytes_grads + self.bytes_opt_state
                + self.bytes_activations + self.bytes_temporaries)

    @property
    def fits(self) -> bool:
        """The step and the idle parameters the trainer holds beside it in USABLE_FRACTION of the HBM."""
        return self.bytes_total + self.bytes_idle_params <= USABLE_FRACTION * self.hbm_bytes

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "bytes_total": self.bytes_total, "fits": self.fits}


# Frozen parameters a stage's step never reads, by path prefix: the Qwen ViT and the untied LM head in
# the generation stages (text prompts, no next-token loss), the generation side in the understanding
# stage. jit prunes them from the compiled program (XLA's figures leave them out); the trainer still
# holds them in HBM beside it. tests/test_plan.py checks these against the arguments jit keeps.
IDLE_PARAMS = {
    "generation": ("backbone/visual/", "backbone/lm_head/"),
    "instruction": ("backbone/visual/", "backbone/lm_head/"),
    "understanding": ("gen_head/", "latent_queries/", "target_encoder/"),
    "joint": (),
}


def parameter_bytes(cfg, stage: str, mesh: dict[str, int], module=None, specs=None) -> dict:
    """Counts per component and per-device bytes of parameters (read by the step, and idle: IDLE_PARAMS),
    gradients and AdamW state, and the largest scanned block the step runs (elements as gathered)."""
    if module is None:
        module, specs = abstract_parameters(cfg)
    trainable = set(_paths(nnx.state(module, model_lib.stage_trainable(cfg, stage))))
    param_size = np.dtype(dtype_of(cfg.model.param_dtype)).itemsize
    frozen_size = np.dtype(dtype_of(model_lib.frozen_param_dtype(cfg, stage))).itemsize  # model.frozen_param_dtype
    counts: dict[str, list[int]] = {}
    layer: dict[str, float] = {}  # elements of one scanned block per component, as gathered for its matmuls
    # Per-device elements of each frozen scanned stack stored outside the compute dtype: XLA hoists their
    # conversion out of the layer loop, so the whole stack exists once more in the compute dtype
    # (measured: 8B generation on v5p-64 with float32 frozen towers, +6.07 GiB of temporaries = the LLM's
    # decoder stack in bfloat16 over fsdp=2).
    converted: dict[str, float] = {}
    convert = frozen_size != np.dtype(dtype_of(cfg.model.dtype)).itemsize
    params = idle = grads = 0
    spec_of = _paths(specs)
    for path, var in _paths(nnx.state(module, nnx.Param)).items():
        n = int(np.prod(var.shape))
        component = _component(path)
        c = counts.setdefault(component, [0, 0])
        c[0] += n
        spec = spec_of[path]
        shard = _shard_elements(var.shape, spec, mesh)
        if path in trainable:
            c[1] += n
            params += shard * param_size
            grads += shard * 4
        elif (path + "/").startswith(IDLE_PARAMS[stage]):
            idle += shard * frozen_size
            continue
        else:
            params += shard * frozen_size
        names = tuple(var.get_metadata().get("out_sharding") or ())
        if "layers" in names:
            tensor = mesh["tensor"] if "tensor" in jax_axes(spec) else 1
            layer[component] = layer.get(component, 0.0) + n / var.shape[names.index("layers")] / tensor
            if convert and path not in trainable:
                converted[component] = converted.get(component, 0.0) + shard
    accum_copy = 2 if cfg.train.grad_accum > 1 else 1
    return {"counts": {k: tuple(v) for k, v in counts.items()}, "params": params, "idle": idle,
            "grads": grads * accum_copy, "opt_state": 2 * grads, "trainable": sum(v[1] for v in counts.values()),
            "largest_layer": max(layer.values(), default=0.0),
            "converted_stack": max(converted.values(), default=0.0)}


def jax_axes(spec) -> set[str]:
    """The mesh axes a PartitionSpec uses."""
    out = set()
    for entry in spec:
        out.update((entry,) if isinstance(entry, str) else tuple(entry or ()))
    return out


# ---------------------------------------------------------------------------------------------
# Activations


def attention_scores(heads: float, kv_len: int, backend: str = "xla") -> float:
    """float32 elements per query token that one attention layer keeps for its backward pass, for the
    (per-device) ``heads``: with ``xla`` the softmax probabilities over ``kv_len`` keys, as its dot-product
    attention materialises them (models/attention.py); a fused kernel (``splash``, ``cudnn``) keeps no
    scores, only one float32 softmax statistic (the log-sum-exp) per query and head."""
    return heads * kv_len if backend == "xla" else heads


def device_platform(kind: str) -> str:
    """The JAX platform of a DEVICES kind: what models/attention.select_backend resolves ``auto`` on."""
    return "tpu" if kind.startswith("v") else "gpu" if kind in ("h100", "a100") else "cpu"


def _backend(cfg, component: str, platform: str, q_len: int, kv_len: int, heads: int, kv_heads: int, **call) -> str:
    """The attention backend one call of ``component`` (its config section, e.g. "llm") resolves to on
    ``platform``: model.<component>.attention, else model.attention, through attention.select_backend."""
    impl = configlib.component(cfg, component).attention
    d = 128  # select_backend reads the head width only for cuDNN's limit; every component here has <= 128
    return attention.select_backend(impl, q_shape=(1, q_len, heads, d), kv_shape=(1, kv_len, kv_heads, d),
                                    dtype=dtype_of(cfg.model.dtype), on=platform, **call)


def _block(policy: str, width: int, kv_width: int, ffn: int, scores: float, tensor: int) -> tuple:
    """(elements in the compute dtype, float32 elements) saved per token inside one block by ``policy``;
    ``scores``: attention_scores of the block's attention (per device)."""
    ffn = ffn / tensor
    table = {
        "none": (4 * width + 2 * kv_width + 3 * ffn, scores),
        "dots": (4 * width + 2 * kv_width + 2 * ffn, scores),
        "dots_no_batch": (3 * width + 2 * kv_width + 2 * ffn, 0.0),
        "full": (0.0, 0.0),
    }
    return table[policy]


def _stack(layers, tokens, width, kv_width, ffn, heads, kv_len, *, backend, policy, act_bytes, tensor, trained=True):
    """(bytes kept across the whole backward pass, bytes of one block's working set)."""
    scores = attention_scores(heads / tensor, kv_len, backend)
    work_el, work_f32 = _block("none", width, kv_width, ffn, scores, tensor)
    working = tokens * (work_el * act_bytes + work_f32 * 4)
    if not trained:
        return 0.0, working
    el, f32 = _block(policy, width, kv_width, ffn, scores, tensor)
    return layers * tokens * ((width + el) * act_bytes + f32 * 4), working


def activation_bytes(cfg, stage: str, mesh: dict[str, int], micro_batch: float, platform: str = "cpu") -> float:
    """``platform``: where the step runs (device_platform), which decides each component's attention backend."""
    m, t = cfg.model, mesh["tensor"]
    act = np.dtype(dtype_of(m.dtype)).itemsize
    kw = dict(policy=m.remat, act_bytes=act, tensor=t)
    llm, eva = m.llm, m.eva
    head_dim = llm.hidden_size // llm.num_attention_heads
    seq = cfg.data.max_length
    # Training calls: causal with a key-padding mask (traced segment ids).
    llm_backend = _backend(cfg, "llm", platform, seq, seq, llm.num_attention_heads, llm.num_key_value_heads,
                           causal=True, segment_ids=True)
    llm_args = (llm.num_hidden_layers, micro_batch * seq, llm.hidden_size, 2 * llm.num_key_value_heads * head_dim,
                llm.intermediate_size, llm.num_attention_heads, seq)
    kept, working = [], []

    def add(stack):
        kept.append(stack[0])
        working.append(stack[1])

    if stage in ("generation", "instruction", "joint"):
        add(_stack(*llm_args, backend=llm_backend, **kw))  # the queries' gradient flows back through the backbone
        shape = heads.activation_shape(m.gen_head, m.denoiser, configlib.head_config(cfg), m.n_query)
        if shape is not None:  # the head says what its stack keeps per sample (heads.Shape)
            backend = _backend(cfg, configlib.head_section(cfg), platform, shape.tokens, shape.kv_len, shape.heads,
                               shape.heads)
            add(_stack(shape.layers, micro_batch * shape.kv_len, shape.width, shape.kv_width, shape.ffn, shape.heads,
                       shape.kv_len, backend=backend, **kw))
        if m.target_encoder == "eva_clip":
            tokens, n_heads = (eva.image_size // eva.patch_size) ** 2 + 1, eva.width // eva.head_width
            add(_stack(eva.layers, micro_batch * tokens, eva.width, 2 * eva.width, int(eva.width * eva.mlp_ratio),
                       n_heads, tokens, backend=_backend(cfg, "eva", platform, tokens, tokens, n_heads, n_heads),
                       trained=False, **kw))
        elif m.target_encoder == "siglip2":
            s = m.siglip2
            backend = _backend(cfg, "siglip2", platform, s.num_patches, s.num_patches, s.num_attention_heads,
                               s.num_attention_heads)
            add(_stack(s.num_hidden_layers, micro_batch * s.num_patches, s.hidden_size, 2 * s.hidden_size,
                       s.intermediate_size, s.num_attention_heads, s.num_patches, backend=backend, trained=False,
                       **kw))
    if stage in ("understanding", "joint"):
        if stage == "understanding":
            add(_stack(*llm_args, backend=llm_backend, **kw))
            if m.get("vision") is not None:
                # The Qwen ViT runs the micro-batch's images as a batch (one grid per run), each image's
                # patches attending to its own (windows told apart by segment ids: model_lib.vision_flops;
                # host segment ids: splash's static block mask).
                v, patches = m.vision, model_lib.understanding_grid(cfg)[1]
                backend = _backend(cfg, "vision", platform, patches, patches, v.num_heads, v.num_heads,
                                   static_segments=True)
                add(_stack(v.depth, micro_batch * patches, v.hidden_size, 2 * v.hidden_size, v.intermediate_size,
                           v.num_heads, patches, backend=backend, trained=not cfg.train.freeze_vision_tower, **kw))
        kept.append(2 * micro_batch * seq * llm.vocab_size / t * 4)  # float32 logits and their gradient
    return float(sum(kept) + max(working, default=0.0))


# ---------------------------------------------------------------------------------------------
# The plan


def make_plan(cfg, mesh: dict[str, int], device: str, *, stage: str | None = None, mfu: float = 0.4,
              config_name: str = "", module=None, specs=None, step_flops: float | None = None) -> Plan:
    stage = stage or (cfg.train.stage if cfg.train.stage not in ("pipeline", "decoder") else "generation")
    kind, peak, hbm, _ = device_spec(device)
    n = math.prod(mesh.values())
    accum = int(cfg.train.grad_accum)
    micro = cfg.data.global_batch_size / (mesh["data"] * mesh["fsdp"]) / accum
    act_bytes = np.dtype(dtype_of(cfg.model.dtype)).itemsize
    p = parameter_bytes(cfg, stage, mesh, module, specs)
    if step_flops is None:
        step_flops = model_lib.step_flops(cfg, stage, p["trainable"])
    return Plan(config=config_name, stage=stage, mesh=dict(mesh), device=kind, num_devices=n,
                micro_batch_per_device=micro, grad_accum=accum, remat=cfg.model.remat,
                params_by_component=p["counts"], bytes_params=p["params"], bytes_idle_params=p["idle"],
                bytes_batch=batch_bytes(cfg, stage) / (mesh["data"] * mesh["fsdp"]), bytes_grads=p["grads"],
                bytes_opt_state=p["opt_state"],
                bytes_activations=activation_bytes(cfg, stage, mesh, micro, device_platform(kind)),
                bytes_temporaries=(2 * p["largest_layer"] + p["converted_stack"]) * act_bytes,
                flops_per_step=step_flops, mfu=mfu, step_seconds=step_flops / (n * peak * mfu), hbm_bytes=hbm)


def recommend(cfg, num_devices: int, device: str, **kwargs) -> Plan | None:
    """The first mesh that fits, preferring (in order) no gradient accumulation, no tensor parallelism,
    then the smallest fsdp axis (less parameter all-gather traffic) that leaves COMFORT of the HBM free
    for what the estimate misses (else the smallest that fits at all); None if nothing fits."""
    module, specs = abstract_parameters(cfg)
    batch, step_flops = cfg.data.global_batch_size, None
    divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    candidates = []
    for accum, tensor in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8)):
        if num_devices % tensor:
            continue
        for fsdp in divisors:
            if (num_devices // tensor) % fsdp:
                continue
            data = num_devices // tensor // fsdp
            if batch % (data * fsdp * accum):
                continue
            c = cfg.copy_and_resolve_references()
            c.train.grad_accum = accum
            plan = make_plan(c, {"data": data, "fsdp": fsdp, "tensor": tensor}, device, module=module, specs=specs,
                             step_flops=step_flops, **kwargs)
            step_flops = plan.flops_per_step  # the same for every mesh and accumulation
            if plan.bytes_total <= COMFORT * plan.hbm_bytes:
                return plan
            if plan.fits:
                candidates.append(plan)
    return candidates[0] if candidates else None


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation (XLA's own memory figures)


def tpu_topology(slice_name: str):
    """A TPU topology description without chips, or (None, reason)."""
    if slice_name.lower() not in TOPOLOGIES:
        return None, f"{slice_name!r} is not a TPU slice in TOPOLOGIES"
    name, chip_config = TOPOLOGIES[slice_name.lower()]
    # libtpu locks /tmp/libtpu_lockfile for the lifetime of the first process that loads it (any jax
    # process on a machine with libtpu installed); a topology description opens no chips, so this
    # process may share it (otherwise: "Internal error when accessing libtpu multi-process lockfile").
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu", chip_config_name=chip_config,
                                            chips_per_host_bounds=(2, 2, 1), num_slices=1), ""
    except Exception as e:  # noqa: BLE001  (libtpu missing, or this jax cannot describe TPUs)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def lower_train_step(cfg, stage: str, mesh):
    """The trainer's own step (training.make_train_step: gradient accumulation, AdamW, the non-finite
    guard; state donated; frozen parameters in ``frozen_param_dtype``) lowered with abstract, sharded
    inputs on ``mesh``: nothing is allocated."""
    graphdef, abstract = model_lib.abstract_model(cfg, mesh)
    module = nnx.merge(graphdef, abstract)
    graphdef, trainable, frozen = nnx.split(module, model_lib.stage_trainable(cfg, stage), ...)
    to_sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    frozen = model_lib.cast_frozen(cfg, stage, jax.tree.map(to_sds, frozen))
    tx = optim.make_optimizer(cfg.train)
    state = training.abstract_state(cfg, trainable, tx, mesh)
    batch, image_grid = abstract_batch(cfg, stage, mesh)
    step = training.jit_train_step(training.make_train_step(cfg, stage, graphdef, tx, image_grid),
                                   jax.tree.map(lambda x: x.sharding, state),
                                   jax.tree.map(lambda x: x.sharding, frozen), mesh)
    with jax.set_mesh(mesh):
        return step.lower(state, frozen, batch)


MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


def compile_train_step(cfg, stage: str, mesh) -> dict:
    """AOT-compiles the train step (lower_train_step) and returns XLA's memory analysis in bytes per
    device, its ``peak_bytes`` (arguments + temporaries + outputs not aliased to a donated argument:
    what the program holds at once, the figure the planner's total predicts) and the compiled FLOPs per
    device (``cost_analysis``; a scanned layer stack is counted once, see tests/test_plan_tpu.py)."""
    return compiled_figures(lower_train_step(cfg, stage, mesh), mesh)


def compiled_figures(lowered, mesh) -> dict:
    """Compiles ``lowered`` for ``mesh``'s devices; XLA's figures as compile_train_step returns them."""
    described = mesh.devices.flat[0].platform != jax.default_backend()
    cache = jax.config.jax_enable_compilation_cache
    # A program compiled for a described topology (no chips, no client of that platform) cannot be
    # read back from the persistent compilation cache ("PjRtCompiler must be constructed with a
    # Client"): such compiles bypass it.
    if described:
        jax.config.update("jax_enable_compilation_cache", False)
    try:
        compiled = lowered.compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    ma = compiled.memory_analysis()
    out = {f: int(getattr(ma, f)) for f in MEMORY_FIELDS if ma is not None and hasattr(ma, f)}
    if {"argument_size_in_bytes", "temp_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes"} <= set(out):
        out["peak_bytes"] = (out["argument_size_in_bytes"] + out["temp_size_in_bytes"] + out["output_size_in_bytes"]
                             - out["alias_size_in_bytes"])
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict on older jax
    if cost and "flops" in cost:
        out["flops"] = float(cost["flops"])
    return out


def batch_shapes(cfg, stage: str) -> tuple[dict[str, tuple], tuple | None]:
    """({field: (global shape, dtype)} of a batch as the trainer places it, the static image grid or None).

    Generation (and joint, whose trainer reads generation samples; their labels feed the LM loss): the
    fields of data/samples.GenerationTransform. Understanding: multimodal sequences of data.max_length
    tokens with the image's pad tokens among them, ``pixel_values`` (B, patches, C * T * p * p) in the
    processor's layout and the M-RoPE ``position_ids`` (B, 3, L) that prepare_batch adds."""
    b, length, size = cfg.data.global_batch_size, cfg.data.max_length, cfg.data.image_size
    shapes: dict[str, tuple] = {"input_ids": ((b, length), jnp.int32), "attention_mask": ((b, length), jnp.int32),
                                "labels": ((b, length), jnp.int32)}
    grid = None
    if stage in ("generation", "instruction", "joint"):
        shapes.update(query_start=((b,), jnp.int32), target_image=((b, size, size, 3), jnp.float32))
    if stage == "understanding":
        vision = cfg.model.vision
        grid, patches = model_lib.understanding_grid(cfg)
        if patches // vision.spatial_merge_size**2 >= length:
            raise ValueError(f"data.max_length {length} leaves no text beside the image's "
                             f"{patches // vision.spatial_merge_size**2} tokens (data.und_image_size)")
        width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        shapes.update(pixel_values=((b, patches, width), jnp.float32), position_ids=((b, 3, length), jnp.int32))
    return shapes, grid


def batch_bytes(cfg, stage: str) -> float:
    """Bytes of one global batch (sharded over the batch axes, data x fsdp)."""
    return float(sum(math.prod(s) * np.dtype(dt).itemsize for s, dt in batch_shapes(cfg, stage)[0].values()))


def abstract_batch(cfg, stage: str, mesh) -> tuple[dict, tuple | None]:
    """(ShapeDtypeStructs of a global batch on ``mesh``, the static image grid or None): batch_shapes."""
    shapes, grid = batch_shapes(cfg, stage)
    batch = {k: jax.ShapeDtypeStruct(s, dt, sharding=sharding.batch_sharding(mesh, len(s)))
             for k, (s, dt) in shapes.items()}
    return batch, grid


# ---------------------------------------------------------------------------------------------
# Output


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _size(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= 0.1 * GiB else f"{x / 1024**2:.2f} MiB"


def format_plan(p: Plan) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in p.mesh.items())
    lines = [f"config {p.config}  stage {p.stage}  mesh {mesh}  device {p.device} x {p.num_devices}  "
             f"remat {p.remat}  micro-batch/device {p.micro_batch_per_device:g}  grad_accum {p.grad_accum}",
             "parameters (total / trainable):"]
    for name, (total, trainable) in sorted(p.params_by_component.items()):
        lines.append(f"  {name:<16} {total:>16,} / {trainable:,}")
    total = sum(v[0] for v in p.params_by_component.values())
    lines.append(f"  {'all':<16} {total:>16,} / {sum(v[1] for v in p.params_by_component.values()):,}")
    lines += [
        "per-device memory:",
        f"  parameters {_size(p.bytes_params)}  batch {_size(p.bytes_batch)}  gradients {_size(p.bytes_grads)}"
        f"  optimizer {_size(p.bytes_opt_state)}  activations {_size(p.bytes_activations)}"
        f"  temporaries {_size(p.bytes_temporaries)}",
        f"  total {_size(p.bytes_total)} (the step); beside it idle frozen parameters {_size(p.bytes_idle_params)}"
        f" (never read by this stage)",
        f"  {_size(p.bytes_total + p.bytes_idle_params)} of {_size(p.hbm_bytes)} HBM -> "
        f"{'fits' if p.fits else 'DOES NOT FIT'} (limit {USABLE_FRACTION:.0%} of HBM)",
        f"FLOPs/step {p.flops_per_step:.3e}; at MFU {p.mfu:g}: {p.step_seconds:.3f} s/step",
    ]
    if p.aot is not None:
        lines += format_aot(p)
    return "\n".join(lines)


def format_aot(p: Plan) -> list[str]:
    """XLA's figures beside the planner's (per device)."""
    a = p.aot
    lines = [f"XLA ({a.get('target', 'AOT')}), per device: arguments {_size(a['argument_size_in_bytes'])}  "
             f"temporaries {_size(a['temp_size_in_bytes'])}  outputs not aliased to a donated argument "
             f"{_size(a['output_size_in_bytes'] - a['alias_size_in_bytes'])}"]
    if "peak_bytes" in a:
        diff = (p.bytes_total - a["peak_bytes"]) / a["peak_bytes"]
        lines.append(f"  XLA peak {_size(a['peak_bytes'])} vs planner total {_size(p.bytes_total)}: planner {diff:+.1%}"
                     f"; XLA peak {'fits' if a['peak_bytes'] <= USABLE_FRACTION * p.hbm_bytes else 'DOES NOT FIT'}"
                     f" in {USABLE_FRACTION:.0%} of HBM")
    if "flops" in a:
        lines.append(f"  compiled FLOPs per device {a['flops']:.3e} (cost_analysis counts a scanned layer stack's "
                     "body once and includes remat's recomputation: not comparable with FLOPs/step above)")
    return lines


def table(cfg, slices: list[str], config_name: str, **kwargs) -> str:
    rows = ["| slice | devices | recommended mesh | grad_accum | params / grads / opt / act / tmp (GiB per device) "
            "| total + idle / HBM (GiB) | step time @ MFU |", "|---|---|---|---|---|---|---|"]
    for name in slices:
        _, _, hbm, count = device_spec(name)
        plan = recommend(cfg, count, name, config_name=config_name, **kwargs)
        if plan is None:
            rows.append(f"| {name} | {count} | none fits | | | {_gib(hbm)} | |")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
        rows.append(f"| {name} | {count} | {mesh} | {plan.grad_accum} | {_gib(plan.bytes_params)} / "
                    f"{_gib(plan.bytes_grads)} / {_gib(plan.bytes_opt_state)} / {_gib(plan.bytes_activations)} / "
                    f"{_gib(plan.bytes_temporaries)} | "
                    f"{_gib(plan.bytes_total + plan.bytes_idle_params)} / {_gib(hbm)} | "
                    f"{plan.step_seconds:.2f} s @ {plan.mfu:g} |")
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    cfg = f.config
    configlib.validate(cfg)
    name = f["config"].config_filename if hasattr(f["config"], "config_filename") else ""
    kw = dict(stage=f.stage or None, mfu=f.mfu)
    if f.slices:
        print(table(cfg, [s.strip() for s in f.slices.split(",")], name, **kw))
        return
    _, _, _, count = device_spec(f.device)
    if f.mesh == "auto":
        if count is None:
            raise SystemExit("--mesh auto needs a slice name as --device (e.g. v5p-64, 8xh100)")
        plan = recommend(cfg, count, f.device, config_name=name, **kw)
        if plan is None:
            raise SystemExit(f"nothing fits on {f.device}")
    else:
        plan = make_plan(cfg, parse_mesh(f.mesh), f.device, config_name=name, **kw)
    plan.aot = _aot(cfg, plan, f.device) if f.aot else None
    print(json.dumps(plan.to_dict(), indent=1) if f.json else format_plan(plan))


LIBTPU_HINT = "pip install libtpu==0.0.42.1 (the version jax[tpu]==0.10.2 pins; requirements-dev.txt)"


def aot_devices(device: str, num_devices: int) -> tuple[list | None, str]:
    """(devices to compile for, what they are) or (None, why not): the TPU slice ``device`` names (or,
    for a TPU kind such as 'v5p', the listed slice with ``num_devices`` devices) described without
    chips by libtpu; for any other device, the local devices when the mesh fits them."""
    key = device.lower()
    if key not in TOPOLOGIES:
        key = next((s for s, (kind, n) in SLICES.items() if kind == key and n == num_devices and s in TOPOLOGIES), key)
    if key in TOPOLOGIES:
        topo, reason = tpu_topology(key)
        if topo is None:
            return None, f"libtpu cannot describe {key} ({reason}); for XLA's figures: {LIBTPU_HINT}"
        if len(topo.devices) != num_devices:
            return None, f"the mesh has {num_devices} devices, {key} has {len(topo.devices)}"
        return list(topo.devices), f"TPU {key}"
    if num_devices > jax.device_count():
        return None, (f"{device!r} is not a TPU slice of TOPOLOGIES and the mesh needs {num_devices} local devices, "
                      f"{jax.device_count()} available (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)")
    return jax.devices()[:num_devices], f"local {jax.devices()[0].platform}"


def _aot(cfg, plan: Plan, device: str) -> dict | None:
    devices, what = aot_devices(device, plan.num_devices)
    if devices is None:
        print(f"AOT compile skipped: {what}", file=sys.stderr)
        return None
    try:
        return {"target": what, **compile_train_step(cfg, plan.stage, sharding.make_mesh(plan.mesh, devices))}
    except Exception as e:  # noqa: BLE001  (XLA reports an out-of-memory program as a compile error)
        print(f"{what} AOT compile failed: {type(e).__name__}: {str(e)[:2000]}", file=sys.stderr)
    return None


def _define_flags():
    cli.define_config_flag("configs/blip3o_8b.py")
    flags.DEFINE_string("mesh", "auto", "data=A,fsdp=B,tensor=C, or 'auto' (needs a slice name as --device).")
    flags.DEFINE_string("device", "v5p-64", f"device kind {sorted(DEVICES)} or slice {sorted(SLICES)}.")
    flags.DEFINE_string("stage", "", "Training stage (default: config.train.stage).")
    flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the predicted step time.")
    flags.DEFINE_string("slices", "", "Comma-separated slices: print a markdown table of recommended meshes.")
    flags.DEFINE_bool("aot", True, "AOT-compile the train step and print XLA's memory figures beside the plan: for "
                      "a TPU slice via libtpu's topology description (no chips needed), otherwise on local devices "
                      "when the mesh fits them. --noaot (or --no-aot) skips the compile.")
    flags.DEFINE_bool("json", False, "Print the plan as JSON.")
    flags.mark_flags_as_required(["config"])


def run() -> None:
    """``python -m blip3o_jax.plan`` and the ``blip3o-plan`` console script."""
    _define_flags()
    sys.argv = ["--noaot" if arg == "--no-aot" else arg for arg in sys.argv]  # absl spells negation --noaot
    cli.run(main)


if __name__ == "__main__":
    run()
