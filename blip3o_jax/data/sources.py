"""Random-access data sources that yield *raw records* (docs/model.md 11: webdataset tar shards).

Every source is a Grain ``RandomAccessDataSource`` (``__len__`` + ``__getitem__``) with a stable
``__repr__`` (Grain compares it when restoring checkpointed iterators) and returns the same record
layout, so sample construction does not care where the data came from::

    {"key": str,                         # sample id (webdataset __key__, record index, ...)
     "image": bytes | np.ndarray | None, # encoded file bytes, or a decoded HxWx3 uint8 array (TFDS)
     "caption": str | None,              # webdataset "txt"
     "meta": dict,                       # webdataset "json" (e.g. question/answer pairs), else {}
     "error": str | None}                # a reason if the record is known to be unusable

Sources never raise for a bad sample; they mark it (``error``) and the pipeline skips and counts it.
Problems found once, when a source is opened (an empty shard), are in ``source.problems``.

- ``WebDatasetSource``: tar shards as BLIP3-o publishes them (BLIP3o-Pretrain, JourneyDB, BLIP3o-60k):
  per key an image ``jpg``/``jpeg``/``png``/``webp``, a ``txt`` caption and an optional ``json``.
  Random access goes through a member index (byte offsets per key) built once per shard and cached
  beside it as ``SHARD.tar.idx.json``, or in ``cache_dir`` when the shard folder is read-only.
- ``ArrayRecordSource``: ArrayRecord files whose records are msgpack maps with the webdataset member
  names (``write_array_record`` writes them).
- ``TfdsSource``: a TFDS data set through ``tfds.data_source`` (no TensorFlow needed for
  ArrayRecord-backed data sets).
- ``PrecomputedSource``: a directory written by ``python -m blip3o_jax.precompute``; its records carry
  ``target_features`` (N, C) float32 (and optionally ``condition``) instead of an image.
- ``open_sources(spec)``: ``"a/*.tar,b.tar"`` is one source; ``"a/*.tar@0.7;tfds:name:train@0.3"`` is a
  weighted mixture (``;`` separates components, ``@w`` gives a weight).

Paths go through ``etils.epath``, so cloud paths work where their file system is installed.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = 1
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "blip3o_jax", "tar_index")


class DataError(ValueError):
    """A data set cannot be used at all (no files, nothing valid)."""


def make_record(key: str, image=None, caption=None, meta=None, error=None) -> dict:
    return {"key": key, "image": image, "caption": caption, "meta": meta or {}, "error": error}


def _decode_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def expand_paths(spec: str | Sequence[str]) -> list[str]:
    """Comma-separated files or globs (or a list of them) -> sorted, de-duplicated file paths."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in (s.strip() for s in items):
        if not item:
            continue
        if any(c in item for c in "*?["):
            # Glob below the last wildcard-free directory (works for local and cloud paths alike).
            parts = item.split("/")
            first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
            base = "/".join(parts[:first]) or "."
            matches = sorted(str(p) for p in epath.Path(base).glob("/".join(parts[first:])))
            if not matches:
                raise DataError(f"no files match {item!r}")
            paths.extend(matches)
        else:
            if not epath.Path(item).exists():
                raise DataError(f"data file {item!r} does not exist")
            paths.append(item)
    seen: set[str] = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


# ---------------------------------------------------------------------------------------------
# webdataset tar shards


def _split_member(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the file name, ext = the rest."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return os.path.join(directory, stem) if directory else stem, ext.lower() if dot else ""


def build_tar_index(path: str) -> dict:
    """Scans one tar shard's headers (data is skipped, not read) -> keys and {ext: [offset, size]}.

    A sample whose member data runs past the end of the file, or during which the scan broke (a cut
    header), stays in the index marked ``truncated``, so the pipeline counts it when it meets it. A
    shard cut exactly between samples (no end-of-archive marker) is flagged ``lost_tail``.
    """
    p = epath.Path(path)
    stat = p.stat()
    file_size = stat.length
    samples: dict[str, dict[str, list[int]]] = {}
    truncated: list[str] = []
    tail_truncated = False
    if file_size > 0:  # an empty file is an empty shard, not a broken one
        with p.open("rb") as f:
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        key, ext = _split_member(m.name)
                        if not ext:
                            continue
                        samples.setdefault(key, {})[ext] = [m.offset_data, m.size]
                        if m.offset_data + m.size > file_size:
                            truncated.append(key)
                    # A complete archive ends with two zero blocks; without them members were cut off.
                    tail_truncated = file_size - tar.offset < 2 * tarfile.BLOCKSIZE
            except (tarfile.ReadError, EOFError, OSError) as e:
                logging.warning("tar shard %s ends inside a member header: %s", path, e)
                if samples:
                    truncated.append(next(reversed(samples)))  # the sample being read when it broke
                tail_truncated = True
    if tail_truncated and not truncated:
        logging.warning("tar shard %s is truncated (no end-of-archive marker)", path)
    return {
        "version": INDEX_VERSION,
        "size": file_size,
        "mtime": stat.mtime,
        "keys": list(samples),
        "members": [samples[k] for k in samples],
        "truncated": sorted(set(truncated)),
        # Cut off between samples: what was lost cannot be attributed to a key; counted once.
        "lost_tail": bool(tail_truncated and not truncated),
    }


def _index_locations(path: str, cache_dir: str) -> list[epath.Path]:
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    return [epath.Path(path + ".idx.json"), epath.Path(cache_dir) / f"{os.path.basename(path)}.{digest}.idx.json"]


def load_or_build_index(path: str, cache_dir: str = DEFAULT_CACHE_DIR) -> tuple[dict, bool]:
    """The shard's member index and whether it had to be built (False = read from a cache file).

    The cache is trusted only if it records the shard's current size and modification time; it is
    written beside the shard, or in ``cache_dir`` if the shard folder is not writable.
    """
    stat = epath.Path(path).stat()
    locations = _index_locations(path, cache_dir)
    for loc in locations:
        try:
            if loc.exists():
                index = json.loads(loc.read_text())
                if (index.get("version"), index.get("size"), index.get("mtime")) == (INDEX_VERSION, stat.length,
                                                                                    stat.mtime):
                    return index, False
        except (OSError, ValueError):
            pass
    index = build_tar_index(path)
    text = json.dumps(index, separators=(",", ":"))
    for loc in locations:
        tmp = loc.parent / (loc.name + f".tmp{os.getpid()}")
        try:
            loc.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            tmp.rename(loc)  # atomic: concurrent readers never see half an index
            break
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
    else:
        logging.warning("could not cache the index of %s anywhere (%s)", path, [str(l) for l in locations])
    return index, True


class WebDatasetSource:
    """Random access into webdataset tar shards through per-shard member indexes (built once, cached)."""

    def __init__(self, paths: str | Sequence[str], *, cache_dir: str = DEFAULT_CACHE_DIR):
        self.paths = expand_paths(paths)
        if not self.paths:
            raise DataError(f"no tar shards given ({paths!r})")
        self.cache_dir = cache_dir
        self._indexes = []
        self.indexes_built = 0  # how many indexes were built now rather than read from the cache
        self.problems: dict[str, int] = {}
        starts = [0]
        for path in self.paths:
            index, built = load_or_build_index(path, cache_dir)
            self.indexes_built += int(built)
            if not index["keys"]:
                logging.warning("tar shard %s holds no samples: skipped", path)
                self.problems["empty_shard"] = self.problems.get("empty_shard", 0) + 1
            if index["lost_tail"]:
                self.problems["truncated_member"] = self.problems.get("truncated_member", 0) + 1
            index["truncated"] = set(index["truncated"])
            self._indexes.append(index)
            starts.append(starts[-1] + len(index["keys"]))
        self._starts = starts
        if starts[-1] == 0:
            raise DataError(f"no samples in any of the {len(self.paths)} tar shards {self.paths[:3]}...")
        self._local = threading.local()

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        # Stable across processes and runs (Grain checks it on restore): paths and length only.
        digest = hashlib.sha1("\n".join(self.paths).encode()).hexdigest()[:12]
        return f"WebDatasetSource(num_shards={len(self.paths)}, len={len(self)}, paths_sha1={digest})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_local")  # open file handles stay in their process
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def _file(self, shard: int):
        # One handle per thread and shard: Grain reads with several threads, and seek+read on a
        # shared handle would interleave.
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        if shard not in handles:
            handles[shard] = epath.Path(self.paths[shard]).open("rb")
        return handles[shard]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        shard = bisect.bisect_right(self._starts, index) - 1
        local = index - self._starts[shard]
        idx = self._indexes[shard]
        key = idx["keys"][local]
        members = idx["members"][local]
        record_key = f"{os.path.basename(self.paths[shard])}/{key}"
        if key in idx["truncated"]:
            return make_record(record_key, error="truncated_member")

        def read(ext):
            offset, size = members[ext]
            f = self._file(shard)
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise EOFError
            return data

        try:
            image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            image = read(image_ext) if image_ext else None
            caption = _decode_text(read("txt")) if "txt" in members else None
            meta = json.loads(read("json")) if "json" in members else {}
        except EOFError:
            return make_record(record_key, error="truncated_member")
        except (OSError, ValueError) as e:
            logging.warning("reading %s from %s failed: %s", key, self.paths[shard], e)
            return make_record(record_key, error="read_error")
        return make_record(record_key, image=image, caption=caption, meta=meta)


def write_tar_shard(path: str, samples: Sequence[dict]) -> None:
    """Writes a webdataset shard deterministically: samples are {"__key__": k, ext: bytes|str, ...}."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, value in sample.items():
                if ext == "__key__":
                    continue
                data = value.encode() if isinstance(value, str) else bytes(value)
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------
# ArrayRecord


def encode_record(sample: dict) -> bytes:
    """A webdataset-style sample dict ({"__key__", "jpg"/"png"/..., "txt", "json"}) -> msgpack bytes."""
    import msgpack

    return msgpack.packb({k: v for k, v in sample.items()}, use_bin_type=True)


def write_array_record(path: str, samples: Sequence[dict]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for sample in samples:
        writer.write(encode_record(sample))
    writer.close()


def _record_from_members(key: str, members: dict) -> dict:
    image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
    meta = members.get("json")
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except ValueError:
            return make_record(key, error="read_error")
    return make_record(key, image=image, caption=_decode_text(members.get("txt")), meta=meta)


class ArrayRecordSource:
    """ArrayRecord files whose records are msgpack maps with webdataset member names."""

    def __init__(self, paths: str | Sequence[str]):
        import grain

        self.paths = expand_paths(paths)
        if not self.paths:
            raise DataError(f"no ArrayRecord files given ({paths!r})")
        self._source = grain.sources.ArrayRecordDataSource(self.paths)
        self.problems: dict[str, int] = {}
        if len(self._source) == 0:
            raise DataError(f"no records in the ArrayRecord files {self.paths[:3]}...")

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        digest = hashlib.sha1("\n".join(self.paths).encode()).hexdigest()[:12]
        return f"ArrayRecordSource(num_files={len(self.paths)}, len={len(self)}, paths_sha1={digest})"

    def __getitem__(self, index: int) -> dict:
        import msgpack

        raw = self._source[int(index)]
        try:
            members = msgpack.unpackb(raw, raw=False)
        except Exception:  # noqa: BLE001 - any corrupt record is a skipped sample, not a crash
            return make_record(f"record{index}", error="read_error")
        return _record_from_members(str(members.get("__key__", f"record{index}")), members)


# ---------------------------------------------------------------------------------------------
# TFDS


class TfdsSource:
    """A TFDS data set through ``tfds.data_source`` (ArrayRecord file format, no TensorFlow needed)."""

    def __init__(self, name: str, split: str = "train", *, data_dir: str | None = None,
                 image_key: str = "image", caption_key: str = "caption", meta_keys: Sequence[str] = ()):
        import tensorflow_datasets as tfds

        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.caption_key, self.meta_keys = image_key, caption_key, tuple(meta_keys)
        self._source = tfds.data_source(name, split=split, data_dir=data_dir)
        self.problems: dict[str, int] = {}
        if len(self._source) == 0:
            raise DataError(f"TFDS data set {name}:{split} is empty")

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        return f"TfdsSource(name={self.name!r}, split={self.split!r}, len={len(self)})"

    def __getitem__(self, index: int) -> dict:
        ex = self._source[int(index)]
        image = ex.get(self.image_key)
        if isinstance(image, np.ndarray) and image.dtype == object:
            image = image.item()
        meta = {k: _decode_text(ex[k]) if isinstance(ex[k], bytes) else ex[k] for k in self.meta_keys if k in ex}
        if isinstance(meta.get("json"), str):
            meta = {**json.loads(meta.pop("json")), **meta}
        return make_record(f"{self.name}:{self.split}/{index}", image=image,
                           caption=_decode_text(ex.get(self.caption_key)), meta=meta)


# ---------------------------------------------------------------------------------------------
# Precomputed target features (blip3o_jax.precompute)

PRECOMPUTED_FORMAT = "blip3o_jax.precomputed_features"
MANIFEST = "manifest.json"


def encode_array(x: np.ndarray) -> dict:
    """An array as a msgpack-able map: {"dtype": name, "shape": [...], "data": raw bytes}."""
    x = np.ascontiguousarray(x)
    return {"dtype": x.dtype.name, "shape": list(x.shape), "data": x.tobytes()}


def decode_array(item: dict) -> np.ndarray:
    """``encode_array``'s map -> a float32 array (bfloat16 storage is widened: exact)."""
    import ml_dtypes  # noqa: F401 - registers "bfloat16" as a numpy dtype name

    dtype = np.dtype(ml_dtypes.bfloat16) if item["dtype"] == "bfloat16" else np.dtype(item["dtype"])
    return np.frombuffer(item["data"], dtype).reshape(item["shape"]).astype(np.float32)


class PrecomputedSource:
    """A ``blip3o_jax.precompute`` output directory: ``manifest.json`` + ArrayRecord shards of msgpack
    records {"__key__", "txt", "json", "target_features": encode_array(...), ["condition": ...]}.

    Records have no image; they carry ``target_features`` (N, C) float32, and ``condition``
    (n_query, H) float32 when it was stored, which the generation transform uses instead.
    """

    def __init__(self, directory: str):
        import grain

        self.directory = str(directory)
        path = epath.Path(directory) / MANIFEST
        if not path.exists():
            raise DataError(f"{directory} has no {MANIFEST}: not a finished blip3o_jax.precompute output "
                            "(re-run the same precompute command to complete it)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != PRECOMPUTED_FORMAT:
            raise DataError(f"{path}: format {self.manifest.get('format')!r} is not {PRECOMPUTED_FORMAT!r}")
        files = [str(epath.Path(directory) / s["file"]) for s in self.manifest["shards"] if s["samples"] > 0]
        if not files:
            raise DataError(f"the precomputed data set {directory} holds no samples: {self.manifest['counts']}")
        self._source = grain.sources.ArrayRecordDataSource(files)
        self.problems: dict[str, int] = {}

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["features"]["shape"])

    @property
    def condition_shape(self) -> tuple[int, ...] | None:
        cond = self.manifest.get("condition")
        return tuple(cond["shape"]) if cond else None

    def __len__(self) -> int:
        return len(self._source)

    def __repr__(self) -> str:
        digest = hashlib.sha1(os.path.abspath(self.directory).encode()).hexdigest()[:12]
        return f"PrecomputedSource(len={len(self)}, features={self.feature_shape}, dir_sha1={digest})"

    def __getitem__(self, index: int) -> dict:
        import msgpack

        try:
            members = msgpack.unpackb(self._source[int(index)], raw=False)
            record = _record_from_members(str(members["__key__"]), members)
            record["target_features"] = decode_array(members["target_features"])
            if "condition" in members:
                record["condition"] = decode_array(members["condition"])
        except Exception:  # noqa: BLE001 - a corrupt record is a skipped sample, not a crash
            return make_record(f"{os.path.basename(self.directory)}/record{index}", error="read_error")
        return record


# ---------------------------------------------------------------------------------------------
# Specs and mixtures


def open_source(spec: str, *, cache_dir: str = DEFAULT_CACHE_DIR, tfds_data_dir: str | None = None):
    """One source from a spec: ``tfds:NAME[:SPLIT]``, a ``blip3o_jax.precompute`` output directory, or
    files/globs ending in .tar / .array_record."""
    spec = spec.strip()
    if spec.startswith("tfds:"):
        parts = spec.split(":")
        return TfdsSource(parts[1], parts[2] if len(parts) > 2 else "train", data_dir=tfds_data_dir)
    if not any(c in spec for c in "*?[,") and epath.Path(spec).is_dir():
        return PrecomputedSource(spec)
    paths = expand_paths(spec)
    kinds = {"tar" if p.endswith(".tar") else "array_record" if "array_record" in os.path.basename(p)
             else "?" for p in paths}
    if kinds == {"tar"}:
        return WebDatasetSource(paths, cache_dir=cache_dir)
    if kinds == {"array_record"}:
        return ArrayRecordSource(paths)
    raise DataError(f"{spec!r}: files must all be .tar shards or all ArrayRecord files, got {sorted(kinds)}")


def open_sources(spec: str, **kwargs) -> list[tuple[Any, float]]:
    """``"A@0.7;B@0.3"`` -> [(source A, 0.7), (source B, 0.3)]; without ``;`` one source of weight 1."""
    components = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        path, w = part, 1.0
        if "@" in part:
            head, _, tail = part.rpartition("@")
            try:
                path, w = head, float(tail)  # "...@0.3"; an "@" inside a path is not a weight
            except ValueError:
                pass
        if w <= 0:
            raise DataError(f"mixture weight must be > 0 in {part!r}")
        components.append((open_source(path, **kwargs), w))
    if not components:
        raise DataError("config.data.paths is empty")
    return components
