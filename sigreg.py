"""SIGReg: the Sketched Isotropic Gaussian Regulariser that keeps LeWM's embeddings from collapsing.

LeWM paper (arXiv 2603.19312) and docs/method.md §7. For each time step, the batch of embeddings is projected on
K random unit directions; the empirical characteristic function of every 1-D projection is compared with that of
N(0, 1) (the Epps-Pulley statistic, integrated on [-3, 3] with a Gaussian window by the trapezoid rule on 17 knots,
using the symmetry of the integrand). The loss is the mean over time steps and directions, scaled by the number of
samples N, so exactly Gaussian embeddings score about 1.05 and collapsed ones score in proportion to N.

Computed in fp32 even under autocast. Under torch.distributed (DDP) it is exact, which the official code is not:
every rank uses rank 0's directions, the characteristic-function sums are all-reduced over the global batch, and the
gradient is arranged so that DDP's gradient averaging yields the gradient of the full-batch statistic.

Dimension letters: T time steps, N samples (the batch), D embedding dim, K directions, J knots.
"""

import torch
import torch.distributed as dist
from torch import nn


def _ddp_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AllReduceSum(torch.autograd.Function):
    """Sum a tensor over ranks; the backward also sums, so each rank's loss carries world_size x its share.

    DDP averages parameter gradients over ranks, so that factor cancels: the averaged gradient equals the gradient
    of the full-batch statistic computed on one process.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class CharacteristicSums(torch.autograd.Function):
    """1-D projections y (T, N, K) and knots t (J,) -> (sum_n cos(t y), sum_n sin(t y)), each (T, K, J).

    The maths of autograd through `(y[..., None] * t).cos().sum(1)` and its sine twin, with a backward that reuses
    the forward's cosines and sines instead of evaluating them again (autograd's cos and sin backwards each take the
    other function anew): SIGReg's forward and backward take about half the time (BENCHMARKS.md).
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, t: torch.Tensor):
        ty = y.unsqueeze(-1) * t  # (T, N, K, J)
        cos, sin = ty.cos(), ty.sin()  # (T, N, K, J) each
        ctx.save_for_backward(cos, sin, t)
        return cos.sum(1), sin.sum(1)  # (T, K, J) each

    @staticmethod
    def backward(ctx, g_cos: torch.Tensor, g_sin: torch.Tensor):
        cos, sin, t = ctx.saved_tensors
        # d/dy of sum_j g_cos_j cos(t_j y) + g_sin_j sin(t_j y) = sum_j t_j (g_sin_j cos(t_j y) - g_cos_j sin(t_j y))
        dy = (cos * (g_sin * t).unsqueeze(1) - sin * (g_cos * t).unsqueeze(1)).sum(-1)  # (T, N, K)
        return dy, None


class SIGReg(nn.Module):
    """Epps-Pulley normality statistic averaged over random 1-D projections (docs/method.md §7)."""

    def __init__(self, knots: int = 17, num_proj: int = 1024, t_max: float = 3.0):
        super().__init__()
        self.num_proj = num_proj
        t = torch.linspace(0.0, t_max, knots, dtype=torch.float64)  # (J,)
        delta = t_max / (knots - 1)
        # Trapezoid weights on [0, t_max], doubled for the mirrored half [-t_max, 0] (the integrand is even).
        trap = torch.full((knots,), 2.0 * delta, dtype=torch.float64)
        trap[0] = trap[-1] = delta
        phi = torch.exp(-0.5 * t**2)  # characteristic function of N(0, 1), also the integration window
        self.register_buffer("t", t.float(), persistent=False)
        self.register_buffer("phi", phi.float(), persistent=False)
        self.register_buffer("weights", (trap * phi).float(), persistent=False)

    def sample_directions(self, dim: int, device: torch.device, generator: torch.Generator | None = None):
        """K unit columns uniformly distributed on the sphere, shared by all ranks under DDP."""
        a = torch.randn(dim, self.num_proj, device=device, generator=generator)  # (D, K)
        if _ddp_active():
            dist.broadcast(a, src=0)
        return a / a.norm(dim=0, keepdim=True)

    def forward(self, z: torch.Tensor, directions: torch.Tensor | None = None) -> torch.Tensor:
        """z (T, N, D) -> scalar. `directions` (D, K) with unit columns replaces the random draw."""
        if z.dim() != 3:
            raise ValueError(f"SIGReg expects embeddings of shape (T, N, D), got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            n = torch.tensor(float(z.shape[1]), device=z.device)
            if directions is None:
                directions = self.sample_directions(z.shape[-1], z.device)
            y = z @ directions.float()  # (T, N, K) 1-D projections
            cos_sum, sin_sum = CharacteristicSums.apply(y, self.t)  # (T, K, J) each: sums over the N samples
            if _ddp_active():
                # DEVIATION: the official SIGReg is single-GPU (each rank tests its local batch with its own
                # directions); here the statistic is the one of the global batch, as in LeJEPA.
                # Global batch: sum the characteristic-function sums and the sample counts over ranks.
                cos_sum, sin_sum = AllReduceSum.apply(torch.stack([cos_sum, sin_sum])).unbind(0)
                n = n.clone()
                dist.all_reduce(n, op=dist.ReduceOp.SUM)
            cos_mean, sin_mean = cos_sum / n, sin_sum / n  # (T, K, J) empirical characteristic function
            err = (cos_mean - self.phi) ** 2 + sin_mean**2  # (T, K, J) |phi_hat(t) - phi(t)|^2
            stat = (err @ self.weights) * n  # (T, K) windowed integral, scaled by N
            return stat.mean()
