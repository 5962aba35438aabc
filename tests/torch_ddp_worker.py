"""One rank of the DDP test (tests/test_torch_ddp.py): a small model of fastnn.torch ops trained with
fastnn.torch.AdamW under DistributedDataParallel (gloo, loopback). Run as
`python torch_ddp_worker.py RANK WORLD PORT OUT`; rank 0 saves the final parameters to OUT."""
import gc
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastnn
import fastnn.torch as ft

STEPS, BATCH = 6, 32


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(ft.Linear(12, 24, activation="relu"), ft.Linear(24, 5)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 12, dtype=torch.float64, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def train(model, x, t):
    """STEPS AdamW steps on the mean cross-entropy of (x, t); returns the model."""
    opt = ft.AdamW(model.parameters(), lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        ft.cross_entropy(model(x), t).backward()
        opt.step()
    return model


def main(rank, world, port, out):
    fastnn.set_num_threads(1)  # one core per rank (a real run gives each rank its own core group)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = build()
    x, t = data()
    shard = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    ddp = DistributedDataParallel(model)
    train(ddp, x[shard], t[shard])  # DDP averages the ranks' gradients: the full batch's mean gradient
    if rank == 0:
        torch.save(model.state_dict(), out)
    # Tear down before the interpreter does: a gloo worker thread still holding the reducer's last work could
    # otherwise ask for the GIL during finalization, be ended by Python, and abort the process (torch's
    # shutdown order, not a fastnn kernel).
    dist.barrier()
    del ddp
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
