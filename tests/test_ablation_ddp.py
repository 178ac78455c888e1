"""Two processes (gloo, CPU) train one step: same adapter gradients on both ranks, equal to
the single-process gradient on the full batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tensadapt.ablation import expand_grid, parse_spec
from tensadapt.ablation.distributed import current
from tensadapt.ablation.runner import execute_run

SPEC = {
    "tasks": [{"model": "tiny_vit", "dataset": "synthetic", "n_train": 24, "n_test": 10}],
    # a batch of 7 splits 4 + 3 over two ranks: the loss scaling must make it exact
    "recipe": {"epochs": 1, "batch_size": 7, "max_steps": 1, "lr": 0.01},
    "configs": [
        {
            "name": "cp-dqh",
            "rank": 3,
            "config": {
                "factorization": "cp",
                "modes": ["depth", "qkv", "heads"],
                "targets": ["q", "k", "v"],
            },
        }
    ],
}


def _run():
    return expand_grid(parse_spec(SPEC))[0]


def _grads(ctx=None):
    grads = {}

    def on_step(step, model):
        for name, p in model.named_parameters():
            if p.requires_grad and p.grad is not None:
                grads[name] = p.grad.detach().clone()

    record = execute_run(_run(), ctx, on_step=on_step)
    return grads, record


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads, record = _grads(current())
        torch.save({"grads": grads, "record": record}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gradients_equal_single_process(tmp_path):
    single, record = _grads()
    assert record["world_size"] == 1 and record["steps"] == 1
    assert any("tensor_adapters" in n for n in single) and any("head" in n for n in single)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    nonzero = [n for n, g in single.items() if "tensor_adapters" in n and g.abs().sum() > 0]
    assert nonzero  # the zero-initialised factor gets a real gradient at step 1
    for name, g in single.items():
        g0, g1 = ranks[0]["grads"][name], ranks[1]["grads"][name]
        assert torch.equal(g0, g1), name  # DDP leaves identical gradients on every rank
        torch.testing.assert_close(g0, g, rtol=1e-5, atol=1e-7, msg=name)
    assert set(ranks[0]["grads"]) == set(single)
    rec0, rec1 = ranks[0]["record"], ranks[1]["record"]
    assert rec0["world_size"] == 2 and rec0["n_test"] == record["n_test"] == 10
    # summed test counts: same accuracy on both ranks, same semantics as one process
    assert rec0["accuracy"] == rec1["accuracy"]
    assert rec0["params"] == record["params"]
