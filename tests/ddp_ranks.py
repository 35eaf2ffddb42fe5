"""What a spawned rank of ``test_ddp`` runs: a module of its own, so that a child process
imports torch and ``learners.data_parallel`` only, not the test module's imports."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from detloop.learners.data_parallel import DataParallel


def broadcast_rank(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks: what ``from_main`` gives it for its own (stop, drops)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        got = DataParallel(rank, 2).from_main((rank == 0, 2 - 2 * rank))
        Path(out, f"rank{rank}.txt").write_text(repr(got))
    finally:
        dist.destroy_process_group()
