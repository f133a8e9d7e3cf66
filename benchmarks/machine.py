"""What a benchmark ran on, in the words every results table uses, and where its table goes in docs/
(one description and one writer for all scripts).

    >>> from machine import hardware  # run from benchmarks/, as the scripts are
    >>> hardware()  # doctest: +SKIP
    '2 CPU cores (AMD EPYC), no GPU'
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from vaegan.factory import usable_cores  # noqa: F401  (the cores this process may run on; used by the scripts)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> str:
    """The first GPU's name, or "no GPU"."""
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"


def hardware() -> str:
    """``"<cores> CPU cores (<model>), <GPU or 'no GPU'>"``."""
    return f"{usable_cores()} CPU cores ({cpu_model()}), {gpu_name()}"


# vaegan 0.2's MNIST defaults for every key that 0.3 changed (latent size, what D judges, its weight, the fitted
# sampler). The benchmarks whose published numbers were measured with them start from these, so the numbers in
# docs/ stay what they say; benchmarks/mnist_quality.py compares them with the current defaults.
DEFAULTS_0_2 = ["model.options.latent_dim=16", "adversarial.fake=prior", "adversarial.weight=0.05",
                "losses=[{name: bce}, {name: kl, weight: {value: 1.0, warmup: 1000}}]", "sampler=null"]


def write_block(path: Path, block: str, begin: str, end: str) -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) in the markdown file ``path``: in place
    of the text between those markers when it has them, else appended."""
    import re

    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
