"""DistributedDataParallel (gloo, 2 processes on CPU; NCCL, 2 processes on 2 GPUs where there are
two): the penalty's gradients equal the single-process ones on the whole batch."""
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import jacext

WORLD = 2
LAM = 0.1


def make_problem(device="cpu"):
    torch.manual_seed(0)
    model = jacext.MLP([6, 16, 16, 4], activation="tanh").double()
    x = torch.randn(12, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (12,))
    return model.to(device), x.to(device), y.to(device)


def penalized_loss(penalized, x, y):
    logits, sq = penalized(x)
    return F.cross_entropy(logits, y) + LAM * sq.mean()


def ddp_step(rank, out, backend):
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    model, x, y = make_problem(device)
    ddp = DistributedDataParallel(jacext.JacobianFrobenius(model), device_ids=[rank] if backend == "nccl" else None)
    local = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
    penalized_loss(ddp, x[local], y[local]).backward()  # DDP averages the ranks' gradients
    if rank == 0:
        torch.save([p.grad.cpu() for p in model.parameters()], out)


def worker(rank, store, out, backend):
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        # the DDP wrapper (its reducer) is gone when ddp_step returns: destroyed after the process
        # group, it could wait forever for a rank that had already exited
        ddp_step(rank, out, backend)
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


TWO_GPUS = torch.cuda.device_count() >= 2 and dist.is_nccl_available()


# A run that has not finished in this many seconds is stopped and started once more, in a new store,
# so that a stuck run fails the test (twice) instead of hanging the suite.
SPAWN_TIMEOUT_S = 120


def run_ranks(tmp_path, out, backend):
    for attempt in range(2):
        store = tmp_path / f"store{attempt}"
        context = mp.start_processes(worker, args=(str(store), str(out), backend), nprocs=WORLD, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                break
        else:
            return
    pytest.fail(f"the {WORLD} ranks did not finish in {SPAWN_TIMEOUT_S} s, twice")


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    not TWO_GPUS, reason="NCCL needs two visible GPUs"))])
def test_ddp_gradients_equal_single_process(tmp_path, backend):
    out = tmp_path / "grads.pt"
    run_ranks(tmp_path, out, backend)
    model, x, y = make_problem("cuda:0" if backend == "nccl" else "cpu")
    penalized_loss(jacext.JacobianFrobenius(model), x, y).backward()
    distributed = torch.load(out)
    assert len(distributed) == len(list(model.parameters()))
    for g_ddp, p in zip(distributed, model.parameters()):
        torch.testing.assert_close(g_ddp, p.grad.cpu(), rtol=1e-10, atol=1e-12)
