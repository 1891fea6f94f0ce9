"""Train a small CNN with normlab's SyncBatchNorm under DistributedDataParallel.

    torchrun --nproc_per_node 2 examples/ddp_syncbn.py --epochs 3

Each process trains on its half of every global batch of sklearn's bundled 8x8 digits; the
BatchNorm statistics are those of the global batch (gloo on CPU, nccl on GPUs), so the run
computes what one process would on the whole batch. Rank 0 prints the validation accuracy.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from normlab.nn.sync import SyncBatchNorm


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
        nn.Flatten(), nn.Linear(128, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (init_method "env://").
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, val = order[:1500], order[1500:]

    torch.manual_seed(0)  # the same initial weights on every rank (DDP broadcasts rank 0's too)
    model = SyncBatchNorm.convert_sync_batchnorm(make_model()).to(device)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    per_rank = args.batch_size // world
    for epoch in range(args.epochs):
        ddp.train()
        # Every rank draws the same permutation and takes its slice of each global batch, so
        # all ranks run the same number of steps (each step runs collectives on every rank).
        perm = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch))]
        total = 0.0
        for start in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            idx = perm[start + rank * per_rank: start + (rank + 1) * per_rank]
            x, y = images[idx].to(device), labels[idx].to(device)
            loss = F.cross_entropy(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()  # SyncBatchNorm all-reduces its input-gradient sums, DDP the grads
            optimizer.step()
            total += loss.item()
        if rank == 0:
            # Eval mode runs no collective: rank 0 alone can evaluate the unwrapped model.
            model.eval()
            with torch.no_grad():
                pred = model(images[val].to(device)).argmax(1).cpu()
            accuracy = (pred == labels[val]).float().mean().item()
            steps = len(perm) // args.batch_size
            print(f"epoch {epoch + 1}/{args.epochs}: train loss {total / steps:.3f}, "
                  f"validation accuracy {accuracy:.3f}", flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
