"""Checkpoint files: atomic saves under a crash that leaves partial bytes, corrupted weights
(same length, bytes flipped in the header or the data), and configs that disagree with the
weights. Every failure is a ``CheckpointError`` naming what is wrong, raised before the model
changes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from conftest import tiny_vit
from families import make
from safetensors.torch import load_file, save_file

import tensadapt as ta
import tensadapt.checkpoint as ckpt
from tensadapt.errors import CheckpointError, TensadaptError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
    )


def assert_unchanged(model, snap):
    state, tree = snap
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == tree
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


def adapted_bert(seed=0):
    """BERT with a random (non-zero) CP adapter on q, k, v; returns (model, inputs, out_of)."""
    model, inputs, out_of = make("hf_bert")
    am = ta.get_adapter_model(
        model,
        ta.TensorAdapterConfig(factorization="cp", modes=["qkv"], targets=["q", "k", "v"], rank=2),
    )
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_(0, 0.5)
    return am, inputs, out_of


def outputs_of_loaded(directory, inputs, out_of):
    loaded = ta.TensorAdapterModel.from_pretrained(make("hf_bert")[0], directory)
    with torch.no_grad():
        return out_of(loaded(**inputs)), loaded


@pytest.fixture
def previous(tmp_path):
    """A saved checkpoint, its outputs, and the same model changed afterwards (unsaved)."""
    am, inputs, out_of = adapted_bert()
    with torch.no_grad():
        want = out_of(am(**inputs))
    directory = tmp_path / "ckpt"
    am.save_pretrained(directory)
    before = {n: (directory / n).read_bytes() for n in (CONFIG, WEIGHTS)}
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.add_(1.0)
        assert not torch.allclose(out_of(am(**inputs)), want)
    return am, inputs, out_of, directory, want, before


def partial_writer(written):
    """A ``save_file`` that writes the first half of the real bytes to the path it is given,
    then fails (a crash or a full disk mid-write)."""
    from safetensors.torch import save

    def writer(tensors, filename, metadata=None):
        data = save(tensors, metadata=metadata)
        with open(filename, "wb") as fh:
            fh.write(data[: len(data) // 2])
        written.append(str(filename))
        raise OSError("No space left on device (simulated mid-write)")

    return writer


def test_crash_with_partial_bytes_keeps_previous_checkpoint(previous, monkeypatch):
    am, inputs, out_of, directory, want, before = previous
    written = []
    monkeypatch.setattr(ckpt, "save_file", partial_writer(written))
    with pytest.raises(OSError, match="simulated mid-write"):
        am.save_pretrained(directory)
    assert written, "the fake writer was not called"
    # the partial bytes went to a temporary file, which is gone; the old files are intact
    assert sorted(os.listdir(directory)) == [CONFIG, WEIGHTS]
    assert all(not os.path.exists(p) for p in written)
    assert {n: (directory / n).read_bytes() for n in (CONFIG, WEIGHTS)} == before
    monkeypatch.undo()
    got, _ = outputs_of_loaded(directory, inputs, out_of)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_crash_while_writing_config_keeps_previous_checkpoint(previous, monkeypatch):
    """The weights are fully written, then the config write fails: neither file changes."""
    am, inputs, out_of, directory, want, before = previous

    def failing_fsync(fd):
        raise OSError("I/O error (simulated while writing the config)")

    monkeypatch.setattr(ckpt.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated while writing the config"):
        am.save_pretrained(directory)
    monkeypatch.undo()
    assert sorted(os.listdir(directory)) == [CONFIG, WEIGHTS]
    assert {n: (directory / n).read_bytes() for n in (CONFIG, WEIGHTS)} == before
    got, _ = outputs_of_loaded(directory, inputs, out_of)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_crash_on_first_save_leaves_nothing(tmp_path, monkeypatch):
    am, *_ = adapted_bert()
    monkeypatch.setattr(ckpt, "save_file", partial_writer([]))
    with pytest.raises(OSError):
        am.save_pretrained(tmp_path / "new")
    monkeypatch.undo()
    assert os.listdir(tmp_path / "new") == []
    with pytest.raises(CheckpointError, match="does not exist"):
        ta.TensorAdapterModel.from_pretrained(make("hf_bert")[0], tmp_path / "new")


def test_successful_save_replaces_and_cleans_up(previous):
    am, inputs, out_of, directory, _, before = previous
    am.save_pretrained(directory)
    assert sorted(os.listdir(directory)) == [CONFIG, WEIGHTS]
    assert (directory / WEIGHTS).read_bytes() != before[WEIGHTS]
    with torch.no_grad():
        want = out_of(am(**inputs))
    got, _ = outputs_of_loaded(directory, inputs, out_of)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- corrupted files
def _header_span(data: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return 8, 8 + n


def _flip(data: bytes, position: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 0xFF
    return bytes(out)


def _edit_header(data: bytes, old: str, new: str) -> bytes:
    """Replace text in the JSON header by text of the same length (file length unchanged)."""
    start, end = _header_span(data)
    header = data[start:end].decode()
    assert len(old) == len(new) and old in header
    return data[:start] + header.replace(old, new, 1).encode() + data[end:]


CORRUPTIONS = {
    "header-byte-flipped": lambda d: _flip(d, (sum(_header_span(d))) // 2),
    "header-length-flipped": lambda d: _flip(d, 3),
    "header-dtype-edited": lambda d: _edit_header(d, '"F32"', '"I32"'),
    "header-shape-edited": lambda d: _edit_header(d, '"shape":[3]', '"shape":[4]'),
    "header-name-edited": lambda d: _edit_header(d, "classifier.bias", "classifier.bia$"),
    "data-byte-flipped": lambda d: _flip(d, (_header_span(d)[1] + len(d)) // 2),
    "data-last-byte-flipped": lambda d: _flip(d, len(d) - 1),
    "truncated": lambda d: d[: len(d) - 7],
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupted_weights_raise_checkpoint_error(kind, tmp_path):
    am, *_ = adapted_bert()
    am.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS
    data = weights.read_bytes()
    broken = CORRUPTIONS[kind](data)
    assert broken != data
    assert len(broken) == len(data) or kind == "truncated"
    weights.write_bytes(broken)
    model = make("hf_bert")[0]
    snap = snapshot(model)
    with pytest.raises(CheckpointError) as err:
        ta.TensorAdapterModel.from_pretrained(model, tmp_path / "a")
    assert isinstance(err.value, (TensadaptError, ValueError))
    message = str(err.value)
    for words in (str(weights), "truncated or corrupted", "save the adapter again"):
        assert words in message, message
    assert_unchanged(model, snap)


def test_checksum_is_written_and_legacy_files_still_load(tmp_path):
    """Files written before the checksum existed (plain safetensors) load unchanged."""
    am, inputs, out_of = adapted_bert()
    with torch.no_grad():
        want = out_of(am(**inputs))
    am.save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / WEIGHTS
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        assert len(fh.metadata()[ckpt.CHECKSUM_KEY]) == 64
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})
    got, _ = outputs_of_loaded(tmp_path / "a", inputs, out_of)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ------------------------------------------------------- config disagreeing with the weights
def _rewrite_config(directory, **changes):
    path = directory / CONFIG
    meta = json.loads(path.read_text())
    meta["config"].update(changes)
    path.write_text(json.dumps(meta))


def test_config_rank_disagreeing_with_weights(tmp_path):
    am, *_ = adapted_bert()
    am.save_pretrained(tmp_path / "a")
    _rewrite_config(tmp_path / "a", rank=3)
    model = make("hf_bert")[0]
    snap = snapshot(model)
    with pytest.raises(CheckpointError) as err:
        ta.TensorAdapterModel.from_pretrained(model, tmp_path / "a")
    message = str(err.value)
    assert "do not match the config" in message and "wrong shape" in message
    # per tensor: its name, the shape in the file (rank 2) and the one the config needs (rank 3)
    # CP on BERT (d=32) with modes ["qkv"]: factor_in / factor_out (32, R), factor_qkv (3, R)
    assert "('tensor_adapters.g0_l0.factor_in', (32, 2), (32, 3))" in message, message
    assert "('tensor_adapters.g0_l0.factor_qkv', (3, 2), (3, 3))" in message, message
    assert_unchanged(model, snap)


def test_config_factorization_disagreeing_with_weights(tmp_path):
    am, *_ = adapted_bert()
    am.save_pretrained(tmp_path / "a")
    _rewrite_config(tmp_path / "a", factorization="tucker", factorization_options={})
    model = make("hf_bert")[0]
    snap = snapshot(model)
    with pytest.raises(CheckpointError) as err:
        ta.TensorAdapterModel.from_pretrained(model, tmp_path / "a")
    message = str(err.value)
    # Tucker needs a core the file lacks: the missing tensors are named
    assert "missing ['tensor_adapters.g0_l0.core'" in message, message
    assert_unchanged(model, snap)


def test_config_with_invalid_values_is_a_checkpoint_error(tmp_path):
    am, *_ = adapted_bert()
    am.save_pretrained(tmp_path / "a")
    _rewrite_config(tmp_path / "a", rank=0)
    model = make("hf_bert")[0]
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=r"adapter config is invalid.*positive int"):
        ta.TensorAdapterModel.from_pretrained(model, tmp_path / "a")
    assert_unchanged(model, snap)


def test_config_and_weights_from_different_saves_are_refused(tmp_path):
    """A crash between the two renames would pair new weights with an old config."""
    torch.manual_seed(0)
    model = tiny_vit()
    cfg = ta.TensorAdapterConfig(factorization="cp", modes=["depth"], targets=["q", "v"], rank=2)
    am = ta.get_adapter_model(model, cfg)
    am.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.add_(1.0)
    am.save_pretrained(tmp_path / "b")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(tmp_path / "a" / "adapter_config.json", mixed)
    shutil.copy(tmp_path / "b" / "adapter_model.safetensors", mixed)
    with pytest.raises(ta.CheckpointError, match="come from different saves"):
        ta.TensorAdapterModel.from_pretrained(tiny_vit(), mixed)
    for good in ("a", "b"):  # each pair as written still loads
        ta.TensorAdapterModel.from_pretrained(tiny_vit(), tmp_path / good)
