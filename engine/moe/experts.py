"""Grouped SwiGLU experts: three grouped GEMMs over the rows sorted by expert.

Parameters are stacked per expert: w_gate/w_up [E, h, F], w_down [E, F, h]. Under
expert parallelism a rank holds a contiguous block of E/ep experts, and under expert
tensor parallelism a slice F/etp of the FFN dim (column-parallel gate/up, row-parallel
down), so its output is a partial sum that the dispatcher reduce-scatters over ETP.

Kernels. `torch._grouped_mm(x [N, h], w [E, h, F], offs)` runs one GEMM per group of
rows with int32 end offsets that stay on the device, so dispatch needs no host copy of
the counts. It runs on CPU (fp32/bf16) and on CUDA bf16 (sm90+; sm80+ with torch's public
`grouped_mm`), and needs 16-byte aligned row strides (h and F a multiple of 4 fp32 or 8
bf16 values). Elsewhere the fallback loops over `w.unbind(0)`, which needs the counts on
the host (one read per forward). Never index `w[e]` in a loop: the backward of every
index allocates a zero gradient of the whole [E, h, F] stack (cost grows as E^2).

Saved for backward: the input rows and the gate and up outputs, 2 [rows, F] tensors where
autograd would keep 4 (gate, silu(gate), up, their product): GroupedSwiGLUDown recomputes
the product, which the down GEMM's weight gradient reads, in backward (engine/swiglu.py).

Gate and up stay two GEMMs: fusing them needs one [E, h, 2F] weight, and building it from
the two parameters copies both stacks every forward and splits the gradient every backward,
which measured slower than two GEMMs (benchmarks/experts.py; docs/performance.md).

Weight gradients dw[g] = x_g^T dy_g run on the transposed view x.t() (no copy). On CPU a
contiguous x^T, dw^T = dy^T x (a transposed grad, which autograd would copy) or a loop of
mm(out=) measured no faster. What a dense GEMM of the same FLOPs does not pay is the
first touch of three fresh [E, h, F] gradient stacks per backward (E times its dW bytes;
above glibc's 32 MB mmap cap each is page-faulted in again every step) and the short
reduction (rows per expert) of the dw GEMMs; the GEMMs themselves are level with dense.

Rows past sum(counts) (the tail that capacity dropping and the all-gather dispatcher leave
for assignments that no local expert takes) get zero output and zero input gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.swiglu import swiglu, swiglu_grads

_PUBLIC_GROUPED_MM = hasattr(F, "grouped_mm")


def grouped_gemm_supported(x_nh: torch.Tensor, w_ehf: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM kernel takes these operands (device, dtype, alignment)."""
    if not hasattr(torch, "_grouped_mm") or x_nh.dtype != w_ehf.dtype:
        return False
    if x_nh.device.type == "cpu":
        ok_dtype = x_nh.dtype in (torch.float32, torch.bfloat16)
    elif x_nh.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x_nh.device)
        ok_dtype = x_nh.dtype == torch.bfloat16 and (major >= 9 or (major >= 8 and _PUBLIC_GROUPED_MM))
    else:
        return False
    # Forward and both backward GEMMs read rows of length h and F: 16-byte aligned strides,
    # and the CUDA kernel also wants 16-byte aligned base pointers (a weight is a view at
    # any element offset of its optimizer bucket; CPU accepts any).
    aligned = all(size * x_nh.element_size() % 16 == 0 for size in w_ehf.shape[1:])
    based = x_nh.device.type == "cpu" or (x_nh.data_ptr() % 16 == 0 and w_ehf.data_ptr() % 16 == 0)
    return ok_dtype and aligned and based


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


def _zero_tail_(rows: torch.Tensor, offs_e: torch.Tensor) -> torch.Tensor:
    """Zeroes the rows at or past offs_e[-1] in place (the kernel leaves them unwritten)."""
    if offs_e.numel() == 0:
        return rows.zero_()
    tail = torch.arange(rows.shape[0], device=rows.device) >= offs_e[-1]
    return rows.masked_fill_(tail.unsqueeze(1), 0)


class GroupedMM(torch.autograd.Function):
    """y = x_g @ w[g] for each group g of rows; backward as two more grouped GEMMs:
    dx_g = dy_g @ w[g]^T, dw[g] = x_g^T @ dy_g (an empty group gets dw[g] = 0)."""

    @staticmethod
    def forward(ctx, x_nh, w_ehf, offs_e, has_tail: bool):
        ctx.save_for_backward(x_nh, w_ehf, offs_e)
        ctx.has_tail = has_tail
        y_nf = _grouped_mm(x_nh, w_ehf, offs_e)
        return _zero_tail_(y_nf, offs_e) if has_tail else y_nf

    @staticmethod
    def backward(ctx, dy_nf):
        x_nh, w_ehf, offs_e = ctx.saved_tensors
        if dy_nf.numel() == 0:     # no rows: the kernel rejects the strides of an empty grad
            return torch.zeros_like(x_nh), torch.zeros_like(w_ehf), None, None
        dy_nf = dy_nf.contiguous()
        dx_nh = dw_ehf = None
        if ctx.needs_input_grad[0]:
            dx_nh = _grouped_mm(dy_nf, w_ehf.transpose(-2, -1), offs_e)
            if ctx.has_tail:
                _zero_tail_(dx_nh, offs_e)
        if ctx.needs_input_grad[1]:
            dw_ehf = _grouped_mm(x_nh.t(), dy_nf, offs_e)
        return dx_nh, dw_ehf, None, None


class GroupedSwiGLUDown(torch.autograd.Function):
    """y = (silu(gate) * up)_g @ w_down[g], keeping gate and up only: backward recomputes
    the product for dw_down and takes torch's own kernels for the rest (bit-identical to
    autograd's gradients). Tail rows of gate and up are zero, so the product's are too."""

    @staticmethod
    def forward(ctx, gate_nf, up_nf, w_down_efh, offs_e, has_tail: bool):
        ctx.save_for_backward(gate_nf, up_nf, w_down_efh, offs_e)
        ctx.has_tail = has_tail
        y_nh = _grouped_mm(F.silu(gate_nf) * up_nf, w_down_efh, offs_e)
        return _zero_tail_(y_nh, offs_e) if has_tail else y_nh

    @staticmethod
    def backward(ctx, dy_nh):
        gate_nf, up_nf, w_down_efh, offs_e = ctx.saved_tensors
        if dy_nh.numel() == 0:
            return torch.zeros_like(gate_nf), torch.zeros_like(up_nf), torch.zeros_like(w_down_efh), None, None
        dy_nh = dy_nh.contiguous()
        silu_nf = F.silu(gate_nf)
        dw_efh = _grouped_mm((silu_nf * up_nf).t(), dy_nh, offs_e)
        d_act_nf = _grouped_mm(dy_nh, w_down_efh.transpose(-2, -1), offs_e)
        if ctx.has_tail:
            _zero_tail_(d_act_nf, offs_e)
        d_gate_nf, d_up_nf = swiglu_grads(gate_nf, up_nf, d_act_nf, silu_nf)
        return d_gate_nf, d_up_nf, dw_efh, None, None


def _swiglu_grouped(x_nh, counts_e, w_gate_ehf, w_up_ehf, w_down_efh, has_tail):
    offs_e = torch.cumsum(counts_e, 0, dtype=torch.int32)
    gate_nf = GroupedMM.apply(x_nh, w_gate_ehf, offs_e, has_tail)
    up_nf = GroupedMM.apply(x_nh, w_up_ehf, offs_e, has_tail)
    return GroupedSwiGLUDown.apply(gate_nf, up_nf, w_down_efh, offs_e, has_tail)


def _swiglu_unbind(x_nh, counts_e, w_gate_ehf, w_up_ehf, w_down_efh):
    """Fallback: one GEMM per expert on unbind views (one autograd node per stack)."""
    sizes = counts_e.tolist()                  # the one host read of this path
    tail = x_nh.shape[0] - sum(sizes)
    chunks = torch.split(x_nh, sizes + [tail], dim=0)
    outputs = [swiglu(x_ch @ w_g, x_ch @ w_u) @ w_d for x_ch, w_g, w_u, w_d in
               zip(chunks, w_gate_ehf.unbind(0), w_up_ehf.unbind(0), w_down_efh.unbind(0))]
    outputs.append(x_nh.new_zeros(tail, w_down_efh.shape[-1]))
    return torch.cat(outputs, dim=0)


def grouped_swiglu(x_nh: torch.Tensor, counts_e: torch.Tensor, w_gate_ehf: torch.Tensor,
                   w_up_ehf: torch.Tensor, w_down_efh: torch.Tensor, *,
                   has_tail: bool = False) -> torch.Tensor:
    """SwiGLU of each contiguous row group with its expert's weights.

    x_nh is sorted by local expert with counts_e[e] rows for expert e (an integer tensor on
    x's device); has_tail says that rows past sum(counts_e) may exist (they give zeros).
    Zero-count experts get a zero gradient, so every rank has the same set of grads to
    reduce, whatever it received.
    """
    if counts_e.numel() != w_gate_ehf.shape[0]:
        raise ValueError(f"got counts for {counts_e.numel()} experts, weights for {w_gate_ehf.shape[0]}")
    if all(grouped_gemm_supported(x_nh, w) for w in (w_gate_ehf, w_up_ehf, w_down_efh)):
        return _swiglu_grouped(x_nh, counts_e, w_gate_ehf, w_up_ehf, w_down_efh, has_tail)
    return _swiglu_unbind(x_nh, counts_e, w_gate_ehf, w_up_ehf, w_down_efh)


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size))
        for w in (self.w_gate, self.w_up, self.w_down):
            if not w.is_meta:   # meta (shard-size build): engine.models.init fills them
                nn.init.normal_(w, std=0.02)

    @property
    def num_local_experts(self) -> int:
        return self.w_gate.shape[0]

    def forward(self, x_nh: torch.Tensor, counts_e: torch.Tensor, *, has_tail: bool = False) -> torch.Tensor:
        return grouped_swiglu(x_nh, counts_e, self.w_gate, self.w_up, self.w_down, has_tail=has_tail)
