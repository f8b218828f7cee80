"""Optional fast kernels for LeWM on CPUs, and the hardware check that says when bf16 pays.

Serves train.py, evaluate.py and bench.py; model.py runs without this file. model.py's attention layers call
F.scaled_dot_product_attention through their `sdpa` attribute; `use_fast_attention(model)` points those at `attend`,
which computes the same maths and picks a faster kernel in bf16 on a CPU (docs/method.md §8, BENCHMARKS.md). In fp32
and on GPUs `attend` is PyTorch's kernel itself, so swapping it in changes no number there; in bf16 on a CPU it runs
the explicit matmuls and softmax below, equal to PyTorch's kernel to bf16 round-off (tested).

`native_bf16` tells whether bf16 runs in hardware; the scripts default --bf16 to it.

Dimension letters: B batch, h heads, P / Pq / Pk tokens (queries, keys), dh head dim.
"""

import torch
import torch.nn.functional as F
from torch import nn

# --- hardware


def native_bf16(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 matmuls run in hardware on `device`: a CUDA GPU that supports bf16, or a CPU whose flags list
    AVX-512 BF16 or AMX (Linux's `cpuinfo`; unknown elsewhere, so False). Without them bf16 is emulated and many
    times slower than fp32 (BENCHMARKS.md, "Precision")."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


# --- attention for bf16 on CPUs


class ExplicitAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(dh)) v with a hand-written backward: the unmasked, dropout-free case of `attend`.

    Three batched matmuls forward, four backward, and the softmax gradient p * (dp - rowsum(do * o)) with the row
    sums in fp32.
    Autograd through the same forward spends most of its time in the bf16 softmax backward.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q = q * q.shape[-1] ** -0.5  # (B, h, P, dh); 1/8 for dh 64, exact in any precision
        p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # (B, h, P, P)
        o = p @ v  # (B, h, P, dh)
        ctx.save_for_backward(q, k, v, p, o)
        return o

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        q, k, v, p, o = ctx.saved_tensors  # q already scaled
        dv = p.transpose(-2, -1) @ do  # (B, h, P, dh)
        dp = do @ v.transpose(-2, -1)  # (B, h, P, P)
        rowsum = (do.float() * o.float()).sum(-1, keepdim=True)  # (B, h, P, 1) = sum_j p_ij dp_ij, in fp32
        ds = (dp - rowsum.to(dp.dtype)).mul_(p)  # (B, h, P, P) gradient of the scaled scores, in place
        return (ds @ k) * q.shape[-1] ** -0.5, ds.transpose(-2, -1) @ q, dv


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention (B, h, Pq, dh) x (B, h, Pk, dh) -> (B, h, Pq, dh); `is_causal` when Pq == Pk.

    A drop-in for F.scaled_dot_product_attention (same arguments, same maths), with the kernel chosen by
    measurement (BENCHMARKS.md): in bf16 on
    a CPU, PyTorch's fused and plain kernels spend most of their time converting and in softmax, so bf16 on a CPU
    runs the three matmuls and the softmax explicitly: 2.3x faster for a ViT-Tiny layer's training step at 257
    tokens, 1.6x at 17, 2 to 5x for the predictor's 3-token planning rollout. fp32 and GPUs keep PyTorch's kernel
    (on CPUs the fused one, the fastest in fp32).
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=dropout_p)
    if not is_causal and not dropout_p:
        return ExplicitAttention.apply(q, k, v)
    s = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, h, Pq, Pk)
    if is_causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return F.dropout(s.softmax(-1), dropout_p, training=bool(dropout_p)) @ v  # (B, h, Pq, dh)


def use_fast_attention(model: nn.Module) -> nn.Module:
    """Point every attention layer of `model` (the modules with an `sdpa` attribute) at `attend`; returns `model`."""
    for m in model.modules():
        if hasattr(m, "sdpa"):
            m.sdpa = attend
    return model
