"""Single-op timings of the native thin kernels against BLAS, per instruction set.

    .venv/bin/python benchmarks/thin_ops.py [--ranks 8 32 64] [--widths 384 1536]

For each rank R and width M, with N = 2080 tokens (DINOv2-S @112, batch 32) and two threads:
``uᵀ z`` (the B gradient ``hᵀ gy``), ``z P`` (``x Aᵀ``), both on one ``z`` (the fused
``gy B`` and ``hᵀ gy`` pass) and ``u P`` (the thin-to-wide ``b + h Bᵀ``), each by torch
(BLAS) and by the native kernels in every instruction set this CPU runs (AVX2, AVX-512).
Before every call a 64 MB buffer is written, so each operand comes from memory as an
activation saved in the forward does in the backward. Methods are interleaved call by call;
the table gives medians in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tensadapt import native

N_TOKENS = 2080


def _time(fns: dict[str, tuple[str | None, Callable[[], object]]], repeats: int) -> dict:
    flush = torch.empty(16 << 20)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, (isa, fn) in fns.items():
            if isa is not None:
                native.use_isa(isa)
            flush.fill_(1.0)
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


Ops = dict[str, dict[str, tuple[str | None, Callable[[], object]]]]


def _ops(u: torch.Tensor, z: torch.Tensor, p: torch.Tensor, pt: torch.Tensor, isas: list) -> Ops:
    """Each op by BLAS and by the native kernels in each set: ``{op: {method: (set, fn)}}``."""
    ops: Ops = {
        "reduce": {"blas": (None, lambda: u.t() @ z)},
        "rows": {"blas": (None, lambda: z @ p)},
        "both": {"blas": (None, lambda: (z @ p, u.t() @ z))},
        "expand": {"blas": (None, lambda: u @ pt)},
    }
    for isa in isas:
        ops["reduce"][isa] = (isa, lambda: native.cols_reduce(u, z))
        ops["rows"][isa] = (isa, lambda: native.rows_times(z, p))
        ops["both"][isa] = (isa, lambda: native.grad_pass(z, p, u))
        ops["expand"][isa] = (isa, lambda: native.rows_expand(u, pt))
    return ops


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--widths", type=int, nargs="+", default=[384, 1536])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit(f"native kernels unavailable: {native.status()}")
    start = native.isa()
    isas = [i for i in ("avx2", "avx512") if native.use_isa(i) == i]
    native.use_isa(start)
    print(f"# thin ops, {N_TOKENS} tokens, {args.threads} threads, ms (BLAS / {' / '.join(isas)})")
    print("\n| rank | width | `uᵀ z` | `z P` | `z P` and `uᵀ z` | `u P` |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    try:
        for r in args.ranks:
            for m in args.widths:
                u = torch.randn(N_TOKENS, r, generator=g)
                z = torch.randn(N_TOKENS, m, generator=g)
                p = torch.randn(m, r, generator=g)
                pt = torch.randn(r, m, generator=g)
                ops = _ops(u, z, p, pt, isas)
                cells = []
                for fns in ops.values():
                    t = _time(fns, args.repeats)
                    cells.append(" / ".join(f"{t[k]:.2f}" for k in fns))
                print(f"| {r} | {m} | " + " | ".join(cells) + " |", flush=True)
    finally:
        native.use_isa(start)


if __name__ == "__main__":
    main()
