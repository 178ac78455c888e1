"""Integration details beyond the shared contract: resolution of the further HF families,
``modules_to_save``, what the checkpoint holds, the parameter report, and an fp16 base."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from conftest import tiny_vit
from families import EXTRA_FAMILIES, GQA_FAMILIES, make
from safetensors import safe_open

import tensadapt as ta
from tensadapt.checkpoint import FORMAT_VERSION
from tensadapt.errors import CheckpointError, ModeError

# per family: the block stack, then (path in a block, role, (out, in)) in role order, the
# (heads, head_dim) of q and of k/v, and the head kept trainable by modules_to_save="auto"
_DECODER = [
    ("self_attn.q_proj", "q", (32, 32)),
    ("self_attn.k_proj", "k", (16, 32)),
    ("self_attn.v_proj", "v", (16, 32)),
    ("self_attn.o_proj", "o", (32, 32)),
    ("mlp.gate_proj", "gate", (64, 32)),
    ("mlp.up_proj", "up", (64, 32)),
    ("mlp.down_proj", "down", (32, 64)),
]
EXPECTED = {
    "hf_qwen2": ("model.layers", _DECODER, (4, 8), (2, 8), []),
    "hf_mistral": ("model.layers", _DECODER, (4, 8), (2, 8), []),
    # Qwen3: head_dim 16 is not hidden / heads, so q is 64 wide and k/v 32
    "hf_qwen3": (
        "model.layers",
        [
            ("self_attn.q_proj", "q", (64, 32)),
            ("self_attn.k_proj", "k", (32, 32)),
            ("self_attn.v_proj", "v", (32, 32)),
            ("self_attn.o_proj", "o", (32, 64)),
            *_DECODER[4:],
        ],
        (4, 16),
        (2, 16),
        [],
    ),
    "hf_roberta": (
        "roberta.encoder.layer",
        [
            ("attention.self.query", "q", (32, 32)),
            ("attention.self.key", "k", (32, 32)),
            ("attention.self.value", "v", (32, 32)),
            ("attention.output.dense", "o", (32, 32)),
            ("intermediate.dense", "fc1", (128, 32)),
            ("output.dense", "fc2", (32, 128)),
        ],
        (4, 8),
        (4, 8),
        ["classifier"],
    ),
    "hf_vit": (
        "vit.layers",
        [
            ("attention.q_proj", "q", (32, 32)),
            ("attention.k_proj", "k", (32, 32)),
            ("attention.v_proj", "v", (32, 32)),
            ("attention.o_proj", "o", (32, 32)),
            ("mlp.fc1", "fc1", (64, 32)),
            ("mlp.fc2", "fc2", (32, 64)),
        ],
        (4, 8),
        (4, 8),
        ["classifier"],
    ),
}


@pytest.mark.parametrize("family", EXTRA_FAMILIES)
def test_further_families_resolve_structurally(family):
    model, _, _ = make(family)
    stack, per_block, q_heads, kv_heads, heads_saved = EXPECTED[family]
    res = ta.resolve_targets(model, ta.TensorAdapterConfig(factorization="lora", targets=["all"]))
    want = [
        (f"{stack}.{layer}.{path}", layer, role, shape)
        for layer in range(2)
        for path, role, shape in per_block
    ]
    assert [(r.module, r.layer, r.role, r.shape) for r in res.rows] == want

    # heads are split head-major with each role's own head count (GQA: fewer for k/v)
    for roles, (heads, head_dim) in ((["q"], q_heads), (["k", "v"], kv_heads)):
        cfg = ta.TensorAdapterConfig(
            factorization="cp", modes=["depth", "qkv", "heads"], targets=roles, rank=2
        )
        (spec,) = ta.resolve_targets(model, cfg).layout.tensors.values()
        sizes = dict(zip(spec.axes, spec.shape))
        assert (sizes["depth"], sizes["qkv"], sizes["heads"], sizes["out"]) == (
            2,
            len(roles),
            heads,
            head_dim,
        )

    am = ta.get_adapter_model(model, ta.TensorAdapterConfig(factorization="lora", rank=2))
    assert am.modules_to_save == heads_saved


@pytest.mark.parametrize("family", sorted(GQA_FAMILIES - {"hf_llama_gqa"}))
def test_gqa_families_refuse_stacking_q_with_kv(family):
    model, _, _ = make(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ta.TensorAdapterConfig(factorization="cp", modes=["qkv"], targets=["q", "k", "v"])
    with pytest.raises(ModeError, match=r"(?s)q_proj.*k_proj.*shapes differ.*grouped-query"):
        ta.get_adapter_model(model, cfg)
    assert not any(isinstance(m, ta.TensorAdapterLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- modules_to_save
def _weights(directory):
    with safe_open(str(directory / "adapter_model.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


@pytest.mark.parametrize(
    "family,spec,head",
    [
        ("hf_bert", "auto", "classifier"),
        ("hf_vit", "auto", "classifier"),
        ("timm_vit", "auto", "head"),
        ("hf_roberta", ["classifier.out_proj"], "classifier.out_proj"),
    ],
)
def test_modules_to_save_trains_saves_and_restores_the_head(family, spec, head, tmp_path):
    model, inputs, out_of = make(family)
    cfg = ta.TensorAdapterConfig(
        factorization="cp", modes=["depth"], targets=["attn"], rank=2, modules_to_save=spec
    )
    am = ta.get_adapter_model(model, cfg)
    assert am.modules_to_save == [head]
    head_module = am.get_base_model().get_submodule(head)
    head_names = {f"base_model.{head}.{n}" for n, _ in head_module.named_parameters()}
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert head_names <= trainable
    assert trainable - head_names == {
        f"tensor_adapters.{n}" for n, _ in am.tensor_adapters.named_parameters()
    }

    # the head really trains: gradients reach it and an optimiser step changes it
    am.train()
    before = {n: p.detach().clone() for n, p in head_module.named_parameters()}
    opt = torch.optim.SGD([p for p in am.parameters() if p.requires_grad], lr=0.5)
    out_of(am(**inputs)).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_module.parameters())
    frozen = [p for n, p in am.named_parameters() if n not in trainable]
    assert frozen and all(p.grad is None for p in frozen)
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in head_module.named_parameters())
    am.eval()
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_(0, 0.3)
        for p in head_module.parameters():  # and a change no optimiser would make
            p.add_(0.25)
        want = out_of(am(**inputs))

    am.save_pretrained(tmp_path / "a")
    stored = _weights(tmp_path / "a")
    head_keys = {f"modules_to_save.{head}.{k}" for k in head_module.state_dict()}
    adapter_keys = {f"tensor_adapters.{k}" for k in am.tensor_adapters.state_dict()}
    assert set(stored) == head_keys | adapter_keys  # the head, and no other base weight
    for k, v in head_module.state_dict().items():
        assert torch.equal(stored[f"modules_to_save.{head}.{k}"], v)

    # a fresh base: the same body, a different head init
    fresh, _, _ = make(family)
    fresh_head = fresh.get_submodule(head)
    torch.manual_seed(99)
    with torch.no_grad():
        for p in fresh_head.parameters():
            p.normal_(0, 1.0)
    assert not torch.equal(fresh_head.weight, head_module.weight)
    loaded = ta.TensorAdapterModel.from_pretrained(fresh, tmp_path / "a")
    for k, v in head_module.state_dict().items():
        assert torch.equal(fresh_head.state_dict()[k], v)
    with torch.no_grad():
        assert torch.equal(out_of(loaded(**inputs)), want)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference load

    again = ta.TensorAdapterModel.from_pretrained(
        make(family)[0], tmp_path / "a", is_trainable=True
    )
    trainable_again = {n for n, p in again.named_parameters() if p.requires_grad}
    assert trainable_again == trainable


def test_without_modules_to_save_the_head_is_frozen_and_not_saved(tmp_path):
    model, _, _ = make("hf_bert")
    cfg = ta.TensorAdapterConfig(factorization="lora", rank=2, modules_to_save=None)
    am = ta.get_adapter_model(model, cfg)
    assert am.modules_to_save == []
    assert not any(p.requires_grad for p in model.classifier.parameters())
    am.save_pretrained(tmp_path / "a")
    assert all(k.startswith("tensor_adapters.") for k in _weights(tmp_path / "a"))


# ---------------------------------------------------------------- checkpoint contents
def _cp_depth(depth):
    model = tiny_vit(depth=depth, dim=32, heads=4)
    cfg = ta.TensorAdapterConfig(
        factorization="cp", modes=["depth"], targets=["attn"], rank=3, modules_to_save=None
    )
    return model, cfg


def test_shared_factor_is_stored_once(tmp_path):
    files = {}
    for depth in (2, 6):
        model, cfg = _cp_depth(depth)
        am = ta.get_adapter_model(model, cfg)
        path = tmp_path / f"d{depth}"
        am.save_pretrained(path)
        stored = _weights(path)
        params = dict(am.tensor_adapters.named_parameters())
        n_params = sum(p.numel() for p in params.values())
        assert n_params == ta.count_parameters(tiny_vit(depth=depth, dim=32, heads=4), cfg)
        # one stored tensor per adapter parameter (not per layer), holding exactly its values
        assert set(stored) == {f"tensor_adapters.{n}" for n in params}
        for n, p in params.items():
            assert torch.equal(stored[f"tensor_adapters.{n}"], p.detach())
        assert sum(t.numel() for t in stored.values()) == n_params
        # and no hidden copies in the file: 8-byte header size + header + raw fp32 data
        raw = (path / "adapter_model.safetensors").read_bytes()
        (header,) = struct.unpack("<Q", raw[:8])
        assert len(raw) == 8 + header + 4 * n_params
        files[depth] = ({k: tuple(v.shape) for k, v in stored.items()}, n_params)

    # 4 more blocks add only 4 rows to each tensor's depth factor
    (shapes2, n2), (shapes6, n6) = files[2], files[6]
    assert shapes2.keys() == shapes6.keys()
    depth_keys = {k for k in shapes2 if k.endswith("factor_depth")}
    assert len(depth_keys) == 4  # q, k, v, o
    for k in shapes2:
        if k in depth_keys:
            assert (shapes2[k], shapes6[k]) == ((2, 3), (6, 3))
        else:
            assert shapes2[k] == shapes6[k]
    assert n6 - n2 == len(depth_keys) * 4 * 3


def test_checkpoint_carries_a_format_version(tmp_path):
    model, cfg = _cp_depth(2)
    ta.get_adapter_model(model, cfg).save_pretrained(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert isinstance(FORMAT_VERSION, int) and FORMAT_VERSION >= 1
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["tensadapt_version"] == ta.__version__
    assert ta.TensorAdapterConfig.from_dict(meta["config"]) == cfg
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as fh:
        assert fh.metadata()["tensadapt_format"] == str(FORMAT_VERSION)
    del meta["format_version"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version"):
        ta.TensorAdapterModel.from_pretrained(tiny_vit(depth=2, dim=32, heads=4), tmp_path / "a")


# ---------------------------------------------------------------- model accessors
def test_get_base_model_is_the_wrapped_module():
    model, inputs, out_of = make("hf_bert")
    am = ta.get_adapter_model(model, ta.TensorAdapterConfig(factorization="lora", rank=2))
    assert am.get_base_model() is model
    assert am.base_model is model
    # the adapters live inside that very module
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, ta.TensorAdapterLayer)
    assert am.merge_and_unload() is model


@pytest.mark.parametrize("spec", ["auto", None])
def test_print_trainable_parameters_reports_exact_counts(spec, capsys):
    model, _, _ = make("hf_bert")
    base_total = sum(p.numel() for p in model.parameters())
    head = sum(p.numel() for p in model.classifier.parameters()) if spec else 0
    cfg = ta.TensorAdapterConfig(
        factorization="tucker",
        modes=["depth", "qkv"],
        targets=["q", "k", "v"],
        rank=2,
        modules_to_save=spec,
    )
    adapter = ta.count_parameters(model, cfg)
    am = ta.get_adapter_model(model, cfg)
    assert adapter == sum(p.numel() for p in am.tensor_adapters.parameters()) > 0
    capsys.readouterr()
    am.print_trainable_parameters()
    text = capsys.readouterr().out
    numbers = {
        k: int(v.replace(",", ""))
        for k, v in re.findall(r"(trainable|adapter|all) params: ([\d,]+)", text)
    }
    assert numbers == {
        "trainable": adapter + head,
        "adapter": adapter,
        "all": base_total + adapter,
    }
    pct = float(re.search(r"trainable%: ([\d.]+)", text).group(1))
    assert pct == pytest.approx(100 * (adapter + head) / (base_total + adapter), abs=1e-4)
    assert am.get_nb_trainable_parameters() == (adapter + head, base_total + adapter)


# ---------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("family", ["hf_bert", "hf_qwen2"])
def test_fp32_adapter_on_fp16_base(family):
    model, inputs, out_of = make(family)
    reference = make(family)[0]  # the same weights, kept in fp32
    model = model.to(torch.float16)
    cfg = ta.TensorAdapterConfig(
        factorization="tucker", modes=["depth", "qkv"], targets=["k", "v"], rank=2
    )
    am = ta.get_adapter_model(model, cfg)
    ref = ta.get_adapter_model(reference, cfg)
    assert all(p.dtype == torch.float32 for p in am.tensor_adapters.parameters())
    assert all(p.dtype == torch.float16 for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        for p, q in zip(am.tensor_adapters.parameters(), ref.tensor_adapters.parameters()):
            p.normal_(0, 0.5)
            q.copy_(p)
    out = out_of(am(**inputs))
    assert out.dtype == torch.float16
    assert torch.isfinite(out).all()
    with torch.no_grad():
        want = out_of(ref(**inputs))
        with ref.disable_adapter():
            unadapted = out_of(ref(**inputs))
    # the adapter's effect survives fp16: the error against the all-fp32 model is small next
    # to what the adapter changes
    effect = (want - unadapted).abs().max().item()
    assert effect > 0
    assert (out.float() - want).abs().max() < 0.05 * effect
    out.float().square().sum().backward()
    grads = [p.grad for p in am.tensor_adapters.parameters()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
