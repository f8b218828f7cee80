"""Evaluate a trained LeWM: goal-reaching by model-predictive control with CEM (docs/method.md §9, §10).

This file is the planning protocol, top to bottom: the frozen model and its dataset (`load_world`), start/goal pairs
drawn from held-out episodes (`draw_pairs`), envs reset to them (`reset_envs`), the batched MPC loop (`run_plan`),
success and the results JSON (`plan_results`), then the command line.

Subcommands (`plan` is the default; the other three are analyses.py's, which builds on this protocol and is
imported only when one of them runs):
    plan      MPC success rate over start/goal pairs drawn from the dataset (docs/method.md §10)
    probe     linear / MLP probes of physical quantities on the frozen embeddings (docs/method.md §11)
    surprise  latent prediction error along trajectories with and without unphysical events (docs/method.md §11)
    diagnose  cheap checks of a candidate model: do the true actions rank high, do actions move the prediction,
              what do linear probes read from the embedding (held-out episodes, never the evaluation pairs)

Run:
    python evaluate.py --ckpt runs/pusht_cpu/ckpt.pt --episodes 50 --out results.json
    python evaluate.py plan --ckpt runs/pusht_cpu/ckpt.pt --policy random            # the random-action floor
    python evaluate.py --official hf:quentinll/lewm-pusht --env pusht   # a released model on our own PushT data
    python evaluate.py --official weights.pt config.json --data pusht.h5 --env pusht --split train
    python evaluate.py --ckpt runs/pusht_paper/ckpt.pt --device cuda                  # one GPU

Deliberately absent: multi-process env workers (all episodes step in one process), reward shaping, any
environment or planner logic beyond what the reference evaluation does.

Dimension letters: B episodes planned at once, S planner samples, N horizon (blocks), A action block
(frameskip x raw action dim), D embedding.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import cli
import data
import envs
from charts import save_episode_pictures
from cli import UsageError, pick_device, save_json
from collect import simulator_dataset
from kernels import native_bf16, use_fast_attention
from model import LeWM, check_checkpoint, load_checkpoint, model_from_checkpoint
from official import check_official, load_released
from planner import cem, gradient_plan, make_cost, warm_start
from policy import act, load_policy, propose

# --- configuration and the command line: flags checked before any work

# COMMANDS: subcommand -> (help, its flags, space-separated). A new subcommand is one entry.
COMMON = "ckpt official data collect_episodes env episodes out seed device"  # every subcommand's flags
PLANNER = "goal_offset horizon samples iterations topk plan_chunk"  # how plans are made, for plan and diagnose
PLAN = "split budget receding_horizon policy policy_file act_steps solver lr warm_start bf16 planner_seed video"
COMMANDS = {
    "plan": ("MPC success rate (default)", f"{COMMON} {PLANNER} {PLAN}"),
    "probe": ("probes on frozen embeddings", f"{COMMON} frames probe_epochs"),
    "surprise": ("latent surprise along trajectories", f"{COMMON} perturb_steps"),
    "diagnose": (
        "can the model plan? action ranking, sensitivity, probes, open-loop plan anatomy, encoder capacity",
        f"{COMMON} {PLANNER} pairs eval_pairs frames anatomy_pairs capacity_steps",
    ),
}


@dataclass
class EvalConfig:
    command: str = "plan"  # plan, probe, surprise or diagnose (set by the subcommand)
    ckpt: str = ""  # our checkpoint (train.py): model, action stats, env, dataset path and held-out episodes
    official: tuple = ()  # a released model: hf:owner/name, a folder with weights.pt + config.json, or WEIGHTS CONFIG
    data: str = ""  # HDF5 dataset ('' = the checkpoint's; with --official: our simulator's, collected if missing)
    collect_episodes: int = 100  # --official without --data: episodes collected at the model's image size
    env: str = ""  # pusht, tworoom, reacher or cube ('' = the checkpoint's)
    split: str = "val"  # episodes to draw start rows from: val (held out) or train (the official choice)
    episodes: int = 50  # start/goal pairs evaluated
    goal_offset: int = 25  # goal = the dataset frame this many raw steps after the start
    budget: int = 50  # env steps per episode
    horizon: int = 5  # N: planned action blocks
    receding_horizon: int = 5  # blocks executed before replanning (= horizon in the reference: no leftover plan)
    policy: str = "planner"  # planner, random (uniform in [-1, 1]: the floor), idm or idm+cem (policy.py's policy)
    policy_file: str = ""  # --policy idm / idm+cem: the file policy.py wrote ('' = policy.pt next to --ckpt)
    act_steps: int = 0  # --policy idm: raw actions of each policy block executed before it acts again (0 = all)
    solver: str = "cem"  # cem or adam (gradient planner), docs/method.md §9
    samples: int = 0  # candidates per plan (0 = 300 for cem, 100 for adam)
    iterations: int = 30  # CEM iterations / Adam steps
    topk: int = 30  # CEM elites
    lr: float = 0.1  # Adam planner learning rate
    warm_start: bool = False  # start each plan from the unexecuted tail of the previous one (off = official)
    bf16: bool = False  # bf16 autocast for the planning rollout
    plan_chunk: int | None = None  # episodes per planning call, same plans at any size (None = 10 on CPU, else all)
    seed: int = 42  # start-row draw; planner and random policy generators use seed + episode
    planner_seed: int = 0  # > 0: the same pairs, other planner draws (generators seeded seed + 1000 * this + episode)
    device: str = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
    out: str = ""  # JSON results ('' = eval_<command>_<env>.json next to the checkpoint, or in the cwd)
    video: str = ""  # folder for a filmstrip PNG (and a GIF with Pillow) per episode, observation beside goal
    frames: int = 20000  # probe: frames drawn from training episodes (a quarter as many from held-out ones)
    probe_epochs: int = 20  # probe: epochs of the MLP probe (AdamW, cosine learning rate)
    perturb_steps: int = 5  # surprise: frames per held-out episode replaced by each perturbation
    pairs: int = 200  # diagnose: start/goal pairs from held-out episodes that hold no evaluation pair
    eval_pairs: int = 50  # diagnose: episodes holding any of this many evaluation pairs (seed 42 draw) are excluded
    anatomy_pairs: int = 50  # diagnose: pairs planned once with CEM and executed open-loop (0 = skip)
    capacity_steps: int = 1000  # diagnose: steps of the supervised fresh-encoder capacity check (0 = skip)


# Valid values, checked before any work: choices, and (rule, test) for the fields with a range.
CHOICES = {
    "env": ["", *envs.REGISTRY],
    "split": ["val", "train"],
    "policy": ["planner", "random", "idm", "idm+cem"],
    "solver": ["cem", "adam"],
    "device": cli.DEVICES,
}
AT_LEAST_1 = "episodes goal_offset budget horizon iterations topk probe_epochs perturb_steps pairs"
AT_LEAST_0 = "act_steps samples seed planner_seed eval_pairs anatomy_pairs capacity_steps plan_chunk"
RANGES = {
    **dict.fromkeys(AT_LEAST_1.split(), (">= 1", lambda v: v >= 1)),
    **dict.fromkeys(AT_LEAST_0.split(), (">= 0", lambda v: v >= 0)),
    **dict.fromkeys(("frames", "collect_episodes"), (">= 2", lambda v: v >= 2)),
    "lr": ("> 0", lambda v: v > 0),
}


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """argparse generated from EvalConfig, with subcommands; no subcommand means `plan`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["plan", *argv]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (text, fields) in COMMANDS.items():
        cli.add_config_flags(
            sub.add_parser(command, help=text, description=text, formatter_class=cli.HelpFormatter),
            EvalConfig,
            names=fields.split(),
            choices=CHOICES,
            metavars={"official": "SOURCE"},
        )
    args = vars(parser.parse_args(argv))
    args["official"] = tuple(args.get("official") or ())
    return EvalConfig(**args)


def check_config(cfg: EvalConfig) -> None:
    """Raise UsageError, naming the flag and its value, for any argument outside its valid values or a file that
    is missing or cannot be written."""
    if cfg.command not in COMMANDS:
        raise UsageError(f"unknown command {cfg.command!r}; valid: {', '.join(COMMANDS)}")
    cli.check_fields(cfg, CHOICES, RANGES)
    if not 1 <= cfg.receding_horizon <= cfg.horizon:
        raise UsageError(f"--receding_horizon {cfg.receding_horizon}: must be in [1, --horizon {cfg.horizon}]")
    if cfg.command == "plan" and cfg.samples and cfg.topk > cfg.samples and cfg.solver == "cem":
        raise UsageError(f"--topk {cfg.topk}: must be <= --samples {cfg.samples}")
    if bool(cfg.ckpt) == bool(cfg.official):
        raise UsageError("give exactly one of --ckpt PATH or --official SOURCE")
    if cfg.official:
        check_official(cfg.official)
        if not cfg.env:
            raise UsageError("--official needs --env (the environment to evaluate on)")
    cli.check_files({"--ckpt": cfg.ckpt, "--data": cfg.data})
    cli.check_device(cfg.device)
    if cfg.out:  # never an input (a checkpoint, a dataset, a policy replaced by JSON)
        cli.check_output(cfg.out, "--out", {"--ckpt": cfg.ckpt, "--data": cfg.data, "--policy_file": cfg.policy_file})
    else:
        folder = os.path.dirname(os.path.abspath(cfg.ckpt)) if cfg.ckpt else "."
        cli.check_writable_file(os.path.join(folder, "eval.json"), "--out (default: next to the checkpoint)")
    if cfg.video:
        if os.path.exists(cfg.video) and not os.path.isdir(cfg.video):
            raise UsageError(f"--video {cfg.video}: is a file, expected a folder")
        cli.check_writable_file(os.path.join(cfg.video, "episode.png"), "--video")


# --- the frozen model and its dataset


@dataclass
class World:
    """Everything a subcommand needs: the frozen model, the dataset and how the model was trained on it."""

    model: LeWM  # eval mode, frozen, on `device`
    stats: dict  # {"mean": (A_raw,), "std": (A_raw,)} action statistics the model was trained with
    traj: data.Trajectories
    train_eps: np.ndarray  # sorted episode indices
    val_eps: np.ndarray  # sorted held-out episode indices (empty for an official model without a split)
    env: str
    frameskip: int  # raw actions per action block
    action_dim: int  # raw env action dim (the model's block is frameskip x this)
    img_size: int  # the dataset's frame side in pixels
    device: torch.device
    source: str  # the checkpoint path, or the --official argument(s)
    data_source: str = ""  # where the dataset comes from, in words (printed and saved with the results)


def load_world(cfg: EvalConfig) -> World:
    """The frozen model and its dataset from `--ckpt` (everything travels with it) or `--official` + `--env`,
    with `--data` or our own simulator's data."""
    if bool(cfg.ckpt) == bool(cfg.official):
        raise UsageError("give exactly one of --ckpt PATH or --official SOURCE")
    device = pick_device(cfg.device)
    if cfg.ckpt:
        try:
            ckpt = load_checkpoint(cfg.ckpt)  # FileNotFoundError / ValueError with the path in the message
            check_checkpoint(ckpt, cfg.ckpt, keys=("action_stats", "env"))  # its structure, what planning uses
            model = model_from_checkpoint(ckpt, source=cfg.ckpt)
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise UsageError(f"--ckpt {cfg.ckpt}: " + "; ".join(str(e).split("\n"))) from e
        env = ckpt["env"]
        if cfg.env and cfg.env != env:
            raise UsageError(f"--env {cfg.env}: does not match the checkpoint, which was trained on {env}")
        path = cfg.data or ckpt.get("train_config", {}).get("data", "")
        if not path:
            raise UsageError(f"--ckpt {cfg.ckpt}: names no dataset; pass --data")
        if not os.path.isfile(path):
            raise UsageError(f"--ckpt {cfg.ckpt}: its dataset {path} is not found from {os.getcwd()}; pass --data")
        traj = cli.open_dataset(path, "--data")
        stats = {k: [float(x) for x in v] for k, v in ckpt["action_stats"].items()}
        val_eps = np.sort(np.asarray(ckpt.get("val_episodes", []), dtype=np.int64))
        if len(val_eps) and val_eps.max() >= traj.num_episodes:
            raise UsageError(
                f"{path} has {traj.num_episodes} episodes but the checkpoint holds out episode "
                f"{val_eps.max()}: not the dataset it was trained on"
            )
        train_eps = np.setdiff1d(np.arange(traj.num_episodes), val_eps)
        source = cfg.ckpt
        data_source = f"--data {path}" if cfg.data else f"the checkpoint's training data {path}"
    else:
        if not cfg.env:
            raise UsageError("--official needs --env (the environment to evaluate on)")
        model = load_released(cfg.official)  # an unknown --env is refused below, whatever the source
        env = cfg.env
        if cfg.data:
            path, data_source = cfg.data, f"--data {cfg.data}"
        else:
            path, data_source = simulator_dataset(env, model.cfg.img_size, cfg.collect_episodes)
        traj = cli.open_dataset(path, "--data")
        train_eps, val_eps = data.split_episodes(traj.num_episodes)
        # The released files hold no action statistics: fitted on this dataset's training episodes.
        stats = data.action_stats(traj, train_eps)
        source = " ".join(cfg.official)
    if env not in envs.REGISTRY:
        raise UsageError(f"--env {env}: unknown environment; valid: {', '.join(envs.REGISTRY)}")
    data.check_env(traj, env)
    frameskip = model.cfg.frameskip
    if traj.action_dim * frameskip != model.cfg.action_dim:
        raise UsageError(
            f"{traj.path} has {traj.action_dim}-d actions, so {frameskip}-step blocks of {traj.action_dim * frameskip}"
            f" dims, but the model takes {model.cfg.action_dim}-d action blocks: wrong dataset or env"
        )
    if len(stats["mean"]) != traj.action_dim:
        raise ValueError(f"action statistics have {len(stats['mean'])} dims, the dataset {traj.action_dim}")
    model = use_fast_attention(model.to(device).eval().requires_grad_(False))  # same maths, faster in bf16
    shape = {"frameskip": frameskip, "action_dim": traj.action_dim, "img_size": traj.img_shape[0], "device": device}
    return World(model, stats, traj, train_eps, val_eps, env, **shape, source=source, data_source=data_source)


def default_out(cfg: EvalConfig, world: World, name: str) -> str:
    """`--out`, or eval_<name>_<env>.json next to the checkpoint (in the cwd for an official model)."""
    if cfg.out:
        return cfg.out
    folder = os.path.dirname(os.path.abspath(cfg.ckpt)) if cfg.ckpt else "."
    return os.path.join(folder, f"eval_{name}_{world.env}.json")


def dataset_states(world: World, rows: np.ndarray) -> np.ndarray:
    """The env `state` (reset option) recorded at the given rows; official files name the columns differently."""
    for columns in envs.REGISTRY[world.env].state_columns:
        if set(columns) <= set(world.traj.columns):
            return np.concatenate([world.traj.read(c, rows) for c in columns], axis=-1)
    raise ValueError(f"{world.traj.path} has no 'state' column from which to set the {world.env} env")


# --- start/goal pairs from held-out episodes, and envs reset to them (docs/method.md §10)


def start_rows(traj: data.Trajectories, episodes, n: int, goal_offset: int, seed: int) -> np.ndarray:
    """`n` distinct start rows (global, sorted) of `episodes` with a goal `goal_offset` raw steps later.

    Valid rows have step_idx <= L - goal_offset - 1, listed in file order; the draw is the reference's
    `np.random.default_rng(seed).choice(len(valid), n, replace=False)`, sorted.
    """
    valid = traj.episode_rows(np.sort(episodes), drop_last=goal_offset)  # (V,)
    if n > len(valid):
        raise UsageError(
            f"{traj.path}: only {len(valid)} valid start rows in the chosen episodes (need step + {goal_offset} "
            f"inside the episode), asked for {n}: lower --episodes or use another --split"
        )
    # DEVIATION: choice(len(valid)) rather than the original LeWM choice(len(valid) - 1), an off-by-one (docs/method.md §10).
    return np.sort(valid[np.random.default_rng(seed=seed).choice(len(valid), n, replace=False)])


@dataclass
class Pairs:
    """Start/goal pairs of the protocol: goal = the dataset frame and state goal_offset raw steps after the start."""

    rows: np.ndarray  # (B,) global start rows
    episode: np.ndarray  # (B,) their episodes
    step: np.ndarray  # (B,) their steps within the episode
    start_frames: np.ndarray  # (B, H, W, 3) uint8
    goal_frames: np.ndarray  # (B, H, W, 3) uint8
    start_states: np.ndarray  # (B, S) env reset states
    goal_states: np.ndarray  # (B, S)


def draw_pairs(world: World, cfg: EvalConfig) -> Pairs:
    """cfg.episodes start/goal pairs from the chosen split (docs/method.md §10)."""
    if cfg.split not in ("val", "train"):
        raise ValueError(f"unknown split {cfg.split!r}; valid: val, train")
    pool = world.val_eps if cfg.split == "val" else world.train_eps
    if len(pool) == 0:
        raise ValueError(f"the {cfg.split} split is empty: use --split train")
    return pairs_at(world, start_rows(world.traj, pool, cfg.episodes, cfg.goal_offset, cfg.seed), cfg.goal_offset)


def pairs_at(world: World, rows: np.ndarray, goal_offset: int) -> Pairs:
    """The start/goal pairs of the given start rows, each with its goal goal_offset raw steps later."""
    traj = world.traj
    episode = np.searchsorted(traj.ep_offset, rows, side="right") - 1  # (B,)
    return Pairs(
        rows,
        episode,
        rows - traj.ep_offset[episode],
        traj.read("pixels", rows),
        traj.read("pixels", rows + goal_offset),
        dataset_states(world, rows),
        dataset_states(world, rows + goal_offset),
    )


def reset_envs(world: World, cfg: EvalConfig, pairs: Pairs) -> tuple[list, np.ndarray, np.ndarray, list]:
    """One env per pair, reset to its start state with its goal: (envs, solved at start (B,), start distance (B,),
    start errors: the success test's parts per pair)."""
    env_list, solved0, dist0, errors0 = [], np.zeros(len(pairs.rows), bool), np.zeros(len(pairs.rows)), []
    for i, (state, goal_state) in enumerate(zip(pairs.start_states, pairs.goal_states)):
        env = envs.make_env(world.env, img_size=world.img_size)
        goal = envs.goal_from_state(world.env, goal_state)
        _, info = env.reset(seed=cfg.seed + i, options={"state": state, "goal_state": goal})
        solved0[i] = bool(info["is_success"])
        dist0[i] = envs.REGISTRY[world.env].goal_distance(info["state"], info["goal_state"])
        errors0.append(envs.REGISTRY[world.env].errors(info["state"], info["goal_state"]))
        env_list.append(env)
    return env_list, solved0, dist0, errors0


# --- planning: CEM (or Adam) on the model's rollout cost, episodes batched (docs/method.md §9)


def encode_frames(model: LeWM, frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 frames (B, H, W, 3) -> z (B, 1, D), encoded once (eval-mode BN: each row independent)."""
    pixels = model.preprocess(torch.as_tensor(frames).to(device)[:, None])  # (B, 1, 3, S, S)
    return model.encode(pixels)  # (B, 1, D)


# Episodes per planning call on a CPU. Each episode draws from its own generator and the rollout treats episodes
# independently, so the plans are the same at any chunk size (bit for bit in fp32, measured); on 2 CPU cores a CEM
# plan of the `cpu` preset costs 1.4x more per episode in one call of 50 than in calls of 10 (BENCHMARKS.md).
CPU_PLAN_CHUNK = 10


def chunk_size(cfg: EvalConfig, device: torch.device) -> int:
    """Episodes per planning call: --plan_chunk, or CPU_PLAN_CHUNK on a CPU and all (0) elsewhere."""
    if cfg.plan_chunk is not None:
        return cfg.plan_chunk
    return CPU_PLAN_CHUNK if device.type == "cpu" else 0


def plan_batch(world: World, cfg: EvalConfig, frames: np.ndarray, z_goal: torch.Tensor, generators, init_mean):
    """One planning call for B episodes: current frames (B, H, W, 3), z_goal (B, D) -> plans (B, N, A) normalised."""
    model, b = world.model, len(frames)
    block = world.frameskip * world.action_dim
    samples = cfg.samples or (300 if cfg.solver == "cem" else 100)
    if cfg.solver == "cem":
        with torch.inference_mode():
            z0 = encode_frames(model, frames, world.device)  # (B, 1, D)
            cost_fn = make_cost(model, z0, z_goal, cfg.bf16)
            return cem(
                cost_fn,
                b,
                cfg.horizon,
                block,
                num_samples=samples,
                iterations=cfg.iterations,
                topk=cfg.topk,
                init_mean=init_mean,
                generator=generators,
                device=world.device,
            )
    if cfg.solver == "adam":
        with torch.no_grad():  # not inference_mode: the embeddings enter the autograd graph of the plans
            z0 = encode_frames(model, frames, world.device)  # (B, 1, D)
        cost_fn = make_cost(model, z0, z_goal, cfg.bf16)
        return gradient_plan(
            cost_fn,
            b,
            cfg.horizon,
            block,
            num_samples=samples,
            steps=cfg.iterations,
            lr=cfg.lr,
            init_mean=init_mean,
            generator=generators,
            device=world.device,
        )
    raise ValueError(f"unknown solver {cfg.solver!r}; valid: cem, adam")


def plan_chunks(world: World, cfg: EvalConfig, frames: np.ndarray, z_goal: torch.Tensor, generators, init_mean):
    """plan_batch over consecutive chunks of chunk_size episodes (0 = all at once); plans (B, N, A)."""
    size = chunk_size(cfg, world.device) or len(frames)
    return torch.cat(
        [
            plan_batch(
                world,
                cfg,
                frames[i : i + size],
                z_goal[i : i + size],
                generators[i : i + size],
                None if init_mean is None else init_mean[i : i + size],
            )
            for i in range(0, len(frames), size)
        ]
    )


def goal_policy_path(cfg: EvalConfig) -> str:
    """The goal-conditioned policy's file: --policy_file, or policy.pt next to the checkpoint."""
    return cfg.policy_file or os.path.join(os.path.dirname(cfg.ckpt), "policy.pt")


def load_goal_policy(cfg: EvalConfig, world: World):
    """The policy.py policy of --ckpt's world model, on the world's device (refused for another world model)."""
    if not cfg.ckpt:
        raise UsageError(f"--policy {cfg.policy}: needs --ckpt (the policy is trained on our checkpoint's latents)")
    return load_policy(goal_policy_path(cfg), load_checkpoint(cfg.ckpt), cfg.ckpt).to(world.device)


# --- success and the results JSON


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (sensible at 0 and n successes, unlike p +- 2 se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def plan_results(cfg: EvalConfig, world: World, pairs: Pairs, outcome: dict, plan_calls: list[dict]) -> dict:
    """The results JSON of a plan run; outcome holds the per-pair arrays success, first_step, solved0, dist0, dist,
    closest (the smallest distance reached), closest_step, and the lists of error dicts errors0, errors (final) and
    closest_errors (at closest_step)."""
    success, solved0 = outcome["success"], outcome["solved0"]
    b, n_ok = len(success), int(outcome["success"].sum())
    solver = {
        "solver": cfg.solver,
        "samples": cfg.samples or (300 if cfg.solver == "cem" else 100),
        "iterations": cfg.iterations,
        "horizon": cfg.horizon,
        "receding_horizon": cfg.receding_horizon,
        "frameskip": world.frameskip,
        "warm_start": cfg.warm_start,
        "bf16": cfg.bf16,
        "plan_chunk": chunk_size(cfg, world.device),
    }
    solver |= {"topk": cfg.topk} if cfg.solver == "cem" else {"lr": cfg.lr}
    per_call = [c["seconds"] / c["episodes"] for c in plan_calls]
    return {
        "env": world.env,
        "checkpoint": world.source,
        "data": world.traj.path,
        "data_source": world.data_source,
        "policy": cfg.policy,
        "split": cfg.split,
        "episodes": b,
        "successes": n_ok,
        "success_rate": n_ok / b,
        "ci95": list(wilson(n_ok, b)),
        "solved_at_start": float(solved0.mean()),
        # Success is tested after each step, never at the start: a pair solved at the start succeeds only if it is
        # still at the goal after its first step. This is the rate on the pairs not solved at the start (le-wm
        # issue 23).
        "success_rate_unsolved_at_start": float(success[~solved0].mean()) if (~solved0).any() else None,
        "budget": cfg.budget,
        "goal_offset": cfg.goal_offset,
        "seed": cfg.seed,
        "device": str(world.device),
        "mean_plan_seconds": float(np.mean(per_call)) if per_call else None,
        "seconds_per_call": float(np.mean([c["seconds"] for c in plan_calls])) if plan_calls else None,
        "plan_calls": plan_calls,
        **({"planner": solver} if cfg.policy in ("planner", "idm+cem") else {}),
        **({"policy_file": goal_policy_path(cfg)} if cfg.policy in ("idm", "idm+cem") else {}),
        **({"act_steps": cfg.act_steps or world.frameskip} if cfg.policy == "idm" else {}),
        "per_episode": [
            {
                "index": i,
                "episode": int(pairs.episode[i]),
                "start_step": int(pairs.step[i]),
                "solved_at_start": bool(solved0[i]),
                "success": bool(success[i]),
                "first_success_step": int(outcome["first_step"][i]),
                "start_distance": float(outcome["dist0"][i]),
                "final_distance": float(outcome["dist"][i]),
                # The success test's parts (envs.py `*_errors`): at the start, at the end, and where the distance
                # was smallest, so a failure says which part of the test it missed.
                "start_errors": outcome["errors0"][i],
                "final_errors": outcome["errors"][i],
                "closest_distance": float(outcome["closest"][i]),
                "closest_step": int(outcome["closest_step"][i]),
                "closest_errors": outcome["closest_errors"][i],
            }
            for i in range(b)
        ],
        "config": dataclasses.asdict(cfg),
    }


def print_plan_table(results: dict) -> None:
    """One line per episode (the final error split into the success test's parts, and the closest approach), then
    the summary line."""
    parts = list(results["per_episode"][0]["final_errors"]) if results["per_episode"] else []
    print(
        f"{'#':>3} {'episode':>7} {'start':>5} {'at_start':>8} {'success':>7} {'step':>4} {'dist0':>9} {'dist':>9} "
        + " ".join(f"{p:>12}" for p in parts)
        + f" {'closest':>9} {'at':>3}"
    )
    for r in results["per_episode"]:
        print(
            f"{r['index']:>3} {r['episode']:>7} {r['start_step']:>5} {r['solved_at_start']!s:>8} "
            f"{r['success']!s:>7} {r['first_success_step']:>4} {r['start_distance']:>9.3f} "
            f"{r['final_distance']:>9.3f} "
            + " ".join(f"{r['final_errors'][p]:>12.3f}" for p in parts)
            + f" {r['closest_distance']:>9.3f} {r['closest_step']:>3}"
        )
    timing = ""
    if results["plan_calls"]:
        timing = (
            f" | {results['mean_plan_seconds']:.3f} s per episode-plan, {results['seconds_per_call']:.2f} s per"
            f" planning round"
        )
    rate = results.get("success_rate_unsolved_at_start")
    unsolved = f" (success on the others {100 * rate:.1f} %)" if rate is not None and results["solved_at_start"] else ""
    lo, hi = results["ci95"]
    print(f"data: {results['data']} ({results['data_source']})")
    print(
        f"{results['env']} {results['policy']} ({results['split']} split): success {results['successes']}/"
        f"{results['episodes']} = {100 * results['success_rate']:.1f} % [95 % CI {100 * lo:.1f}-{100 * hi:.1f}] | "
        f"solved at start {100 * results['solved_at_start']:.1f} %{unsolved}{timing}"
    )


# --- the MPC loop


def run_plan(cfg: EvalConfig) -> dict:
    """Goal-reaching success rate of MPC (or random actions, or the goal-conditioned policy acting every block, or
    CEM started from that policy's plan) from dataset start/goal pairs, all episodes batched."""
    if cfg.policy not in CHOICES["policy"]:
        raise ValueError(f"unknown policy {cfg.policy!r}; valid: {', '.join(CHOICES['policy'])}")
    if not 1 <= cfg.receding_horizon <= cfg.horizon:
        raise ValueError(f"need 1 <= receding_horizon <= horizon, got {cfg.receding_horizon} and {cfg.horizon}")
    world = load_world(cfg)
    goal_policy = load_goal_policy(cfg, world) if cfg.policy in ("idm", "idm+cem") else None
    if cfg.bf16 and cfg.policy == "planner" and not native_bf16(world.device):
        print(f"--bf16: {world.device.type} has no native bf16 here, so the rollout is emulated and far slower")
    if cfg.act_steps > world.frameskip:
        raise UsageError(f"--act_steps {cfg.act_steps}: must be in [0, {world.frameskip}] (the raw actions of a block)")
    pairs = draw_pairs(world, cfg)
    env_list, solved0, dist0, errors0 = reset_envs(world, cfg, pairs)
    b, name, a_dim, fs = len(pairs.rows), world.env, world.action_dim, world.frameskip
    # The first frame the planner sees is the dataset frame, not a render (docs/method.md §10); later ones are renders.
    obs, dist = pairs.start_frames.copy(), dist0.copy()  # (B, H, W, 3), (B,)
    success, first_step = np.zeros(b, bool), np.full(b, -1)
    errors, closest, closest_step = list(errors0), dist0.copy(), np.zeros(b, int)  # final and closest approach
    closest_errors = list(errors0)
    queues = [np.zeros((0, a_dim), np.float32) for _ in range(b)]  # raw actions still to execute, per episode
    prev_plans: list[torch.Tensor | None] = [None] * b
    videos = [[obs[i].copy()] for i in range(b)] if cfg.video else None  # observed frames per episode
    # One generator per episode, so batching does not change any episode's draws; planner_seed 0 is seed + i.
    draw_seeds = [cfg.seed + 1000 * cfg.planner_seed + i for i in range(b)]
    gens = [torch.Generator(world.device).manual_seed(s) for s in draw_seeds]
    rngs = [np.random.default_rng(s) for s in draw_seeds]
    z_goal, plan_calls = None, []
    if cfg.policy != "random":
        with torch.inference_mode() if cfg.solver == "cem" else torch.no_grad():
            z_goal = encode_frames(world.model, pairs.goal_frames, world.device)[:, 0]  # (B, D) once per episode

    bar = tqdm(range(cfg.budget), desc=f"plan {name} ({b} episodes)", unit="step", dynamic_ncols=True)
    for t in bar:
        active = np.flatnonzero(~success)  # an env is frozen once it has succeeded (swm HEAD)
        bar.set_postfix(success=f"{int(success.sum())}/{b}", refresh=False)
        if len(active) == 0:
            break
        need = [i for i in active if len(queues[i]) == 0]
        if need and cfg.policy in ("planner", "idm+cem"):
            # DEVIATION: the unfinished episodes are planned together, in batched calls of plan_chunk episodes, each
            # with its own generator seeded seed + episode (the reference plans them one after another from one
            # generator seeded 42).
            init = None
            t0 = time.perf_counter()
            if cfg.policy == "idm+cem":  # CEM refines the policy's plan, rolled out through the predictor
                with torch.inference_mode():
                    z_now = encode_frames(world.model, obs[need], world.device)  # (B', 1, D)
                    init = propose(goal_policy, world.model, z_now, z_goal[need], cfg.horizon)  # (B', N, A)
            elif cfg.warm_start and prev_plans[need[0]] is not None:
                init = warm_start(torch.stack([prev_plans[i] for i in need]), cfg.receding_horizon)  # (B', N, A)
            plans = plan_chunks(world, cfg, obs[need], z_goal[need], [gens[i] for i in need], init)  # (B', N, A)
            plan_calls.append({"step": t, "episodes": len(need), "seconds": time.perf_counter() - t0})
            raw = plans.float().cpu().numpy().reshape(len(need), cfg.horizon * fs, a_dim)  # row-major blocks
            # DEVIATION: de-normalised with the training statistics (ddof=1); the reference refits them with
            # ddof=0 (StandardScaler) at evaluation time, a relative difference of 1/(2 * rows) in the scale.
            raw = data.denormalize_actions(raw[:, : cfg.receding_horizon * fs], world.stats)  # (B', R*fs, A_raw)
            for j, i in enumerate(need):
                queues[i], prev_plans[i] = raw[j], plans[j]
        elif need and cfg.policy == "idm":  # the policy's next block from the newest frame, every block
            t0 = time.perf_counter()
            with torch.inference_mode():
                z_now = encode_frames(world.model, obs[need], world.device)[:, 0]  # (B', D)
                block = act(goal_policy, z_now, z_goal[need]).float().cpu().numpy()  # (B', fs*A_raw) normalised
            plan_calls.append({"step": t, "episodes": len(need), "seconds": time.perf_counter() - t0})
            raw = data.denormalize_actions(block.reshape(len(need), fs, a_dim), world.stats)  # (B', fs, A_raw)
            for j, i in enumerate(need):  # the first act_steps of the block; the policy then acts from the new frame
                queues[i] = raw[j][: cfg.act_steps or fs]
        elif need:
            for i in need:
                queues[i] = rngs[i].uniform(-1, 1, (fs, a_dim)).astype(np.float32)
        for i in active:
            action, queues[i] = queues[i][0], queues[i][1:]
            # Sent unclipped, as the reference: PushT moves its target by 100 x action with no clip; TwoRoom,
            # Reacher and Cube clip to [-1, 1] inside step(), as their originals do.
            obs[i], _, terminated, _, info = env_list[i].step(action)
            dist[i] = envs.REGISTRY[name].goal_distance(info["state"], info["goal_state"])
            errors[i] = envs.REGISTRY[name].errors(info["state"], info["goal_state"])
            if dist[i] < closest[i]:
                closest[i], closest_step[i], closest_errors[i] = dist[i], t + 1, errors[i]
            if terminated:
                success[i], first_step[i] = True, t + 1
            if videos is not None:
                videos[i].append(obs[i].copy())
    bar.close()
    for env in env_list:
        env.close()

    outcome = {
        "success": success,
        "first_step": first_step,
        "solved0": solved0,
        "dist0": dist0,
        "dist": dist,
        "errors0": errors0,
        "errors": errors,
        "closest": closest,
        "closest_step": closest_step,
        "closest_errors": closest_errors,
    }
    results = plan_results(cfg, world, pairs, outcome, plan_calls)
    print_plan_table(results)
    out = default_out(cfg, world, f"plan_{cfg.policy}")
    save_json(results, out)
    if videos is not None:
        save_episode_pictures(cfg.video, name, videos, pairs.goal_frames, results["per_episode"])
    results["out"] = out
    return results


# --- main


def main(cfg: EvalConfig) -> dict:
    """Run the configured subcommand and return its results."""
    check_config(cfg)
    print(json.dumps(dataclasses.asdict(cfg)))
    if cfg.command == "plan":
        return run_plan(cfg)
    import analyses  # here, not at the top: analyses.py builds on this protocol, so it sits above this file

    if cfg.command == "probe":
        return analyses.run_probe(cfg)
    if cfg.command == "surprise":
        return analyses.run_surprise(cfg)
    if cfg.command == "diagnose":
        return analyses.run_diagnose(cfg)
    raise ValueError(f"unknown command {cfg.command!r}; valid: {COMMANDS}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except UsageError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
