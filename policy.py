"""A goal-conditioned inverse-dynamics policy on the frozen LeWM embeddings (GC-IDM, arXiv 2605.08732).

An MLP maps (z_now, z_goal) to one normalised action block (frameskip raw actions, the block the predictor takes).
It is trained with MSE on the training episodes of the world model's dataset, with hindsight goals: the goal of
frame t is the frame t + frameskip * k of the same episode, k uniform in 1..max_goal_blocks (beyond the planning
horizon of 5 blocks), and the target is the block of raw actions t..t+frameskip-1, normalised as in training.
The world model stays frozen: every frame is embedded once, then the policy trains on cached embeddings. The
embeddings are kept in a file (embeddings.pt beside the policy), so further runs on the same world model and data
(other seeds, other shapes) start training at once.

Planning uses it two ways: `act` gives the next block greedily, and `propose` rolls the policy open-loop through
the world model's predictor for `horizon` blocks, a plan used as CEM's initial mean. The saved file records the
world model it was trained on (step and a hash of the weights); `load_policy` refuses it for any other.

Deliberately absent: input normalisation (SIGReg keeps the embeddings near N(0, 1)), fine-tuning of the world
model, the training run's extra exploration episodes (--extra_data): pairs come from the dataset the checkpoint
holds episodes out of, so validation measures held-out episodes of that same data. One process only (no DDP):
the policy is a small MLP on cached embeddings.

Run:
    python policy.py --ckpt runs/pusht_cpu/ckpt.pt                  # writes runs/pusht_cpu/policy.pt
    python policy.py --ckpt runs/pusht_cpu/ckpt.pt --episodes 500   # embed and train on 500 training episodes
    python policy.py --ckpt runs/pusht_paper/ckpt.pt --device cuda  # one GPU

Arguments are checked before any work (a wrong one: one line naming it, exit code 2).

Dimension letters: B pairs, D embedding, A action block (frameskip x raw action dim), N horizon (blocks),
R dataset rows.
"""

import argparse
import dataclasses
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

import cli
import data
from cli import UsageError, pick_device
from model import LeWM, check_checkpoint, load_checkpoint, model_from_checkpoint, save_checkpoint

VAL_SEED = 0  # draw of the fixed validation pairs: the same for every --seed, so runs compare on the same pairs
EMBED_BATCH = 256  # frames per encoder call
POLICY_KEYS = ("policy", "policy_config", "world_model")  # what makes a file a policy file

# --- configuration


@dataclass
class PolicyConfig:
    ckpt: str = ""  # world-model checkpoint written by train.py (required)
    data: str = ""  # dataset ('' = the one the checkpoint was trained on)
    out: str = ""  # policy file to write ('' = policy.pt next to the checkpoint)
    embed_cache: str = ""  # frozen embeddings kept for later runs ('' = embeddings.pt next to --out; 'none' = off)
    hidden: int = 512  # width of the hidden layers
    depth: int = 3  # hidden layers (0 = a linear map)
    goal_input: str = "diff"  # diff: the MLP sees [z_now, z_goal - z_now]; pair: [z_now, z_goal]
    max_goal_blocks: int = 10  # hindsight goals lie k blocks ahead, k uniform in 1..this (planning horizon: 5)
    episodes: int = 0  # training episodes to embed and train on, the first ones of the split (0 = all)
    steps: int = 4000  # optimiser steps
    batch_size: int = 512  # (frame, goal) pairs per step
    lr: float = 1e-3  # peak AdamW learning rate, cosine to 0 over the run
    weight_decay: float = 1e-4  # AdamW weight decay
    val_pairs: int = 4096  # fixed (frame, goal) pairs of the held-out episodes for the validation MSE
    val_every: int = 500  # steps between validation passes and log lines
    seed: int = 0  # policy init and the draw of training pairs
    device: str = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu


CHOICES = {"goal_input": ["diff", "pair"], "device": cli.DEVICES}
RANGES = {
    "hidden": (">= 1", lambda v: v >= 1),
    "depth": (">= 0", lambda v: v >= 0),
    "max_goal_blocks": (">= 1", lambda v: v >= 1),
    "episodes": (">= 0", lambda v: v >= 0),
    "steps": (">= 1", lambda v: v >= 1),
    "batch_size": (">= 1", lambda v: v >= 1),
    "lr": ("> 0", lambda v: v > 0),
    "weight_decay": (">= 0", lambda v: v >= 0),
    "val_pairs": (">= 1", lambda v: v >= 1),
    "val_every": (">= 1", lambda v: v >= 1),
    "seed": (">= 0", lambda v: v >= 0),
}

# --- the policy


class GoalPolicy(nn.Module):
    """(z_now (B, D), z_goal (B, D)) -> normalised action block (B, A): `depth` Linear-LayerNorm-GELU layers and a
    linear head. goal_input "diff" feeds [z_now, z_goal - z_now] (the displacement to cover), "pair" [z_now, z_goal].
    """

    def __init__(self, dim: int, action_dim: int, hidden: int = 512, depth: int = 3, goal_input: str = "diff"):
        super().__init__()
        if goal_input not in ("diff", "pair"):
            raise ValueError(f"goal_input must be 'diff' or 'pair', got {goal_input!r}")
        self.goal_input = goal_input
        layers, width = [], 2 * dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, action_dim)
        # Zero head: the untrained policy predicts the mean action (0 after normalisation), the MSE reference.
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, z_now: torch.Tensor, z_goal: torch.Tensor) -> torch.Tensor:
        goal = z_goal - z_now if self.goal_input == "diff" else z_goal  # (B, D)
        h = self.body(torch.cat([z_now, goal], dim=-1))  # (B, hidden), or (B, 2D) when depth is 0
        return self.head(h)  # (B, A)


def policy_loss(policy: nn.Module, z_now: torch.Tensor, z_goal: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and the taken normalised action block a (B, A)."""
    return (policy(z_now, z_goal) - a).pow(2).mean()  # scalar


def train_step(
    policy: nn.Module, opt: torch.optim.Optimizer, z_now: torch.Tensor, z_goal: torch.Tensor, a: torch.Tensor, lr: float
) -> torch.Tensor:
    """One AdamW step at learning rate lr on a batch of pairs; returns the batch loss (detached)."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = policy_loss(policy, z_now, z_goal, a)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def lr_at(step: int, peak: float, total_steps: int) -> float:
    """Cosine from `peak` at step 0 to 0 at `total_steps`."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / total_steps)))


@torch.inference_mode()
def act(policy: nn.Module, z_now: torch.Tensor, z_goal: torch.Tensor) -> torch.Tensor:
    """The policy's next normalised action block (B, A) from z_now (B, D) towards z_goal (B, D)."""
    return policy(z_now, z_goal)  # (B, A)


@torch.inference_mode()
def propose(policy: nn.Module, model: LeWM, z0: torch.Tensor, z_goal: torch.Tensor, horizon: int) -> torch.Tensor:
    """The policy's open-loop plan (B, horizon, A) from z0 (B, 1, D) towards z_goal (B, D): each block is the
    policy's action at the embedding the world model predicts after the blocks before it. Used as CEM's initial
    mean. The model is used as given (evaluation expects it in eval mode, so predictor dropout is off)."""
    if z0.dim() != 3 or z0.shape[1] != 1:
        raise ValueError(f"propose expects z0 of shape (B, 1, D), got {tuple(z0.shape)}")
    blocks = [policy(z0[:, 0], z_goal)]  # [(B, A)]
    for _ in range(1, horizon):
        plan = torch.stack(blocks, dim=1)  # (B, k, A)
        # Re-rolling the whole plan each step costs O(horizon^2) predictor passes, negligible at horizon 5.
        z = model.rollout(z0, plan[:, None])[:, 0, -1]  # (B, D) predicted embedding after k blocks
        blocks.append(policy(z, z_goal))  # (B, A)
    return torch.stack(blocks, dim=1)  # (B, horizon, A)


# --- hindsight pairs


def pair_candidates(ep_offset: np.ndarray, ep_len: np.ndarray, episodes, frameskip: int) -> tuple:
    """Rows (R,) of `episodes` with at least one block ahead in their episode, and the room (R,) after each: the
    number of rows between it and its episode's last row. Every frame t with room >= frameskip has a goal t + f."""
    rows, room = [], []
    for e in episodes:
        step = np.arange(ep_len[e] - frameskip)  # steps s with s + frameskip <= len - 1
        rows.append(ep_offset[e] + step)
        room.append(ep_len[e] - 1 - step)
    return np.concatenate([*rows, np.zeros(0, np.int64)]), np.concatenate([*room, np.zeros(0, np.int64)])


def sample_pairs(
    rng: np.random.Generator, rows: np.ndarray, room: np.ndarray, frameskip: int, max_goal_blocks: int, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """n hindsight pairs (t (n,), goal (n,)) of global rows: t uniform among `rows`, goal = t + frameskip * k with
    k uniform in 1..min(max_goal_blocks, room // frameskip), so the goal and the block's raw actions t..t+f-1 stay
    inside t's episode (its last row, whose action is NaN, is at most a goal, never part of a block)."""
    i = rng.integers(len(rows), size=n)  # (n,)
    k_max = np.minimum(max_goal_blocks, room[i] // frameskip)  # (n,) >= 1 by construction of the candidates
    k = rng.integers(1, k_max + 1)  # (n,)
    return rows[i], rows[i] + frameskip * k


def action_blocks(action: np.ndarray, frameskip: int) -> np.ndarray:
    """Normalised raw actions (R, a) -> the block starting at every row (R, frameskip * a): rows t..t+f-1
    concatenated, as the clip loader builds blocks. The last f-1 rows run past the data and are zero-padded;
    `sample_pairs` never starts a block where that would cross an episode's end."""
    padded = np.concatenate([action, np.zeros((frameskip - 1, action.shape[1]), action.dtype)])  # (R+f-1, a)
    return np.concatenate([padded[j : j + len(action)] for j in range(frameskip)], axis=1)  # (R, f*a)


# --- embedding cache


def embed_rows(model: LeWM, traj: data.Trajectories, rows: np.ndarray) -> torch.Tensor:
    """Frozen embeddings z (R, D) float32 on the model's device of the frames at dataset rows, EMBED_BATCH frames
    per encoder call (eval-mode BN: each frame is embedded independently of its batch)."""
    chunks = []
    for i in tqdm(range(0, len(rows), EMBED_BATCH), desc=f"embed {len(rows)} frames", unit="batch"):
        frames = torch.from_numpy(traj.read("pixels", rows[i : i + EMBED_BATCH]))  # (b, H, W, 3) uint8
        with torch.inference_mode():
            chunks.append(model.embed(frames).float())  # (b, D)
    return torch.cat(chunks)  # (R, D)


@torch.inference_mode()
def val_mse(policy: nn.Module, z_now: torch.Tensor, z_goal: torch.Tensor, a: torch.Tensor) -> float:
    """MSE of the policy's blocks on the fixed validation pairs, in chunks (a large sample needs no large batch)."""
    total, chunk = 0.0, 4096
    for i in range(0, len(a), chunk):
        a_pred = policy(z_now[i : i + chunk], z_goal[i : i + chunk])  # (chunk, A)
        total += (a_pred - a[i : i + chunk]).pow(2).sum().item()
    return total / a.numel()


# --- embedding cache: later runs on the same world model and dataset (other seeds, other policy shapes) skip the
# encoder pass. The file holds one embedding per dataset row and which rows are filled; any other world model or
# dataset replaces it.


def cache_key(fingerprint: dict, traj: data.Trajectories) -> dict:
    """What the cached embeddings depend on: the world model (its `world_model_fingerprint`) and the dataset (path
    and row count)."""
    return {**fingerprint, "data": os.path.abspath(traj.path), "rows": int(traj.num_rows)}


def cached_embeddings(path: str, key: dict, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (rows, D) float32, filled (rows,) bool) from the cache at `path` when it was made with `key`; otherwise
    (zeros, all False). A missing, unreadable or foreign file is no error: it is recomputed."""
    empty = torch.zeros(key["rows"], dim), torch.zeros(key["rows"], dtype=torch.bool)
    if not path or not os.path.isfile(path):
        return empty
    try:
        saved = load_checkpoint(path)
    except ValueError:
        return empty
    if not isinstance(saved, dict) or saved.get("key") != key or saved["z"].shape != empty[0].shape:
        return empty
    return saved["z"].float(), saved["filled"].bool()


def embed_with_cache(model: LeWM, traj: data.Trajectories, rows: np.ndarray, path: str, key: dict) -> torch.Tensor:
    """Embeddings z (rows of the file, D) on the model's device, every row in `rows` filled: the cached ones are
    read, the others embedded and added to the cache (written atomically; a failed write only warns)."""
    z, filled = cached_embeddings(path, key, model.cfg.embed_dim)  # (N, D), (N,)
    todo = rows[~filled[torch.from_numpy(rows)].numpy()]  # (R',) rows still to embed
    if len(todo):
        z[torch.from_numpy(todo)] = embed_rows(model, traj, todo).cpu()
        filled[torch.from_numpy(todo)] = True
        if path:
            try:
                save_checkpoint(path, {"key": key, "z": z, "filled": filled})
            except OSError as e:
                print(f"warning: embedding cache {path} not written ({e.strerror}); the next run embeds again")
    else:
        print(f"embeddings of {len(rows)} frames read from {path}")
    return z.to(next(model.parameters()).device)


# --- checkpoints


def world_model_fingerprint(ckpt: dict) -> dict:
    """What identifies a world-model checkpoint: its step and a sha256 over its weights (every tensor of
    ckpt["model"], in sorted key order, as float32 bytes)."""
    h = hashlib.sha256()
    for key in sorted(ckpt["model"]):
        h.update(ckpt["model"][key].detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return {"step": int(ckpt.get("step", -1)), "sha256": h.hexdigest()}


def load_policy(path: str, ckpt: dict, ckpt_path: str = "CKPT") -> GoalPolicy:
    """The policy saved at `path`, in eval mode, on the CPU; UsageError (one line) if the file is not a policy or
    was trained on another world model than `ckpt` (named ckpt_path in the retrain command)."""
    retrain = f"python policy.py --ckpt {ckpt_path}"
    try:
        saved = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"{path}: cannot load a policy ({str(e).splitlines()[0]}); train one with {retrain}") from e
    missing = [k for k in POLICY_KEYS if not isinstance(saved, dict) or k not in saved]
    if not missing and not isinstance(saved["world_model"], dict):
        missing = ["world_model fingerprint"]
    if missing:
        raise UsageError(f"{path}: not a policy file (lacks {', '.join(missing)}); train one with {retrain}")
    mine, theirs = world_model_fingerprint(ckpt), saved["world_model"]
    if theirs.get("sha256") != mine["sha256"]:
        raise UsageError(
            f"{path}: trained on another world model (step {theirs.get('step')}, weights sha "
            f"{str(theirs.get('sha256'))[:12]}), not this checkpoint (step {mine['step']}, weights sha "
            f"{mine['sha256'][:12]}): retrain it with {retrain}"
        )
    try:
        policy = GoalPolicy(**saved["policy_config"])
        policy.load_state_dict(saved["policy"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UsageError(f"{path}: a damaged policy file ({str(e).splitlines()[0]}); retrain it with {retrain}") from e
    return policy.eval()


# --- arguments


def parse_args(argv: list[str] | None = None) -> PolicyConfig:
    """argparse generated from PolicyConfig: every field a flag, its trailing comment the help text."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    cli.add_config_flags(parser, PolicyConfig, choices=CHOICES)
    return PolicyConfig(**vars(parser.parse_args(argv)))


def split(ckpt: dict, num_episodes: int, episodes: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) episode indices, sorted: the checkpoint's held-out episodes and all others (only the
    first `episodes` of them when it is not 0)."""
    val_eps = np.sort(np.asarray(ckpt.get("val_episodes", []), dtype=np.int64))
    train_eps = np.setdiff1d(np.arange(num_episodes), val_eps)
    return train_eps[: episodes or None], val_eps


def check_run(cfg: PolicyConfig, ckpt: dict, model: LeWM, traj: data.Trajectories) -> tuple[str, str]:
    """The checks that need the checkpoint and its dataset; returns the output and embedding cache paths."""
    path = traj.path
    if "env" in ckpt:
        data.check_env(traj, ckpt["env"])
    if traj.action_dim * model.cfg.frameskip != model.cfg.action_dim:
        raise UsageError(
            f"--data {path}: {traj.action_dim}-d actions in blocks of {model.cfg.frameskip}, but the model takes "
            f"{model.cfg.action_dim}-d blocks: not the dataset it was trained on"
        )
    train_eps, val_eps = split(ckpt, traj.num_episodes, cfg.episodes)
    if len(val_eps) == 0:
        raise UsageError(f"--ckpt {cfg.ckpt}: holds out no validation episodes (trained with --val_fraction 0)")
    if val_eps.max() >= traj.num_episodes:
        raise UsageError(f"--data {path}: {traj.num_episodes} episodes, but the checkpoint holds out {val_eps.max()}")
    for name, eps in (("training", train_eps), ("held-out", val_eps)):
        if not (traj.ep_len[eps] > model.cfg.frameskip).any():
            raise UsageError(f"--data {path}: no {name} episode is longer than one block ({model.cfg.frameskip} rows)")
    out = cfg.out or os.path.join(os.path.dirname(cfg.ckpt), "policy.pt")
    cli.check_output(out, "--out", {"--ckpt": cfg.ckpt, "--data": path})
    cache = embed_cache_path(cfg, out)
    if cache:
        cli.check_output(cache, "--embed_cache", {"--ckpt": cfg.ckpt, "--data": path, "--out": out})
    return out, cache


def embed_cache_path(cfg: PolicyConfig, out: str) -> str:
    """The embedding cache's file: --embed_cache, embeddings.pt beside the policy file, or '' when it is 'none'."""
    if cfg.embed_cache == "none":
        return ""
    return cfg.embed_cache or os.path.join(os.path.dirname(os.path.abspath(out)), "embeddings.pt")


def prepare(cfg: PolicyConfig) -> tuple[PolicyConfig, dict, LeWM, data.Trajectories]:
    """Check every argument before any long work; returns the resolved config (real dataset and output paths), the
    checkpoint, its frozen model (CPU, eval mode) and its dataset. A wrong argument raises UsageError naming it."""
    cli.check_fields(cfg, CHOICES, RANGES)
    cli.check_device(cfg.device)
    if not cfg.ckpt:
        raise UsageError("--ckpt: required (the world-model checkpoint written by train.py)")
    try:
        ckpt = load_checkpoint(cfg.ckpt)
        check_checkpoint(ckpt, cfg.ckpt, keys=("action_stats",))  # its structure, what planning uses
        model = model_from_checkpoint(ckpt, source=cfg.ckpt)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise UsageError(f"--ckpt {cfg.ckpt}: " + "; ".join(str(e).split("\n"))) from e
    path = cfg.data or ckpt.get("train_config", {}).get("data", "")
    if not path or not os.path.isfile(path):
        raise UsageError(f"--ckpt {cfg.ckpt}: its dataset {path or '(none named)'} is not found; pass --data")
    traj = cli.open_dataset(path, "--data")
    try:
        out, cache = check_run(cfg, ckpt, model, traj)
    except UsageError:
        traj.close()
        raise
    resolved = dataclasses.replace(cfg, data=os.path.abspath(path), out=out, embed_cache=cache)
    return resolved, ckpt, model, traj


# --- main


def main(cfg: PolicyConfig) -> dict:
    """Embed the dataset once with the frozen world model, train the policy on hindsight pairs of the training
    episodes, save it; returns a summary (validation MSE and its mean-action reference, seconds, output path)."""
    cfg, ckpt, model, traj = prepare(cfg)
    device = pick_device(cfg.device)
    model = model.to(device).requires_grad_(False)
    f, dim = model.cfg.frameskip, model.cfg.embed_dim
    train_eps, val_eps = split(ckpt, traj.num_episodes, cfg.episodes)
    train_rows, train_room = pair_candidates(traj.ep_offset, traj.ep_len, train_eps, f)
    val_rows, val_room = pair_candidates(traj.ep_offset, traj.ep_len, val_eps, f)

    # Embed every frame of the episodes used, once; rows of unused episodes stay 0 and are never drawn.
    t_start = time.time()
    rows = traj.episode_rows(np.concatenate([train_eps, val_eps]))  # (R,)
    fingerprint = world_model_fingerprint(ckpt)  # a hash of every weight: computed once, for the cache and the file
    z = embed_with_cache(model, traj, rows, cfg.embed_cache, cache_key(fingerprint, traj))  # (rows of the file, D)
    action = data.normalize_actions(traj.cache("action"), ckpt["action_stats"])  # (rows, a), NaN -> 0
    blocks = torch.from_numpy(action_blocks(action, f)).to(device)  # (rows, A)
    embed_seconds = time.time() - t_start

    val_t, val_goal = sample_pairs(
        np.random.default_rng(VAL_SEED), val_rows, val_room, f, cfg.max_goal_blocks, cfg.val_pairs
    )
    val_t, val_goal = torch.from_numpy(val_t).to(device), torch.from_numpy(val_goal).to(device)
    val_z, val_z_goal, val_a = z[val_t], z[val_goal], blocks[val_t]  # (V, D), (V, D), (V, A)
    mean_action_mse = val_a.pow(2).mean().item()  # predicting the mean action, 0 after normalisation

    torch.manual_seed(cfg.seed)
    policy_kwargs = {
        "dim": dim,
        "action_dim": model.cfg.action_dim,
        "hidden": cfg.hidden,
        "depth": cfg.depth,
        "goal_input": cfg.goal_input,
    }
    policy = GoalPolicy(**policy_kwargs).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    print(
        f"policy: {sum(p.numel() for p in policy.parameters()):,} parameters | {len(train_eps)} training episodes "
        f"({len(train_rows)} frames with a goal) | {len(val_eps)} held-out | {device} | "
        f"embedded in {embed_seconds:.0f} s"
    )

    t_train = time.time()
    bar = tqdm(range(cfg.steps), desc="policy", unit="step", dynamic_ncols=True)
    for step in bar:
        lr = lr_at(step, cfg.lr, cfg.steps)
        t, goal = sample_pairs(rng, train_rows, train_room, f, cfg.max_goal_blocks, cfg.batch_size)
        t, goal = torch.from_numpy(t).to(device), torch.from_numpy(goal).to(device)
        loss = train_step(policy, opt, z[t], z[goal], blocks[t], lr)  # z: (B, D), blocks: (B, A)
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            mse = val_mse(policy, val_z, val_z_goal, val_a)
            bar.write(
                f"step {step + 1:5d} | loss {loss.item():.4f} | val mse {mse:.4f} "
                f"(mean action {mean_action_mse:.4f}) | lr {lr:.2e}"
            )
    bar.close()
    seconds = time.time() - t_train

    bad = [k for k, v in policy.state_dict().items() if not v.isfinite().all()]
    if bad:  # a non-finite weight never reaches a file
        raise UsageError(f"non-finite policy weights after training ({', '.join(bad[:3])}); not saved: lower --lr")
    cli.save_checkpoint_or_copy(
        cfg.out,
        {
            "policy": {k: v.cpu() for k, v in policy.state_dict().items()},
            "policy_config": policy_kwargs,
            "train_config": dataclasses.asdict(cfg),
            "world_model": fingerprint,
            "val_mse": mse,
            "val_mse_mean_action": mean_action_mse,
            "seconds": seconds,
        },
    )
    traj.close()
    print(f"wrote {cfg.out}: val mse {mse:.4f} against {mean_action_mse:.4f} for the mean action, {seconds:.0f} s")
    return {
        "out": cfg.out,
        "val_mse": mse,
        "val_mse_mean_action": mean_action_mse,
        "train_seconds": seconds,
        "embed_seconds": embed_seconds,
    }


if __name__ == "__main__":
    with cli.exit_codes("policy.py"):  # a wrong flag or file: one line, exit code 2; Ctrl-C 130
        main(parse_args(sys.argv[1:]))
