"""How the training step's cost grows with batch size and image size, as a table and a plot.

Each point is one subprocess of ``benchmarks/throughput.py``'s trainer worker (the recipe's default
model, losses and discriminator; 1-channel synthetic images of the given side), reporting images/s
after a warm-up and the peak memory (resident on CPU, allocated on GPU).

    python benchmarks/scaling.py                                        # writes docs/images/scaling.png
    python benchmarks/scaling.py --batch-sizes 16 64 256 --sizes 28 32 64 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = Path(__file__).with_name("throughput.py")


def measure(batch: int, size: int, steps: int, warmup: int, precision: str) -> dict:
    cmd = [sys.executable, str(THROUGHPUT), "--worker", "trainer", "--batch", str(batch), "--size", str(size),
           "--steps", str(steps), "--warmup", str(warmup), "--precision", precision,
           "--out-dir", str(ROOT / "outputs" / "scaling" / f"b{batch}_s{size}")]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return {"batch": batch, "size": size, **json.loads(out.stdout.strip().splitlines()[-1])}


def plot(rows, batch_sizes, sizes, base_batch: int, base_size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, values, fixed in ((axes[0], "batch", batch_sizes, ("size", base_size)),
                                   (axes[1], "size", sizes, ("batch", base_batch))):
        pts = sorted((r[key], r) for r in rows if r[fixed[0]] == fixed[1] and r[key] in values)
        xs = [x for x, _ in pts]
        ax.plot(xs, [r["images_per_s"] for _, r in pts], "o-", color="tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size" if key == "batch" else "image side (pixels)")
        ax.set_ylabel("images/s", color="tab:blue")
        ax.set_title(f"{fixed[0]} = {fixed[1]}")
        twin = ax.twinx()
        twin.plot(xs, [r["peak_memory_mb"] for _, r in pts], "s--", color="tab:red")
        twin.set_ylabel("peak memory (MB)", color="tab:red")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 32, 64, 128])
    p.add_argument("--base-batch", type=int, default=64, help="batch of the image-size sweep")
    p.add_argument("--base-size", type=int, default=28, help="image side of the batch sweep")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "images" / "scaling.png")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    points = {(b, args.base_size) for b in args.batch_sizes} | {(args.base_batch, s) for s in args.sizes}
    rows = []
    sys.stdout.write("| batch | side | images/s | peak memory MB |\n| ---: | ---: | ---: | ---: |\n")
    for batch, size in sorted(points, key=lambda bs: (bs[1], bs[0])):
        r = measure(batch, size, args.steps, args.warmup, args.precision)
        rows.append(r)
        sys.stdout.write(f"| {batch} | {size} | {r['images_per_s']:.1f} | {r['peak_memory_mb']:.0f} |\n")
        sys.stdout.flush()
    plot(rows, args.batch_sizes, args.sizes, args.base_batch, args.base_size, args.plot)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
