"""Run under mpirun: exercise a backend's collectives and its gradient averaging, and write what each
rank saw to OUT/rank-R.pt so the test can compare against a single-process computation."""

import sys

import torch

from hpcgan.parallel import make_backend

backend_name, out = sys.argv[1], sys.argv[2]
backend = make_backend(backend_name, device="cpu")
rank, world = backend.rank, backend.world_size


def model_and_batch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    x = torch.linspace(-1, 1, 8 * 6).reshape(8, 6)
    y = torch.cos(torch.arange(8.0)).reshape(8, 1)
    return model, x, y


model, x, y = model_and_batch()
optimizer = backend.distributed_optimizer(
    torch.optim.Adam(model.parameters(), lr=0.1, weight_decay=1e-3), model, prefix="m"
)
backend.broadcast_module(model)
per_rank = x.shape[0] // world
for _ in range(3):  # each rank sees its part of the global batch of 8
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
    backend.step(optimizer)

result = {
    "world": world,
    "params": {k: v.clone() for k, v in model.state_dict().items()},
    "mean": backend.allreduce_(torch.tensor([float(rank + 1), 10.0 * rank]), "mean"),
    "sum": backend.allreduce_(torch.tensor([float(rank + 1)]), "sum"),
    "max": backend.allreduce_(torch.tensor([float(rank)]), "max"),
    "gathered": backend.allgather(torch.full((2,), float(rank))),
    "object": backend.broadcast_object({"from": rank, "t": torch.arange(3) * (rank + 1)} if rank == 0 else None),
    "all_objects": backend.gather_object({"rank": rank, "text": "x" * (rank + 1)}),
    "metrics": backend.mean_metrics({"loss": float(rank)}),
}
torch.save(result, f"{out}/rank-{rank}.pt")
backend.shutdown()
