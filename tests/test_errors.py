"""The error catalogue (docs/errors.md): one row per misuse, each raised before the model changes.

Every row: the exception type, words the message must contain (the bad value and what would
be valid), and a check that the model's state dict and module tree are unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from families import make

import tensadapt as ta
from tensadapt.errors import (
    AdapterStateError,
    CheckpointError,
    ConfigError,
    ModeError,
    TargetResolutionError,
    UnknownNameError,
)


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
    )


def unchanged(model, snap):
    state, tree = snap
    now = model.state_dict()
    return (
        [(n, type(m).__name__) for n, m in model.named_modules()] == tree
        and now.keys() == state.keys()
        and all(torch.equal(now[k], state[k]) for k in now)
    )


def _vit():
    return tiny_vit(dim=16, heads=2)


def _saved_bert(tmp: Path) -> Path:
    model = make("hf_bert")[0]
    am = ta.get_adapter_model(
        model,
        ta.TensorAdapterConfig(factorization="cp", modes=["qkv"], targets=["q", "k", "v"], rank=2),
    )
    am.save_pretrained(tmp / "a")
    return tmp / "a"


def _adapted_merged():
    am = ta.get_adapter_model(_vit(), ta.TensorAdapterConfig())
    am.merge_adapter()
    return am.base_model, am


# id: (model factory, action(model, tmp) , exception, message words)
CATALOGUE = {
    "unknown-factorization": (
        _vit,
        lambda m, t: ta.get_adapter_model(m, {"factorization": "cpd"}),
        UnknownNameError,
        ["'cpd'", "cp, lora, tt, tucker"],
    ),
    "unknown-mode": (
        _vit,
        lambda m, t: ta.get_adapter_model(m, {"factorization": "cp", "modes": ["layers"]}),
        UnknownNameError,
        ["'layers'", "depth"],
    ),
    "bad-rank": (
        _vit,
        lambda m, t: ta.get_adapter_model(m, {"rank": 0}),
        ConfigError,
        ["rank", "positive int", "0"],
    ),
    "rank-for-absent-mode": (
        _vit,
        lambda m, t: ta.get_adapter_model(
            m,
            {
                "factorization": "tucker",
                "modes": ["qkv"],
                "rank": {"qkv": 2, "in": 2, "out": 2, "depth": 2},
            },
        ),
        ConfigError,
        ["['depth']", "does not have"],
    ),
    "lora-with-modes": (
        _vit,
        lambda m, t: ta.get_adapter_model(m, {"factorization": "lora", "modes": ["qkv"]}),
        ConfigError,
        ["per-layer", "'qkv'"],
    ),
    "targets-match-nothing": (
        _vit,
        lambda m, t: ta.get_adapter_model(m, ta.TensorAdapterConfig(targets=["gate"])),
        TargetResolutionError,
        ["['gate']", "match nothing", "q, k, v, o, fc1, fc2"],
    ),
    "unknown-architecture": (
        lambda: torch.nn.Sequential(torch.nn.Linear(4, 4)),
        lambda m, t: ta.get_adapter_model(m, ta.TensorAdapterConfig()),
        TargetResolutionError,
        ["target_modules", "num_heads"],
    ),
    "heads-do-not-divide": (
        lambda: tiny_vit(dim=18, heads=3),
        lambda m, t: ta.get_adapter_model(
            m,
            ta.TensorAdapterConfig(factorization="cp", modes=["heads"], targets=["q"], num_heads=4),
        ),
        ModeError,
        ["heads=4", "attention width 18", "valid head counts are 1, 2, 3, 6, 9, 18"],
    ),
    "heads-on-mlp": (
        _vit,
        lambda m, t: ta.get_adapter_model(
            m, ta.TensorAdapterConfig(factorization="cp", modes=["heads"], targets=["fc1"])
        ),
        ModeError,
        ["'heads'", "attention roles", "'fc1'"],
    ),
    "gqa-qkv-stacking": (
        lambda: make("hf_llama_gqa")[0],
        lambda m, t: ta.get_adapter_model(
            m, ta.TensorAdapterConfig(factorization="cp", modes=["qkv"], targets=["q", "k", "v"])
        ),
        ModeError,
        ["shapes differ", "grouped-query"],
    ),
    "non-square-without-slices": (
        _vit,
        lambda m, t: ta.get_adapter_model(
            m, ta.TensorAdapterConfig(factorization="cp", modes=["qkv"], targets=["q", "fc1"])
        ),
        ModeError,
        ["shapes differ", "'slices'"],
    ),
    "modules-to-save-missing": (
        _vit,
        lambda m, t: ta.get_adapter_model(
            m, ta.TensorAdapterConfig(modules_to_save=["classifier"])
        ),
        ConfigError,
        ["['classifier']", "head"],
    ),
    "adapt-twice": (
        lambda: ta.get_adapter_model(_vit(), ta.TensorAdapterConfig()).base_model,
        lambda m, t: ta.get_adapter_model(m, ta.TensorAdapterConfig()),
        AdapterStateError,
        ["already holds tensor adapters", "merge_and_unload"],
    ),
    "merge-twice": (lambda: _adapted_merged()[0], None, AdapterStateError, ["already merged"]),
    "unmerge-unmerged": (lambda: _vit(), None, AdapterStateError, ["not merged"]),
    "load-other-architecture": (
        _vit,
        lambda m, t: ta.TensorAdapterModel.from_pretrained(m, _saved_bert(t)),
        CheckpointError,
        ["BertForSequenceClassification", "Load it into"],
    ),
    "load-missing-files": (
        _vit,
        lambda m, t: ta.TensorAdapterModel.from_pretrained(m, t / "nowhere"),
        CheckpointError,
        ["adapter_config.json", "does not exist"],
    ),
    "load-truncated": (
        lambda: make("hf_bert")[0],
        "truncate",
        CheckpointError,
        ["adapter_model.safetensors", "truncated or corrupted", "save the adapter again"],
    ),
    "load-corrupted": (
        lambda: make("hf_bert")[0],
        "corrupt",
        CheckpointError,
        ["adapter_model.safetensors", "checksum", "corrupted", "save the adapter again"],
    ),
    "load-newer-format": (
        lambda: make("hf_bert")[0],
        "newer",
        CheckpointError,
        ["format_version 99", "upgrade"],
    ),
    "load-shape-mismatch": (
        lambda: make("hf_bert")[0],
        "shape",
        CheckpointError,
        # the tensor, its shape in the file (rank 2) and the shape the config needs (rank 3)
        ["wrong shape", "('tensor_adapters.g0_l0.factor_in', (32, 2), (32, 3))"],
    ),
}


def _file_action(kind):
    def act(model, tmp):
        path = _saved_bert(tmp)
        if kind == "truncate":
            w = path / "adapter_model.safetensors"
            w.write_bytes(w.read_bytes()[:40])
        elif kind == "corrupt":  # one data byte flipped: same length, the header still parses
            w = path / "adapter_model.safetensors"
            data = bytearray(w.read_bytes())
            data[-3] ^= 0xFF
            w.write_bytes(bytes(data))
        elif kind == "newer":
            c = path / "adapter_config.json"
            c.write_text(json.dumps(json.loads(c.read_text()) | {"format_version": 99}))
        else:
            c = path / "adapter_config.json"
            meta = json.loads(c.read_text())
            meta["config"]["rank"] = 3
            c.write_text(json.dumps(meta))
        return ta.TensorAdapterModel.from_pretrained(model, path)

    return act


@pytest.mark.parametrize("row", sorted(CATALOGUE))
def test_error_catalogue(row, tmp_path):
    factory, action, exc, words = CATALOGUE[row]
    if row == "merge-twice":
        model, am = _adapted_merged()
        action = lambda m, t: am.merge_adapter()  # noqa: E731
    elif row == "unmerge-unmerged":
        am = ta.get_adapter_model(_vit(), ta.TensorAdapterConfig())
        model = am.base_model
        action = lambda m, t: am.unmerge_adapter()  # noqa: E731
    else:
        model = factory()
        if isinstance(action, str):
            action = _file_action(action)
    snap = snapshot(model)
    with pytest.raises(exc) as err:
        action(model, tmp_path)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert unchanged(model, snap)


def test_catalogue_is_documented():
    doc = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.M))
    assert documented == set(CATALOGUE)


def test_heads_not_dividing_names_the_valid_head_counts():
    model = tiny_vit(dim=18, heads=3)
    snap = snapshot(model)
    cfg = ta.TensorAdapterConfig(factorization="cp", modes=["heads"], targets=["q"], num_heads=4)
    with pytest.raises(ModeError) as err:
        ta.get_adapter_model(model, cfg)
    assert unchanged(model, snap)
    valid = [h for h in range(1, 19) if 18 % h == 0]  # the divisors of the width
    assert ", ".join(map(str, valid)) in str(err.value), str(err.value)
