"""Stopping on the scheduler's terms: signals to any process of the job, SLURM's advance warning and
requeue, wall-clock limits, and checkpoints by the clock.

:class:`RunControl` decides after each optimizer step whether the run saves a checkpoint now and
whether it stops, and makes every process take the same decision after the same step:

- **signals**: SIGINT and SIGTERM (to the main process, to its process group, or to every process of
  a multi-process run; repeated copies from launchers are one request) stop the run with a checkpoint
  and exit status 130/143. The scheduler's advance warning (``train.warning_signal``, default USR1, as in
  ``#SBATCH --signal=USR1@90``) does the same with status 128 + its number, and under SLURM with
  ``train.requeue`` the job is requeued (``scontrol requeue``) once the checkpoint is complete.
- **the clock**: ``train.max_time`` stops the run with a checkpoint before its budget runs out (status 124,
  as ``timeout`` reports; requeued like the warning); ``train.checkpoint_every_minutes`` saves by time.
- **data workers** (:class:`WorkerSignals`, the training loader's ``worker_init_fn``) ignore those
  signals while the main process trains: it decides, checkpoints, then shuts them down.

With one process the decision is taken on the host at once. With several, each process's requests
ride in the step guard's one reduce per step (no extra collective); the sums of step k are copied to
the host asynchronously and read after step k + 1, so every process acts after the same step, one
step late, without stopping the CPU's run-ahead of the GPU.

Example:
    >>> with RunControl(cfg.train, accelerator, train_step.guard, loader) as control:  # doctest: +SKIP
    ...     for x in loader:
    ...         train_step(x, step); step += 1
    ...         decision = control.after_step()
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .config import TrainConfig
from .config.values import parse_duration, parse_signal
from .errors import TrainingStopped
from .guards import StepGuard

__all__ = ["RunControl", "Decision", "WorkerSignals", "GracefulStop", "stopped", "requeue_slurm_job", "slurm_job_id",
           "shutdown_workers", "stop_signals", "TrainingStopped", "EXIT_CODES", "CONTINUE"]

logger = logging.getLogger(__name__)

# Positions of the control flags reduced with each step; a stop's reason is the first one set, in this order.
INTERRUPT, WARNING, DEADLINE, SAVE = range(4)
TIMEOUT_STATUS = 124  # the exit status of a run stopped by train.max_time (GNU timeout's)
# Exit status after a graceful stop: the shell's convention (128 + N) for "terminated by signal N".
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
CONTINUE = "Continue with --resume auto (train.resume=auto)."  # how every stopped run is told to go on


class GracefulStop:
    """Context manager: the given signals call ``on_signal`` instead of killing the process at once.

    Handlers are installed only in the main thread (Python's rule) and the previous ones are put back on
    exit. The same signal arriving again is the same request: launchers (torchrun, ``accelerate launch``)
    forward what they receive to their workers, which under SLURM or ``kill -- -PGID`` already got it,
    and schedulers escalate to SIGKILL themselves. Only a second SIGINT more than ``repeat_window``
    seconds after the first (a user pressing Ctrl-C again) restores the previous handler and re-sends
    itself, so an impatient user still gets an immediate stop.

    Args:
        on_signal: Called with the signal number from the handler, every time one arrives.
        signals: The signals to catch.
        repeat_window: Seconds within which a repeated SIGINT counts as the forwarded copy of the first.
    """

    def __init__(self, on_signal: Optional[Callable[[int], None]] = None,
                 signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM), repeat_window: float = 1.0) -> None:
        self.signals = tuple(signals)
        self.on_signal = on_signal
        self.repeat_window = repeat_window
        self.signum: Optional[int] = None  # the first signal received
        self._received: Dict[int, float] = {}  # signal -> when it first arrived (monotonic)
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            logger.debug("Not in the main thread: %s keep their default behaviour.",
                         ", ".join(signal.Signals(s).name for s in self.signals))
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        now = time.monotonic()
        first = self._received.setdefault(signum, now)
        if signum == signal.SIGINT and now - first > self.repeat_window:  # Ctrl-C again: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        if self.signum is None:
            self.signum = signum
        if first == now:
            logger.warning("Received %s: a checkpoint is written after the current step (all processes agree on "
                           "the step), then training exits%s.", signal.Signals(signum).name,
                           " (press Ctrl-C again to stop immediately)" if signum == signal.SIGINT else "")
        if self.on_signal is not None:
            self.on_signal(signum)


def stopped(signum: Optional[int], step: int, detail: str = "",
            then: str = CONTINUE) -> TrainingStopped:
    """The ``SystemExit`` that ends a run stopped by a signal (status ``128 + signum``), logged with ``then``.

    ``signum`` is None on a process that learnt of another process's signal; it exits like SIGTERM.
    ``detail`` follows the signal's name in the message (`` (the scheduler's warning)``).
    """
    signum = signal.SIGTERM if signum is None else signum
    why = f"stopped by {signal.Signals(signum).name}{detail}"
    logger.warning("%s after step %d; the checkpoint of that step is saved. %s", why[:1].upper() + why[1:], step,
                   then)
    return TrainingStopped(128 + int(signum), why, step)


@dataclass(frozen=True)
class Decision:
    """What to do after a step: ``save`` a checkpoint now; ``stop`` (``"interrupt"``, ``"warning"``,
    ``"deadline"``) after saving one, or None to go on."""

    save: bool = False
    stop: Optional[str] = None


class WorkerSignals:
    """``worker_init_fn`` of the training DataLoader: its workers leave stop signals to the main process.

    Schedulers and launchers signal every process of a job (``kill -- -PGID``, ``timeout``, SLURM, a
    terminal's Ctrl-C), and a data worker dying of it would end the run with the DataLoader's error
    before the main process could checkpoint. While :attr:`active` is set (by :class:`RunControl`, for
    the length of training) the workers ignore those signals; the main process checkpoints and exits.
    Outside training such a signal ends a worker at once, quietly (status 0), so the loader's and
    Python's own shutdown (which terminates daemonic children with SIGTERM) still work.

    Args:
        signals: The signals the workers ignore while training.
        inner: Another ``worker_init_fn`` to call after installing the handlers.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
                 inner: Optional[Callable[[int], None]] = None) -> None:
        self.signals = tuple(int(s) for s in signals)
        self.inner = inner
        # Shared memory: set in the main process, read by the workers (forked or spawned with it).
        self.active = multiprocessing.RawValue("b", 0)

    def __call__(self, worker_id: int) -> None:
        # multiprocessing's temporary folder as inherited from the parent (None, or the parent's own)
        self._inherited_tmp = multiprocessing.current_process()._config.get("tempdir")
        for sig in self.signals:
            signal.signal(sig, self._handle)
        if self.inner is not None:
            self.inner(worker_id)

    def _handle(self, signum: int, frame: object) -> None:
        if self.active.value:
            return  # the main process got it too (or will learn of it from its peers): it decides
        # Training is over and this is a shutdown's SIGTERM (Python's exit terminates daemonic children):
        # end with status 0, which the loader's SIGCHLD check accepts (a death by signal is reported as an
        # error), removing the pymp-* folder this worker made for passing tensors, which os._exit would leave.
        own = multiprocessing.current_process()._config.get("tempdir")
        if own and own != getattr(self, "_inherited_tmp", None):
            shutil.rmtree(own, ignore_errors=True)
        os._exit(0)


def stop_signals(train: TrainConfig) -> Tuple[int, ...]:
    """SIGINT, SIGTERM and ``train.warning_signal``: what stops a run (and what its data workers ignore)."""
    warning = parse_signal(train.warning_signal, "train.warning_signal") if train.warning_signal is not None else None
    return (signal.SIGINT, signal.SIGTERM) + ((warning,) if warning is not None else ())


def shutdown_workers(loader: Any) -> None:
    """End a DataLoader's persistent worker processes now, the way the loader itself does (no signal).

    Left to Python's exit, daemonic workers are terminated with SIGTERM and leave their temporary
    folders (``pymp-*``) behind. PyTorch has no public call for this: a persistent loader keeps its
    iterator in ``_iterator`` (under Accelerate's ``base_dataloader``) and its workers end when that
    iterator is shut down; the loader makes a new one if it is iterated again.
    """
    base = getattr(loader, "base_dataloader", loader)
    iterator = getattr(base, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        base._iterator = None
        iterator._shutdown_workers()


def slurm_job_id(env: Mapping[str, str] = os.environ) -> Optional[str]:
    """The id ``scontrol requeue`` takes for this SLURM job (``<array job>_<task>`` in an array), or None."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def requeue_slurm_job(env: Mapping[str, str] = os.environ, timeout: float = 60.0) -> bool:
    """Run ``scontrol requeue <job>`` for this SLURM job; True when scontrol accepted it.

    Failures are logged, not raised: the checkpoint is already saved, and the job can be resubmitted.
    """
    job = slurm_job_id(env)
    if job is None:
        logger.warning("train.requeue is set but this process is not in a SLURM job (no SLURM_JOB_ID): not "
                       "requeued. Resubmit the job; --resume auto continues from the checkpoint.")
        return False
    cmd = ["scontrol", "requeue", job]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.error("Could not requeue SLURM job %s (`%s`: %s). Resubmit the job; --resume auto continues from "
                     "the checkpoint.", job, " ".join(cmd), exc)
        return False
    if result.returncode != 0:
        logger.error("`%s` failed with status %d: %s. Resubmit the job; --resume auto continues from the "
                     "checkpoint (the job script needs #SBATCH --requeue).", " ".join(cmd), result.returncode,
                     (result.stderr or result.stdout).strip())
        return False
    logger.info("Requeued SLURM job %s; it continues from the checkpoint with --resume auto.", job)
    return True


class RunControl:
    """Signals, wall-clock limits and timed checkpoints, agreed by every process (see the module docstring).

    Use as a context manager around the training loop; call :meth:`after_step` after every optimizer
    step, :meth:`saved` after every checkpoint, and raise :meth:`stop` once the stop's checkpoint is saved.

    Args:
        train: The ``train`` section: ``max_time``, ``checkpoint_every_minutes``, ``warning_signal``,
            ``requeue``.
        accelerator: The run's Accelerator (number of processes, main process).
        guard: The step guard whose per-step reduce carries the requests of every process.
        loader: The training loader; when its ``worker_init_fn`` is a :class:`WorkerSignals` its workers are
            told to ignore stop signals while training. Its workers (and those of :attr:`loaders`) are shut
            down when training ends, however it ends.
    """

    def __init__(self, train: TrainConfig, accelerator: Any, guard: StepGuard, loader: Any = None) -> None:
        self.train = train
        self.accelerator = accelerator
        self.guard = guard
        self.single = accelerator.num_processes == 1
        self.warning_signal = (parse_signal(train.warning_signal, "train.warning_signal")
                               if train.warning_signal is not None else None)
        self.max_time = parse_duration(train.max_time, "train.max_time") if train.max_time is not None else None
        self.save_every = train.checkpoint_every_minutes * 60.0 or None
        self.signals = stop_signals(train)
        self.signum: Optional[int] = None  # the first stopping signal this process received
        self.loader = loader
        self.loaders: List[Any] = []  # more loaders whose workers end with training (a resumed epoch's)
        worker_init = getattr(loader, "worker_init_fn", None)
        self._workers = worker_init if isinstance(worker_init, WorkerSignals) else None
        self._catch = GracefulStop(self._on_signal, self.signals)
        self._requests = [0.0, 0.0]  # this process's INTERRUPT and WARNING
        self._start = self._last_save = self._last_step = time.monotonic()
        self._step_seconds = 0.0  # a running mean of the time between steps (the host's view)
        self._save_seconds = 0.0  # the longest checkpoint save so far
        self._pending: Optional[Tuple[torch.Tensor, Any]] = None  # the last step's reduced flags, on their way

    # ---- the context ---------------------------------------------------------------------------------
    def __enter__(self) -> "RunControl":
        self._start = self._last_save = self._last_step = time.monotonic()
        self._catch.__enter__()
        self.guard.flags = self._flags
        if self._workers is not None:
            self._workers.active.value = 1
        if self.train.requeue and self.accelerator.is_main_process:
            if slurm_job_id() is None:
                logger.warning("train.requeue is set but this is not a SLURM job (no SLURM_JOB_ID): a warning-signal "
                               "or max_time stop will checkpoint and exit without requeueing.")
            elif shutil.which("scontrol") is None:
                logger.warning("train.requeue is set but `scontrol` is not on PATH: the job cannot requeue itself.")
        return self

    def __exit__(self, *exc: object) -> None:
        for loader in (self.loader, *self.loaders):  # before Python's exit would terminate them with SIGTERM
            shutdown_workers(loader)
        if self._workers is not None:
            self._workers.active.value = 0  # from now on a signal ends the workers again
        self.guard.flags = None
        self._catch.__exit__(*exc)

    def _on_signal(self, signum: int) -> None:
        if signum == self.warning_signal:
            self._requests[WARNING] = 1.0
        else:
            self._requests[INTERRUPT] = 1.0
            self.signum = self.signum or signum

    # ---- the decision --------------------------------------------------------------------------------
    def _flags(self) -> List[float]:
        """This process's requests now (interrupt, warning, deadline, save), as host floats."""
        now = time.monotonic()
        # Stop while there is still time for the step that has started, one more (the agreement's lag)
        # and the checkpoint save.
        late = self.max_time is not None and (
            now - self._start + 2.0 * self._step_seconds + self._save_seconds >= self.max_time)
        due = self.save_every is not None and now - self._last_save >= self.save_every
        return [*self._requests, float(late), float(due)]

    def after_step(self) -> Decision:
        """What every process does after the step that just ended (the same on all of them)."""
        now = time.monotonic()
        gap, self._last_step = now - self._last_step, now
        self._step_seconds = gap if not self._step_seconds else 0.9 * self._step_seconds + 0.1 * gap
        if self.single:
            flags = self._flags()
        else:  # the previous step's sums (complete by now), then send this step's on their way
            flags = self._read(self._pending) if self._pending is not None else [0.0] * 4
            self._pending = self._send(self.guard.reduced_flags)
        stop = next((name for i, name in ((INTERRUPT, "interrupt"), (WARNING, "warning"), (DEADLINE, "deadline"))
                     if flags[i] > 0), None)
        return Decision(save=flags[SAVE] > 0, stop=stop)

    @staticmethod
    def _send(flags: Optional[torch.Tensor]) -> Optional[Tuple[torch.Tensor, Any]]:
        if flags is None:
            return None
        if flags.device.type != "cuda":
            return flags, None
        host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    @staticmethod
    def _read(pending: Tuple[torch.Tensor, Any]) -> List[float]:
        host, event = pending
        if event is not None:
            event.synchronize()  # the previous step only: this step's kernels stay queued
        return host.tolist()

    def saved(self, seconds: float) -> None:
        """Note a checkpoint that took ``seconds``: restarts the timed-checkpoint clock."""
        self._last_save = time.monotonic()
        self._save_seconds = max(self._save_seconds, seconds)

    def stop(self, reason: str, step: int) -> TrainingStopped:
        """The exception that ends the run after the stop's checkpoint of ``step`` is saved (every process
        calls this); the main process first requeues the SLURM job when the reason and ``train.requeue``
        ask for it."""
        requeued = (reason != "interrupt" and self.train.requeue and self.accelerator.is_main_process
                    and requeue_slurm_job())
        then = ("The job is requeued and continues with --resume auto." if requeued
                else CONTINUE)
        if reason == "interrupt":  # a process that learnt of it from its peers exits like SIGTERM
            return stopped(self.signum if self.signum in (signal.SIGINT, signal.SIGTERM) else None, step, then=then)
        if reason == "warning":  # every process has the same config, so the same warning signal
            return stopped(self.warning_signal or signal.SIGUSR1, step, " (the scheduler's warning)", then)
        why = f"stopped before train.max_time ({self.train.max_time})"
        logger.warning("%s after step %d; the checkpoint of that step is saved. %s", why[:1].upper() + why[1:],
                       step, then)
        return TrainingStopped(TIMEOUT_STATUS, why, step)
