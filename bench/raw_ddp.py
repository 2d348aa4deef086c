"""B7's baseline: a hand-written PyTorch training loop, one process or DDP over gloo, on a project copy's data.

What the train stage does for one epoch, without Lightning, MLflow or checkpoints: the same net
(`build_model`, same seed), AdamW + OneCycleLR stepped per batch, each rank taking every `world`-th sample of a
seeded permutation (each sample once per epoch across ranks), `--batch` samples per rank and step, then
validation of each rank's share with the loss and accuracy sums all-reduced. It shows what DDP itself costs on
this machine, so B7 can tell the cost of DDP from the cost of cnnpipe. Writes rank 0's epoch times (training +
validation, seconds) to `--out` as JSON.

Run: python -m bench.raw_ddp --project DIR --world 2 --batch 64 --epochs 3 --out times.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time
from pathlib import Path


def train(rank: int, args: argparse.Namespace, port: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from cnnpipe.config import load_config
    from cnnpipe.data.store import load_meta, load_split
    from cnnpipe.models.factory import build_model, model_spec

    torch.set_num_threads(1)
    world = args.world
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config([], root=args.project)
    torch.manual_seed(cfg.seed)
    meta = load_meta(args.project / cfg.paths.prepared)
    train_split = load_split(args.project / cfg.paths.augmented / "train.npz")
    val_split = load_split(args.project / cfg.paths.prepared / "val.npz")
    net: torch.nn.Module = build_model(model_spec(cfg.model, meta))
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    images, labels = torch.from_numpy(train_split.images), torch.from_numpy(train_split.labels)
    val_images = torch.from_numpy(val_split.images[rank::world]).float().div_(255.0)
    val_labels = torch.from_numpy(val_split.labels[rank::world])
    n, bs = len(labels), args.batch
    steps = math.ceil(len(range(rank, n, world)) / bs)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.optim.lr, total_steps=args.epochs * steps)
    times = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        net.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))[rank::world]
        for first in range(0, len(order), bs):
            idx = order[first : first + bs]
            loss = F.cross_entropy(net(images[idx].float().div_(255.0)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.inference_mode():
            logits = net(val_images)
            sums = torch.stack(
                [F.cross_entropy(logits, val_labels, reduction="sum"), (logits.argmax(1) == val_labels).sum()]
            )
        if world > 1:
            dist.all_reduce(sums)
        times.append(time.perf_counter() - start)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        args.out.write_text(json.dumps({"epoch_s": times, "val_acc": float(sums[1]) / len(val_split.labels)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a project copy that ran prepare and augment")
    parser.add_argument("--world", type=int, default=1, help="processes (DDP over gloo when > 1)")
    parser.add_argument("--batch", type=int, required=True, help="samples per rank and step")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.world == 1:
        train(0, args, 0)
        return
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(train, args=(args, port), nprocs=args.world)


if __name__ == "__main__":
    main()
