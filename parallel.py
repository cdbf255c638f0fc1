"""
What changes when torchrun starts W processes (one per device, each with its RANK and LOCAL_RANK),
and stopping at a safe point on Ctrl-C or SIGTERM. Every process runs all of tsalign.py and holds
all the models (under --fsdp a shard of the policy and the student). Blocks of work go to the
processes in turn, and every result to all (`spread`, called by roles.py); in training each takes
its share of every batch and the same step (train_loop.train). In one process: a loop, or nothing.
"""
import math
import os
import signal
import threading
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

# ---- The process group ---------------------------------------------------------------------------

solo = False  # True while rank 0 works alone (`alone`): it then sees a single process


def rank():
    return dist.get_rank() if dist.is_initialized() and not solo else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() and not solo else 1


def is_main():
    """Only rank 0 prints, shows progress bars and writes files."""
    return rank() == 0


def init_distributed(device, always=False):
    """Join torchrun's process group if it started several processes (with always, even one, as
    FSDP2 needs); the device this process uses (cuda:LOCAL_RANK on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and not (always and "LOCAL_RANK" in os.environ):
        return device
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def broadcast(obj):
    """Rank 0's obj, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish():
    if dist.is_initialized():
        dist.destroy_process_group()


def sum_over_ranks(values, device):
    """Each of a list of floats summed over the ranks (a collective: every rank must call it)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def alone(fn, *args):
    """fn(*args) on rank 0 alone (building the default world) while the others wait: it sees one
    process, so its training loop and spread call no collective the others would have to join."""
    global solo
    if is_main():
        solo = True
        try:
            fn(*args)
        finally:
            solo = False
    if dist.is_initialized():
        dist.barrier()


# ---- FSDP2: the policy and the student sharded across the processes (--fsdp) ---------------------

def shard(model):
    """--fsdp: FSDP2's fully_shard on each block, then the rest: each process keeps 1/W of every
    weight, gradient and AdamW state (weights gathered per block); training equals one process's."""
    from torch.distributed.fsdp import fully_shard
    stack = model.encoder if model.config.encoder else model.decoder  # encoder.py's too
    for block in stack.blocks:
        fully_shard(block)
    return fully_shard(model)


def place(model, fsdp):
    """A model that trains, as the run holds it: sharded under --fsdp (the teacher and any judge
    stay whole on every process: they only score, and may do unequal work per process)."""
    return shard(model) if fsdp else model


def sharded(model):
    return any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2's are DTensors


@contextmanager
def gathered(*models):
    """The sharded models' full weights on every process while the block runs: their forwards then
    call no collective (inference may do unequal work per process) and sampling gathers once."""
    from torch.distributed.fsdp import FSDPModule
    units = [(u, u is m) for m in models if sharded(m)
             for u in m.modules() if isinstance(u, FSDPModule)]
    for u, _ in units:  # every process calls this at the same point: the gathers are collectives
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield
    finally:
        for u, root in units:
            u.reshard()
            u.set_reshard_after_forward(not root, recurse=False)  # FSDP2's defaults: the root keeps


# ---- Sharing work out --------------------------------------------------------------------------

def spread(fn, *columns, block=64, desc=None):
    """fn over blocks of `block` items of the columns (lists of n), one result per item: process r
    of W runs blocks r, r+W, ... and every process gets all n results in order (as pickles: keep
    them small, on the CPU). In one process a loop. desc: a progress bar."""
    starts = range(0, len(columns[0]), block)
    ours = [s for j, s in enumerate(starts) if j % world_size() == rank()]
    bar = tqdm(total=len(ours), desc=desc, disable=desc is None or not is_main(), leave=False,
               dynamic_ncols=True)
    done = {}
    for j in range(math.ceil(len(starts) / world_size())):  # as many turns on every process
        safe_point()
        if j < len(ours):
            done[ours[j]] = fn(*(c[ours[j]:ours[j] + block] for c in columns))
            bar.update()
    bar.close()
    if world_size() > 1:
        parts = [None] * world_size()
        dist.all_gather_object(parts, done)
        done = {s: out for part in parts for s, out in part.items()}
    return [x for s in starts for x in done[s]]


# ---- Stopping at a safe point: Ctrl-C and SIGTERM ----------------------------------------------
# The signal handler only records the signal; the run stops at the next safe point: every training
# micro-batch and every block of spread's work. So an interrupt is never lost (Python drops one
# raised inside a finalizer, a progress bar's), and every process stops at the same point.

stop_signal = None  # signal.SIGINT or signal.SIGTERM, once one arrived


class Stopped(BaseException):
    """A Ctrl-C or SIGTERM acted on; a BaseException, so that no `except Exception` takes it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def stop_votes():  # this process's [Ctrl-C, SIGTERM], to be summed over the ranks
    return [float(stop_signal == signal.SIGINT), float(stop_signal == signal.SIGTERM)]


def stop_if(votes):
    """Raise Stopped if any process got a signal: its own, or else SIGTERM over Ctrl-C."""
    if votes[0] or votes[1]:
        raise Stopped(stop_signal or (signal.SIGTERM if votes[1] else signal.SIGINT))


def safe_point():
    """Stop here if any process got a signal (a collective: every process must call it)."""
    on_gpu = dist.is_initialized() and dist.get_backend() == "nccl"  # nccl reduces GPU tensors only
    stop_if(sum_over_ranks(stop_votes(), "cuda" if on_gpu else "cpu"))


@contextmanager
def stop_on_signals():
    """While the block runs, Ctrl-C and SIGTERM are recorded, and the run stops at its next safe
    point. A second one a second later raises Stopped at once; sooner, it is the first delivered
    again (a terminal sends Ctrl-C to every process, and torchrun passes it on too)."""
    global stop_signal
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield
        return
    first = []

    def record(signum, frame):
        global stop_signal
        if stop_signal is None:
            stop_signal = signum
            first.append(time.monotonic())
        elif time.monotonic() - first[0] > 1:
            raise Stopped(signum)

    stop_signal = None
    before = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        stop_signal = None
