"""Streaming PyTorch <-> NNX weight conversion shared by every component's mapping table.

A component's mapping is a list of ``Rule``s, each pairing one PyTorch key pattern with one NNX
parameter path. ``{i}`` in both stands for the layer index: the PyTorch side has one tensor per layer,
the NNX side one array stacked along a leading 'layers' axis (scanned blocks). ``load_component``
reads tensors one at a time from (sharded) safetensors, transforms each, and writes it straight into
its target sharding, so host memory stays near one tensor. Coverage is checked both ways before any
tensor is read: every missing, unexpected and mis-shaped key is reported in one error.

Transforms (PyTorch -> NNX):
  "linear"  (out, in)            -> (in, out)          nn.Linear weight -> kernel
  "conv2d"  (O, I, kh, kw)       -> (kh, kw, I, O)
  "conv3d"  (O, I, t, h, w)      -> (t, h, w, I, O)
  "none"    unchanged (biases, norm scales, embeddings, learned tokens)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

_PERMS = {
    "linear": (1, 0),
    "conv2d": (2, 3, 1, 0),
    "conv3d": (2, 3, 4, 1, 0),
}


def to_jax_layout(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "none":
        return x
    return np.transpose(x, _PERMS[transform])


def to_torch_layout(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "none":
        return x
    return np.transpose(x, np.argsort(_PERMS[transform]))


def torch_shape(jax_shape: Sequence[int], transform: str) -> tuple[int, ...]:
    if transform == "none":
        return tuple(jax_shape)
    inv = np.argsort(_PERMS[transform])
    return tuple(int(jax_shape[i]) for i in inv)


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str  # e.g. "layers.{i}.attn1.to_q.weight"
    nnx: str  # e.g. "layers/attn1/to_q/kernel" (the 'layers' array is stacked over {i})
    transform: str = "none"


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: lists every offending key at once."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), where: str = ""):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        lines = [f"checkpoint does not match the model{(' (' + where + ')') if where else ''}:"]
        if self.missing:
            lines.append(f"  missing {len(self.missing)} key(s):")
            lines += [f"    {k}  expected shape {tuple(s)}" for k, s in self.missing]
        if self.unexpected:
            lines.append(f"  unexpected {len(self.unexpected)} key(s):")
            lines += [f"    {k}  shape {tuple(s)}" for k, s in self.unexpected]
        if self.mismatched:
            lines.append(f"  mis-shaped {len(self.mismatched)} key(s):")
            lines += [f"    {k}  checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Reading safetensors directories lazily


# safetensors dtype names -> numpy dtypes (bfloat16 via ml_dtypes, as jnp exposes it).
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


class TruncatedCheckpointError(ValueError):
    """A safetensors file is shorter than its header says (or its header is cut or corrupt)."""


def _read_header(file: str) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, or TruncatedCheckpointError naming the file."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TruncatedCheckpointError(f"{file} is truncated: {size} bytes, less than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise TruncatedCheckpointError(f"{file} is truncated: its header needs {8 + n} bytes, the file has {size}")
        try:
            return n, json.loads(f.read(n))
        except ValueError as e:  # json.JSONDecodeError / UnicodeDecodeError
            raise TruncatedCheckpointError(f"{file}: unreadable safetensors header ({e})") from None


class TorchCheckpoint:
    """Read-only view of a weights directory: keys and shapes up front, tensors on demand.

    Accepts ``{stem}.safetensors`` or sharded files with ``{stem}.safetensors.index.json`` (stem
    ``model`` for Hugging Face models, ``diffusion_pytorch_model`` for diffusers components), trying
    ``variants`` in order (``None`` = no variant, ``"bf16"`` = ``{stem}.bf16.safetensors``); any other
    folder of ``*.safetensors`` is read whole. Pickle ``*.bin`` only with ``allow_pickle=True``.

    Tensors are read straight from the file at their offset into one new array (no memory map), so a
    read never holds a tensor twice in resident memory; float16/bfloat16 are upcast to float32.
    """

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False, *, stem: str = "model",
                 variants: Sequence[str | None] = (None,)):
        self.path = os.fspath(path)
        self._where: dict[str, tuple[str, int, Any, tuple[int, ...]]] = {}  # key -> file, offset, dtype, shape
        self._bin: dict[str, Any] | None = None
        files = self._pick_files(stem, variants)
        if not files:
            bins = sorted(f for f in os.listdir(self.path) if f.endswith(".bin"))
            if bins and not allow_pickle:
                raise ValueError(
                    f"{self.path} holds only pickle weights ({', '.join(bins)}); pickle files can run "
                    "arbitrary code. Convert them to safetensors, or pass allow_pickle=True / --allow-pickle."
                )
            if not bins:
                raise FileNotFoundError(f"no *.safetensors weights in {self.path}")
            self._load_bins(bins)
            return
        for fname in files:
            file = os.path.join(self.path, fname)
            n, header = _read_header(file)
            size = os.path.getsize(file)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{file}: tensor {key!r} has unsupported dtype {info['dtype']}")
                dtype = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(info["shape"])
                start, end = info["data_offsets"]
                # Checked before anything is read: a download that broke off would otherwise surface much
                # later as a bare numpy reshape error on whichever tensor happens to be read first.
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                if end - start != nbytes:
                    raise TruncatedCheckpointError(
                        f"{file}: tensor {key!r} {info['dtype']}{list(shape)} needs {nbytes} bytes but its header "
                        f"gives data_offsets {start}..{end} ({end - start} bytes): the file is corrupt")
                if 8 + n + end > size:
                    raise TruncatedCheckpointError(
                        f"{file} is truncated (an incomplete download?): tensor {key!r} {info['dtype']}"
                        f"{list(shape)} lies at bytes {8 + n + start}..{8 + n + end}; expected a file of at least "
                        f"{8 + n + end} bytes, found {size}")
                self._where[key] = (file, 8 + n + start, dtype, shape)
        self._shapes = {k: v[3] for k, v in self._where.items()}

    def _pick_files(self, stem: str, variants: Sequence[str | None]) -> list[str]:
        names = set(os.listdir(self.path))
        for variant in variants:
            base = stem + (f".{variant}" if variant else "")
            if base + ".safetensors" in names:
                return [base + ".safetensors"]
            if base + ".safetensors.index.json" in names:
                with open(os.path.join(self.path, base + ".safetensors.index.json")) as f:
                    return sorted(set(json.load(f)["weight_map"].values()))
        return sorted(f for f in names if f.endswith(".safetensors"))

    def _load_bins(self, bins: list[str]) -> None:
        import torch  # only for explicitly allowed pickle checkpoints

        self._bin = {}
        for fname in bins:
            sd = torch.load(os.path.join(self.path, fname), map_location="cpu", weights_only=True)
            self._bin.update(sd)
        self._shapes = {k: tuple(v.shape) for k, v in self._bin.items()}

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def get(self, key: str) -> np.ndarray:
        """One tensor as a float32 (or integer) numpy array; bfloat16/float16 are upcast."""
        if self._bin is not None:
            t = self._bin[key]
            return t.float().numpy() if t.is_floating_point() else t.numpy()
        file, offset, dtype, shape = self._where[key]
        x = np.fromfile(file, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
        return x.astype(np.float32) if x.dtype in (np.float16, jnp.bfloat16) else x


class RenamedCheckpoint:
    """A checkpoint seen under other key names (``rename(key)``); reads stay lazy."""

    def __init__(self, ckpt, rename):
        self.ckpt = ckpt
        self._orig: dict[str, str] = {}
        for key in ckpt.keys():
            new = rename(key)
            if new in self._orig:
                raise ValueError(f"checkpoint holds both {self._orig[new]!r} and {key!r} (the same name after renaming)")
            self._orig[new] = key

    def keys(self) -> list[str]:
        return list(self._orig)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.ckpt.shape(self._orig[key])

    def __contains__(self, key: str) -> bool:
        return key in self._orig

    def get(self, key: str) -> np.ndarray:
        return self.ckpt.get(self._orig[key])


# ---------------------------------------------------------------------------------------------
# Mapping tables


def _expand(rule: Rule, num_layers: int | None) -> Iterator[tuple[str, str, int | None]]:
    if "{i}" in rule.torch:
        if num_layers is None:
            raise ValueError(f"rule {rule} needs the number of layers")
        for i in range(num_layers):
            yield rule.torch.format(i=i), rule.nnx, i
    else:
        yield rule.torch, rule.nnx, None


def _flat_params(state: nnx.State) -> dict[str, Any]:
    return {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def _leaf_shape(v: Any) -> tuple[int, ...]:
    x = v.get_value() if isinstance(v, nnx.Variable) else v
    return tuple(x.shape)


def expected_torch_keys(
    rules: Sequence[Rule], state: nnx.State, prefix: str = ""
) -> dict[str, tuple[str, int | None, str, tuple[int, ...]]]:
    """torch key -> (nnx path, layer index or None, transform, torch shape), for this model's state."""
    flat = _flat_params(state)
    out = {}
    for rule in rules:
        if rule.nnx not in flat:
            raise KeyError(f"mapping rule {rule} names an NNX path that the model does not have")
        shape = _leaf_shape(flat[rule.nnx])
        layered = "{i}" in rule.torch
        n = shape[0] if layered else None
        for key, path, i in _expand(rule, n):
            out[prefix + key] = (path, i, rule.transform, torch_shape(shape[1:] if layered else shape, rule.transform))
    unmapped = set(flat) - {r.nnx for r in rules}
    if unmapped:
        raise KeyError(f"NNX parameters without a mapping rule: {sorted(unmapped)}")
    return out


def check_coverage(
    ckpt_keys: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[str, int | None, str, tuple[int, ...]]],
    *,
    prefix: str = "",
    ignore: Iterable[str] = (),
    where: str = "",
) -> None:
    """Raises CheckpointMismatchError naming every missing / unexpected / mis-shaped key under prefix."""
    ignore_res = [re.compile(p) for p in ignore]
    present = {k: s for k, s in ckpt_keys.items() if k.startswith(prefix) and not any(r.match(k) for r in ignore_res)}
    missing = [(k, e[3]) for k, e in expected.items() if k not in present]
    unexpected = [(k, s) for k, s in present.items() if k not in expected]
    mismatched = [(k, present[k], e[3]) for k, e in expected.items() if k in present and tuple(present[k]) != e[3]]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, where)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, i, value):
    return jax.lax.dynamic_update_index_in_dim(stacked, value.astype(stacked.dtype), i, 0)


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape: tuple[int, ...], dtype, sharding):
    """One compiled allocator per (shape, dtype, sharding), not one per stacked tensor."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def load_component(
    ckpt: TorchCheckpoint,
    rules: Sequence[Rule],
    abstract_state: nnx.State,
    *,
    prefix: str = "",
    ignore: Iterable[str] = (),
    check: bool = True,
    where: str = "",
) -> nnx.State:
    """Fills ``abstract_state`` (ShapeDtypeStructs with shardings, see sharding.abstract_with_shardings)
    from the checkpoint, one tensor at a time. Returns a state of real arrays in their target sharding.
    """
    expected = expected_torch_keys(rules, abstract_state, prefix)
    if check:
        check_coverage({k: ckpt.shape(k) for k in ckpt.keys()}, expected, prefix=prefix, ignore=ignore, where=where)
    flat = _flat_params(abstract_state)
    values: dict[str, jax.Array] = {}
    for key, (path, layer, transform, _) in expected.items():
        target = flat[path]
        target = target.get_value() if isinstance(target, nnx.Variable) else target
        host = to_jax_layout(ckpt.get(key), transform)
        if layer is None:
            values[path] = jax.device_put(host.astype(target.dtype), target.sharding)
            continue
        if path not in values:
            values[path] = _zeros_fn(tuple(target.shape), jnp.dtype(target.dtype), target.sharding)()
        values[path] = _set_layer(values[path], layer, host)
    return _replace_leaves(abstract_state, values)


def _replace_leaves(state: nnx.State, values: Mapping[str, jax.Array]) -> nnx.State:
    flat = []
    for path, v in nnx.to_flat_state(state):
        key = "/".join(str(p) for p in path)
        flat.append((path, v.replace(values[key]) if isinstance(v, nnx.Variable) else values[key]))
    return nnx.from_flat_state(flat)


def export_component(rules: Sequence[Rule], state: nnx.State, prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    """Yields (torch key, float32/int numpy tensor in PyTorch layout), one tensor at a time."""
    flat = _flat_params(state)
    for key, (path, layer, transform, _) in expected_torch_keys(rules, state, prefix).items():
        v = flat[path]
        x = v.get_value() if isinstance(v, nnx.Variable) else v
        x = x[layer] if layer is not None else x
        yield key, to_torch_layout(np.asarray(jax.device_get(x)), transform)


def save_safetensors_sharded(
    tensors: Iterable[tuple[str, np.ndarray]], path: str | os.PathLike, max_shard_bytes: int = 2 << 30
) -> None:
    """Writes ``model-XXXXX-of-YYYYY.safetensors`` + index (or one ``model.safetensors``)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    # Shards are flushed to temporary names as they fill, so at most one shard is held in memory.
    written: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal size
        if shards[-1]:
            tmp = f"shard-{len(written):05d}.tmp"
            save_file({k: np.ascontiguousarray(v) for k, v in shards[-1].items()}, os.path.join(path, tmp))
            written.append((tmp, list(shards[-1])))
            shards[-1] = {}
            size = 0

    for key, x in tensors:
        if size and size + x.nbytes > max_shard_bytes:
            flush()
        shards[-1][key] = x
        size += x.nbytes
    flush()
    if len(written) == 1:
        os.replace(os.path.join(path, written[0][0]), os.path.join(path, "model.safetensors"))
        return
    weight_map = {}
    total = len(written)
    for n, (tmp, keys) in enumerate(written, 1):
        name = f"model-{n:05d}-of-{total:05d}.safetensors"
        os.replace(os.path.join(path, tmp), os.path.join(path, name))
        weight_map.update({k: name for k in keys})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


# numpy dtype -> safetensors dtype name (the inverse of _SAFETENSORS_DTYPES).
_SAFETENSORS_NAMES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}


def save_safetensors_streamed(
    specs: Sequence[tuple[str, Sequence[int], Any]],
    read: Callable[[str], np.ndarray],
    path: str | os.PathLike,
    max_shard_bytes: int = 2 << 30,
    on_tensor: Callable[[], Any] | None = None,
) -> None:
    """Writes ``model-XXXXX-of-YYYYY.safetensors`` + index (or one ``model.safetensors``) holding one
    tensor in memory at a time: ``specs`` = (key, shape, dtype) of every tensor in order, so the shards
    and every header are planned before any data is read; ``read(key)`` then supplies each tensor,
    whose bytes are appended to its shard. The files are the same as safetensors' own ``save_file``
    writes (8-byte header length, JSON header padded to 8 bytes, little-endian C-order data)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for key, shape, dtype in specs:
        dtype = np.dtype(dtype)
        if dtype not in _SAFETENSORS_NAMES:
            raise ValueError(f"tensor {key!r}: dtype {dtype} has no safetensors name")
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if size and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, tuple(int(d) for d in shape), dtype))
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)])
    for name, shard in zip(names, shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, shape, dtype in shard:
            end = offset + int(np.prod(shape)) * dtype.itemsize
            header[key] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, name), "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for key, shape, dtype in shard:
                x = np.asarray(read(key))
                if x.shape != shape or x.dtype != dtype:
                    raise ValueError(f"tensor {key!r}: read {x.dtype}{list(x.shape)}, planned {dtype}{list(shape)}")
                # Raw bytes without a copy (a uint8 view also serves bfloat16, which has no buffer format);
                # every supported host is little-endian, as the format is.
                f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
                del x
                if on_tensor is not None:
                    on_tensor()
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
