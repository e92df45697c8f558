"""Generation heads and the velocity networks a flow head runs: one registry, the single source of
truth for what a head is (docs/model.md 12.1; adding one: docs/ADDING_A_HEAD.md).

A head turns the LLM's query states z (B, n_query, H) into target tokens (B, N, C) (CLIP features or
VAE latents) and knows its own training loss:

    head.loss(x0, z, rng) -> scalar float32          x0 (B, N, C) clean targets, one PRNG key
    head.sample(z, rng_or_noise, **options) -> (B, N, C)
    head.velocity(x, t, z) -> (B, N, C)              flow heads; others raise a clear error

Two registries, both read by everything else (configlib builds the config schema and the choices of
``model.gen_head`` / ``model.denoiser`` from them; conversion asks for the PyTorch mapping; plan and
flops ask for the FLOP count and the activation shape):

- ``HEADS``: ``flow`` (the released BLIP3-o head: a velocity network trained by flow matching and
  sampled with guided Euler steps, models/flow.py) and ``mse`` (Emu2 / MetaMorph style regression).
- ``VELOCITY_NETS``: what a flow head runs (config key ``model.denoiser``): ``dit`` (the released
  Lumina-Next DiT of models/dit.py) and every module in ``blip3o_jax/models/denoisers/`` (imported
  here by discovery, so a new denoiser is one new file there plus its test).

A velocity network's config section is ``model.<name>`` and its parameters live at
``gen_head/<name>/...``, so the DiT keeps the parameter paths (``gen_head/dit/...``) that every
earlier Orbax checkpoint and the released-layout conversion use.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import pkgutil
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blip3o_jax import flops as flops_lib
from blip3o_jax.models import dit as dit_lib
from blip3o_jax.models import dit_mapping, flow
from blip3o_jax.models.flow import FlowConfig


@runtime_checkable
class GenHead(Protocol):
    """What the unified model and the trainer use from a generation head."""

    target_shape: tuple[int, int]  # (N, C) of one sample's target tokens

    def loss(self, x0: jax.Array, z: jax.Array, rng: jax.Array) -> jax.Array: ...

    def validation_losses(self, x0: jax.Array, z: jax.Array, sigmas: jax.Array, noise: jax.Array) -> jax.Array: ...

    def sample(self, z: jax.Array, rng_or_noise: jax.Array, **options: Any) -> jax.Array: ...

    def velocity(self, x: jax.Array, t: jax.Array, z: jax.Array) -> jax.Array: ...


class Shape(NamedTuple):
    """A transformer stack as the planner and the FLOP count see it (per sample)."""

    layers: int
    tokens: int  # query tokens per sample
    width: int
    kv_width: int  # key + value projection width
    ffn: int  # FFN hidden width
    heads: int
    kv_len: int  # keys each query attends to


@dataclasses.dataclass(frozen=True)
class VelocityNet:
    """A registered velocity network: ``module(cfg, *, dtype, param_dtype, remat, rules, rngs)`` with
    ``velocity(x (B, N, C), t (B,) on 0..1000, z (B, n_query, H)) -> (B, N, C)`` float32.

    ``config`` is a frozen dataclass with ``num_tokens``, ``in_channels`` and ``latent_embedding_size``
    (fields or properties: what configlib checks against the target encoder and the LLM).
    ``check(cfg)`` lists (field, problem) pairs of its own constraints. ``forward_flops(cfg, n_query,
    params)`` is one sample's forward pass. ``shape(cfg, n_query)`` the planner's activation model
    (None: no transformer stack). ``mapping``: a module with the released PyTorch layout (``PREFIX``,
    ``rules(cfg)``, ``config_to_hf(cfg)``, ``config_from_hf(hf_config, condition_width)``) or None.
    """

    name: str
    module: type
    config: type
    forward_flops: Callable[[Any, int, int], float]
    check: Callable[[Any], list[tuple[str, str]]] = lambda cfg: []
    shape: Callable[[Any, int], Shape | None] = lambda cfg, n_query: None
    mapping: Any = None


@dataclasses.dataclass(frozen=True)
class Head:
    """A registered head. ``config`` None: the head is configured by its velocity network
    (``model.denoiser``, section ``model.<denoiser>``); otherwise its own section ``model.<name>``."""

    name: str
    module: type
    config: type | None
    forward_flops: Callable[[Any, int, int], float] | None = None  # heads with their own config
    check: Callable[[Any], list[tuple[str, str]]] = lambda cfg: []


HEADS: dict[str, Head] = {}
VELOCITY_NETS: dict[str, VelocityNet] = {}
# Config sections and keys under ``model.`` that are not heads: a registered name must not shadow them.
RESERVED_NAMES = frozenset({"llm", "vision", "eva", "siglip2", "decoder", "n_query", "query_init_std", "gen_head",
                            "denoiser", "target_encoder", "dtype", "param_dtype", "remat", "gen_start_token_id",
                            "query_token_id", "image_pad_token_id", "vision_start_token_id", "vision_end_token_id",
                            "pad_token_id"})


def _check_name(kind: str, name: str) -> None:
    if name in RESERVED_NAMES:
        raise ValueError(f"{kind} {name!r}: the name of config key model.{name}, which is not a head; choose another")


def register_head(name: str, *, config: type | None = None, forward_flops=None, check=None):
    """Class decorator: ``model.gen_head=name`` builds this head."""

    _check_name("generation head", name)

    def add(cls: type) -> type:
        if name in HEADS:
            raise ValueError(f"generation head {name!r} is already registered ({HEADS[name].module.__name__})")
        if config is not None and name in VELOCITY_NETS:
            raise ValueError(f"generation head {name!r}: a velocity network of that name owns model.{name}")
        HEADS[name] = Head(name, cls, config, forward_flops, check or (lambda cfg: []))
        return cls

    return add


def register_velocity_net(name: str, *, config: type, forward_flops, check=None, shape=None, mapping=None):
    """Class decorator: ``model.denoiser=name`` makes flow heads run this network."""

    _check_name("velocity network", name)

    def add(cls: type) -> type:
        if name in VELOCITY_NETS:
            raise ValueError(f"velocity network {name!r} is already registered ({VELOCITY_NETS[name].module.__name__})")
        if name in HEADS:
            raise ValueError(f"velocity network {name!r}: a head of that name owns the config section model.{name}")
        VELOCITY_NETS[name] = VelocityNet(name, cls, config, forward_flops, check or (lambda cfg: []),
                                          shape or (lambda cfg, n_query: None), mapping)
        return cls

    return add


def head_spec(name: str) -> Head:
    if name not in HEADS:
        raise ValueError(f"unknown generation head {name!r}; registered: {sorted(HEADS)}")
    return HEADS[name]


def velocity_net_spec(name: str) -> VelocityNet:
    if name not in VELOCITY_NETS:
        raise ValueError(f"unknown velocity network (model.denoiser) {name!r}; registered: {sorted(VELOCITY_NETS)}")
    return VELOCITY_NETS[name]


def config_section(gen_head: str, denoiser: str) -> str:
    """The config section under ``model.`` that configures this head (and holds its target shape)."""
    return denoiser if head_spec(gen_head).config is None else gen_head


def check(gen_head: str, denoiser: str, cfg) -> list[tuple[str, str]]:
    """The (field, problem) list of the active head's config."""
    spec = head_spec(gen_head)
    return velocity_net_spec(denoiser).check(cfg) if spec.config is None else spec.check(cfg)


def forward_flops(gen_head: str, denoiser: str, cfg, n_query: int, params: int) -> float:
    """FLOPs of one sample's forward pass through the head (training calls it once per sample)."""
    spec = head_spec(gen_head)
    fn = velocity_net_spec(denoiser).forward_flops if spec.config is None else spec.forward_flops
    return float(fn(cfg, n_query, params)) if fn is not None else 2.0 * params * cfg.num_tokens


def activation_shape(gen_head: str, denoiser: str, cfg, n_query: int) -> Shape | None:
    return velocity_net_spec(denoiser).shape(cfg, n_query) if head_spec(gen_head).config is None else None


def torch_mapping(gen_head: str, denoiser: str):
    """The released PyTorch layout of this head as ``(torch prefix, nnx prefix, mapping module)``, or None."""
    if head_spec(gen_head).config is not None:
        return None
    mapping = velocity_net_spec(denoiser).mapping
    return None if mapping is None else (mapping.PREFIX, f"gen_head/{denoiser}/", mapping)


def build_head(name: str, cfg: Any, *, denoiser: str = "dit", n_query: int = 64, flow_cfg: FlowConfig = FlowConfig(),
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, remat: str = "none", rules=None,
               rngs: nnx.Rngs) -> GenHead:
    """The head registered under ``name``, configured by ``cfg`` (its config section's dataclass)."""
    spec = head_spec(name)
    kw = dict(n_query=n_query, flow_cfg=flow_cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rules=rules,
              rngs=rngs)
    if spec.config is None:
        kw["denoiser"] = denoiser
    return spec.module(cfg, **kw)


def noise_like_target(head: GenHead, rng_or_noise: jax.Array, batch: int) -> jax.Array:
    """Noise (B, N, C): the array itself if it is one, else standard normal drawn from the PRNG key."""
    x = jnp.asarray(rng_or_noise) if not isinstance(rng_or_noise, jax.Array) else rng_or_noise
    is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or (x.dtype == jnp.uint32 and x.shape == (2,))
    if is_key:
        return jax.random.normal(x, (batch, *head.target_shape), jnp.float32)
    return x


# ---------------------------------------------------------------------------------------------
# The released velocity network: the Lumina-Next DiT (models/dit.py, mapping models/dit_mapping.py)


def _dit_check(cfg: dit_lib.DiTConfig) -> list[tuple[str, str]]:
    problems = []
    if cfg.n_heads > 0 and cfg.dim % cfg.n_heads:
        problems.append(("n_heads", f"{cfg.n_heads} heads do not divide dim {cfg.dim}"))
    if cfg.n_kv_heads > 0 and cfg.n_heads % cfg.n_kv_heads:
        problems.append(("n_kv_heads", f"{cfg.n_kv_heads} must divide n_heads {cfg.n_heads}"))
    if cfg.n_heads > 0 and not cfg.dim % cfg.n_heads and (cfg.dim // cfg.n_heads) % 4:
        problems.append(("n_heads", f"head_dim {cfg.dim // cfg.n_heads} must be a multiple of 4 for the 2-D RoPE"))
    if cfg.patch_size > 0 and cfg.input_size % cfg.patch_size:
        problems.append(("patch_size", f"{cfg.patch_size} must divide input_size {cfg.input_size}"))
    return problems


def _dit_shape(cfg: dit_lib.DiTConfig, n_query: int) -> Shape:
    n = (cfg.input_size // cfg.patch_size) ** 2
    return Shape(cfg.n_layers, n, cfg.dim, 2 * cfg.dim * cfg.n_kv_heads // cfg.n_heads, dit_lib.ffn_hidden_dim(cfg),
                 cfg.n_heads, n + n_query)


def _dit_forward_flops(cfg: dit_lib.DiTConfig, n_query: int, params: int) -> float:
    """Weight matmuls over the N image tokens, plus self-attention (N x N) and the cross-attention to
    the n_query condition tokens (N x n_query) in every block."""
    n = (cfg.input_size // cfg.patch_size) ** 2
    attention = (flops_lib.attention_flops(cfg.n_layers, n, cfg.dim, 1, "forward")
                 + flops_lib.attention_flops(cfg.n_layers, n, cfg.dim, 1, "forward", kv_seq=n_query))
    return flops_lib.dense_flops(params, n, "forward") + attention


register_velocity_net("dit", config=dit_lib.DiTConfig, forward_flops=_dit_forward_flops, check=_dit_check,
                      shape=_dit_shape, mapping=dit_mapping)(dit_lib.DiT)


# ---------------------------------------------------------------------------------------------
# Heads


@register_head("flow")
class FlowHead(nnx.Module):
    """CLIP (or VAE) + flow matching with any registered velocity network (``model.denoiser``).

    The network is stored under its registered name (``self.dit`` for the DiT), so its parameter paths
    are ``gen_head/<denoiser>/...``. A VAE-latent target is the same head with another config (e.g. a
    DiTConfig with in_channels = latent channels, input_size = latent grid, patch_size 2).
    """

    def __init__(self, cfg: Any, *, denoiser: str = "dit", n_query: int = 64, flow_cfg: FlowConfig = FlowConfig(),
                 dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none", rules=None, rngs: nnx.Rngs):
        del n_query  # velocity networks accept any number of condition tokens
        spec = velocity_net_spec(denoiser)
        if not isinstance(cfg, spec.config):
            raise TypeError(f"velocity network {denoiser!r} takes a {spec.config.__name__}, got {type(cfg).__name__}")
        self.flow_cfg = flow_cfg
        self.denoiser = denoiser
        self.target_shape = (cfg.num_tokens, cfg.in_channels)
        setattr(self, denoiser, spec.module(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rules=rules,
                                            rngs=rngs))

    @property
    def net(self) -> nnx.Module:
        """The velocity network."""
        return getattr(self, self.denoiser)

    def velocity(self, x, t, z):
        return self.net.velocity(x, t, z)

    def loss(self, x0, z, rng):
        f = self.flow_cfg
        return flow.flow_matching_loss(self.net, x0, z, rng, cond_dropout=f.cond_dropout,
                                       num_train_timesteps=f.num_train_timesteps, shift=f.shift,
                                       timestep_sampling=f.timestep_sampling, logit_mean=f.logit_mean,
                                       logit_std=f.logit_std, mode_scale=f.mode_scale,
                                       loss_weighting=f.loss_weighting)

    def validation_losses(self, x0, z, sigmas, noise):
        """(T,) the unweighted flow-matching loss at each sigma of ``sigmas`` (T,), with the given noise
        (B, N, C) and every condition kept: the training objective with its random draws fixed (the
        validation loss, training.Validator). One velocity pass over the T x B stacked samples."""
        x0 = x0.astype(jnp.float32)
        (b, *shape), n_t = x0.shape, sigmas.shape[0]
        s = sigmas[:, None, None, None]
        x_sigma = ((1.0 - s) * x0[None] + s * noise[None]).reshape((n_t * b, *shape))
        t = jnp.repeat(sigmas * self.flow_cfg.num_train_timesteps, b)
        z = jnp.broadcast_to(z[None], (n_t, *z.shape)).reshape((n_t * b, *z.shape[1:]))
        pred = self.net.velocity(x_sigma, t, z).astype(jnp.float32).reshape((n_t, b, *shape))
        return jnp.mean(jnp.square(pred - (noise - x0)[None]), axis=tuple(range(1, pred.ndim)))

    def sample(self, z, rng_or_noise, num_steps: int | None = None, guidance: float | None = None):
        f = self.flow_cfg
        noise = noise_like_target(self, rng_or_noise, z.shape[0])
        return flow.sample_features(
            self.net, z, noise, num_steps or f.sample_steps, f.guidance if guidance is None else guidance,
            shift=f.shift, num_train_timesteps=f.num_train_timesteps,
        )


def interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation of a token sequence (half-pixel centres, edges clamped); if both
    counts are square numbers, bilinear interpolation of the square grids instead (row-major tokens)."""

    def interp_1d(m: int, n: int) -> np.ndarray:
        pos = np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = pos - lo
        a = np.zeros((m, n), np.float32)
        a[np.arange(m), lo] += 1 - w
        a[np.arange(m), hi] += w
        return a

    so, si = math.isqrt(n_out), math.isqrt(n_in)
    if so * so == n_out and si * si == n_in:
        a = interp_1d(so, si)
        return np.kron(a, a).astype(np.float32)
    return interp_1d(n_out, n_in)


@dataclasses.dataclass(frozen=True)
class MSEConfig:
    """Config section ``model.mse``: the target grid and width, the condition width and the MLP width."""

    input_size: int = 8  # target grid side: N = input_size**2 tokens
    in_channels: int = 1792  # target feature width C
    latent_embedding_size: int = 3584  # condition width H (the LLM's hidden size)
    dim: int = 1792  # MLP hidden width

    @property
    def num_tokens(self) -> int:
        return self.input_size * self.input_size


def _mse_forward_flops(cfg: MSEConfig, n_query: int, params: int) -> float:
    mlp = 2.0 * n_query * (cfg.latent_embedding_size * cfg.dim + cfg.dim * cfg.in_channels)
    token_map = 2.0 * cfg.num_tokens * n_query * cfg.in_channels if n_query != cfg.num_tokens else 0.0
    return mlp + token_map


def _mse_check(cfg: MSEConfig) -> list[tuple[str, str]]:
    return [(k, f"must be > 0, got {getattr(cfg, k)}") for k in ("input_size", "in_channels", "dim")
            if getattr(cfg, k) <= 0]


@register_head("mse", config=MSEConfig, forward_flops=_mse_forward_flops, check=_mse_check)
class MSEHead(nnx.Module):
    """CLIP + MSE: ``pred = MLP(z)`` (H -> dim -> C, GELU-tanh), loss = mean((pred - x0)^2) in float32.

    Query i predicts target token i when n_query == N. Otherwise a learned token map (N, n_query),
    initialised to (bi)linear interpolation of the query grid onto the target grid, mixes the
    projected queries into the N target positions.
    """

    def __init__(self, cfg: MSEConfig, *, n_query: int = 64, flow_cfg: FlowConfig = FlowConfig(),
                 dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none", rules=None, rngs: nnx.Rngs):
        del flow_cfg, remat, rules  # nothing to scan or sample
        n = cfg.num_tokens
        self.target_shape = (n, cfg.in_channels)
        self.proj = dit_lib.MLP2(cfg.latent_embedding_size, cfg.dim, cfg.in_channels, (("embed", "mlp"), ("mlp", None)),
                                 lambda x: jax.nn.gelu(x, approximate=True), dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
        self.token_map = (
            nnx.Param(jnp.asarray(interpolation_matrix(n, n_query), param_dtype), out_sharding=(None, None))
            if n_query != n else None
        )

    def predict(self, z):
        y = self.proj(z)
        if self.token_map is not None:
            y = jnp.einsum("nq,bqc->bnc", self.token_map[...].astype(y.dtype), y)
        return y.astype(jnp.float32)

    def velocity(self, x, t, z):
        raise NotImplementedError("the 'mse' head regresses the targets directly; it has no flow velocity "
                                  "(use model.gen_head='flow')")

    def loss(self, x0, z, rng):
        del rng  # deterministic objective
        return jnp.mean(jnp.square(self.predict(z) - x0.astype(jnp.float32)))

    def validation_losses(self, x0, z, sigmas, noise):
        del noise  # a regression has no noise level: the same loss at every sigma
        return jnp.broadcast_to(self.loss(x0, z, None), sigmas.shape)

    def sample(self, z, rng_or_noise=None, **options):
        del rng_or_noise, options  # regression: one answer per condition
        return self.predict(z)


# Velocity networks beyond the DiT: every module of blip3o_jax/models/denoisers/ registers itself on import.
# Plugin discovery by path: those modules import this one (the registry), never the other way round.
for _module in pkgutil.iter_modules([os.path.join(os.path.dirname(__file__), "denoisers")]):
    importlib.import_module(f"blip3o_jax.models.denoisers.{_module.name}")
