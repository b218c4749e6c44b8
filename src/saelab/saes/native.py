"""The compiled part of the CPU fast path (`topk_native.c`), built once per machine with the system C compiler and
loaded with ctypes: an exact one-pass top-k over latent-major pre-activations; the exact, fixed-order scores of
candidate latents that define a selection (`certified`); the bf16 filter's weight with the norms its bound needs;
the unit-norm decoder constraint, one pass per row (`project_rows`, `normalize_rows`); and the sparse decoder's
backward, latent by latent (`latent_pass`); and the pooled FVU's sums in one pass (`fvu_sums`).

The top-k reads the [n, rows] GEMM output once, in order, and adds the encoder bias on the fly, so the GEMM itself
can skip the bias (a broadcast copy of the whole output, ~4% of the step at n = 98,304). On AVX-512 CPUs it compares
64 values per step, starts each token's threshold at a lower bound of its k-th largest value and cuts full candidate
buffers with vector compresses; measured on a 2-core Zen 4 over 4,096 tokens: 7 ms for 4,096 fp32 latents with
k = 41 (the fp32 filter's candidates) and 24 ms for 24,576 bf16 latents with k = 65 (the bf16 filter's), against 27
and 74 ms for the scalar-cut AVX2 loop it replaced there.

Everything here is optional: without a C compiler, with `SAELAB_NATIVE=0`, or when a build fails (a warning says
why), `library()` is None and the kernels use the torch path. The built library lives in the user cache
(`$SAELAB_CACHE/native`), named by a hash of the source, the compiler and the CPU's feature flags, since it is
built for the CPU it runs on (-march=native).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from saelab.user_cache import cache_dir

SOURCE = Path(__file__).with_name("topk_native.c")
# Read once, at import: the library is built lazily, and a source file changed under a running process (an editable
# install updated mid-run) would otherwise be built against the argument lists declared below from the old one
_SOURCE_TEXT = SOURCE.read_bytes()
# -ffp-contract=off: every product and sum of an exact score rounded on its own, as elementwise torch ops round them
# (`exact_scores`), so the definition is the same with or without fused multiply-add, on CPU and on CUDA
_FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC", "-pthread")


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: a concurrent or interrupted build never leaves a
    half-written library under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    source = Path(tmp).with_suffix(".c")
    try:
        source.write_bytes(_SOURCE_TEXT)
        subprocess.run([compiler, *_FLAGS, str(source), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
        source.unlink(missing_ok=True)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, built on first use; None where it cannot be had (the torch path runs instead)."""
    if os.environ.get("SAELAB_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    key = hashlib.sha256(
        b"\0".join([_SOURCE_TEXT, compiler.encode(), " ".join(_FLAGS).encode(), _cpu_signature().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / "native" / f"topk-{platform.machine()}-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"saelab could not build its native top-k kernel ({detail}); using the slower torch path. "
                      "Install a C compiler (gcc) or set SAELAB_NATIVE=0 to silence this.", stacklevel=2)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.saelab_topk_latent_major, lib.saelab_topk_latent_major_bf16):
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, ptr, ptr, i64]
        fn.restype = ctypes.c_int
    lib.saelab_rescore_topk.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64]
    lib.saelab_rescore_topk.restype = ctypes.c_int
    lib.saelab_bf16_split.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64]
    lib.saelab_bf16_split.restype = ctypes.c_int
    lib.saelab_project_rows.argtypes = [ptr, ptr, i64, i64, i64]
    lib.saelab_project_rows.restype = ctypes.c_int
    lib.saelab_normalize_rows.argtypes = [ptr, i64, i64, i64]
    lib.saelab_normalize_rows.restype = ctypes.c_int
    lib.saelab_latent_pass.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ptr, ptr, i64]
    lib.saelab_latent_pass.restype = ctypes.c_int
    lib.saelab_group_by_latent.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr]
    lib.saelab_group_by_latent.restype = ctypes.c_int
    lib.saelab_fvu_sums.argtypes = [ptr, ptr, i64, i64, ptr, i64]
    lib.saelab_fvu_sums.restype = ctypes.c_int
    return lib


def supports(pre: Tensor) -> bool:
    """Whether `topk_latent_major` can take this pre-activation matrix (CPU, float32 or bfloat16) on this machine."""
    return pre.device.type == "cpu" and pre.dtype in (torch.float32, torch.bfloat16) and library() is not None


def topk_latent_major(pre: Tensor, bias: Tensor, k: int, values: Tensor, indices: Tensor) -> bool:
    """Write the k largest `pre[:, r] + bias` of every column r of the latent-major `pre` [n, rows] (unsorted) into
    `values` [rows, k] and their latents into `indices` [rows, k]. Returns False, writing nothing useful, when the
    library is missing or a column has fewer than k finite candidates (NaN, -inf), so the caller can use torch.topk.
    """
    lib = library()
    n, rows = pre.shape
    if lib is None or not (pre.is_contiguous() and values.is_contiguous() and indices.is_contiguous()):
        return False
    bias = bias.detach().float().contiguous()
    kernel = lib.saelab_topk_latent_major_bf16 if pre.dtype == torch.bfloat16 else lib.saelab_topk_latent_major
    status = kernel(pre.data_ptr(), n, rows, rows, bias.data_ptr(), k, values.data_ptr(), indices.data_ptr(),
                    torch.get_num_threads())
    return status == 0


def rescore_topk(x: Tensor, weight: Tensor, bias: Tensor, candidates: Tensor | None, k: int) -> tuple[Tensor, ...]:
    """(values, indices [rows, k], k-th best [rows]): for each row of `x` [rows, d], the exact scores x · w_j + b_j
    of its `candidates` [rows, c] (None: every latent), each summed in one fixed order that depends on nothing but
    the two vectors (see `saelab_rescore_topk`), and the k best under (score descending, latent ascending). CPU,
    float32; requires `library()`."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not built on this machine")
    x, weight, bias = x.detach().contiguous(), weight.detach().contiguous(), bias.detach().contiguous()
    rows, (n, d) = x.shape[0], weight.shape
    c = n if candidates is None else candidates.shape[1]
    values, kth = x.new_empty(rows, k), x.new_empty(rows)
    indices = torch.empty(rows, k, dtype=torch.long)
    cand = None if candidates is None else candidates.contiguous()
    status = lib.saelab_rescore_topk(x.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                                     None if cand is None else cand.data_ptr(), rows, n, d, c, k, values.data_ptr(),
                                     indices.data_ptr(), kth.data_ptr(), torch.get_num_threads())
    if status == 4:
        raise IndexError(f"rescore_topk: a candidate latent is outside [0, {n})")
    if status:
        raise MemoryError(f"the native rescoring could not allocate its buffers (status {status})")
    return values, indices, kth


def bf16_split(weight: Tensor, out: Tensor | None, rows: Tensor | None = None) -> tuple[float, float, float]:
    """(max_j ||w16_j||, max_j ||w_j - w16_j||, max_j ||w_j||) of a float32 [n, d] weight and its bfloat16 rounding
    w16, written into `out` (n·d bfloat16 elements) unless None, in one pass over the weight (a NaN weight makes the
    norms NaN): the bf16 filter's GEMM operand and the norms its error bound needs. With `rows` (a contiguous
    [n, 3] float64 tensor) each row's three squared norms are written there too. CPU; requires `library()`."""
    lib = library()
    if lib is None:
        raise RuntimeError("the native kernels are not built on this machine")
    weight = weight.detach().contiguous()
    n, d = weight.shape
    if out is not None and not (out.dtype == torch.bfloat16 and out.is_contiguous() and out.numel() == n * d):
        raise ValueError(f"bf16_split: out must be a contiguous bfloat16 tensor of {n * d} elements")
    if rows is not None and not (rows.dtype == torch.float64 and rows.is_contiguous() and rows.shape == (n, 3)):
        raise ValueError(f"bf16_split: rows must be a contiguous float64 tensor of shape ({n}, 3)")
    stats = torch.zeros(3, dtype=torch.float64)
    status = lib.saelab_bf16_split(weight.data_ptr(), n, d, None if out is None else out.data_ptr(), stats.data_ptr(),
                                   None if rows is None else rows.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError(f"the native bf16 split could not allocate its buffers (status {status})")
    nu, rho, w_max = stats.tolist()
    return nu, rho, w_max


def rows_supported(*matrices: Tensor) -> bool:
    """Whether the row kernels (`project_rows`, `normalize_rows`, `latent_pass`, `fvu_sums`) can take these
    matrices: 2-D, contiguous float32 on CPU, with the library built."""
    return library() is not None and all(
        m.device.type == "cpu" and m.dtype == torch.float32 and m.dim() == 2 and m.is_contiguous() for m in matrices)


def project_rows(weight: Tensor, grad: Tensor) -> None:
    """In place, row by row: grad_i -= (<grad_i, w_i> / max(<w_i, w_i>, 1e-30)) w_i, one pass over both matrices, each
    sum in the exact scores' fixed order (a row's result depends only on the row). Requires `rows_supported`."""
    lib = library()
    if lib is None or not rows_supported(weight, grad) or weight.shape != grad.shape:
        raise ValueError("project_rows needs the native library and two contiguous float32 CPU matrices of one shape")
    n, d = weight.shape
    if lib.saelab_project_rows(weight.data_ptr(), grad.data_ptr(), n, d, torch.get_num_threads()):
        raise RuntimeError("the native row projection could not start its threads")
    torch.autograd.graph.increment_version(grad)  # written behind autograd's back: as an in-place op would mark it


def normalize_rows(weight: Tensor) -> None:
    """In place: every row w_i /= max(||w_i||, 1e-12), one pass, the norm summed in the exact scores' fixed order.
    Requires `rows_supported`."""
    lib = library()
    if lib is None or not rows_supported(weight):
        raise ValueError("normalize_rows needs the native library and a contiguous float32 CPU matrix")
    n, d = weight.shape
    if lib.saelab_normalize_rows(weight.data_ptr(), n, d, torch.get_num_threads()):
        raise RuntimeError("the native row normalisation could not start its threads")
    torch.autograd.graph.increment_version(weight)


def latent_pass(rows: Tensor, order: Tensor, starts: Tensor, k: int, weight: Tensor | None = None,
                coefficients: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Over a selection grouped by latent (`order` [B·k] flat positions b·k + slot, latent by latent, token order
    within one; `starts` [n + 1]): with `weight` [n, d], dots [B, k] = <rows[b], weight[latent]> of every selected
    pair, in exact_dot's fixed order; with `coefficients` [B, k], sums [n, d], row i = Σ over latent i's pairs of
    coefficient · rows[b], in token order. One pass that reads each selected row once for both (the decoder's
    backward), the result independent of the thread count. Requires `rows_supported` for rows, weight and
    coefficients, and int64 CPU `order` / `starts`."""
    lib = library()
    n = starts.shape[0] - 1
    b, d = rows.shape
    if lib is None or not rows_supported(rows, *(t for t in (weight, coefficients) if t is not None)):
        raise ValueError("latent_pass needs the native library and contiguous float32 CPU matrices")
    if (order.dtype != torch.int64 or starts.dtype != torch.int64 or order.device.type != "cpu"
            or order.numel() != b * k):
        raise ValueError("latent_pass needs int64 CPU order [B·k] and starts [n + 1]")
    if weight is not None and weight.shape != (n, d):
        raise ValueError(f"latent_pass: weight must be [{n}, {d}], got {tuple(weight.shape)}")
    if coefficients is not None and coefficients.shape != (b, k):
        raise ValueError(f"latent_pass: coefficients must be [{b}, {k}], got {tuple(coefficients.shape)}")
    order, starts = order.contiguous(), starts.contiguous()
    dots = rows.new_empty(b, k) if weight is not None else None
    sums = rows.new_empty(n, d) if coefficients is not None else None
    status = lib.saelab_latent_pass(
        rows.data_ptr(), None if weight is None else weight.data_ptr(),
        None if coefficients is None else coefficients.data_ptr(), order.data_ptr(), starts.data_ptr(), n, d, k,
        None if dots is None else dots.data_ptr(), None if sums is None else sums.data_ptr(), torch.get_num_threads())
    if status:
        raise RuntimeError("the native latent pass could not start its threads")
    return dots, sums


def group_by_latent(indices: Tensor, n_latents: int) -> tuple[Tensor, Tensor, Tensor]:
    """(order, tokens, starts) of a [B, k] int64 CPU selection grouped by latent: `order` the flat positions latent
    by latent, in position order within a latent (a stable sort's), `tokens` = order // k, `starts` [n + 1] where
    each latent's run begins. A counting sort; requires `library()`."""
    lib = library()
    if lib is None or indices.device.type != "cpu" or indices.dtype != torch.int64:
        raise ValueError("group_by_latent needs the native library and int64 CPU indices")
    if indices.dim() != 2:
        raise ValueError(f"group_by_latent needs a [B, k] selection, got shape {tuple(indices.shape)}")
    flat = indices.contiguous().reshape(-1)
    order, tokens = torch.empty_like(flat), torch.empty_like(flat)
    starts = torch.empty(n_latents + 1, dtype=torch.int64)
    if lib.saelab_group_by_latent(flat.data_ptr(), flat.numel(), n_latents, max(indices.shape[1], 1), order.data_ptr(),
                                  tokens.data_ptr(), starts.data_ptr()):
        raise IndexError(f"group_by_latent: a latent index lies outside [0, {n_latents})")
    return order, tokens, starts


def fvu_sums(x: Tensor, x_hat: Tensor) -> tuple[float, float]:
    """(Σ_t ||x̂_t − x_t||², Σ_t ||x_t − mean(x)||²) of two [rows, d] matrices, accumulated in double in one pass over
    each, the same at any thread count. Requires `rows_supported(x, x_hat)`."""
    lib = library()
    if lib is None or not rows_supported(x, x_hat) or x.shape != x_hat.shape:
        raise ValueError("fvu_sums needs the native library and two contiguous float32 CPU matrices of one shape")
    out = torch.zeros(2, dtype=torch.float64)
    if lib.saelab_fvu_sums(x.data_ptr(), x_hat.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(),
                           torch.get_num_threads()):
        raise MemoryError("the native FVU sums could not allocate their buffers")
    sq_err, sq_dev = out.tolist()
    return sq_err, sq_dev

