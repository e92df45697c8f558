"""Decode + preprocess throughput from tar shards: the Grain pipeline with 0, 1, 2 workers against a
plain single-process PIL loop over the same files, in the same run.

    python -m blip3o_jax.data.benchmark [--num-images 384] [--size 448] [--workdir DIR]

The images are photo-like JPEGs (smooth colour fields + noise, 512x640, so the resize and crop do real
work) written once as webdataset shards. Each pipeline run is timed after its first batch (worker
start-up excluded) and includes tokenization of the caption (the full generation sample).
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

from blip3o_jax.data import pipeline, samples, sources, synthetic


def _photo(rng: np.random.Generator, h: int = 512, w: int = 640) -> bytes:
    coarse = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    pixels = np.clip(field + rng.normal(0, 12, size=field.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(workdir: str, num_images: int, per_shard: int = 128) -> list[str]:
    os.makedirs(workdir, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for s in range(-(-num_images // per_shard)):
        path = os.path.join(workdir, f"bench-{s:05d}.tar")
        n = min(per_shard, num_images - s * per_shard)
        if not os.path.exists(path):
            sources.write_tar_shard(path, [{"__key__": f"{s * per_shard + i:08d}", "jpg": _photo(rng),
                                            "txt": "a photo of a colourful blur"} for i in range(n)])
        paths.append(path)
    return paths


def plain_loop(paths: list[str], size: int) -> float:
    """images/s of a straightforward tarfile + PIL + numpy loop (no Grain, one process)."""
    mean = np.asarray((0.48145466, 0.4578275, 0.40821073), np.float32)
    std = np.asarray((0.26862954, 0.26130258, 0.27577711), np.float32)
    n, start = 0, time.perf_counter()
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.name.endswith(".jpg"):
                    continue
                img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                scale = size / min(img.size)
                w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
                img = img.resize((w, h), Image.Resampling.BICUBIC)
                left, top = (w - size) // 2, (h - size) // 2
                x = np.asarray(img.crop((left, top, left + size, top + size)), np.float32) / 255.0
                _ = (x - mean) / std
                n += 1
    return n / (time.perf_counter() - start)


def pipeline_rate(paths: list[str], size: int, workers: int, batch_size: int = 16) -> float:
    tok = synthetic.train_demo_tokenizer()
    transform = samples.GenerationTransform(tok, max_length=128, n_query=64, image_size=size)
    src = [(sources.WebDatasetSource(paths), 1.0)]
    it = pipeline.DataIterator(src, transform, batch_size=batch_size, num_workers=workers, num_epochs=1)
    next(it)  # start-up (worker processes, first decode) excluded
    n, start = 0, time.perf_counter()
    try:
        while True:
            n += len(next(it)["input_ids"])
    except StopIteration:
        pass
    rate = n / (time.perf_counter() - start)
    it.close()
    return rate


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=384)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "blip3o_bench"))
    args = parser.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
    paths = write_shards(args.workdir, args.num_images)
    rows = [("plain PIL loop, 1 process", plain_loop(paths, args.size))]
    for workers in (0, 1, 2):
        rows.append((f"Grain pipeline, {workers} workers", pipeline_rate(paths, args.size, workers)))
    print(f"| decode + preprocess, {args.size} px, {args.num_images} JPEGs 512x640 from tar | images/s |")
    print("|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} |")


if __name__ == "__main__":
    main()
