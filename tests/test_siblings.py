"""Separate q, k, v modules run as one fused map over their shared input."""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from families import make
from torch import nn

import tensadapt as ta
from tensadapt.low_rank import LowRankLinear
from tensadapt.shared_input import SharedInputLowRank

F64 = dict(adapter_dtype="float64")


def _adapted(family: str, preset: str, **kw):
    model, inputs, out_fn = make(family)
    am = ta.get_adapter_model(model.double(), ta.presets.get(preset, **F64, **kw)).train()
    torch.manual_seed(1)
    with torch.no_grad():  # random factors and role biases: every term reaches the output
        for p in am.tensor_adapters.parameters():
            p.normal_(0, 0.3)
    return am, inputs, out_fn


def _spy_calls(monkeypatch) -> list[tuple]:
    """Records every low-rank node, in order: ``("one", out, in)`` for a module's own
    :class:`LowRankLinear`, ``("shared", shared_a, outs)`` for a fused group."""
    calls = []
    one, stacked = LowRankLinear.apply, SharedInputLowRank.apply

    def spy_one(x, xa, w, *rest):
        calls.append(("one", w.shape[0], w.shape[1]))
        return one(x, xa, w, *rest)

    def spy_shared(x, shared, *tensors):
        g = len(tensors) // 4
        calls.append(("shared", shared, tuple(w.shape[0] for w in tensors[:g])))
        return stacked(x, shared, *tensors)

    monkeypatch.setattr(LowRankLinear, "apply", spy_one)
    monkeypatch.setattr(SharedInputLowRank, "apply", spy_shared)
    return calls


def _step(am, inputs, out_fn):
    am.zero_grad()
    torch.manual_seed(5)
    out = out_fn(am(**inputs))
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in am.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _apart(am) -> None:
    for layer in am.adapted_layers.values():
        layer.siblings = None


@pytest.mark.parametrize(
    "family,preset,kw,shared_a",
    [
        ("hf_bert", "lora", {"rank": 2, "targets": ["q", "k", "v", "o"]}, False),
        ("hf_bert", "cara", {"rank": 2, "dropout": 0.0}, True),
        ("hf_llama_gqa", "lora", {"rank": 2, "targets": ["q", "k", "v", "gate", "up"]}, False),
        ("hf_dinov2", "lorta", {}, None),
    ],
)
def test_fused_siblings_match_separate_modules(family, preset, kw, shared_a, monkeypatch):
    """From the second pass on, q, k and v run as one call with the stacked weights; the
    output and every gradient (adapters and trained head) equal the modules run apart."""
    am, inputs, out_fn = _adapted(family, preset, **kw)
    groups = {id(l.siblings): l.siblings for l in am.adapted_layers.values() if l.siblings}
    # one per attention block, and one per gated MLP (LLaMA's gate and up)
    assert len(groups) == (4 if "gate" in kw.get("targets", []) else 2)
    merged_away = sum(len(g.members) - 1 for g in groups.values())
    calls = _spy_calls(monkeypatch)
    first = _step(am, inputs, out_fn)  # this pass shows that q, k, v read one input
    assert all(g.verified for g in groups.values())
    assert not [c for c in calls if c[0] == "shared"]
    n_apart = len(calls)
    calls.clear()
    fused_out, fused_grads = _step(am, inputs, out_fn)
    shared = [c for c in calls if c[0] == "shared"]
    assert len(shared) == len(groups) and len(calls) == n_apart - merged_away
    if shared_a is not None:  # CaRA's q, k, v share A: one x Aᵀ for the three
        assert all(c[1] is shared_a for c in shared)
    torch.testing.assert_close(fused_out, first[0], rtol=0, atol=1e-10)
    _apart(am)
    apart_out, apart_grads = _step(am, inputs, out_fn)
    torch.testing.assert_close(fused_out, apart_out, rtol=0, atol=1e-10)
    assert fused_grads.keys() == apart_grads.keys()
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], apart_grads[name], rtol=1e-9, atol=1e-10)


def test_rank_dropout_runs_members_apart(monkeypatch):
    """Rank dropout draws a mask per module on its own rank activations: the members keep
    their own nodes."""
    am, inputs, out_fn = _adapted("hf_bert", "cara", rank=2, dropout=0.0)
    for layer in am.adapted_layers.values():
        for p in layer.programs:
            p.dropout = nn.Dropout(0.5)
            p.dropout_on = "rank"
    am.train()
    calls = _spy_calls(monkeypatch)
    _step(am, inputs, out_fn)
    calls.clear()
    _step(am, inputs, out_fn)
    assert calls and all(c[0] == "one" for c in calls)
    am.eval()  # dropout off: fused again, under no_grad too (not in inference mode)
    calls.clear()
    with torch.no_grad():
        want = am(**inputs).logits
    assert [c for c in calls if c[0] == "shared"]
    calls.clear()
    with torch.inference_mode():
        got = am(**inputs).logits
    assert calls and all(c[0] == "one" for c in calls)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("unused", [None, 1])
def test_shared_input_low_rank_gradcheck(shared, with_bias, unused):
    """Outputs ``x (W_m + B_m A_m)ᵀ + b_m`` and their gradients against autograd's numerical
    ones; ``unused``: an output that takes no part in the loss."""
    torch.manual_seed(0)
    n, d_in, outs, r = 5, 6, (4, 3, 2), 2
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(o, d_in, dtype=torch.float64) for o in outs]
    biases = [
        torch.randn(o, dtype=torch.float64, requires_grad=True) if with_bias else None for o in outs
    ]
    a0 = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    a_list = [a0] * 3 if shared else [torch.randn_like(a0).requires_grad_() for _ in outs]
    b_list = [torch.randn(o, r, dtype=torch.float64, requires_grad=True) for o in outs]
    got = SharedInputLowRank.apply(x, shared, *ws, *biases, *a_list, *b_list)
    for y, w, b, a, bm in zip(got, ws, biases, a_list, b_list):
        want = x @ (w + bm @ a).t() + (0 if b is None else b)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-12)

    def f(x, *t):
        ys = SharedInputLowRank.apply(x, shared, *ws, *t)
        return tuple(y for i, y in enumerate(ys) if i != unused)

    leaves = ([*biases] if with_bias else [None] * 3) + [*a_list, *b_list]
    assert torch.autograd.gradcheck(f, (x, *leaves))


class _Block(nn.Module):
    """q reads ``x``, k and v read ``mem`` (cross-attention's pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.k_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)

    def forward(self, x, mem):
        return self.q_proj(x) + self.k_proj(mem) * self.v_proj(mem)


class _Cross(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block()])

    def forward(self, x, mem):
        return self.layers[0](x, mem)


def _cross_model():
    torch.manual_seed(0)
    cfg = ta.TensorAdapterConfig(
        factorization="lora",
        rank=2,
        targets=["q", "k", "v"],
        target_modules={"q": r".*\.q_proj", "k": r".*\.k_proj", "v": r".*\.v_proj"},
        **F64,
    )
    am = ta.get_adapter_model(_Cross().double(), cfg)
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    return am


def test_members_reading_different_inputs_never_fuse(monkeypatch):
    am = _cross_model()
    group = am.adapted_layers["layers.0.q_proj"].siblings
    assert group is not None and len(group.members) == 3
    x, mem = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    want = am(x, mem)
    assert group.verified is False
    calls = _spy_calls(monkeypatch)
    got = am(x, mem)
    assert [c[0] for c in calls] == ["one"] * 3
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the same tensor for all three: fused, and equal to the map run apart
    group.verified = None
    am(x, x)
    assert group.verified is True
    calls.clear()
    fused = am(x, x)
    assert calls == [("shared", False, (8, 8, 8))]
    _apart(am)
    torch.testing.assert_close(fused, am(x, x), rtol=0, atol=1e-12)


def test_no_fusion_outside_a_model_pass_or_under_checkpointing(monkeypatch):
    """A submodule called on its own, or a pass whose activations are recomputed in the
    backward (checkpointing), runs each member apart, with the same gradients."""
    am, inputs, out_fn = _adapted("hf_bert", "lora", rank=2, targets=["q", "k", "v"])
    _step(am, inputs, out_fn)
    calls = _spy_calls(monkeypatch)
    attn = am.base_model.bert.encoder.layer[0].attention.self
    h = torch.randn(2, 7, 32, dtype=torch.float64)
    for m in (attn.query, attn.key, attn.value):
        m(h)
    assert [c[0] for c in calls] == ["one"] * 3
    calls.clear()
    am.zero_grad()
    torch.manual_seed(5)  # the seed _step uses: the same dropout masks in the model
    out = torch.utils.checkpoint.checkpoint(
        lambda ids: out_fn(am(input_ids=ids)), inputs["input_ids"], use_reentrant=False
    )
    out.square().sum().backward()
    ckpt_grads = {n: p.grad.clone() for n, p in am.named_parameters() if p.grad is not None}
    # forward and recomputation, three nodes per block
    assert [c[0] for c in calls] == ["one"] * (2 * 2 * 3)
    _apart(am)
    _, apart = _step(am, inputs, out_fn)
    for name, g in ckpt_grads.items():
        torch.testing.assert_close(g, apart[name], rtol=1e-9, atol=1e-10)


def test_in_place_change_between_members_runs_them_apart():
    """A member called after its input was modified in place gets the map of the new
    values, not the fused output computed from the old ones."""
    am = _cross_model()
    x = torch.randn(4, 8, dtype=torch.float64)
    am(x, x)  # verified: one input
    a = am.base_model.layers[0]

    def bumped(x, mem):
        q = a.q_proj(x)
        mem.add_(1.0)
        return q + a.k_proj(mem) * a.v_proj(mem)

    am.base_model.forward = bumped
    xx = x.clone()
    got = am(xx, xx)
    assert a.q_proj.siblings.verified is False  # k saw new values: run apart from then on
    _apart(am)
    xx = x.clone()
    want = am(xx, xx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "preset,kw",
    [("lora", {"rank": 8, "targets": ["q", "k", "v", "o"]}), ("cara", {"rank": 8, "dropout": 0.0})],
)
def test_real_minilm_fused_matches_apart(preset, kw, monkeypatch):
    """The pretrained all-MiniLM-L6-v2 on Rotten Tomatoes sentences, float32: one fused node
    per layer, and the loss and every gradient of the modules run apart."""
    from tensadapt import assets

    data = assets.rotten_tomatoes(n_train=8, n_test=8)
    tok = assets.load_minilm_tokenizer()
    batch = tok(list(data.x_train), padding=True, truncation=True, return_tensors="pt")
    torch.manual_seed(0)
    am = ta.get_adapter_model(assets.load_minilm_classifier(2), ta.presets.get(preset, **kw))
    am.eval()  # no BERT dropout: the two runs see the same function
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_(0, 0.02)

    def step():
        am.zero_grad()
        logits = am(**batch).logits
        nn.functional.cross_entropy(logits, data.y_train).backward()
        return logits.detach(), {
            n: p.grad.clone() for n, p in am.named_parameters() if p.grad is not None
        }

    step()
    calls = _spy_calls(monkeypatch)
    fused = step()
    assert [c[1] for c in calls if c[0] == "shared"] == [preset == "cara"] * 6
    _apart(am)
    apart = step()
    torch.testing.assert_close(fused[0], apart[0], rtol=1e-5, atol=1e-6)
    for name, g in apart[1].items():
        torch.testing.assert_close(fused[1][name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item())
