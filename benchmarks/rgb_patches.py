"""Write an image-folder dataset of RGB photo patches: ``OUT/{size}/{train,test}/*.png``.

The patches are cut from the RGB photographs that ship with scikit-learn and scikit-image (no network),
with the TRAIN and the TEST patches taken from DIFFERENT photographs, so a test score measures how an
autoencoder does on images it has never seen, not on other crops of its training images:

===========  ==================================================================================
split        photographs (source, native size)
===========  ==================================================================================
train        astronaut (skimage, 512x512), rocket (skimage, 427x640), china (sklearn, 427x640),
             motorcycle_left + motorcycle_right (skimage.data.stereo_motorcycle, 500x741 each: two
             views of one scene, so both are on the same side), hubble_deep_field (skimage, 872x1000),
             retina (skimage, 1411x1411), immunohistochemistry (skimage, 512x512)
test         chelsea (skimage, the cat, 300x451), coffee (skimage, 400x600), flower (sklearn, 427x640)
===========  ==================================================================================

Left out: skimage's synthetic images (colorwheel, logo, checkerboard, ...), its grayscale ones
(camera, coins, moon, page, text, clock, horse, brick, grass, gravel, ...), ``cat`` (the same photo as
chelsea) and those that need a download (lily, skin, kidney, cells3d, eagle, ...).

Scales. Patches are cut at the photographs' native resolution (half of each split) and from copies
downscaled 2x (30%) and 4x (20%) by box averaging (``PIL.Image.reduce``: the area filter, no ringing).
Native patches carry the photos' real fine texture, sensor noise and JPEG traces (what an
autoencoder trained on random crops of large images sees, as latent diffusion's are); the downscaled
copies put larger structures (object edges, whole objects) into a patch and are cleaner per pixel, so
the set is not all fur and noise. Within a scale each photo gets a share proportional to the square root
of its area (a compromise between one share per photo and one per pixel, so the 1411x1411 retina does
not make up half of the training set).

Sampling. Positions are drawn uniformly and without replacement from a generator seeded by
``(seed, size, photo, scale)``: the same command writes the same files on any machine, and a photo's
patches do not change when another photo is added. Nearly constant patches (standard deviation of the
uint8 pixels below ``--min-std``, default 2: the retina's black surround) are skipped and replaced by
further draws; the manifest counts them.

    python benchmarks/rgb_patches.py --out data/rgb_patches                       # 32 and 64, 4000 / 400 each
    python benchmarks/rgb_patches.py --out /tmp/p --sizes 32 --train 200 --test 50  # a quick one

Writes ``OUT/{size}/train/*.png``, ``OUT/{size}/test/*.png`` (named ``photo_sF_NNNNN.png``; existing PNGs
in those two folders are deleted first) and ``OUT/{size}/manifest.json`` (the split, the counts per photo
and scale, the settings), and prints a summary. ``vaegan`` reads the folder with the ``image_folder``
dataset: ``data: {name: image_folder, root: OUT/32}`` uses ``train/`` for training and ``test/`` for
evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

TRAIN_PHOTOS = ("astronaut", "rocket", "china", "motorcycle_left", "motorcycle_right", "hubble_deep_field",
                "retina", "immunohistochemistry")
TEST_PHOTOS = ("chelsea", "coffee", "flower")
SCALES: Tuple[Tuple[int, float], ...] = ((1, 0.5), (2, 0.3), (4, 0.2))  # (downscale factor, share of the patches)
SOURCES = {
    "astronaut": "skimage.data.astronaut", "rocket": "skimage.data.rocket", "chelsea": "skimage.data.chelsea",
    "coffee": "skimage.data.coffee", "hubble_deep_field": "skimage.data.hubble_deep_field",
    "retina": "skimage.data.retina", "immunohistochemistry": "skimage.data.immunohistochemistry",
    "motorcycle_left": "skimage.data.stereo_motorcycle()[0]", "motorcycle_right": "skimage.data.stereo_motorcycle()[1]",
    "china": "sklearn.datasets.load_sample_images() china.jpg",
    "flower": "sklearn.datasets.load_sample_images() flower.jpg",
}


def load_photos(names: Sequence[str]) -> Dict[str, np.ndarray]:
    """The named photographs as uint8 (H, W, 3) arrays, from the files scikit-learn and scikit-image ship."""
    photos: Dict[str, np.ndarray] = {}
    wanted = set(names)
    if wanted & {"china", "flower"}:
        from sklearn.datasets import load_sample_images

        sk = load_sample_images()
        for path, image in zip(sk.filenames, sk.images):
            name = Path(path).stem
            if name in wanted:
                photos[name] = np.asarray(image, dtype=np.uint8)
    if wanted & {"motorcycle_left", "motorcycle_right"}:
        from skimage.data import stereo_motorcycle

        left, right, _disparity = stereo_motorcycle()
        photos.update({"motorcycle_left": left, "motorcycle_right": right})
    import skimage.data

    for name in wanted - set(photos):
        photos[name] = getattr(skimage.data, name)()
    for name, image in photos.items():
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise RuntimeError(f"{name}: expected an RGB uint8 photograph, got {image.dtype} {image.shape}")
    return {n: photos[n] for n in names}


def downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-average ``image`` by ``factor`` (PIL's ``reduce``: each output pixel is the mean of a factor^2 block)."""
    if factor == 1:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).reduce(factor))


def allocate(total: int, weights: Dict[object, float]) -> Dict[object, int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder; ties by key order)."""
    keys = list(weights)
    norm = sum(weights.values())
    exact = {k: total * weights[k] / norm for k in keys}
    counts = {k: int(np.floor(v)) for k, v in exact.items()}
    rest = total - sum(counts.values())
    for k in sorted(keys, key=lambda k: -(exact[k] - counts[k]))[:rest]:
        counts[k] += 1
    return counts


def cut(image: np.ndarray, size: int, count: int, rng: np.random.Generator, min_std: float) -> Tuple[List[np.ndarray], int]:
    """``count`` distinct (size, size) patches at uniform positions, skipping nearly constant ones.

    Returns:
        (patches, number of skipped flat patches). Fewer than ``count`` only if the image runs out of
        non-flat positions.
    """
    h, w = image.shape[:2]
    ny, nx = h - size + 1, w - size + 1
    population = ny * nx
    patches: List[np.ndarray] = []
    skipped, drawn = 0, 0
    order = rng.permutation(population) if population <= 200_000 else None
    seen: set = set()
    while len(patches) < count and drawn < population:
        if order is not None:
            pos = int(order[drawn])
        else:  # large images: draw positions, rejecting repeats (no O(population) permutation)
            pos = int(rng.integers(population))
            if pos in seen:
                if len(seen) >= population:
                    break
                continue
            seen.add(pos)
        drawn += 1
        y, x = divmod(pos, nx)
        patch = image[y:y + size, x:x + size]
        if patch.astype(np.float32).std() < min_std:
            skipped += 1
            continue
        patches.append(np.ascontiguousarray(patch))
    return patches, skipped


def write_split(photos: Dict[str, np.ndarray], split: str, size: int, total: int, seed: int, min_std: float,
                out: Path) -> Dict[str, object]:
    """Cut ``total`` patches of ``size`` from ``photos`` over the scales and write them as PNGs into ``out``."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    per_scale = allocate(total, {factor: share for factor, share in SCALES})
    counts: Dict[str, Dict[str, int]] = {}
    skipped: Dict[str, Dict[str, int]] = {}
    written = 0
    for factor, _share in SCALES:
        scaled = {name: downscale(img, factor) for name, img in photos.items()}
        usable = {n: im for n, im in scaled.items() if min(im.shape[:2]) >= size}
        if not usable:
            continue
        shares = allocate(per_scale[factor], {n: float(np.sqrt(im.shape[0] * im.shape[1])) for n, im in usable.items()})
        for name, image in usable.items():
            rng = np.random.default_rng(np.random.SeedSequence([seed, size, zlib.crc32(name.encode()), factor]))
            patches, flat = cut(image, size, shares[name], rng, min_std)
            for i, patch in enumerate(patches):
                Image.fromarray(patch).save(out / f"{name}_s{factor}_{i:05d}.png", optimize=False)
            counts.setdefault(name, {})[f"x1/{factor}"] = len(patches)
            skipped.setdefault(name, {})[f"x1/{factor}"] = flat
            written += len(patches)
    return {"split": split, "photos": {n: {"source": SOURCES[n], "shape": list(photos[n].shape)} for n in photos},
            "patches": written, "requested": total, "per_photo_and_scale": counts, "skipped_flat": skipped}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/rgb_patches"), help="root folder (default data/rgb_patches)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="patch sides (default 32 64)")
    p.add_argument("--train", type=int, default=4000, help="training patches per size (default 4000)")
    p.add_argument("--test", type=int, default=400, help="test patches per size (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-std", type=float, default=2.0,
                   help="skip patches whose uint8 pixel standard deviation is below this (default 2: constant borders)")
    args = p.parse_args(argv)
    if set(TRAIN_PHOTOS) & set(TEST_PHOTOS):
        raise SystemExit("a photograph is in both splits")  # a guard for edits of the lists above
    photos = load_photos(TRAIN_PHOTOS + TEST_PHOTOS)
    lines = []
    for size in args.sizes:
        root = args.out / str(size)
        manifest = {"size": size, "seed": args.seed, "min_std": args.min_std,
                    "scales": {f"x1/{f}": share for f, share in SCALES},
                    "downscaling": "PIL.Image.reduce (box average)", "photo_share_within_scale": "sqrt(area)"}
        for split, names, total in (("train", TRAIN_PHOTOS, args.train), ("test", TEST_PHOTOS, args.test)):
            info = write_split({n: photos[n] for n in names}, split, size, total, args.seed, args.min_std, root / split)
            manifest[split] = info
            flat = sum(v for d in info["skipped_flat"].values() for v in d.values())
            lines.append(f"{size}x{size} {split:5s}: {info['patches']} patches (requested {total}) in {root / split}, "
                         f"{flat} flat ones skipped")
            for name, per in info["per_photo_and_scale"].items():
                shape = "x".join(str(s) for s in photos[name].shape[:2])
                lines.append(f"    {name:22s} {shape:>9s}  " + "  ".join(f"{k}: {v:4d}" for k, v in per.items()))
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    sys.stdout.write("train photographs: " + ", ".join(TRAIN_PHOTOS) + "\n")
    sys.stdout.write("test photographs:  " + ", ".join(TEST_PHOTOS) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
