"""Devices and processes: which device, its precision and free memory, several processes on one machine
(torchrun), and stopping cleanly on a signal.

Without torchrun a run is rank 0 of 1 and nothing here talks to other processes.
"""

import contextlib
import datetime
import os
import resource
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def default_device() -> str:
    """cuda, then mps, then cpu: the first this machine has."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@dataclass
class Processes:
    """This process among torchrun's (RANK, WORLD_SIZE, LOCAL_RANK); without torchrun, rank 0 of 1."""
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    wait_group: object = None  # a gloo group with a long timeout, for waiting on rank 0

    @property
    def is_main(self) -> bool:  # rank 0 logs, evaluates and writes files
        return self.rank == 0

    def say(self, *args, **kwargs):
        """print() on rank 0 only."""
        if self.is_main:
            print(*args, **kwargs)

    def barrier(self):
        if self.world_size > 1:
            dist.barrier(group=self.wait_group)

    @classmethod
    def start(cls, device: str) -> "Processes":
        world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if world_size == 1:
            return cls(0, 1, device)
        if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) != world_size:
            raise SystemExit("error: training runs on one machine (its processes share the embedding cache "
                             "through memory maps); start torchrun with --nnodes=1")
        cuda = torch.device(device).type == "cuda"
        if cuda:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")  # gloo runs on CPUs (and the test)
        # Waiting for rank 0 (a 20 GB download, embedding, evaluating) goes through a CPU group with a long
        # timeout, so that it does not trip the short timeout meant to catch a hung GPU collective.
        wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
        return cls(rank, world_size, device, wait_group)

    @staticmethod
    def stop():
        if dist.is_initialized():
            dist.destroy_process_group()

    def wrap(self, module):
        """`module` in DistributedDataParallel when there are several processes, else itself."""
        if self.world_size == 1:
            return module
        cuda = torch.device(self.device).type == "cuda"
        return DistributedDataParallel(module, device_ids=[torch.device(self.device)] if cuda else None)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes (a collective: call it on all)."""
        if self.world_size == 1:
            return list(values)
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors
        dist.all_reduce(totals)
        return totals.tolist()


def to_device(tensor, device):
    """Host to device without waiting: pinned memory lets the copy run behind the GPU's queue."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def my_share(window: list, rank: int, world_size: int) -> tuple[list, float]:
    """This process's items of one optimizer step's window, and their weight. Process r takes every
    world_size-th item. The epoch's last window can be too short to give every process one, but every
    process must still join the gradient all-reduce: one left empty runs the window's first item with
    weight 0, which adds nothing to the gradient.

    >>> my_share(["a", "b", "c"], rank=1, world_size=4)
    (['b'], 1.0)
    >>> my_share(["a", "b", "c"], rank=3, world_size=4)
    (['a'], 0.0)
    """
    mine = window[rank::world_size]
    return (mine, 1.0) if mine else (window[:1], 0.0)


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM while training: finish the optimizer step, save a checkpoint, then stop.
    A second signal stops at once (nothing is lost: --resume goes on from the last checkpoint). With several
    processes, a signal to any one of them stops all of them, and each knows why."""

    def __init__(self, processes: Processes):
        self.processes, self.signal = processes, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        # os.write, not print: a handler that prints while the main thread prints raises "reentrant call"
        os.write(2, f"{self.signal}: finishing this optimizer step, then saving a checkpoint (again to stop "
                    f"at once)\n".encode())

    def requested(self) -> bool:
        """Whether to stop now; with several processes, all stop together (a collective: call it on all)."""
        if self.processes.world_size == 1:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)], device=self.processes.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if bool(flag.item()) and self.signal is None:  # the signal went to another process
            self.signal = "a signal to another process"
        return self.signal is not None


def interrupt(signum, frame):
    """SIGTERM outside training: as Ctrl-C, a message rather than a silent death."""
    raise KeyboardInterrupt


def embedding_precision(device, precision: str) -> str:
    """What a backbone really runs in: "16" or "bf16" autocast on CUDA; fp32 ("32") elsewhere."""
    if precision not in ("32", "16", "bf16"):
        raise ValueError(f"precision must be 32, 16 or bf16, not {precision!r}")
    return precision if torch.device(device).type == "cuda" else "32"


def autocast(device, precision: str):
    """The autocast context for --precision "16" (fp16), "bf16" or "32" (none) on `device`."""
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "16" else torch.bfloat16
    return torch.autocast(torch.device(device).type, dtype=dtype)


def items_that_fit(bytes_per_item: int, wanted: int, device, what: str, why: str, remedy: str) -> int:
    """How many items of this size to process at once: at most `wanted`, as many as half of the memory free
    on `device` holds (the rest is headroom). If not even one fits: a ValueError with the figures."""
    budget = free_memory(device) // 2
    if bytes_per_item > budget:
        raise ValueError(f"{what} needs about {bytes_per_item / 2**30:.1f} GiB ({why}), more than the "
                         f"{budget / 2**30:.1f} GiB this program allows itself on {device} (half of what is "
                         f"free); {remedy}")
    return max(1, min(wanted, budget // bytes_per_item))


def free_memory(device) -> int:
    """Bytes that `device` can still allocate: free GPU memory on CUDA; elsewhere the machine's available
    memory (MemAvailable), lowered to what a cgroup limit (a container) or an address-space limit (ulimit -v)
    leaves this process."""
    device = torch.device(device)
    if device.type == "cuda":  # PyTorch's cache of freed blocks counts as used for the driver, not for us
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    limits = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        limits.append(int(info["MemAvailable"].split()[0]) * 1024)
    with contextlib.suppress(OSError, ValueError, KeyError):
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g, \
                open("/sys/fs/cgroup/memory.stat") as h:
            stat = dict(line.split() for line in h)  # the page cache it could drop counts as free
            limits.append(int(f.read()) - int(g.read()) + int(stat["inactive_file"]))  # "max" fails int()
    with contextlib.suppress(OSError, ValueError, KeyError):
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                status = dict(line.split(":", 1) for line in f)
            limits.append(soft - int(status["VmSize"].split()[0]) * 1024)
    return max(0, min(limits)) if limits else 8 << 30  # nothing to read (macOS): assume 8 GiB
