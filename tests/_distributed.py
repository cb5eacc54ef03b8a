"""Run a test body on two CPU ranks (gloo), the way ``torchrun --nproc_per_node 2`` would."""
import os
import socket
import sys
from collections.abc import Callable


def _rank_main(rank: int, body: Callable[[int, int, str], None], world: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    body(rank, world, out_dir)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter finalisation.  A gloo worker thread may still be dropping the last
    # reference to a finished collective's tensors; if that happens while Python shuts down it needs
    # the GIL, cannot get it, and the process aborts (SIGABRT) after every result was written.
    os._exit(0)


def run_ranks(body: Callable[[int, int, str], None], out_dir: str, world: int = 2) -> None:
    """``body(rank, world, out_dir)`` in ``world`` spawned processes; a failure in any rank raises here.

    ``body`` must be a module-level function (the children import it by name).  It writes its
    results under ``out_dir`` for the test to read after the join.
    """
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(body, world, port, out_dir), nprocs=world, join=True)
