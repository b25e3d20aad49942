"""Meta-training on several processes with torch.distributed: every rank samples its own tasks,
and every rank's p.grad is the mean meta-gradient over the tasks of all ranks.

    torchrun --nproc_per_node=2 examples/distributed_meta_training.py
    torchrun --nproc_per_node=4 examples/distributed_meta_training.py --estimator maml --steps 5

The script is the same on every rank — no rank-0 special case: each rank builds the same model
(same seed), the learner averages with one all-reduce per outer step, so the outer optimizers
take identical steps and the models stay identical. NCCL and one GPU per rank when CUDA is
available, gloo on CPU otherwise.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import lazymaml
from gradcheck import problems


def meta_train(args: argparse.Namespace, device: torch.device) -> None:
    """The training loop every rank runs; the learner lives only as long as this call."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same θ on every rank (the learner checks it)
    model = problems.mlp((40, 40)).to(device)
    learner = lazymaml.MetaLearner(
        model, args.steps, args.inner_lr, estimator=args.estimator, process_group=dist.group.WORLD
    )
    outer = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = torch.Generator().manual_seed(1000 + rank)  # each rank its own tasks
    for step in range(args.outer_steps + 1):
        outer.zero_grad()
        loss = learner.meta_backward(
            [problems.sinusoid(stream, device=device) for _ in range(args.tasks_per_rank)]
        )
        outer.step()
        if step % 25 == 0:
            total = world * args.tasks_per_rank
            print(
                f"rank {rank}/{world}  step {step:>4}  mean L_Q over all {total} tasks {loss:.4f}", flush=True
            )
    checksum = sum(p.double().sum() for p in model.parameters()).item()
    print(f"rank {rank}/{world}  done; Σθ = {checksum:.12f} (the same on every rank)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimator", default="lazy", choices=list(lazymaml.estimators.REGISTRY))
    parser.add_argument("--steps", type=int, default=20, help="inner steps K")
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--outer-steps", type=int, default=100)
    parser.add_argument("--tasks-per-rank", type=int, default=8)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    meta_train(args, device)
    # destroy the group once nothing refers to it (gloo on torch 2.13 can abort at exit when a
    # reference to a destroyed group outlives the interpreter's teardown)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
