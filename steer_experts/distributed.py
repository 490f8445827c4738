"""Which process am I, and how do the processes of one run agree.

A run may be split over several processes that each do a fixed share of the work: started
by ``torchrun --nproc-per-node N`` (or any launcher that sets the standard ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``), or by :func:`spawn_team`
(``steer-experts discover --workers N``). :func:`team` says which process this is and joins the
others: it initialises torch's default process group the first time it is needed (backend
"gloo" on CPU, "nccl" when the model is on a CUDA device) unless the caller already has one.

With one process (``WORLD_SIZE`` unset or 1, no process group) :func:`team` is a plain
:class:`Team` of one whose barrier and gather do nothing, and nothing of torch is imported.

The stages that split work (:func:`~steer_experts.responses.collect_responses`,
:func:`~steer_experts.expertise.compute_expertise`) are collectives: every process of the
team must call them, in the same order and with the same arguments.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import InvalidArgumentError, SteerExpertsError


class TeamFailedError(SteerExpertsError, RuntimeError):
    """A process of a team started by :func:`spawn_team` failed; the others were stopped."""


@dataclass(frozen=True)
class Team:
    """The processes of one run: this one's ``rank`` among ``size`` (0 <= rank < size)."""

    rank: int = 0
    size: int = 1

    @property
    def lead(self) -> bool:
        """Whether this is rank 0: the process that prints and saves."""
        return self.rank == 0

    def barrier(self) -> None:
        """Return once every process of the team has called it."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, array: np.ndarray) -> list[np.ndarray]:
        """Every process's ``array``, in rank order, on every process.

        The arrays may differ in shape (not in number of dimensions) and must share one dtype
        that torch can hold (float32, float64, int64...); their bytes arrive unchanged.
        """
        if self.size == 1:
            return [array]
        import torch
        import torch.distributed as dist

        device = _collective_device()
        array = np.ascontiguousarray(array)
        shape = torch.tensor(array.shape, dtype=torch.int64, device=device)
        shapes = [torch.empty_like(shape) for _ in range(self.size)]
        dist.all_gather(shapes, shape)
        shapes = [tuple(s.tolist()) for s in shapes]
        # all_gather moves equal sizes only: pad every flat array to the longest (at least one element).
        longest = max(1, *(int(np.prod(s)) for s in shapes))
        values = torch.tensor(array.reshape(-1))
        flat = torch.zeros(longest, dtype=values.dtype, device=device)
        flat[:values.numel()] = values.to(device)
        parts = [torch.empty_like(flat) for _ in range(self.size)]
        dist.all_gather(parts, flat)
        return [p[:int(np.prod(s))].cpu().numpy().reshape(s) for p, s in zip(parts, shapes)]


def _collective_device():
    """Where collective tensors live: the current GPU under nccl, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _launch_setting(name: str, default: int) -> int:
    """The integer launch variable ``name`` of the environment, or ``default`` when it is unset."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(
            f"The environment variable {name}={value!r} is not an integer; start the processes with torchrun "
            "or `steer-experts discover --workers N`, which set it.") from None


def team(device=None) -> Team:
    """This process's :class:`Team`, joining the others first if several processes were launched.

    ``device`` (a torch device or its name; default CPU) is where this process's model runs: it
    chooses the backend when the process group is created here ("nccl" for CUDA, else "gloo").
    An existing process group is used as it is.

    Raises:
        InvalidArgumentError: the launch variables are not integers, RANK is out of [0, WORLD_SIZE),
            or MASTER_ADDR / MASTER_PORT are missing with WORLD_SIZE > 1.
    """
    dist = sys.modules.get("torch.distributed")  # no torch imported yet: no process group can exist
    if dist is not None and dist.is_available() and dist.is_initialized():
        return Team(dist.get_rank(), dist.get_world_size())
    size = _launch_setting("WORLD_SIZE", 1)
    if size == 1:
        return Team()
    rank = _launch_setting("RANK", -1)
    if size < 1 or not 0 <= rank < size:
        raise InvalidArgumentError(f"RANK={os.environ.get('RANK')} and WORLD_SIZE={size}: need 0 <= RANK < WORLD_SIZE "
                                   "(torchrun and `steer-experts discover --workers N` set both).")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise InvalidArgumentError(f"WORLD_SIZE={size} but {' and '.join(missing)} unset: start the processes with "
                                   "torchrun or `steer-experts discover --workers N`, which set them.")
    import torch
    import torch.distributed as dist

    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=size)
    return Team(rank, size)


def is_lead() -> bool:
    """Whether this process is rank 0 of its run (or the only process), without joining the others."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _launch_setting("RANK", 0) == 0


def local_device(device: str, processes: int | None = None) -> str:
    """The device this process should use when asked for ``device``, with ``processes`` in the team
    (default: ``WORLD_SIZE``): with several, a plain ``"cuda"`` is ``"cuda:LOCAL_RANK"`` (one GPU
    each); anything else as given.

    Raises:
        InvalidArgumentError: ``"auto"`` (one model spread over every GPU) with several processes.
    """
    processes = _launch_setting("WORLD_SIZE", 1) if processes is None else processes
    if processes > 1 and device == "auto":
        raise InvalidArgumentError("--device auto spreads one model over every GPU, so several processes "
                                   "(torchrun, --workers) cannot each have one; give each a GPU: --device cuda.")
    if device == "cuda" and processes > 1:
        return f"cuda:{_launch_setting('LOCAL_RANK', 0)}"
    return device


def spawn_team(n: int, fn: Callable, *args) -> None:
    """Run ``fn(*args)`` in ``n`` new processes on this machine that form one team, and wait for all.

    Each process gets the launch variables torchrun would set (rendezvous on a free port of
    127.0.0.1), so :func:`team` joins them as it would under torchrun. ``fn`` must be importable
    by name (a module-level function) and its ``args`` picklable, as for ``torch.multiprocessing``.

    Raises:
        InvalidArgumentError: ``n`` is not a positive integer, or this process is itself one of a team.
        TeamFailedError: a process raised or exited with a non-zero code; the others were stopped.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"The number of processes must be a positive integer; got {n!r}.")
    if _launch_setting("WORLD_SIZE", 1) > 1:
        raise InvalidArgumentError("This process is already one of several (WORLD_SIZE is set, e.g. by torchrun): "
                                   "start the processes one way, not both.")
    import torch.multiprocessing as mp

    try:
        mp.spawn(_member, args=(n, _free_port(), fn, args), nprocs=n, join=True)
    except mp.ProcessExitedException as err:
        how = f"signal {err.signal_name}" if err.signal_name else f"exit code {err.exit_code}"
        raise TeamFailedError(f"Process {err.error_index} of {n} ended with {how}; the others were stopped.") from None
    except mp.ProcessRaisedException as err:
        raise TeamFailedError(f"Process {err.error_index} of {n} failed; the others were stopped.\n{err.msg}") from None


def _member(rank: int, size: int, port: int, fn: Callable, args: tuple) -> None:
    """One process of :func:`spawn_team`: set the launch variables, then run ``fn``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fn(*args)


def _free_port() -> int:
    # The port is free now; another program could take it before the team binds it, but on
    # one machine that window is short enough for a launcher (torchrun does the same).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
