"""CPU data-parallel training with synchronized batch norm (gloo), the launch in the README:

    torchrun --standalone --nproc-per-node 2 examples/torch_ddp_syncbn.py [--steps 5] [--batch 32]

Each rank trains the 32x32 ResNet-18 of :mod:`numbabn.torch.resnet` on its slice of
a random global batch under DistributedDataParallel, with every batch norm turned
into numbabn's SyncBatchNorm (and the Sequential ReLUs fused into them). Rank 0
prints the loss per step; at the end every rank checks that its running statistics
are bit-identical to rank 0's.
"""

import argparse

import torch
import torch.distributed as dist

from numbabn.torch import convert_batchnorm
from numbabn.torch.resnet import resnet18


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="global batch, split over the ranks")
    args = parser.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = torch.nn.parallel.DistributedDataParallel(convert_batchnorm(resnet18(), sync=True, fuse_relu=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    mine = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step)
        x, labels = torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[mine]), labels[mine])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss on rank 0's slice {loss.item():.4f}", flush=True)
    stats = torch.cat([b.flatten().double() for n, b in model.module.named_buffers() if "running" in n])
    parts = [torch.empty_like(stats) for _ in range(world)]
    dist.all_gather(parts, stats)
    same = all(torch.equal(p, parts[0]) for p in parts)
    print(f"rank {rank}: running statistics {'identical to' if same else 'DIFFERENT from'} rank 0's", flush=True)
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
