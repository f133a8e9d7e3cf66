"""Writing files: atomically, with the user's permissions, never through a planted link.

Every file vaegan writes as a whole (weights, configs, sampler files, the classifier cache, latents) goes
through :func:`write_atomic`: into a temporary file of this process next to the target, then one
``os.replace``. A reader (another rank, a teammate's ``vaegan sample``) never sees half a file, two
processes never share a temporary name, and a symlink at the target is replaced by the file rather
than followed (nothing outside the output folder is written through it).

The temporary file gets the mode of any other file the user creates (``0o666`` minus the umask):
safetensors writes its files with mode 0600, which kept the weights of a run on a shared file system
unreadable for the rest of the team while every other file of the run was 0644.
:func:`share_like_umask` gives the files that Accelerate's ``save_state`` wrote (through safetensors
and torch) the same mode.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
    >>> write_atomic(p, lambda tmp: tmp.write_text("hello")).read_text()
    'hello'
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import CheckpointError

__all__ = ["umask", "file_mode", "write_atomic", "write_text_atomic", "save_safetensors", "share_like_umask",
           "finite_json", "dumps_json", "check_finite", "safetensors_shapes", "shape_differences", "mb"]


def umask() -> int:
    """This process's umask, read without changing it where the system says it (Linux), else set back at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)  # the only portable way to read it; restored on the next line
    os.umask(current)
    return current


def file_mode() -> int:
    """The mode a new regular file gets from ``open()`` here: ``0o666 & ~umask`` (0644 under umask 022)."""
    return 0o666 & ~umask()


def write_atomic(path: Union[str, Path], write: Callable[[Path], Any]) -> Path:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a temporary file of this process in the same
    folder, which then gets :func:`file_mode` and replaces ``path`` (or a symlink there: the link, not what
    it points at). On failure the temporary file is removed and the exception propagates.

    Returns:
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    """:func:`write_atomic` of a text file."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_safetensors(tensors: Dict[str, Any], path: Union[str, Path], metadata: Optional[Mapping[str, str]] = None) -> Path:
    """``safetensors.torch.save_file`` through :func:`write_atomic` (so with the user's file mode)."""
    from safetensors.torch import save_file

    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None))


def share_like_umask(folder: Union[str, Path]) -> None:
    """Give the regular files directly in ``folder`` that this process owns :func:`file_mode` (links and
    other people's files are left alone: no permission is ever widened through a link)."""
    mode = file_mode()
    for entry in os.scandir(folder):
        try:
            info = entry.stat(follow_symlinks=False)
            mine = info.st_uid == os.getuid() if hasattr(os, "getuid") else True
            if stat.S_ISREG(info.st_mode) and mine and stat.S_IMODE(info.st_mode) != mode:
                os.chmod(entry.path, mode)
        except FileNotFoundError:
            # Gone since the listing: another process's temporary file, renamed into place meanwhile
            # (safetensors writes ``.tmpXXXX`` and renames it), is not an error of this folder.
            continue


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (nested in dicts, lists, tuples) replaced by None.

    JSON has no NaN or Infinity: Python's ``json`` writes them as ``NaN`` / ``Infinity``, which other readers
    (``jq``, JavaScript, most JSON libraries) reject, so an undefined value is written as ``null``.

    Example:
        >>> finite_json({"psnr": float("inf"), "ssim": 0.5, "list": [float("nan")]})
        {'psnr': None, 'ssim': 0.5, 'list': [None]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite_json` (``obj``), with ``allow_nan=False``: never a NaN in a file."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def check_finite(state: Mapping[str, Any], path: Union[str, Path]) -> None:
    """Refuse weights with NaN or infinite values (they decode to black or NaN images, silently).

    Args:
        state: Name -> tensor, as loaded from ``path`` (integer tensors are not checked).
        path: The file they came from, for the message.

    Raises:
        CheckpointError: naming the first tensor and how many values of how many tensors are not finite.

    Example:
        >>> import torch
        >>> check_finite({"w": torch.ones(2)}, "model.safetensors")
    """
    import torch

    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()
           and not bool(torch.isfinite(v).all())}
    if bad:
        first = next(iter(bad))
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"'{path}' holds non-finite values: {bad[first]} of the {state[first].numel()} values of '{first}' are "
            f"NaN or inf{more}. A model with them decodes to black or NaN images. Load another checkpoint (an "
            "earlier step under <output-dir>/checkpoints) or re-export the model.")


def safetensors_shapes(path: Union[str, Path]) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, read from its header alone (no tensor is loaded).

    Raises:
        OSError, ValueError or safetensors' ``SafetensorError``: not a readable safetensors file (a bad header,
        a file shorter than its header says); the caller words the error for its file.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def shape_differences(found: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]]
                      ) -> Tuple[List[str], List[str], List[str]]:
    """How a file's tensors (name -> shape) differ from the state they should fill: the missing names, the
    unexpected ones and those of a wrong shape, each sorted (three empty lists: they fit).

    Example:
        >>> shape_differences({"w": (2, 3), "extra": (1,)}, {"w": (2, 4), "b": (4,)})
        (['b'], ['extra'], ['w'])
    """
    got = {k: tuple(v) for k, v in found.items()}
    want = {k: tuple(v) for k, v in expected.items()}
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    return missing, unexpected, [k for k in sorted(set(want) & set(got)) if got[k] != want[k]]


def mb(nbytes: float) -> str:
    """``nbytes`` for people: ``"12.3 MB"`` (``"1.2 GB"`` from a gigabyte)."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
