"""The output folder a run owns: one run at a time, never a fresh run over an earlier one, no link followed.

- **A lock for the whole run.** ``<output-dir>/.vaegan.lock`` (JSON: PID, host, start time, command, the
  SLURM job id) is created atomically (``O_EXCL``) by the main process before anything is written and
  removed when the run ends. A second run into the folder, or a ``--resume`` while another run holds it, is
  refused with one paragraph naming the holder. A lock whose process is gone (same host), or that belongs to
  an earlier incarnation of this SLURM job (a requeue), is stale: reported and taken over. A lock of another
  host cannot be checked; it is refused with its age and the command to remove it.
- **No fresh run over a run.** A folder that holds a run (its ``config.yaml``, checkpoints, ``final/`` or
  ``metrics.jsonl``) is refused to a run without ``train.resume``, unless ``train.overwrite`` (``--overwrite``):
  then the earlier run's files, and only files vaegan writes, are moved to ``previous/<time>/`` in the same
  folder, nothing deleted, so its checkpoints can never be resumed by the new run by mistake.
- **No links.** The sub-folders a run writes into (``checkpoints``, ``final``, ``samples``, ...) must not be
  symbolic links: a link there would put the run's files, or a checkpoint rotation's deletions, somewhere
  else. Files are replaced, never written through (:func:`vaegan.files.write_atomic`).

Example:
    >>> folder = RunFolder("outputs/run", resume=None, overwrite=False)  # doctest: +SKIP
    >>> folder.check(); folder.claim()  # before training; folder.release() after  # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .errors import OutputError

__all__ = ["LOCK_NAME", "RUN_ENTRIES", "RunFolder", "holds_run", "read_lock"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".vaegan.lock"
# Everything a run writes directly in its output folder (plus the tracker's project folder for TensorBoard).
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "loss_curves.png", "checkpoints", "final", "samples",
               "wandb")
LINK_FREE = ("checkpoints", "final", "samples", "previous")  # folders a run writes into or deletes in
PREVIOUS = "previous"


def holds_run(folder: Union[str, Path]) -> List[str]:
    """What in ``folder`` shows that a vaegan run wrote there (empty: nothing), for messages."""
    from .checkpointing import list_checkpoints

    def written(path: Path) -> bool:  # a link is never a run's file: a run replaces links, never writes through them
        return path.is_file() and not path.is_symlink()

    folder = Path(folder)
    found = ["config.yaml"] if written(folder / "config.yaml") else []
    ckpts = list_checkpoints(folder / "checkpoints")
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint{'s' * (len(ckpts) != 1)} (newest {ckpts[-1].name})")
    if written(folder / "final" / "model.safetensors"):
        found.append("final/")
    if written(folder / "metrics.jsonl"):
        found.append("metrics.jsonl")
    return found


def read_lock(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The lock file's record, ``{}`` when it is unreadable (being written, or not JSON), None when absent."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def _describe(info: Dict[str, Any], now: float) -> str:
    started = info.get("started")
    age = ""
    if isinstance(started, (int, float)):
        age = f", started {datetime.datetime.fromtimestamp(started).strftime('%Y-%m-%d %H:%M:%S')} " \
              f"({(now - started) / 60:.0f} min ago)"
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    command = f": {info['command']}" if info.get("command") else ""
    return f"process {info.get('pid', '?')} on host {info.get('host', '?')}{job}{age}{command}"


class RunFolder:
    """The output folder of one run: :meth:`check` (read-only), :meth:`claim` (main process:
    the lock, and with ``overwrite`` the earlier run moved aside), :meth:`release`.

    Args:
        path: ``train.output_dir``.
        resume: ``train.resume`` (None: a fresh run).
        overwrite: ``train.overwrite``.
        extra_entries: More names the run writes in the folder (the TensorBoard project folder).
    """

    def __init__(self, path: Union[str, Path], resume: Optional[str], overwrite: bool,
                 extra_entries: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.entries = tuple(dict.fromkeys((*RUN_ENTRIES, *extra_entries)))
        self.lock = self.path / LOCK_NAME
        self.held = False

    # ---- read-only checks ------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse, before any data is read, a folder this run must not write into.

        Raises:
            OutputError: a link among the folders a run writes into; a fresh run (no ``resume``, no
                ``overwrite``) into a folder that holds a run; a live run holding the folder.
        """
        for name in LINK_FREE:
            link = self.path / name
            if link.is_symlink():
                raise OutputError(
                    f"'{link}' is a symbolic link (to '{os.readlink(link)}'). vaegan never writes or deletes through "
                    f"a link inside its output folder: a run's {name}/ there would land in, or a checkpoint rotation "
                    f"delete from, the folder it points to. Remove the link (rm '{link}'; its target is untouched) "
                    "or choose another --output-dir.")
        found = holds_run(self.path)
        if found and self.resume is None and not self.overwrite:
            raise OutputError(
                f"'{self.path}' already holds a vaegan run ({', '.join(found)}). A fresh run there would replace its "
                "final model and mix its checkpoints and metrics with this one's. To continue that run: --resume auto "
                "(train.resume=auto). To start again in this folder: --overwrite (train.overwrite=true), which moves "
                f"the earlier run's files to '{self.path / PREVIOUS}/<time>/' and deletes nothing. Or choose another "
                "--output-dir.")
        holder = self._live_holder()
        if holder is not None:
            raise self._busy(holder)

    def _live_holder(self) -> Optional[Dict[str, Any]]:
        """The record of a lock that a live run (or one that cannot be checked) holds; None if free or stale."""
        info = read_lock(self.lock)
        if info is None:
            return None
        if not info:  # being written this instant, or garbage: another process is claiming the folder
            try:
                fresh = time.time() - self.lock.stat(follow_symlinks=False).st_mtime < 60
            except OSError:
                return None
            return {"pid": "?", "host": "?", "unreadable": True} if fresh else None
        if self._stale(info):
            return None
        return info

    def _stale(self, info: Dict[str, Any]) -> bool:
        job = os.environ.get("SLURM_JOB_ID")
        if job and info.get("slurm_job_id") == job and info.get("pid") != os.getpid():
            return True  # an earlier incarnation of this very job (requeued): it is not running any more
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            return info["pid"] == os.getpid() or not _alive(info["pid"])  # this process's own (an earlier trainer)
        return False  # another host: cannot be checked from here

    def _busy(self, info: Dict[str, Any]) -> OutputError:
        if info.get("unreadable"):
            who = "another process that is claiming it right now"
        else:
            who = _describe(info, time.time())
        return OutputError(
            f"'{self.path}' is in use by another vaegan run ({who}). Two runs in one folder would overwrite each other's "
            "checkpoints and mix their metrics. Wait for it to finish, stop it, or choose another --output-dir. If you "
            f"are sure no run uses the folder (a run on a machine that crashed), remove the lock: rm '{self.lock}'.")

    # ---- the main process ------------------------------------------------------------------------------
    def claim(self, command: Optional[str] = None) -> None:
        """Take the lock (atomically; a stale one is reported and replaced), then, with ``overwrite``, move the
        earlier run's files aside. Main process only.

        Raises:
            OutputError: another live run holds the folder (it may have claimed it since :meth:`check`).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": command if command is not None else " ".join(sys.argv),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        for _ in range(3):
            try:
                fd = os.open(self.lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileExistsError:
                info = read_lock(self.lock)
                holder = self._live_holder()
                if holder is not None:
                    raise self._busy(holder) from None
                self._remove_stale(info)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            self.held = True
            break
        else:
            raise OutputError(f"Could not take the lock {self.lock} (it reappeared three times): another run is "
                              "starting in this folder. Choose another --output-dir or wait for it.")
        if self.overwrite:
            self._move_previous()

    def _remove_stale(self, info: Optional[Dict[str, Any]]) -> None:
        """Move the stale lock ``info`` out of the way, atomically: a process that took the folder between our
        read and now keeps its (new) lock, and this claim is refused with its name.

        Raises:
            OutputError: the lock is no longer the stale one that was read.
        """
        grave = self.lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.replace(self.lock, grave)  # a rename: a link planted there moves as a link, its target untouched
        except FileNotFoundError:
            return
        moved = read_lock(grave)
        if moved != info:  # not the one judged stale: hand it back (never over a lock created meanwhile)
            try:
                os.link(grave, self.lock)
            except OSError:
                pass
            grave.unlink(missing_ok=True)
            raise self._busy(moved or {"unreadable": True})
        grave.unlink(missing_ok=True)
        if info and info.get("pid") != os.getpid():
            logger.warning("Taking over the lock of %s: %s, which is not running any more.", self.path,
                           _describe(info, time.time()))

    def _move_previous(self) -> Optional[Path]:
        present = [self.path / n for n in self.entries if os.path.lexists(self.path / n)]
        if not present:
            return None
        dest = self.path / PREVIOUS / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        while dest.exists():
            dest = dest.with_name(dest.name + "_")
        dest.mkdir(parents=True)
        for entry in present:
            os.replace(entry, dest / entry.name)  # a rename: a link moves as a link, nothing is copied or followed
        logger.warning("--overwrite: moved the earlier run's %s to %s (nothing deleted)",
                       ", ".join(p.name for p in present), dest)
        return dest

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent)."""
        if not self.held:
            return
        info = read_lock(self.lock)
        if info and info.get("pid") == os.getpid():
            self.lock.unlink(missing_ok=True)
        self.held = False
