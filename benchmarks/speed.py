"""Training-step speed, peak memory and merged-inference benchmark (``make bench``).

Two backbones, random init (timing does not depend on the weights):

* ``dinov2``: timm ``vit_small_patch14_dinov2`` at 112 px (65 tokens), batch 32;
* ``minilm``: HF ``BertForSequenceClassification`` with the all-MiniLM-L6-v2 shape (hidden 384,
  6 layers, 12 heads, intermediate 1536), batch 32, sequence 64.

Each configuration is one training step (forward, cross-entropy, backward, AdamW step) of the
same backbone with a trainable head. **limit** freezes everything but the head and makes the
embedding output require grad, so the backward pass runs through every block without any weight
gradient: no adapter can be cheaper. Every configuration of a backbone lives in this one process
and the repeats are interleaved: each timed step of a configuration follows a timed step of the
limit and precedes another, and the **paired** ratio is the median over repeats of (step ÷
the mean of the two limit steps around it), which cancels the machine's slow changes of speed
(a shared host). Medians, min-max and the ratio of minima (the least disturbed repeats) are
reported too; ratios to PEFT LoRA (same targets and rank) divide the two paired ratios. Each
ratio comes with a 95 % percentile-bootstrap interval over the rounds (``ratio_interval``), so
a reader can tell a miss the run resolves from one inside the host's noise. Minor page faults
per step are counted.

**limit_same** is the limit with every frozen linear of the backbone run through the products
the adapted maps run (:func:`tensadapt.gemm.dense_linear`: oneDNN where the CPU has AVX-512 and
``TENSADAPT_GEMM`` allows it, ``F.linear`` otherwise; the same dtype and device): the
like-for-like limit, against which the targets are checked; ratios to the plain limit are
reported beside them. Both limits are rows of the same interleaved run.

After the warm-up, each row runs one untimed step under a ``TorchDispatchMode`` that counts
the aten ops dispatched (on a GPU about one kernel launch each) and one under
``sys.setprofile`` counting Python function calls (``'call'`` events), with autograd's
backward on the calling thread. They are counts, not timings, and depend only on the code.

``--device cuda`` runs everything on the GPU (timed between ``torch.cuda.synchronize()`` calls;
peak memory from ``torch.cuda.max_memory_allocated``); ``--precision bf16`` runs forward and
loss under ``torch.autocast`` in bfloat16. The targets follow the kernels in use: the
PyTorch path's (``TENSADAPT_NATIVE=0 TENSADAPT_GEMM=blas``, and any GPU) or the CPU kernels'.

Peak memory (CPU) is the RSS high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the RSS after building the model, over a few training steps, measured in a separate
process per configuration (``--quick``: one process per backbone, freed memory returned with
``malloc_trim`` between configurations). tracemalloc cannot see torch's CPU allocations.

Run ``python benchmarks/speed.py`` (full), ``--quick`` (< 2 min) or ``--tiny`` (toy models,
for the smoke test).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import tensadapt as ta  # noqa: E402
from tensadapt import native  # noqa: E402
from tensadapt.precision import autocast_dtype, cast  # noqa: E402

# ---------------------------------------------------------------------------- backbones


@dataclass
class Family:
    """One backbone: how to build it, its inputs, and its target names."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, torch.Tensor]]
    labels: Callable[[int], torch.Tensor]
    embed: str  # the module whose output starts the backward pass of the limit
    head: str
    # PEFT's target_modules: names matched as suffixes, or one regex matched in full
    # ("qkv, proj, fc1, fc2" as suffixes would also take the patch embedding's conv ``proj``,
    # and "dense" BERT's pooler)
    peft_attn: list[str] | str
    peft_all: list[str] | str
    ta_attn: list[str]
    attn_label: str
    # role -> module regex for tensadapt's generic resolver, so that its LoRA rows adapt the
    # very maps PEFT's do (None: the structural roles ``ta_attn`` / ``all`` already do)
    ta_attn_modules: dict[str, str] | None = None
    ta_all_modules: dict[str, str] | None = None


def _vit(tiny: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        if tiny:
            from timm.models.vision_transformer import VisionTransformer

            return VisionTransformer(
                img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=10
            )
        return timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=112, num_classes=10
        )

    return build


def _bert(tiny: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import BertConfig, BertForSequenceClassification

        if tiny:
            cfg = BertConfig(
                vocab_size=100,
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=2,
            )
        else:  # sentence-transformers/all-MiniLM-L6-v2
            cfg = BertConfig(
                vocab_size=30522,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=12,
                intermediate_size=1536,
                max_position_embeddings=512,
                num_labels=2,
            )
        return BertForSequenceClassification(cfg)

    return build


def families(tiny: bool, seq: int) -> dict[str, Family]:
    px = 16 if tiny else 112
    vocab = 100 if tiny else 30522
    seq = 8 if tiny else seq
    return {
        "dinov2": Family(
            name="DINOv2-S @112" if not tiny else "tiny ViT",
            build=_vit(tiny),
            inputs=lambda b: {"x": torch.randn(b, 3, px, px)},
            labels=lambda b: torch.randint(0, 10, (b,)),
            embed="patch_embed",
            head="head",
            peft_attn=["qkv"],
            peft_all=r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.fc[12])",
            ta_attn=["q", "k", "v"],
            attn_label="qkv",
            # PEFT's target "qkv" is one rank-8 map over the fused q, k, v output; the
            # structural roles q, k, v would be three rank-8 maps on its row slices (1.5x the
            # parameters), so the LoRA rows name the modules instead (the role only labels them)
            ta_attn_modules={"q": r"blocks\.\d+\.attn\.qkv"},
            ta_all_modules={
                "q": r"blocks\.\d+\.attn\.qkv",
                "o": r"blocks\.\d+\.attn\.proj",
                "fc1": r"blocks\.\d+\.mlp\.fc1",
                "fc2": r"blocks\.\d+\.mlp\.fc2",
            },
        ),
        "minilm": Family(
            name=f"MiniLM-L6 seq {seq}" if not tiny else "tiny BERT",
            build=_bert(tiny),
            inputs=lambda b: {
                "input_ids": torch.randint(0, vocab, (b, seq)),
                "attention_mask": torch.ones(b, seq, dtype=torch.long),
            },
            labels=lambda b: torch.randint(0, 2, (b,)),
            embed="bert.embeddings",
            head="classifier",
            peft_attn=["query", "key", "value", "attention.output.dense"],
            peft_all=r".*encoder\.layer\.\d+\.(attention\.(self\.(query|key|value)|output\.dense)"
            r"|intermediate\.dense|output\.dense)",
            ta_attn=["q", "k", "v", "o"],
            attn_label="q,k,v,o",
        ),
    }


# ---------------------------------------------------------------------------- configurations


def _ta(fam: Family, base: nn.Module, cfg: ta.TensorAdapterConfig) -> nn.Module:
    return ta.get_adapter_model(base, cfg)


def _preset(name: str, **kw: Any) -> Callable[[Family, nn.Module], nn.Module]:
    return lambda fam, base: _ta(fam, base, ta.presets.get(name, **kw))


def _lora(targets: str, structural: bool = False) -> Callable[[Family, nn.Module], nn.Module]:
    """tensadapt's LoRA r=8 on PEFT's maps (``targets`` "attn" or "all"), or with
    ``structural`` on the roles the structural resolver finds (q, k, v slices of a fused
    ``qkv``)."""

    def build(fam: Family, base: nn.Module) -> nn.Module:
        modules = fam.ta_attn_modules if targets == "attn" else fam.ta_all_modules
        if modules is None or structural:
            roles = fam.ta_attn if targets == "attn" else ["all"]
            return _ta(fam, base, ta.presets.get("lora", rank=8, targets=roles))
        cfg = ta.presets.get("lora", rank=8, targets=list(modules))
        cfg.target_modules = dict(modules)
        return _ta(fam, base, cfg)

    return build


def _peft(targets: str) -> Callable[[Family, nn.Module], nn.Module]:
    def build(fam: Family, base: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        modules = fam.peft_attn if targets == "attn" else fam.peft_all
        cfg = LoraConfig(r=8, lora_alpha=8, target_modules=modules, modules_to_save=[fam.head])
        return get_peft_model(base, cfg)

    return build


def _reference_style(fam: Family, base: nn.Module) -> nn.Module:
    """CaRA as its reference code runs it: ``ΔW`` rebuilt every forward and applied as a
    second dense matmul, ``y = x Wᵀ + b + s·x ΔWᵀ`` (no fold into ``W``, no low-rank path)."""
    cfg = ta.presets.get("cara", rank=8, dropout=0.0, strategy="materialise")
    model = ta.get_adapter_model(base, cfg)
    for layer in model.adapted_layers.values():
        layer.__dict__["_forward_folded"] = lambda *a: None
        layer.__dict__["_forward_low_rank"] = lambda *a: None
    return model


def _limit(fam: Family, base: nn.Module) -> nn.Module:
    for name, p in base.named_parameters():
        p.requires_grad_(name.startswith(fam.head + "."))
    embed = base.get_submodule(fam.embed)
    embed.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return base


def _same_products(lin: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    """``lin``'s forward through the products an adapted map runs: ``x Wᵀ + b`` by
    :func:`tensadapt.gemm.dense_linear` (oneDNN where the adapters' products go there, else
    ``F.linear``), in autocast's dtype where autocast is on, as the engine casts its
    operands before its own products."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = lin.weight, lin.bias
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, w, b = cast(x, dtype), cast(w, dtype), cast(b, dtype)
        return ta.gemm.dense_linear(x, w, b)

    return forward


def _limit_same_products(fam: Family, base: nn.Module) -> nn.Module:
    """The limit with every frozen linear of the backbone (not the trainable head) on the
    adapters' products: the same backend, dtype and device as theirs, so a ratio to it
    measures the adapter and not a change of matmul library."""
    model = _limit(fam, base)
    head = fam.head
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name != head and not name.startswith(head + "."):
            mod.forward = _same_products(mod)
    return model


def _full(fam: Family, base: nn.Module) -> nn.Module:
    return base


@dataclass
class Config:
    key: str
    label: str
    build: Callable[[Family, nn.Module], nn.Module]
    compare: str | None = None  # the PEFT row with the same targets and rank
    tags: set[str] = field(default_factory=set)
    gemm: str | None = None  # the adapted maps' dense products on this backend (default: auto)


def configurations(fam: Family) -> list[Config]:
    a = fam.attn_label
    return [
        Config("limit", "limit: frozen backbone, grads flow", _limit, tags={"quick"}),
        Config(
            "limit_same",
            "limit on the adapters' products (like for like)",
            _limit_same_products,
            tags={"quick"},
        ),
        Config("full", "full fine-tuning", _full),
        Config("peft_lora_attn", f"PEFT LoRA r=8 {a}", _peft("attn"), tags={"quick"}),
        Config(
            "ta_lora_attn", f"tensadapt LoRA r=8 {a}", _lora("attn"), "peft_lora_attn", {"quick"}
        ),
        Config(
            "ta_lora_attn_blas",
            f"tensadapt LoRA r=8 {a}, products on BLAS",
            _lora("attn"),
            "peft_lora_attn",
            tags={"quick"},
            gemm="blas",
        ),
        *(
            [
                Config(
                    "ta_lora_slices",
                    "tensadapt LoRA r=8 on q,k,v row slices (3 maps per qkv)",
                    _lora("attn", structural=True),
                )
            ]
            if fam.ta_attn_modules is not None
            else []
        ),
        Config("peft_lora_all", "PEFT LoRA r=8 all linear", _peft("all"), tags={"quick"}),
        Config(
            "ta_lora_all", "tensadapt LoRA r=8 all linear", _lora("all"), "peft_lora_all", {"quick"}
        ),
        Config(
            "cara", "CaRA R=8 (no dropout)", _preset("cara", rank=8, dropout=0.0), tags={"quick"}
        ),
        Config(
            "cara_blas",
            "CaRA R=8 (no dropout), products on BLAS",
            _preset("cara", rank=8, dropout=0.0),
            gemm="blas",
        ),
        Config(
            "cara_materialise",
            "CaRA R=8 forced materialise",
            _preset("cara", rank=8, dropout=0.0, strategy="materialise"),
            tags={"quick"},
        ),
        Config(
            "cara_reference",
            "CaRA R=8 reference-style (ΔW rebuilt, 2nd matmul)",
            _reference_style,
            tags={"quick"},
        ),
        Config("cara_preset", "CaRA R=8 preset (DropConnect 0.1)", _preset("cara", rank=8)),
        Config(
            "tenslora",
            "TensLoRA att_qkv_depth (Tucker)",
            _preset("tenslora", variant="att_qkv_depth"),
            tags={"quick"},
        ),
        Config("fact_tk", "FacT-TK r=32 (Tucker)", _preset("fact_tk"), tags={"quick"}),
        Config("fact_tt", "FacT-TT r=8 (TT)", _preset("fact_tt"), tags={"quick"}),
        Config("lotr", "LoTR r=8 (TT)", _preset("lotr")),
        Config("lorta", "LoRTA r=8 (CP)", _preset("lorta")),
        Config("metatt", "MetaTT r=8 (TT)", _preset("metatt")),
        Config("serial_lora", "Serial LoRA r=8", _preset("serial_lora")),
    ]


# ---------------------------------------------------------------------------- one training step


def logits_of(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


class Runner:
    """A model, its optimizer and fixed inputs; ``step()`` runs one training step."""

    def __init__(
        self,
        fam: Family,
        cfg: Config,
        batch: int,
        seed: int = 0,
        device: str = "cpu",
        precision: str = "fp32",
    ) -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device)
        base = fam.build().to(self.device)
        self.model = cfg.build(fam, base)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.inputs = {k: v.to(self.device) for k, v in fam.inputs(batch).items()}
        self.labels = fam.labels(batch).to(self.device)
        self.gemm = cfg.gemm
        self.amp = PRECISIONS[precision]
        # trainable parameters outside the classifier head: equal for a PEFT row and the
        # tensadapt row compared with it
        self.adapter_params = sum(
            p.numel()
            for name, p in self.model.named_parameters()
            if p.requires_grad and f"{fam.head}." not in name
        )

    def step(self) -> float:
        if self.gemm is not None:
            with ta.gemm.use_backend(self.gemm):
                return self._step()
        return self._step()

    def _step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = logits_of(self.model(**self.inputs))
            loss = nn.functional.cross_entropy(logits.float(), self.labels)
        loss.backward()
        self.opt.step()
        sync(self.device)
        return time.perf_counter() - t0

    def counts(self) -> dict[str, int]:
        """One untimed step under a dispatch counter, one under a profile hook: the aten ops
        it dispatches and the Python functions it calls (backward on this thread)."""
        with torch.autograd.set_multithreading_enabled(False):
            with AtenOps() as ops:
                self.step()
            calls = python_calls(self.step)
        return {"aten_ops": ops.count, "python_calls": calls}


#: ``--precision``: the autocast dtype of the step (None: autocast off)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a wall-clock interval
    holds the work it timed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class AtenOps(TorchDispatchMode):
    """Counts the aten ops dispatched while active: on a GPU, about one kernel launch each
    (views and metadata ops included, as the dispatcher sees them)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        self.count += 1
        return func(*args, **(kwargs or {}))


def python_calls(fn: Callable[[], Any]) -> int:
    """The Python function calls (``'call'`` profile events) that ``fn()`` makes."""
    n = 0

    def hook(frame: Any, event: str, arg: Any) -> None:
        nonlocal n
        if event == "call":
            n += 1

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return n


def bracketed_ratio(t: float, t_before: float, t_after: float) -> float:
    """``t ÷ mean(t_before, t_after)``: a step against the limit steps on either side."""
    return 2.0 * t / (t_before + t_after)


def time_configs(
    fam: Family,
    configs: list[Config],
    batch: int,
    warmup: int,
    repeats: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[str, dict[str, Any]]:
    runners = {c.key: Runner(fam, c, batch, device=device, precision=precision) for c in configs}
    plans: dict[str, dict[str, int]] = {}
    for key, r in runners.items():
        before = ta.plan_cache_info()
        r.step()
        first = ta.plan_cache_info()
        for _ in range(max(0, warmup - 1)):
            r.step()
        after = ta.plan_cache_info()
        plans[key] = {
            "first_step_built": first["built"] - before["built"],
            "warmup_built": after["built"] - first["built"],
        }
    counts = {key: r.counts() for key, r in runners.items()}  # untimed, after the warm-up
    times: dict[str, list[float]] = {k: [] for k in runners}
    faults: dict[str, list[int]] = {k: [] for k in runners}
    ratios: dict[str, list[float]] = {k: [] for k in runners}

    def timed(key: str) -> float:
        r = runners[key]
        before = ta.plan_cache_info()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = r.step()
        times[key].append(t)
        faults[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        after = ta.plan_cache_info()
        plans[key]["timed_built"] = plans[key].get("timed_built", 0)
        plans[key]["timed_built"] += after["built"] - before["built"]
        plans[key]["hits_per_step"] = after["hits"] - before["hits"]
        return t

    # limit, A, limit, B, ..., limit: each step of a configuration sits between two steps of
    # the limit, and is divided by their mean, which cancels the machine's slow drifts (other
    # tenants of a shared host) on both sides of the step
    with_limit = "limit" in runners
    t_before = timed("limit") if with_limit else None
    for _ in range(repeats):
        for key in runners:
            if key == "limit":
                continue
            t = timed(key)
            if with_limit:
                t_after = timed("limit")
                ratios[key].append(bracketed_ratio(t, t_before, t_after))
                t_before = t_after
    ratios["limit"] = [1.0] * len(times.get("limit", []))
    return {
        k: {
            "median": statistics.median(v),
            "min": min(v),
            "max": max(v),
            "paired": statistics.median(ratios[k]) if ratios[k] else float("nan"),
            "ratios": ratios[k],
            "plans": plans[k],
            "adapter_params": runners[k].adapter_params,
            "faults": statistics.median(faults[k]),
            **counts[k],
        }
        for k, v in times.items()
    }


# ---------------------------------------------------------------------------- memory


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_kb() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory mapped: no trimming of the heap top, no ``mmap`` per
    allocation below 32 MB.

    Many models interleaved in one process make glibc hand memory back to the kernel and fault
    it in again on the next step of another model (up to ~10⁵ page faults per step here, each
    of several µs on a virtual machine), a cost that depends on which models happen to run
    next to each other. A training loop with one model reaches a steady state without faults;
    this setting gives the interleaved benchmark the same steady state, for every row alike.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 << 20)
    return bool(ok and libc.mallopt(m_trim_threshold, 2**31 - 1))


def memory_child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    fam = families(args.tiny, args.seq)[args.family]
    by_key = {c.key: c for c in configurations(fam)}
    out = {}
    cuda = args.device == "cuda"
    for key in args.keys:
        _trim()
        runner = Runner(fam, by_key[key], args.batch, device=args.device, precision=args.precision)
        _trim()
        if cuda:  # the caching allocator's own statistics: the peak of live tensors
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _rss_kb()
            _reset_peak()
        for _ in range(args.mem_steps):
            runner.step()
        if cuda:
            out[key] = max(0, torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            out[key] = max(0, _peak_kb() - base) / 1024
        del runner
    print("MEMORY " + json.dumps(out))


def measure_memory(
    args: argparse.Namespace, family: str, keys: list[str], per_process: bool
) -> dict[str, float]:
    groups = [[k] for k in keys] if per_process else [keys]
    result: dict[str, float] = {}
    for group in groups:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-child",
            family,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--threads",
            str(args.threads),
            "--mem-steps",
            str(args.mem_steps),
            "--device",
            args.device,
            "--precision",
            args.precision,
            *(["--tiny"] if args.tiny else []),
            "--keys",
            *group,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("MEMORY ")), None)
        if line is None:
            raise RuntimeError(f"memory child failed for {group}:\n{proc.stderr[-2000:]}")
        result.update(json.loads(line[len("MEMORY ") :]))
    return result


# ---------------------------------------------------------------------------- merged inference


def merged_inference(
    fam: Family,
    batch: int,
    repeats: int,
    configs: list[Config],
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    dev = torch.device(device)
    amp = PRECISIONS[precision]
    base = fam.build().to(dev).eval()
    models = {"base": base}
    for cfg in configs:
        am = cfg.build(fam, copy.deepcopy(base))
        with torch.no_grad():
            for p in am.tensor_adapters.parameters():
                p.normal_(0, 0.01)
        models[cfg.key] = am.merge_and_unload().eval()
    inputs = {k: v.to(dev) for k, v in fam.inputs(batch).items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    ratios: dict[str, list[float]] = {k: [] for k in models}

    def timed(key: str) -> float:
        sync(dev)
        t0 = time.perf_counter()
        models[key](**inputs)
        sync(dev)
        times[key].append(time.perf_counter() - t0)
        return times[key][-1]

    with (
        torch.inference_mode(),
        torch.autocast(dev.type, dtype=amp, enabled=amp is not None),
    ):
        for m in models.values():
            m(**inputs)
        t_before = timed("base")
        for _ in range(repeats):
            for k in models:
                if k != "base":
                    t = timed(k)
                    t_after = timed("base")
                    ratios[k].append(bracketed_ratio(t, t_before, t_after))
                    t_before = t_after
    ratios["base"] = [1.0]
    return {
        k: {
            "median": statistics.median(v),
            "min": min(v),
            "max": max(v),
            "paired": statistics.median(ratios[k]),
            "ratios": ratios[k],
        }
        for k, v in times.items()
    }


# ---------------------------------------------------------------------------- report


def report_family(
    fam: Family,
    configs: list[Config],
    timing: dict[str, dict[str, Any]],
    memory: dict[str, float] | None,
    merged: dict[str, dict[str, float]] | None,
) -> list[str]:
    lines = [f"### {fam.name}", ""]
    same = "limit_same" if "limit_same" in timing else None
    head = "| config | params | median s | min-max s | × limit (paired) | 95% interval |"
    head += " × like-for-like limit | 95% interval | × limit (minima) | × PEFT | aten ops/step |"
    head += " Python calls/step | peak MB | plans 1st/after | faults/step |"
    lines += [head, "|" + "---|" * 15]
    low = timing["limit"]["min"]
    for c in configs:
        t = timing[c.key]
        vs_peft = ops_peft = calls_peft = ""
        if c.compare in timing:
            peft = timing[c.compare]
            vs_peft = f"{t['paired'] / peft['paired']:.3f}"
            ops_peft = f" ({t['aten_ops'] / peft['aten_ops']:.2f}× PEFT)"
            calls_peft = f" ({t['python_calls'] / peft['python_calls']:.2f}× PEFT)"
        mem = f"{memory[c.key]:.0f}" if memory and c.key in memory else ""
        p = t["plans"]
        ci = ratio_interval(t["ratios"]) if c.key != "limit" and t["ratios"] else None
        ci_text = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
        vs_same = same_ci = ""
        if same is not None and c.key != same:
            vs_same = f"{t['paired'] / timing[same]['paired']:.3f}"
            rb = timing[same]["ratios"]
            ra = t["ratios"] if c.key != "limit" else [1.0] * len(rb)
            if ra and len(ra) == len(rb):
                lo, hi = ratio_interval(ra, rb)
                same_ci = f"{lo:.3f}-{hi:.3f}"
        lines.append(
            f"| {c.label} | {t['adapter_params']:,} | {t['median']:.3f} | "
            f"{t['min']:.3f}-{t['max']:.3f} | {t['paired']:.3f} | {ci_text} | "
            f"{vs_same} | {same_ci} | "
            f"{t['min'] / low:.3f} | {vs_peft} | {t['aten_ops']:,}{ops_peft} | "
            f"{t['python_calls']:,}{calls_peft} | {mem} | "
            f"{p['first_step_built']}/{p['warmup_built'] + p.get('timed_built', 0)} | "
            f"{t['faults']:.0f} |"
        )
    if merged:
        lines += ["", "| merged inference (eval, no grad) | median s | min-max s |"]
        lines[-1] += " × base (paired) | 95% interval | × base (minima) |"
        lines += ["|---|---|---|---|---|---|"]
        b_min = merged["base"]["min"]
        for k, v in merged.items():
            ci = ratio_interval(v["ratios"]) if k != "base" else None
            ci_text = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else ""
            lines.append(
                f"| {k} | {v['median']:.4f} | {v['min']:.4f}-{v['max']:.4f} | "
                f"{v['paired']:.3f} | {ci_text} | {v['min'] / b_min:.3f} |"
            )
    lines.append("")
    return lines


def ratio_interval(
    a: list[float], b: list[float] | None = None, level: float = 0.95, draws: int = 2000
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``median(a) ÷ median(b)`` (``median(a)`` without ``b``).

    ``a[i]`` and ``b[i]`` are the paired ratios of two configurations in round ``i``; each draw
    resamples the rounds with replacement, the same rounds for both, so what a round shares
    (the host's speed in that minute) stays paired. Seeded, so a run's report is reproducible
    from its raw ratios."""
    if not a:
        return float("nan"), float("nan")
    rng = random.Random(0)
    n = len(a)
    stats = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        top = statistics.median(a[i] for i in idx)
        stats.append(top / statistics.median(b[i] for i in idx) if b else top)
    stats.sort()
    tail = (1.0 - level) / 2.0
    return stats[int(tail * (draws - 1))], stats[int(round((1.0 - tail) * (draws - 1)))]


#: the targets, by the kernels the adapters run on: ``"pytorch"`` (``TENSADAPT_NATIVE=0``,
#: products on BLAS: the path a GPU runs) or ``"kernels"`` (the CPU-native passes and oneDNN)
BOUNDS: dict[str, dict[str, float]] = {
    "pytorch": {"lora_peft": 1.0, "cara": 1.25, "preset": 1.35},
    "kernels": {"lora_peft": 0.95, "cara": 1.10, "preset": 1.25},
}
PRESET_ROWS = [
    "ta_lora_attn",
    "ta_lora_slices",
    "cara",
    "cara_preset",
    "tenslora",
    "fact_tk",
    "fact_tt",
    "lotr",
    "lorta",
    "metatt",
    "serial_lora",
]


def kernel_path(device: str) -> str:
    """``"kernels"`` where this process's adapters use the CPU-native passes or oneDNN's
    products, else ``"pytorch"``."""
    if device != "cpu":
        return "pytorch"
    return "kernels" if native.available() or ta.gemm.backend() == "onednn" else "pytorch"


def targets_check(
    timing: dict[str, dict[str, Any]],
    memory: dict[str, float] | None,
    fam: str,
    path: str = "kernels",
) -> list[str]:
    """The targets of ``BOUNDS[path]``: step times against the like-for-like limit
    (``limit_same``; the plain limit where it is absent) and PEFT, aten ops per step against
    PEFT's and LoRA's; ratios against the plain limit as ``[info]`` lines."""
    out = []
    bounds = BOUNDS[path]
    limit = "limit_same" if "limit_same" in timing else "limit"

    def ratio(a: str, b: str) -> tuple[float, float, tuple[float, float] | None] | None:
        """(ratio of the paired medians, ratio of minima, 95 % interval of the first): each
        step is paired with the limit steps around it; the minimum is the least disturbed
        repeat."""
        if a in timing and b in timing:
            ta_, tb = timing[a], timing[b]
            ra = ta_.get("ratios", [])
            rb = None if b == "limit" else tb.get("ratios")
            ci = ratio_interval(ra, rb) if rb is None or len(rb) == len(ra) else None
            return ta_["paired"] / tb["paired"], ta_["min"] / tb["min"], ci
        return None

    def line(name: str, value: tuple | float | None, bound: float) -> None:
        if value is None:
            return
        med, low, ci = value if isinstance(value, tuple) else (value, value, None)
        ok = status(med, low, bound)
        shown = f"{med:.3f}" if med == low else f"{med:.3f} (minima: {low:.3f})"
        out.append(f"[{ok}] {fam}: {name} = {shown}{interval_text(ci)} (target <= {bound})")

    def info(name: str, value: tuple | None) -> None:
        if value is not None:
            out.append(
                f"[info] {fam}: {name} = {value[0]:.3f} (minima: {value[1]:.3f})"
                f"{interval_text(value[2])}"
            )

    def ops(name: str, a: str, b: str, bound: float) -> None:
        if a in timing and b in timing:
            n_a, n_b = timing[a]["aten_ops"], timing[b]["aten_ops"]
            value = n_a / n_b
            ok = "OK  " if value <= bound else "MISS"
            out.append(
                f"[{ok}] {fam}: aten ops/step {name} = {n_a} / {n_b} = {value:.3f} "
                f"(target <= {bound}, a count)"
            )

    out.append(f"[info] {fam}: targets for the {path} path, against '{limit}'")
    line("tensadapt LoRA attn / PEFT", ratio("ta_lora_attn", "peft_lora_attn"), bounds["lora_peft"])
    line("tensadapt LoRA all / PEFT", ratio("ta_lora_all", "peft_lora_all"), bounds["lora_peft"])
    ops("tensadapt LoRA attn / PEFT", "ta_lora_attn", "peft_lora_attn", 1.1)
    ops("tensadapt LoRA all / PEFT", "ta_lora_all", "peft_lora_all", 1.1)
    ops("CaRA preset / tensadapt LoRA all", "cara_preset", "ta_lora_all", 2.0)
    info("like-for-like limit / limit", ratio("limit_same", "limit"))
    # not targets: the adapters' own cost, their dense products on BLAS as the limit's are
    for name, a, b in (
        ("tensadapt LoRA attn, products on BLAS / PEFT", "ta_lora_attn_blas", "peft_lora_attn"),
        ("CaRA, products on BLAS / limit", "cara_blas", "limit"),
        ("CaRA, products on BLAS / CaRA reference-style", "cara_blas", "cara_reference"),
    ):
        info(name, ratio(a, b))
    line(f"CaRA / {limit}", ratio("cara", limit), bounds["cara"])
    line("CaRA / CaRA reference-style", ratio("cara", "cara_reference"), 0.5)
    # not a target: the engine's own materialise folds ΔW into W and sits near full fine-tuning
    info("CaRA / CaRA materialise (folded)", ratio("cara", "cara_materialise"))
    for k in PRESET_ROWS:
        line(f"{k} / {limit}", ratio(k, limit), bounds["preset"])
        if limit != "limit":
            info(f"{k} / limit", ratio(k, "limit"))
    if memory:
        for ta_key, peft_key in (
            ("ta_lora_attn", "peft_lora_attn"),
            ("ta_lora_all", "peft_lora_all"),
        ):
            if ta_key in memory and peft_key in memory:
                line(f"peak MB {ta_key} / PEFT", memory[ta_key] / max(memory[peft_key], 1e-9), 1.0)
    return out


def status(med: float, low: float, bound: float) -> str:
    """``OK`` when the paired ratio meets the bound, ``OK@min`` when only the ratio of minima
    (the least disturbed repeats) does, else ``MISS``."""
    return "OK  " if med <= bound else "OK@min" if low <= bound else "MISS"


def interval_text(ci: tuple[float, float] | None) -> str:
    return "" if ci is None else f" [95% interval {ci[0]:.3f}-{ci[1]:.3f}]"


def merged_check(merged: dict[str, Any], fam: str) -> list[str]:
    base = merged["base"]
    out = []
    for k, v in merged.items():
        if k != "base":
            med, low = v["paired"], v["min"] / base["min"]
            ci = interval_text(ratio_interval(v.get("ratios", [])))
            out.append(
                f"[{status(med, low, 1.01)}] {fam}: merged {k} / base = {med:.3f} "
                f"(minima: {low:.3f}){ci} (target <= 1.01)"
            )
    return out


def summary(checks: list[str]) -> str:
    """How many targets the run meets on the paired ratio, and how many misses it resolves.

    A target whose paired ratio misses counts as missed even when the ratio of minima meets it
    (``OK@min``): the minima are one repeat each, the paired median is the measurement. A miss
    whose whole 95 % interval lies above its bound is the code's; one whose interval contains
    the bound is within what this run can tell apart from the host's noise."""
    met = sum(c.startswith("[OK  ]") for c in checks)
    missed = [c for c in checks if c.startswith(("[MISS", "[OK@min"))]
    at_min = sum(c.startswith("[OK@min") for c in missed)
    resolved = 0
    for c in missed:
        if "95% interval " in c and "target <= " in c:
            lo = float(c.split("95% interval ")[1].split("-")[0])
            bound = float(c.split("target <= ")[1].rstrip(")"))
            resolved += lo > bound
        else:
            resolved += 1
    by_min = f" ({at_min} of them met by the minima)" if at_min else ""
    return (
        f"{met} of {met + len(missed)} targets met; {len(missed)} missed{by_min}, {resolved} of "
        "them with the whole 95% interval above the bound"
    )


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repeats, batch 8, core configs")
    ap.add_argument("--tiny", action="store_true", help="toy models (smoke test)")
    ap.add_argument("--families", nargs="+", default=["dinov2", "minilm"])
    ap.add_argument("--only", nargs="+", help="config keys to run (limit is always added)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--warmup", type=int, help="warm-up steps (2; --quick: 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument(
        "--precision", choices=list(PRECISIONS), default="fp32", help="bf16: torch.autocast"
    )
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-merged", action="store_true")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's trimming on (more faults)"
    )
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--keys", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.quick or args.tiny
    args.batch = args.batch or (8 if quick else 32)
    if args.memory_child:
        args.family = args.memory_child
        memory_child(args)
        return {}
    repeats = args.repeats or (3 if quick else 9)
    kept = False if args.default_malloc else keep_freed_memory()
    args.warmup = args.warmup or (1 if quick else 2)
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    fams = families(args.tiny, args.seq)
    where = platform.processor() or platform.machine()
    if args.device == "cuda":
        where = f"{torch.cuda.get_device_name()} (host {where})"
    print(
        f"# tensadapt speed benchmark: {where}, {args.device}, {args.precision}, "
        f"{args.threads} threads, torch {torch.__version__}, batch {args.batch}, "
        f"repeats {repeats} (interleaved), warm-up {args.warmup}; freed memory kept mapped: "
        f"{kept}; load average {_loadavg()}; adapted maps' products: {ta.gemm.status()}; "
        f"native passes: {native.status()}; targets: {kernel_path(args.device)} path"
    )
    results: dict[str, Any] = {"args": vars(args), "families": {}}
    lines: list[str] = []
    checks: list[str] = []
    for fkey in args.families:
        fam = fams[fkey]
        configs = configurations(fam)
        if args.only:
            configs = [c for c in configs if c.key in args.only or c.key.startswith("limit")]
        elif quick:
            configs = [c for c in configs if "quick" in c.tags]
        t0 = time.perf_counter()
        timing = time_configs(
            fam, configs, args.batch, args.warmup, repeats, args.device, args.precision
        )
        memory = None
        if not args.no_memory:
            memory = measure_memory(args, fkey, [c.key for c in configs], per_process=not quick)
        merged = None
        if not args.no_merged:
            merged_cfgs = [c for c in configs if c.key in ("ta_lora_all", "cara")]
            # short steps, a bound 1 % above parity: more pairs (12 per training repeat since
            # run 32: a merged model is the base model's own structure, its ratio is 1 but
            # for the host's noise)
            merged_repeats = max(12 * repeats, 2 if args.tiny else 10)
            merged = merged_inference(
                fam, args.batch, merged_repeats, merged_cfgs, args.device, args.precision
            )
        lines += report_family(fam, configs, timing, memory, merged)
        checks += targets_check(timing, memory, fkey, kernel_path(args.device))
        if merged:
            checks += merged_check(merged, fkey)
        new_plans = sum(
            t["plans"].get("timed_built", 0) + t["plans"]["warmup_built"] for t in timing.values()
        )
        checks.append(
            f"[{'OK  ' if new_plans == 0 else 'MISS'}] {fkey}: plans built after the first step "
            f"= {new_plans} (target 0); cache {ta.plan_cache_info()}"
        )
        results["families"][fkey] = {"timing": timing, "memory": memory, "merged": merged}
        print("\n".join(report_family(fam, configs, timing, memory, merged)))
        print(f"({fkey}: {time.perf_counter() - t0:.0f} s)\n", flush=True)
    print(f"load average at the end: {_loadavg()}")
    print("## targets")
    print("\n".join(checks))
    print(summary(checks))
    results["checks"] = checks
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
