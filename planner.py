"""Action planners for LeWM: the cross-entropy method (CEM) and a gradient (AdamW) planner over action blocks.

Pure optimisation: both planners minimise a black-box `cost_fn(candidates (B, S, N, A)) -> costs (B, S)` and know
nothing about the world model or the environment. `make_cost` builds the LeWM rollout cost of docs/method.md §9
from any model with a `rollout(z0, actions)` method, passed to it as an argument (this file imports nothing from
the project).

- `cem` is docs/method.md §9 (stable-worldmodel `CEMSolver`, config `cem.yaml`): mean 0, std 1, 300 samples,
  30 iterations, top 30 elites, candidate 0 = the mean, elite mean / unbiased elite std, returns the final mean.
- `gradient_plan` is docs/method.md §9 (`GradientSolver`, config `adam.yaml`): 100 samples, AdamW(lr 0.1,
  weight decay 0.01) on the actions for 30 steps, returns the lowest-cost sample.
- `warm_start` builds the optional initial mean for receding-horizon MPC (docs/method.md §9, execution; never used by
  the default protocol, which replans from zero every `horizon` blocks).

Options the official solvers lack (all off by default, so the defaults reproduce the reference): a warm-start mean and
several problems solved at once with one generator per problem. Deliberately absent, as in the reference: clipping to
action bounds, minimum std, momentum / smoothing of mean or std, early stopping, gradient clipping, action noise
during gradient steps.

Dimension letters: B problems solved at once, S samples (candidates) per problem, N horizon (action blocks),
A action-block dim (frameskip * raw action dim), K elites.
"""

from collections.abc import Callable, Sequence

import torch

CostFn = Callable[[torch.Tensor], torch.Tensor]  # candidates (B, S, N, A) -> costs (B, S)
Generators = torch.Generator | Sequence[torch.Generator] | None

# --- helpers


def make_cost(model, z0: torch.Tensor, z_goal: torch.Tensor, bf16: bool) -> CostFn:
    """docs/method.md §9 cost: sum over D of the squared error between the last predicted embedding and the goal.

    model: anything with `rollout(z0 (B, 1, D), candidates (B, S, N, A)) -> z (B, S, N+1, D)` (LeWM); z_goal (B, D).
    """

    def cost_fn(candidates: torch.Tensor) -> torch.Tensor:  # (B, S, N, A) -> (B, S)
        with torch.autocast(z0.device.type, dtype=torch.bfloat16, enabled=bf16):
            z_pred = model.rollout(z0, candidates)[:, :, -1]  # (B, S, D)
        return (z_pred.float() - z_goal[:, None]).pow(2).sum(dim=-1)  # (B, S)

    return cost_fn


def warm_start(prev_plan: torch.Tensor, executed_blocks: int) -> torch.Tensor:
    """Shift the unexecuted tail of `prev_plan` (..., N, A) to the front and zero-pad the end (zero = mean action)."""
    horizon = prev_plan.shape[-2]
    executed_blocks = min(max(executed_blocks, 0), horizon)
    init = torch.zeros_like(prev_plan)  # (..., N, A)
    init[..., : horizon - executed_blocks, :] = prev_plan[..., executed_blocks:, :]  # (..., N - executed, A)
    return init


def _randn(generator: Generators, shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """Standard normal noise of shape (B, ...).

    One generator: a single draw of the whole (B, ...) tensor, as the reference solver does for its batch.
    A sequence of B generators: problem b draws its own (...) slice from generator b, so a problem solved inside a
    batch sees exactly the noise it would see solved alone (batch 1) with that same generator.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)  # (B, ...)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for {shape[0]} problems")
    return torch.stack([torch.randn(shape[1:], generator=g, device=device, dtype=dtype) for g in generator])  # (B, ...)


def _init_mean(init_mean, batch: int, horizon: int, action_dim: int, device, dtype) -> torch.Tensor:
    """Initial plan (B, N, A): zeros (the dataset-mean action in z-scored space) or a copy of the given warm start."""
    if init_mean is None:
        return torch.zeros(batch, horizon, action_dim, device=device, dtype=dtype)  # (B, N, A)
    return (
        torch.as_tensor(init_mean, device=device, dtype=dtype).expand(batch, horizon, action_dim).clone()
    )  # (B, N, A)


# --- CEM (docs/method.md §9)


def cem(
    cost_fn: CostFn,
    batch: int,
    horizon: int,
    action_dim: int,
    num_samples: int = 300,
    iterations: int = 30,
    topk: int = 30,
    init_std: float = 1.0,
    init_mean: torch.Tensor | None = None,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Cross-entropy method: minimise `cost_fn` over plans (B, N, A); returns the final elite mean (B, N, A).

    generator: None (global RNG), one torch.Generator (one (B, S, N, A) draw per iteration, the reference behaviour;
        the reference seeds it with 42 once and solves its 50 problems one after another with batch 1), or a sequence
        of B generators (problem b draws its (S, N, A) noise from generator b, so batched plans equal plans solved
        one problem at a time with the same generators, provided `cost_fn` treats problems independently).
    """
    if not 2 <= topk <= num_samples:
        raise ValueError(f"need 2 <= topk <= num_samples (elite std uses ddof=1), got {topk=} {num_samples=}")
    if device is None:
        device = init_mean.device if isinstance(init_mean, torch.Tensor) else "cpu"
    with torch.inference_mode():
        mean = _init_mean(init_mean, batch, horizon, action_dim, device, dtype)  # (B, N, A)
        std = torch.full_like(mean, init_std)  # (B, N, A)  a standard deviation, the reference calls it "var"
        for _ in range(iterations):
            eps = _randn(generator, (batch, num_samples, horizon, action_dim), device, dtype)  # (B, S, N, A)
            candidates = mean[:, None] + std[:, None] * eps  # (B, S, N, A)
            candidates[:, 0] = mean  # (B, N, A)  the current mean is always evaluated, so it can stay elite
            costs = cost_fn(candidates)  # (B, S)
            idx = costs.topk(topk, dim=1, largest=False).indices  # (B, K)  ascending costs
            index = idx[:, :, None, None].expand(-1, -1, horizon, action_dim)  # (B, K, N, A)
            elites = candidates.gather(1, index)  # (B, K, N, A)
            mean = elites.mean(dim=1)  # (B, N, A)
            std = elites.std(dim=1)  # (B, N, A)  torch default: unbiased (ddof=1), as the reference
    return mean


# --- gradient planner (docs/method.md §9)


def gradient_plan(
    cost_fn: CostFn,
    batch: int,
    horizon: int,
    action_dim: int,
    num_samples: int = 100,
    steps: int = 30,
    lr: float = 0.1,
    weight_decay: float = 0.01,
    init_mean: torch.Tensor | None = None,
    generator: Generators = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gradient planner: AdamW on S parallel plans per problem; returns the lowest-cost plan (B, N, A).

    Sample 0 starts at `init_mean` (zeros by default), samples 1..S-1 at init_mean + N(0, 1) noise (drawn as in `cem`:
    one (B, S-1, N, A) draw from one generator, or per problem from a sequence of B generators). Each step minimises
    the sum of all costs, so every plan follows its own gradient. Gradients are enabled even when called inside
    `torch.no_grad()` or `torch.inference_mode()`; `cost_fn` must be differentiable in its input (freeze the model
    inside it).
    """
    if device is None:
        device = init_mean.device if isinstance(init_mean, torch.Tensor) else "cpu"
    with torch.inference_mode(False), torch.enable_grad():
        init = _init_mean(init_mean, batch, horizon, action_dim, device, dtype)  # (B, N, A)
        noise = _randn(generator, (batch, num_samples - 1, horizon, action_dim), device, dtype)  # (B, S-1, N, A)
        plans = torch.cat([init[:, None], init[:, None] + noise], dim=1)  # (B, S, N, A)
        plans.requires_grad_(True)
        opt = torch.optim.AdamW([plans], lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            loss = cost_fn(plans).sum()  # ()  sum, not mean (as upstream): the cost scale sets Adam's early trajectory
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            # DEVIATION: rank by costs re-evaluated after the final update (newer swm), not the March-2026 costs
            # computed before it, so the returned plan's cost is the one it actually has (one extra forward pass).
            costs = cost_fn(plans)  # (B, S)
            best = costs.argmin(dim=1)  # (B,)
            plan = plans[torch.arange(batch, device=device), best].detach()  # (B, N, A)
    return plan
