"""The fused DMoL likelihood: an autograd Function over a C++ (OpenMP + SIMD) / CUDA extension built on
first use with torch.utils.cpp_extension.load (ninja).

Without a gradient (inference) the forward writes only the per-pixel log-likelihood (B, H*W), reduced to
(B,) here. When float32 / float64 params need a gradient (training), the forward computes the per-pixel
log-likelihood and its unscaled gradient d log p / d params in one pass over the components (`forward_grad`)
and the backward only scales that gradient by grad_output[b], in place; half-precision params take the
two-pass route (the backward recomputes each pixel and writes the scaled gradient). Either way nothing of
size M*C*H*W is materialised besides the gradient itself. x gets no gradient (it is data).

Build cache: ``$TORCH_EXTENSIONS_DIR`` when set, else ``~/.cache/hvae_dist/torch_extensions``; the
extension name carries a hash of the sources and flags (and, for the CPU build, of this CPU's features,
since it is compiled with -march=native), so an edited source or another node type gets its own build
and a shared home directory stays safe. Concurrent first uses (DDP ranks) wait on torch's file lock.
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from hvae_dist.kernels.constants import CSRC
from hvae_dist.kernels.reference import check_dmol_args, compute_dtype

# Every header the drivers include: part of the build hash, so editing one rebuilds the extension.
HEADERS = ["dmol_constants.h", "dmol_math.h", "dmol_binding.h"]
# -fno-trapping-math lets gcc if-convert the branch selects of the per-pixel math and so vectorize the
# pixel loop, together with the polynomial exp/log of dmol_math.h. Deliberately NOT -ffast-math: that
# implies -ffinite-math-only, which would break NaN propagation and the inf handling of the edge logic.
CPU_CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fopenmp"]
CPU_LDFLAGS = ["-fopenmp"]
CUDA_CFLAGS = ["-O3"]

_lock = threading.Lock()
_extensions: dict[str, ModuleType | BaseException] = {}


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _source_hash(files: list[str], flags: list[str], extra: str = "") -> str:
    h = hashlib.sha256()
    for f in files:
        h.update((CSRC / f).read_bytes())
    h.update(" ".join(flags).encode())
    h.update(extra.encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:12]


def build_root() -> Path:
    """Where the compiled extensions are cached."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hvae_dist" / "torch_extensions"


def _build(kind: str, verbose: bool = False) -> ModuleType:
    from torch.utils.cpp_extension import load

    if kind == "cpu":
        files, flags = HEADERS + ["dmol_cpu.cpp"], CPU_CFLAGS
        name = "hvae_dmol_cpu_" + _source_hash(files, flags + CPU_LDFLAGS, platform.machine() + _cpu_features())
    else:
        files, flags = HEADERS + ["dmol_cuda.cu"], CUDA_CFLAGS
        name = "hvae_dmol_cuda_" + _source_hash(files, flags, str(torch.version.cuda))
    build_dir = build_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(name=name, sources=[str(CSRC / files[-1])], extra_include_paths=[str(CSRC)],
                  build_directory=str(build_dir), verbose=verbose)
    if kind == "cpu":
        return load(extra_cflags=flags, extra_ldflags=CPU_LDFLAGS, **kwargs)
    return load(extra_cflags=["-O3"], extra_cuda_cflags=flags, **kwargs)


def load_extension(kind: str = "cpu", verbose: bool = False) -> ModuleType:
    """The compiled extension for `kind` ('cpu' or 'cuda'), built on first use. Raises the build error
    (also on later calls: a failed build is not retried within the process)."""
    with _lock:
        if kind not in _extensions:
            try:
                _extensions[kind] = _build(kind, verbose)
            except Exception as e:  # compiler missing, compile error, ...: remembered, re-raised below
                _extensions[kind] = e
        ext = _extensions[kind]
    if isinstance(ext, BaseException):
        raise RuntimeError(f"the fused DMoL {kind} extension did not build: {ext}") from ext
    return ext


def extension_kind(device: torch.device) -> str | None:
    """'cpu' / 'cuda' when the fused kernel can run on `device`, else None."""
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and torch.cuda.is_available():
        return "cuda"
    return None


ONE_PASS_DTYPES = (torch.float32, torch.float64)   # params dtypes of the one-pass forward + gradient


class DmolFunction(torch.autograd.Function):
    """log p(x) per example for x (B, C, HW) in the compute dtype and params (B, K, HW), both contiguous."""

    @staticmethod
    def forward(ctx, x: Tensor, params: Tensor, num_mixtures: int, bits: int, ext: ModuleType) -> Tensor:
        ctx.num_mixtures, ctx.bits, ctx.ext = num_mixtures, bits, ext
        ctx.unscaled = None
        if not ctx.needs_input_grad[1]:
            return ext.forward(x, params, num_mixtures, bits).sum(1)        # B
        if params.dtype in ONE_PASS_DTYPES:
            lp, ctx.unscaled = ext.forward_grad(x, params, num_mixtures, bits)  # B, HW; B, K, HW
        else:
            lp = ext.forward(x, params, num_mixtures, bits)                  # B, HW (compute dtype)
        ctx.save_for_backward(x, params, lp)
        return lp.sum(1)                                                     # B

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, params, lp = ctx.saved_tensors
        g = grad_out.to(lp.dtype).contiguous()
        if params.dtype not in ONE_PASS_DTYPES:
            grad = ctx.ext.backward(x, params, lp, g, ctx.num_mixtures, ctx.bits)  # B, K, HW (params dtype)
            return None, grad, None, None, None
        # The one-pass gradient, scaled in place and handed over: no second buffer. A second backward through
        # the same graph (retain_graph, e.g. gradcheck) recomputes it the same way, so repeats agree exactly.
        unscaled, ctx.unscaled = ctx.unscaled, None
        if unscaled is None:
            unscaled = ctx.ext.forward_grad(x, params, ctx.num_mixtures, ctx.bits)[1]
        return None, unscaled.mul_(g.view(-1, 1, 1)), None, None, None


def dmol_fused(x: Tensor, params: Tensor, bits: int = 8) -> Tensor:
    """The fused kernel (same contract as `dmol_log_prob`). Raises RuntimeError if it cannot run here."""
    m, c = check_dmol_args(x, params, bits)
    return fused_log_prob(x, params, bits, m, c)


def fused_log_prob(x: Tensor, params: Tensor, bits: int, m: int, c: int) -> Tensor:
    """`dmol_fused` without the argument checks, for callers that already ran them:
    ``m, c = check_dmol_args(x, params, bits)``. The extension re-checks only cheap layout invariants."""
    kind = extension_kind(params.device)
    if kind is None:
        raise RuntimeError(f"the fused DMoL kernel has no implementation for device {params.device}")
    ext = load_extension(kind)
    b, k, h, w = params.shape
    xf = x.to(compute_dtype(params)).reshape(b, c, h * w).contiguous()     # B, C, HW
    pf = params.reshape(b, k, h * w).contiguous()                            # B, K, HW
    return DmolFunction.apply(xf, pf, m, bits, ext)
