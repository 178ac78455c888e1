"""Thin passes in native code: ``z P`` and ``uᵀ z`` for a token-sized ``z`` and a thin ``P``/``u``.

A low-rank adapter's extra work is a few passes over big activations with a rank-``R``
matrix: ``h = x Aᵀ``, ``gh = gy B``, ``gAᵀ = ghᵀ x``, ``gBᵀ = hᵀ gy``. Each is bound by the
read of the activation, yet CPU BLAS runs these shapes at about half that speed (for
``x`` 2080 × 1536 and ``R = 8``: ``x Aᵀ`` 1.8 ms, ``hᵀ x`` 2.0 ms, reading ``x`` once
0.8 ms). ``thin_passes.c`` does them in one read each, ``gy B`` with ``hᵀ gy`` in one
read together (:func:`grad_pass`), and all four (with the bias gradients ``1ᵀ gy``) for maps
that read one ``x`` in one read of ``x`` and each ``gy``, block by block of tokens
(:func:`factor_grads`). ``thin_expand.c``
forms the thin-to-wide products ``C + u P`` (``b + h Bᵀ``, ``gh A``, ``W + B A``) with
each output tile in registers over the rank (:func:`rows_expand`).

``drop_connect.c`` applies DropConnect to a low-rank update while folding it into the
frozen weight (:func:`drop_fold`), gives the factor gradients from thin passes and the
dropped entries' dot products in one read of ``x`` and ``gy`` (:func:`drop_factor_grads`),
masks a dense weight gradient (:func:`drop_grad_`) and gives the mask itself
(:func:`keep_bytes`); the mask is a keyed hash of each entry's index
(:mod:`tensadapt.drop_connect`), so it is drawn again instead of stored.

Each kernel is written once against the vector macros of ``simd.h`` and compiled twice, for
AVX2 (8 floats per register) and AVX-512F (16); :func:`isa` says which set runs (the widest
the CPU has, or ``TENSADAPT_NATIVE_ISA``), and :func:`max_rank` the widest thin operand it
takes. The C files are compiled on first use with the system C compiler (``$CC``, else
``cc``) into ``$TENSADAPT_CACHE`` (default ``~/.cache/tensadapt``), keyed by the sources'
hash, and loaded with :mod:`ctypes`; OpenMP threads come from the runtime torch already
loaded. Where there is no compiler, no AVX2/FMA, or ``TENSADAPT_NATIVE=0``, :func:`available`
is False and callers use their PyTorch path; the results agree to float32 rounding (the
sums run in another order).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = [
    "available",
    "status",
    "isa",
    "use_isa",
    "max_rank",
    "usable",
    "rows_times",
    "cols_reduce",
    "grad_pass",
    "rows_expand",
    "pack",
    "drop_fold",
    "drop_grad_",
    "keep_bytes",
    "drop_factor_grads",
]

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(n) for n in ("thin_passes.c", "thin_expand.c", "drop_connect.c")
)
HEADERS = (Path(__file__).with_name("simd.h"),)  # included by the sources, part of the key
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")
MIN_TOKENS = 64  # below this the ctypes call and packing outweigh what BLAS loses
#: widest thin operand the AVX2 passes take: up to rank 24 they beat BLAS on activations read
#: from memory; at 32 single passes range from 10 % slower to 28 % faster than BLAS, and
#: whole FacT-TK steps (rank 32) ran 2-4 % faster (2080 tokens, widths 384 to 1536;
#: ``benchmarks/HISTORY.md``, run 21)
MAX_RANK = 32
#: widest thin operand of the AVX2 :func:`rows_expand` (the same bound, measured with it)
MAX_EXPAND_RANK = 32
#: widest thin operand of the AVX-512 kernels, passes and expand alike: twice the FMA width
#: of AVX2 keeps them 1.5-2x ahead of BLAS at every rank measured, 8 to 64
MAX_RANK_AVX512 = 64

_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch < 2.3: never
_lib: ctypes.CDLL | None = None
_state = "unloaded"  # "unloaded" | "ready" | "off"
_isa = ""  # "avx2" | "avx512": the kernels' instruction set once loaded
ISAS = {"avx2": 256, "avx512": 512}
_reason = "not loaded yet"


def _cache_dir() -> Path:
    root = os.environ.get("TENSADAPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tensadapt"
    )
    return Path(root)


def _build() -> Path:
    """Compile the C sources once per version into one library, renamed into place."""
    compiler = os.environ.get("CC", "cc")
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"thin_passes-{platform.machine()}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", tmp],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> ctypes.CDLL | None:
    global _lib, _state, _reason
    if _state != "unloaded":
        return _lib
    _state = "off"
    if os.environ.get("TENSADAPT_NATIVE", "1") == "0":
        _reason = "switched off by TENSADAPT_NATIVE=0"
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        _reason = f"no kernels for {platform.machine()} (x86-64 only)"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", b"") or b"").decode(errors="replace").strip()
        _reason = f"build failed: {err}" + (f": {detail}" if detail else "")
        log.info("native thin passes unavailable, using PyTorch: %s", _reason)
        return None
    best = lib.ta_cpu_ok()
    if not best:
        _reason = "the CPU lacks AVX2 or FMA"
        return None
    wanted = os.environ.get("TENSADAPT_NATIVE_ISA", "auto")
    if wanted not in ("auto", *ISAS):
        _reason = f"TENSADAPT_NATIVE_ISA={wanted!r}: expected 'auto', 'avx2' or 'avx512'"
        log.warning("native thin passes off: %s", _reason)
        return None
    _select(lib, best if wanted == "auto" else ISAS[wanted])
    ptr, size = ctypes.c_void_p, ctypes.c_long
    lib.ta_select_isa.argtypes = [ctypes.c_int]
    lib.ta_panel_width.argtypes = [ctypes.c_long]
    lib.ta_panel_width.restype = ctypes.c_int
    lib.ta_rows_times.argtypes = [ptr, size, size, ptr, size, ptr, ctypes.c_int]
    lib.ta_rows_times.restype = None
    lib.ta_cols_reduce.argtypes = [ptr, size, size, ptr, size, ptr, ctypes.c_int]
    lib.ta_cols_reduce.restype = ctypes.c_int
    lib.ta_grad_pass.argtypes = [ptr, size, size, ptr, size, ptr, ptr, size, ptr, ctypes.c_int]
    lib.ta_grad_pass.restype = ctypes.c_int
    lib.ta_factor_grads.argtypes = [ctypes.c_int, ctypes.c_int, ptr, size, size, ptr, ptr, ptr]
    lib.ta_factor_grads.argtypes += [ptr, size, ptr, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.ta_factor_grads.restype = ctypes.c_int
    lib.ta_rows_expand.argtypes = [ptr, size, size, ptr, size, ptr, size, ptr, ctypes.c_int]
    lib.ta_rows_expand.restype = None
    u32, i32 = ctypes.c_uint32, ctypes.c_int
    lib.ta_drop_fold.argtypes = [ptr, size, size, ptr, ptr, size, ctypes.c_float, u32, u32, i32]
    lib.ta_drop_fold.argtypes += [ptr, i32]
    lib.ta_drop_fold.restype = None
    lib.ta_drop_grad.argtypes = [ptr, size, ctypes.c_float, u32, u32, i32, i32]
    lib.ta_drop_grad.restype = None
    lib.ta_keep_mask.argtypes = [ptr, size, u32, u32, i32, i32]
    lib.ta_keep_mask.restype = None
    lib.ta_drop_factor_grads.argtypes = [ptr, size, ptr, size, size, ptr, ptr, size, ptr, ptr]
    lib.ta_drop_factor_grads.argtypes += [ctypes.c_float, u32, u32, i32, ptr, ptr, ptr, i32]
    lib.ta_drop_factor_grads.restype = ctypes.c_int
    _lib, _state, _reason = lib, "ready", "ready"
    return lib


def _select(lib: ctypes.CDLL, width: int) -> None:
    global _isa
    _isa = "avx512" if lib.ta_select_isa(width) == 512 else "avx2"


def isa() -> str:
    """The kernels' instruction set: ``"avx512"`` where the CPU has AVX-512F (16 floats per
    register: twice the FMA width, which the rank-32 passes are bound by), else ``"avx2"``;
    ``""`` when unavailable. ``TENSADAPT_NATIVE_ISA=avx2`` keeps AVX2 on any CPU."""
    return _isa if _load() is not None else ""


def use_isa(name: str) -> str:
    """Switch the kernels to ``name`` (``"avx2"`` or ``"avx512"``, the latter only where the
    CPU has it); returns the set now in use. For comparing the two in one process."""
    if name not in ISAS:
        raise ValueError(f"use_isa: expected one of {sorted(ISAS)}, got {name!r}")
    lib = _load()
    if lib is None:
        raise RuntimeError(f"native kernels unavailable: {_reason}")
    _select(lib, ISAS[name])
    return _isa


def available() -> bool:
    """Whether the native thin passes are compiled, loaded and supported by this CPU."""
    return _load() is not None


def status() -> str:
    """``"ready"``, or why the native passes are not in use (build error, CPU, switched off)."""
    _load()
    return _reason


def max_rank(expand: bool = False) -> int:
    """The widest thin operand the kernels in use take (:func:`rows_expand` when ``expand``):
    :data:`MAX_RANK_AVX512` with AVX-512, else :data:`MAX_RANK` / :data:`MAX_EXPAND_RANK`."""
    if _isa == "avx512":
        return MAX_RANK_AVX512
    return MAX_EXPAND_RANK if expand else MAX_RANK


def usable(*tensors: torch.Tensor, rank: int, expand: bool = False) -> bool:
    """True when the thin operand's width ``rank`` is at most :func:`max_rank` (of
    :func:`rows_expand` when ``expand``), every tensor is a plain, contiguous float32 CPU
    matrix of at least :data:`MIN_TOKENS` rows, and the library is available (not while
    compiling a graph)."""
    if _state == "off":
        return False
    # the tensors first: a CUDA (or any non-CPU) tensor never starts the build
    for t in tensors:
        if not plain_cpu_float32(t) or t.dim() != 2 or not t.is_contiguous():
            return False
        if t.shape[0] < MIN_TOKENS:
            return False
    if _is_compiling() or not available():
        return False
    return rank <= max_rank(expand)


def plain_cpu_float32(t: torch.Tensor) -> bool:
    """Whether ``t`` is a float32 CPU tensor of torch's own class (not a subclass such as a
    fake or functional tensor, whose data a foreign kernel cannot read)."""
    return (
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype == torch.float32
        and t.device.type == "cpu"
    )


def pack(p: torch.Tensor) -> torch.Tensor:
    """``P`` (M, R) as ``(⌈R/w⌉, M, w)``, zero padded: the layout the kernels read, ``w`` the
    floats per vector register (8 with AVX2, 16 with AVX-512 from rank 9 on; at rank 8 a
    16-wide panel would be half padding, so the AVX2 pass runs it)."""
    m, r = p.shape
    w = _lib.ta_panel_width(r)
    if r == w:  # one panel: the layout is P's own
        return p.contiguous()
    groups = (r + w - 1) // w
    if r % w:
        p = torch.nn.functional.pad(p, (0, groups * w - r))
    return p.reshape(m, groups, w).transpose(0, 1).contiguous()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def rows_times(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``z P``: ``z`` (N, M) contiguous float32, ``P`` (M, R); one read of ``z``."""
    n, m = z.shape
    r = p.shape[1]
    packed = pack(p.detach())
    out = z.new_empty(n, r)
    _lib.ta_rows_times(z.data_ptr(), n, m, packed.data_ptr(), r, out.data_ptr(), _threads())
    return out


def cols_reduce(u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``uᵀ z`` (R, M): ``u`` (N, R) and ``z`` (N, M) contiguous float32; one read of ``z``."""
    n, r = u.shape
    m = z.shape[1]
    out = z.new_empty(r, m)
    status = _lib.ta_cols_reduce(u.data_ptr(), n, r, z.data_ptr(), m, out.data_ptr(), _threads())
    if status != 0:
        raise MemoryError(f"thin pass uᵀ z: no scratch memory for {_threads()} × {r} × {m}")
    return out


def grad_pass(
    gy: torch.Tensor, b: torch.Tensor, hb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gy B, hbᵀ gy)`` in one read of ``gy`` (N, M): ``B`` (M, R), ``hb`` (N, R_h)."""
    n, m = gy.shape
    r, rh = b.shape[1], hb.shape[1]
    packed = pack(b.detach())
    gh = gy.new_empty(n, r)
    g = gy.new_empty(rh, m)
    status = _lib.ta_grad_pass(
        gy.data_ptr(), n, m, packed.data_ptr(), r, gh.data_ptr(), hb.data_ptr(), rh,
        g.data_ptr(), _threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"thin pass hbᵀ gy: no scratch memory for {_threads()} × {rh} × {m}")
    return gh, g


#: most maps :func:`factor_grads` takes in one call
MAX_MAPS = 16


def factor_grads(
    x: torch.Tensor,
    gys: list[torch.Tensor],
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    *,
    shared: bool = False,
    biases: list[bool] | None = None,
) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]]:
    """``[(gA_j, gB_j, gb_j)]``: the factor and bias gradients of maps
    ``y_j = x (W_j + B_j A_j)ᵀ + b_j`` that read one ``x`` (N, K), in one read of ``x`` and of
    each ``gy_j`` (N, M_j). ``A_j`` (R, K), ``B_j`` (M_j, R), one rank ``R``, at most
    :data:`MAX_MAPS` maps:

    * ``gA_j = (gy_j B_j)ᵀ x`` and ``gB_j = gy_jᵀ (x A_jᵀ)``;
    * with ``shared`` every map has the one ``A = A_1`` (``a_list`` holds it first):
      ``gA_1 = (Σ_j gy_j B_j)ᵀ x``, ``gB_j = gy_jᵀ (x Aᵀ)`` and ``gA_j`` None for ``j > 1``;
    * ``gb_j = 1ᵀ gy_j`` where ``biases[j]``, else None.

    The rank activations ``x A_jᵀ`` and ``gy_j B_j`` are formed block by block on the way."""
    n, k = x.shape
    maps = len(gys)
    r = a_list[0].shape[0] if a_list else 0
    if not 1 <= maps <= MAX_MAPS or any(t.shape[0] != r for t in a_list):
        raise ValueError(f"factor_grads: 1 to {MAX_MAPS} maps of one rank, got {maps} maps")
    if len(b_list) != maps or (len(a_list) != maps and not shared):
        need_a = "a shared A" if shared else f"{maps} A factors"
        raise ValueError(
            f"factor_grads: {maps} gradients need {maps} B factors and {need_a}, "
            f"got {len(b_list)} B and {len(a_list)} A"
        )
    biases = biases or [False] * maps
    a_used = a_list[:1] if shared else a_list
    pas = [pack(a.detach().t()) for a in a_used] * (maps if shared else 1)  # held until return
    pbs = [pack(b.detach()) for b in b_list]
    hs = [x.new_empty(n, r) for _ in a_used] * (maps if shared else 1)
    gs = [x.new_empty(n, r) for _ in gys]
    gas = [x.new_empty(r, k) for _ in a_used] * (maps if shared else 1)
    gbts = [x.new_empty(r, gy.shape[1]) for gy in gys]
    gbs = [x.new_empty(gy.shape[1]) if bias else None for gy, bias in zip(gys, biases)]

    def ptrs(ts: list[torch.Tensor | None]) -> ctypes.Array:
        return (ctypes.c_void_p * maps)(*(None if t is None else t.data_ptr() for t in ts))

    widths = (ctypes.c_long * maps)(*(gy.shape[1] for gy in gys))
    status = _lib.ta_factor_grads(
        maps, int(shared), x.data_ptr(), k, n, ptrs(gys), widths, ptrs(pas), ptrs(pbs), r,
        ptrs(hs), ptrs(gs), ptrs(gas), ptrs(gbts), ptrs(gbs), _threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"factor gradients: no scratch memory for {_threads()} threads")
    return [
        (ga if not shared or j == 0 else None, gbt.t(), gb)
        for j, (ga, gbt, gb) in enumerate(zip(gas, gbts, gbs))
    ]


def rows_expand(u: torch.Tensor, p: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``c + u P`` (N, M): ``u`` (N, R) contiguous float32, ``P`` (R, M); ``c`` None, a row
    (M,) added to every token, or an (N, M) matrix. ``P`` and ``c`` are made contiguous."""
    n, r = u.shape
    m = p.shape[1]
    p = p.detach().contiguous()
    if c is not None:
        if c.shape not in ((m,), (n, m)) or c.dtype != u.dtype:
            got = f"{tuple(c.shape)} {c.dtype}"
            raise ValueError(f"rows_expand: c must be ({m},) or ({n}, {m}) {u.dtype}, got {got}")
        c = c.detach().contiguous()
    out = u.new_empty(n, m)
    _lib.ta_rows_expand(
        u.data_ptr(), n, r, p.data_ptr(), m, None if c is None else c.data_ptr(),
        0 if c is None or c.dim() == 1 else m, out.data_ptr(), _threads(),
    )  # fmt: skip
    return out


def drop_fold(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: float,
    threshold: int,
    key: tuple[int, int],
) -> torch.Tensor:
    """``W + c·(m ⊙ B A)`` in one pass: ``W`` (out, in), ``A`` (R, in), ``B`` (out, R), all
    contiguous float32; ``m`` the keep mask of ``key`` and ``threshold``."""
    rows, cols = w.shape
    out = torch.empty_like(w)
    _lib.ta_drop_fold(
        w.data_ptr(), rows, cols, a.data_ptr(), b.data_ptr(), a.shape[0], c, *key, threshold,
        out.data_ptr(), _threads(),
    )  # fmt: skip
    return out


def drop_grad_(g: torch.Tensor, c: float, threshold: int, key: tuple[int, int]) -> torch.Tensor:
    """``g ← c·(m ⊙ g)`` in place, ``g`` contiguous float32, ``m`` as in :func:`drop_fold`."""
    _lib.ta_drop_grad(g.data_ptr(), g.numel(), c, *key, threshold, _threads())
    return g


def keep_bytes(numel: int, threshold: int, key: tuple[int, int]) -> torch.Tensor:
    """The keep mask of ``key`` and ``threshold`` over ``numel`` entries, as ``uint8`` 0/1."""
    out = torch.empty(numel, dtype=torch.uint8)
    _lib.ta_keep_mask(out.data_ptr(), numel, *key, threshold, _threads())
    return out


def drop_factor_grads(
    gy: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: float,
    threshold: int,
    key: tuple[int, int],
    bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(gA, gB, gbias)`` of DropConnect on ``ΔW = B A``: ``gA = c·Bᵀ(m ⊙ G)``,
    ``gB = c·(m ⊙ G)Aᵀ`` for ``G = gyᵀ x``, and ``1ᵀ gy`` when ``bias``. ``gy`` (N, out),
    ``x`` (N, in), ``A`` (R, in), ``B`` (out, R) contiguous float32; ``m`` the keep mask of
    ``key``. Thin passes and the dropped entries' dot products in one read of ``x`` and
    ``gy``: the drop rate's share of the dense ``gyᵀ x``."""
    n, rows = gy.shape
    cols, r = x.shape[1], a.shape[0]
    a_t = a.detach().t().contiguous()
    b = b.detach()
    ga = x.new_empty(r, cols)
    gb = x.new_empty(rows, r)
    gbias = x.new_empty(rows) if bias else None
    pa, pb = pack(a_t), pack(b)  # held until the call returns
    status = _lib.ta_drop_factor_grads(
        gy.data_ptr(), rows, x.data_ptr(), cols, n, a_t.data_ptr(), b.data_ptr(), r,
        pa.data_ptr(), pb.data_ptr(), c, *key, threshold, ga.data_ptr(),
        gb.data_ptr(), gbias.data_ptr() if bias else None, _threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"DropConnect factor gradients: no scratch memory for {rows} × {cols}")
    return ga, gb, gbias
