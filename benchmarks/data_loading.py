"""Data-loading benchmark: images/s of a DataLoader over the ``image_folder`` dataset plugin.

Writes a folder of photo-like RGB images (crops of the photographs that ship with scikit-learn and
scikit-image, scaled so the long side is ``--original-size`` px, as JPEG and as PNG) or reads yours
(``--folder``), then times a ``torch.utils.data.DataLoader`` (batch 32, the trainer's
``prefetch_factor=4`` and persistent workers) over ``vaegan.data.image_folder(...)`` for every output
size, worker count and augmentation setting (none, or ``random_flip`` + ``crop: random``). JPEGs are
timed with and without ``PIL.Image.draft`` (the decoder downscaling large JPEGs while decoding), so
the row pairs show what it buys. One warm-up epoch (worker start-up, the page cache) is not timed;
the best of ``--repeats`` epochs is reported, as a markdown table (progress goes to stderr), next to
the CPU cost of one item on one thread and the images/s that cost allows on the available cores, and
how far the draft moves the output (PSNR against the full decode).

    python benchmarks/data_loading.py                           # 512 images, 64/128/256 px, 0/2/4 workers
    python benchmarks/data_loading.py --original-size 1024      # larger originals (draft matters more)
    python benchmarks/data_loading.py --folder ~/photos --json out.json

``--sources`` compares the dataset plugins on the same JPEGs instead: ``image_folder``, ``webdataset`` (the folder
written as tar shards by ``vaegan_plugins.shards.write_shards``), ``hf_datasets`` (saved by
``vaegan_plugins.hf_datasets.write_dataset``, read map-style) and ``hf_stream`` (the same, ``streaming: true``);
the streams are read as a training run reads them (bound to rank 0 of 1, shuffled). It also times building each
dataset (for shards: reading every member header), and writes the table the docs show:

    python benchmarks/data_loading.py --sources --sizes 64 256 --workers 0 2 --json outputs/sources.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
from torch.utils.data import DataLoader

from vaegan.data import image_folder

sys.path.insert(0, str(Path(__file__).parent))
from machine import cpu_model, usable_cores  # noqa: E402

AUGMENT = {"none": {}, "flip+random crop": {"random_flip": True, "crop": "random"}}


def _sources() -> List[np.ndarray]:
    """The RGB photographs installed with scikit-learn and scikit-image (H, W, 3) uint8."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)  # china, flower
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
                 "hubble_deep_field"):
        photos.append(getattr(skimage.data, name)())
    return [p for p in photos if p.ndim == 3 and p.shape[2] == 3]


def write_photos(folder: Path, n: int, original_size: int, fmt: str, seed: int = 0) -> Path:
    """``n`` photo-like images: a random crop (70-100 % of a photo's short side, aspect 3:4 to 4:3) of a
    source photo, flipped or not, scaled so its long side is ``original_size``; JPEG quality 90 or PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = _sources()
    for i in range(n):
        photo = photos[i % len(photos)]
        h0, w0 = photo.shape[:2]
        side = int(min(h0, w0) * rng.uniform(0.7, 1.0))
        aspect = rng.choice([0.75, 1.0, 4 / 3])
        ch, cw = min(h0, side), min(w0, int(side * aspect))
        top, left = rng.integers(0, h0 - ch + 1), rng.integers(0, w0 - cw + 1)
        img = Image.fromarray(photo[top:top + ch, left:left + cw])
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = original_size / max(ch, cw)
        img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.LANCZOS)
        if fmt == "jpeg":
            img.save(folder / f"{i:05d}.jpg", quality=90)
        else:
            img.save(folder / f"{i:05d}.png")
    return folder


def item_cost_ms(folder: Path, size: int, options: Dict, draft: bool, repeats: int) -> float:
    """CPU milliseconds to produce one item (decode, resize, crop, flip, convert) on one thread, in this
    process: the best of ``repeats`` passes over the folder. CPU time hardly moves when other programs
    share the cores, so this is the steady number; ``1000 x cores / cost`` bounds what the cores can
    deliver, whatever the worker count."""
    ds = image_folder(str(folder), "train", False, None, (3, size, size), (-1.0, 1.0), **options)
    ds.jpeg_draft = draft
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        best = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            for i in range(len(ds)):
                ds[i]
            best = min(best, (time.process_time() - start) / len(ds) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return best


def draft_difference(folder: Path, size: int) -> Dict[str, float]:
    """How far the draft decode moves the default (centre-crop) output from the full decode, over the
    folder, in uint8 levels: PSNR, mean and largest absolute difference."""
    ds = image_folder(str(folder), "train", False, None, (3, size, size), (0.0, 255.0))
    fast = torch.stack([ds[i] for i in range(len(ds))])
    ds.jpeg_draft = False
    full = torch.stack([ds[i] for i in range(len(ds))])
    diff = fast - full
    mse = diff.pow(2).mean().item()
    return {"psnr_db": round(10 * math.log10(255**2 / mse), 1) if mse > 0 else float("inf"),
            "mean_abs": round(diff.abs().mean().item(), 3), "max_abs": round(diff.abs().max().item())}


def measure(folder: Path, size: int, workers: int, options: Dict, draft: bool, batch: int, repeats: int) -> float:
    """Images/s of the fastest of ``repeats`` timed epochs, after one untimed warm-up epoch (the best
    epoch, not the mean: on a shared machine the slow epochs measure the neighbours)."""
    ds = image_folder(str(folder), "train", False, None, (3, size, size), (-1.0, 1.0), **options)
    ds.jpeg_draft = draft
    loader = DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None)
    for x in loader:  # warm-up: worker start-up, page cache
        assert x.shape[1:] == (3, size, size)
    best = 0.0
    for _ in range(repeats):
        seen, start = 0, time.perf_counter()
        for x in loader:
            seen += x.shape[0]
        best = max(best, seen / (time.perf_counter() - start))
    del loader  # stops persistent workers
    return best


SOURCES = ("image_folder", "webdataset", "hf_datasets", "hf_stream")


def convert(folder: Path, out: Path) -> Dict[str, Path]:
    """The folder as 16 tar shards (``out/shards``, shuffled) and as a saved dataset (``out/hf``)."""
    from vaegan_plugins.hf_datasets import write_dataset
    from vaegan_plugins.shards import write_shards

    n = sum(1 for p in folder.rglob("*") if p.is_file())
    write_shards(folder, out / "shards", per_shard=max(8, n // 16))  # 16 shards: enough for 2 workers x 8
    write_dataset(folder, out / "hf")
    return {"image_folder": folder, "webdataset": out / "shards", "hf_datasets": out / "hf", "hf_stream": out / "hf"}


def build_source(source: str, root: Path, size: int):
    """Dataset plugin ``source`` over ``root`` for (3, size, size) items in [-1, 1] (as a recipe would)."""
    shape, value_range = (3, size, size), (-1.0, 1.0)
    if source == "image_folder":
        return image_folder(str(root), "train", False, None, shape, value_range)
    if source == "webdataset":
        from vaegan_plugins.shards import webdataset

        last = len(list(root.glob("shards-*.tar"))) - 1
        return webdataset(str(root), "train", False, None, shape, value_range, shards=f"shards-{{000000..{last:06d}}}.tar")
    from vaegan_plugins.hf_datasets import hf_datasets

    return hf_datasets(str(root), "train", False, None, shape, value_range, streaming=source == "hf_stream")


def measure_source(source: str, root: Path, size: int, workers: int, batch: int, repeats: int) -> Dict[str, float]:
    """Images/s of ``source`` through the trainer's kind of DataLoader (best of ``repeats`` epochs after a warm-up),
    and the seconds building the dataset took."""
    from vaegan.data import is_stream

    start = time.perf_counter()
    ds = build_source(source, root, size)
    built = time.perf_counter() - start
    stream = is_stream(ds)
    if stream:  # as prepare_stream binds it: rank 0 of 1, the loader's batch and workers, seed 0
        ds.bind(rank=0, world=1, batch_size=batch, workers=workers, seed=0)
    loader = DataLoader(ds, batch_size=batch, shuffle=not stream, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=workers > 0,
                        prefetch_factor=4 if workers > 0 else None)
    best = 0.0
    for epoch in range(repeats + 1):  # epoch 0: the warm-up (worker start-up, the page cache), not timed
        if stream:
            ds.set_epoch(epoch)
        seen, t0 = 0, time.perf_counter()
        for x in loader:
            seen += x.shape[0]
        if epoch:
            best = max(best, seen / (time.perf_counter() - t0))
    del loader
    return {"images_per_s": best, "build_s": built}


def compare_sources(args, folder: Path, tmp: Path) -> List[Dict]:
    """The ``--sources`` table: every source at every size and worker count."""
    roots = convert(folder, tmp)
    rows = []
    for size in args.sizes:
        for source in SOURCES:
            row = {"source": source, "size": size, "images_per_s": {}}
            for workers in args.workers:
                got = measure_source(source, roots[source], size, workers, args.batch_size, args.repeats)
                row["images_per_s"][workers] = round(got["images_per_s"], 1)
                row["build_s"] = round(got["build_s"], 3)
                print(f"{source} {size}px workers={workers}: {got['images_per_s']:.0f} images/s (built in "
                      f"{got['build_s']:.2f} s)", file=sys.stderr, flush=True)
            rows.append(row)
    n = len(build_source("image_folder", folder, 8))
    print(f"{cpu_model()}, {usable_cores()} cores, torch {torch.__version__}; {n} JPEGs (long side "
          f"{args.original_size} px), batch {args.batch_size}, best of {args.repeats} epochs; images/s out of the "
          "DataLoader")
    print()
    print("| source | size | build s | " + " | ".join(f"{w} workers" for w in args.workers) + " |")
    print("|---|---:|---:|" + "---:|" * len(args.workers))
    for r in rows:
        print(f"| {r['source']} | {r['size']} | {r['build_s']:.2f} | "
              + " | ".join(f"{v:.0f}" for v in r["images_per_s"].values()) + " |")
    return rows


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="time this folder of images instead of generated ones")
    parser.add_argument("--images", type=int, default=512, help="images to generate (per format)")
    parser.add_argument("--original-size", type=int, default=512, help="long side of the generated images")
    parser.add_argument("--formats", nargs="+", default=["jpeg", "png"], choices=["jpeg", "png"],
                        help="formats to generate (ignored with --folder)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--augment", nargs="+", default=list(AUGMENT), choices=list(AUGMENT))
    parser.add_argument("--no-draft-comparison", action="store_true", help="time JPEGs with draft only")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs after the warm-up; the best is kept")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--sources", action="store_true",
                        help="compare the dataset plugins (image_folder, webdataset, hf_datasets, hf_stream) on JPEGs")
    args = parser.parse_args(argv)

    tmp = tempfile.TemporaryDirectory(prefix="vaegan-data-bench-")
    if args.sources:
        folder = args.folder or write_photos(Path(tmp.name) / "jpeg", args.images, args.original_size, "jpeg")
        rows = compare_sources(args, folder, Path(tmp.name) / "converted")
        if args.json:
            meta = {"cpu": f"{cpu_model()}, {usable_cores()} cores", "torch": torch.__version__,
                    "original_size": args.original_size, "batch_size": args.batch_size, "repeats": args.repeats}
            args.json.write_text(json.dumps({"meta": meta, "sources": rows}, indent=2))
        tmp.cleanup()
        return rows
    folders = {}
    if args.folder is not None:
        folders["folder"] = args.folder
    else:
        for fmt in args.formats:
            folders[fmt] = write_photos(Path(tmp.name) / fmt, args.images, args.original_size, fmt)

    rows = []
    cores = usable_cores()
    for fmt, folder in folders.items():
        n_images = len(image_folder(str(folder), "train", False, None, (3, 8, 8), (0.0, 1.0)))
        drafts = [True] if fmt == "png" or args.no_draft_comparison else [False, True]
        for size in args.sizes:
            for aug in args.augment:
                for draft in drafts:
                    cost = item_cost_ms(folder, size, AUGMENT[aug], draft, 3)
                    row = {"format": fmt, "images": n_images, "size": size, "augmentation": aug,
                           "draft": None if fmt == "png" else draft, "cpu_ms_per_image": round(cost, 2),
                           "bound_images_per_s": round(1000 * cores / cost), "images_per_s": {}}
                    for workers in args.workers:
                        ips = measure(folder, size, workers, AUGMENT[aug], draft, args.batch_size, args.repeats)
                        row["images_per_s"][workers] = round(ips, 1)
                        print(f"{fmt} {size}px {aug} draft={row['draft']} workers={workers}: {ips:.0f} images/s "
                              f"({cost:.2f} CPU ms/image)", file=sys.stderr, flush=True)
                    rows.append(row)

    print(f"{cpu_model()}, {usable_cores()} cores, torch {torch.__version__}; batch {args.batch_size}, best of {args.repeats} epochs of "
          f"{rows[0]['images'] if rows else 0} images; images/s through the DataLoader, and one item's CPU cost on "
          f"one thread with the bound it sets on {cores} cores (1000 x {cores} / ms)")
    print()
    print("| format | size | augmentation | draft | CPU ms/image | bound | "
          + " | ".join(f"{w} workers" for w in args.workers) + " |")
    print("|---|---:|---|---|---:|---:|" + "---:|" * len(args.workers))
    for r in rows:
        shown = "n/a" if r["draft"] is None else ("on" if r["draft"] else "off")
        print(f"| {r['format']} | {r['size']} | {r['augmentation']} | {shown} | {r['cpu_ms_per_image']:.2f} | "
              f"{r['bound_images_per_s']} | " + " | ".join(f"{v:.0f}" for v in r["images_per_s"].values()) + " |")
    differences = {}
    if not args.no_draft_comparison:
        for fmt, folder in folders.items():
            if fmt != "png":
                for size in args.sizes:
                    differences[f"{fmt} {size}"] = draft_difference(folder, size)
    if differences:
        print()
        print("Draft vs full decode, default output (centre crop), in uint8 levels:")
        print()
        print("| format | size | PSNR dB | mean abs | max abs |")
        print("|---|---:|---:|---:|---:|")
        for key, d in differences.items():
            print(f"| {key.split()[0]} | {key.split()[1]} | {d['psnr_db']} | {d['mean_abs']} | {d['max_abs']} |")
    if args.json:
        meta = {"cpu": f"{cpu_model()}, {usable_cores()} cores", "torch": torch.__version__,
                "original_size": args.original_size, "batch_size": args.batch_size, "repeats": args.repeats}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "draft_difference": differences}, indent=2))
    tmp.cleanup()
    return rows


if __name__ == "__main__":
    main()
