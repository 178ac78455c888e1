"""Independent references for tests: dense tensors via tensorly and the documented layout rules.

Nothing here calls tensadapt's own reconstruction or coordinate code.
"""

from __future__ import annotations

import numpy as np
import tensorly as tl
import torch
from tensorly.cp_tensor import cp_to_tensor
from tensorly.tt_tensor import tt_to_tensor
from tensorly.tucker_tensor import tucker_to_tensor

ROLE_ORDER = ["q", "k", "v", "o", "fc1", "fc2", "gate", "up", "down"]

tl.set_backend("numpy")


def dense_oracle(tensor) -> torch.Tensor:
    """Dense tensor of a tensadapt FactorizedTensor computed by tensorly from its raw terms."""
    name = type(tensor).name
    get = lambda n: getattr(tensor, n).detach().double().numpy()  # noqa: E731
    axes = tensor.axes
    if name == "lora":
        out = get("lora_B") @ get("lora_A")  # (out, in)
        dense = out.T if list(axes) == ["in", "out"] else out
    elif name == "cp":
        factors = [get(f"factor_{a}") for a in axes]
        weights = (
            get("weights")
            if "weights" in dict(tensor.named_buffers()) | dict(tensor.named_parameters())
            else np.ones(factors[0].shape[1])
        )
        dense = cp_to_tensor((weights, factors))
    elif name == "tucker":
        dense = tucker_to_tensor((get("core"), [get(f"factor_{a}") for a in axes]))
    elif name == "tt":
        dense = tt_to_tensor([get(f"core_{a}") for a in axes])
    else:
        raise ValueError(name)
    return torch.from_numpy(np.asarray(dense))


def structural_coords(modes, target_layer, role, slice_index, group_roles, roles_slices):
    """Coordinates by the documented rules (depth=layer, qkv=rank of role, fused = enumeration)."""
    present = [r for r in ROLE_ORDER if r in group_roles]
    coords = {}
    for m in modes:
        parts = m.split("*")
        if parts == ["heads"] or m in ("in", "out"):
            continue
        if len(parts) == 1:
            coords[m] = {
                "depth": target_layer,
                "qkv": present.index(role) if role in present else None,
                "slices": slice_index,
            }[m]
            continue
        # fused: enumerate occurring combinations in lexicographic (layer, role, slice) order
        combos = []
        for layer in range(roles_slices["layers"]):
            for r in present:
                for s in range(roles_slices[r]):
                    key = tuple(
                        {"depth": layer, "qkv": ROLE_ORDER.index(r), "slices": s}[p] for p in parts
                    )
                    if key not in combos:
                        combos.append(key)
        combos.sort()
        key = tuple(
            {"depth": target_layer, "qkv": ROLE_ORDER.index(role), "slices": slice_index}[p]
            for p in parts
        )
        coords[m] = combos.index(key)
    return coords


def feature_block(T: torch.Tensor, axes, coords, role, heads_mode, transposed=False):
    """Index ``T`` at ``coords`` and lay the rest out as an ``(out, in)`` block."""
    index = []
    rest = []
    for a in axes:
        if a in coords:
            index.append(coords[a])
        else:
            index.append(slice(None))
            rest.append(a)
    block = T[tuple(index)]
    out_ax, in_ax = ("in", "out") if transposed else ("out", "in")
    if heads_mode and role in ("q", "k", "v"):
        order = ["heads", out_ax, in_ax]
        b = block.permute(*[rest.index(a) for a in order])
        return b.reshape(b.shape[0] * b.shape[1], b.shape[2])
    if heads_mode and role == "o":
        order = [out_ax, "heads", in_ax]
        b = block.permute(*[rest.index(a) for a in order])
        return b.reshape(b.shape[0], b.shape[1] * b.shape[2])
    return block.permute(rest.index(out_ax), rest.index(in_ax))


def instance_name(modes, layer, role):
    """The documented instance naming: g0, plus _l<layer> without depth, _<role> without qkv."""
    covered = {p for m in modes for p in m.split("*")}
    name = "g0"
    if "depth" not in covered:
        name += f"_l{layer}"
    if "qkv" not in covered:
        name += f"_{role}"
    return name


def expected_target_delta(am, cfg, row, dim, layers, mlp_ratio=4):
    """ΔW of one (module, role) by the documented layout rules, from tensorly's dense T."""
    modes = cfg.modes
    tensor = am.tensor_adapters[instance_name(modes, row.layer, row.role)]
    T = dense_oracle(tensor)
    out_f, in_f = row.shape
    sliced = any("slices" in m.split("*") for m in modes)
    n_out, n_in = (out_f // dim, in_f // dim) if sliced else (1, 1)
    transposed = cfg.orientation == "residual" and row.role == "fc2"
    counts = {"q": 1, "k": 1, "v": 1, "o": 1, "fc1": mlp_ratio, "fc2": mlp_ratio, "layers": layers}
    blocks = []
    for po in range(n_out):
        line = []
        for pi in range(n_in):
            coords = structural_coords(
                modes, row.layer, row.role, po * n_in + pi, cfg.targets, counts
            )
            line.append(
                feature_block(T, tensor.axes, coords, row.role, "heads" in modes, transposed)
            )
        blocks.append(torch.cat(line, dim=1))
    return torch.cat(blocks, dim=0)
