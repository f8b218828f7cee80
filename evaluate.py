"""Evaluate a trained LeWM: goal-reaching by model-predictive control with CEM (docs/method.md §9, §10).

Subcommands (`plan` is the default):
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
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import data
import envs
from data import UsageError
from model import (
    LeWM,
    ViT,
    load_checkpoint,
    load_official,
    load_pretrained,
    model_from_checkpoint,
    native_bf16,
    pick_device,
    preprocess,
)
from planner import cem, gradient_plan, make_cost, warm_start
from policy import act, load_policy, propose

# Flags every subcommand takes; COMMANDS: subcommand -> (help, its flags). A new subcommand is one entry.
COMMON_FIELDS = ("ckpt", "official", "data", "collect_episodes", "env", "episodes", "out", "seed", "device")
COMMANDS = {
    "plan": (
        "MPC success rate (default)",
        COMMON_FIELDS
        + (
            "split",
            "goal_offset",
            "budget",
            "horizon",
            "receding_horizon",
            "policy",
            "policy_file",
            "solver",
            "samples",
            "iterations",
            "topk",
            "lr",
            "warm_start",
            "bf16",
            "plan_chunk",
            "planner_seed",
            "video",
        ),
    ),
    "probe": ("probes on frozen embeddings", COMMON_FIELDS + ("frames", "probe_epochs")),
    "surprise": ("latent surprise along trajectories", COMMON_FIELDS + ("perturb_steps",)),
    "diagnose": (
        "can the model plan? action ranking, sensitivity, probes, open-loop plan anatomy, encoder capacity",
        COMMON_FIELDS
        + ("pairs", "eval_pairs", "goal_offset", "horizon", "samples", "iterations", "topk", "frames")
        + ("plan_chunk", "anatomy_pairs", "capacity_steps"),
    ),
}

# --- configuration


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


# Valid values, checked before any work: choices, and (rule, test) for the fields with a range.
CHOICES = {
    "env": ["", *envs.REGISTRY],
    "split": ["val", "train"],
    "policy": ["planner", "random", "idm", "idm+cem"],
    "solver": ["cem", "adam"],
    "device": ["auto", "cuda", "mps", "cpu"],
}
RANGES = {
    "episodes": (">= 1", lambda v: v >= 1),
    "goal_offset": (">= 1", lambda v: v >= 1),
    "budget": (">= 1", lambda v: v >= 1),
    "horizon": (">= 1", lambda v: v >= 1),
    "samples": (">= 0", lambda v: v >= 0),
    "iterations": (">= 1", lambda v: v >= 1),
    "topk": (">= 1", lambda v: v >= 1),
    "lr": ("> 0", lambda v: v > 0),
    "seed": (">= 0", lambda v: v >= 0),
    "planner_seed": (">= 0", lambda v: v >= 0),
    "frames": (">= 2", lambda v: v >= 2),
    "probe_epochs": (">= 1", lambda v: v >= 1),
    "perturb_steps": (">= 1", lambda v: v >= 1),
    "pairs": (">= 1", lambda v: v >= 1),
    "collect_episodes": (">= 2", lambda v: v >= 2),
    "eval_pairs": (">= 0", lambda v: v >= 0),
    "anatomy_pairs": (">= 0", lambda v: v >= 0),
    "capacity_steps": (">= 0", lambda v: v >= 0),
    "plan_chunk": (">= 0", lambda v: v >= 0),
}

COLLECT_WORKERS = 2  # processes collecting our own data for a released model (--official without --data)

# --- helpers


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    """argparse generated from EvalConfig, with subcommands; no subcommand means `plan`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["plan", *argv]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command, (text, fields) in COMMANDS.items():
        data.add_config_flags(
            sub.add_parser(command, help=text, description=text, formatter_class=data.HelpFormatter),
            EvalConfig,
            names=fields,
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
    data.check_fields(cfg, CHOICES, RANGES)
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
    for flag, path in [("--ckpt", cfg.ckpt), ("--data", cfg.data)]:
        if path and not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such file")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    if cfg.device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available (use --device auto or cpu)")
    if cfg.out:
        data.check_writable_file(cfg.out, "--out")
    else:
        folder = os.path.dirname(os.path.abspath(cfg.ckpt)) if cfg.ckpt else "."
        data.check_writable_file(os.path.join(folder, "eval.json"), "--out (default: next to the checkpoint)")
    if cfg.video:
        if os.path.exists(cfg.video) and not os.path.isdir(cfg.video):
            raise UsageError(f"--video {cfg.video}: is a file, expected a folder")
        data.check_writable_file(os.path.join(cfg.video, "episode.png"), "--video")


def open_dataset(path: str) -> data.Trajectories:
    try:
        return data.Trajectories(path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--data: {e}") from e


def check_official(official: tuple) -> None:
    """--official is WEIGHTS CONFIG (two files), a folder holding weights.pt and config.json, or hf:owner/name."""
    if len(official) == 2:
        for path in official:
            if not os.path.isfile(path):
                raise UsageError(f"--official {path}: no such file")
    elif len(official) == 1 and os.path.isdir(official[0]):
        missing = [n for n in ("weights.pt", "config.json") if not os.path.isfile(os.path.join(official[0], n))]
        if missing:
            raise UsageError(f"--official {official[0]}: the folder lacks {' and '.join(missing)}")
    elif len(official) != 1 or not official[0].startswith("hf:"):
        raise UsageError(
            f"--official {' '.join(official)}: give hf:owner/name, a folder with weights.pt and "
            "config.json, or the two files WEIGHTS CONFIG"
        )


def load_released(official: tuple) -> LeWM:
    """The model named by --official; a missing huggingface_hub, no network or a bad file is one UsageError line."""
    check_official(official)
    try:
        return load_official(*official) if len(official) == 2 else load_pretrained(official[0])
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        lines = [ln.strip() for ln in str(e).splitlines()]  # a key mismatch lists its keys on several lines
        raise UsageError(f"--official {' '.join(official)}: " + "; ".join(lines)) from e


def own_dataset(env: str, img_size: int, episodes: int) -> tuple[str, str]:
    """Our simulator's data for a released model: data/<env>_<img>px_<N>ep.h5 at the model's image size, with the
    env's default data policy, collected first if missing. Returns (path, where the data comes from in words)."""
    path = data.default_data_path(env, img_size, episodes)
    policy = envs.REGISTRY[env].policy
    if not os.path.exists(path):
        print(
            f"no --data: collecting {episodes} episodes of our {env} simulator at {img_size} px ({policy!r} "
            f"policy) into {path}"
        )
        data.collect(env, episodes, path, img_size=img_size, workers=COLLECT_WORKERS)
    source = (
        f"own simulator, collected by data.collect({env!r}, episodes={episodes}, img_size={img_size}) with "
        f"the {policy!r} policy"
    )
    print(f"data: {path} ({source})")
    return path, source


def load_world(cfg: EvalConfig) -> World:
    """The frozen model and its dataset from `--ckpt` (everything travels with it) or `--official` + `--env`,
    with `--data` or our own simulator's data."""
    if bool(cfg.ckpt) == bool(cfg.official):
        raise UsageError("give exactly one of --ckpt PATH or --official SOURCE")
    device = pick_device(cfg.device)
    if cfg.ckpt:
        try:
            ckpt = load_checkpoint(cfg.ckpt)  # FileNotFoundError / ValueError with the path in the message
            missing = [k for k in ("model", "model_config", "action_stats", "env") if k not in ckpt]
            if missing:
                raise ValueError(f"{cfg.ckpt} lacks {missing}: not a checkpoint written by train.py")
            model = model_from_checkpoint(ckpt)
        except (ValueError, FileNotFoundError, TypeError) as e:
            raise UsageError(f"--ckpt {cfg.ckpt}: {e}") from e
        env = ckpt["env"]
        if cfg.env and cfg.env != env:
            raise UsageError(f"--env {cfg.env}: does not match the checkpoint, which was trained on {env}")
        path = cfg.data or ckpt.get("train_config", {}).get("data", "")
        if not path:
            raise UsageError(f"--ckpt {cfg.ckpt}: names no dataset; pass --data")
        if not os.path.isfile(path):
            raise UsageError(f"--ckpt {cfg.ckpt}: its dataset {path} is not found from {os.getcwd()}; pass --data")
        traj = open_dataset(path)
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
        if cfg.env not in envs.REGISTRY:
            raise UsageError(f"--env {cfg.env}: unknown environment; valid: {', '.join(envs.REGISTRY)}")
        model = load_released(cfg.official)
        env = cfg.env
        if cfg.data:
            path, data_source = cfg.data, f"--data {cfg.data}"
        else:
            path, data_source = own_dataset(env, model.cfg.img_size, cfg.collect_episodes)
        traj = open_dataset(path)
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
    model = model.to(device).eval().requires_grad_(False)
    return World(
        model,
        stats,
        traj,
        train_eps,
        val_eps,
        env,
        frameskip,
        traj.action_dim,
        traj.img_shape[0],
        device,
        source,
        data_source,
    )


def default_out(cfg: EvalConfig, world: World, name: str) -> str:
    """`--out`, or eval_<name>_<env>.json next to the checkpoint (in the cwd for an official model)."""
    if cfg.out:
        return cfg.out
    folder = os.path.dirname(os.path.abspath(cfg.ckpt)) if cfg.ckpt else "."
    return os.path.join(folder, f"eval_{name}_{world.env}.json")


def save_json(results: dict, out: str) -> None:
    """Write results as indented JSON, creating the folder; atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, out)
    print(f"results: {out}")


def dataset_states(world: World, rows: np.ndarray) -> np.ndarray:
    """The env `state` (reset option) recorded at the given rows; official files name the columns differently."""
    for columns in envs.REGISTRY[world.env].state_columns:
        if set(columns) <= set(world.traj.columns):
            return np.concatenate([world.traj.read(c, rows) for c in columns], axis=-1)
    raise ValueError(f"{world.traj.path} has no 'state' column from which to set the {world.env} env")


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion (sensible at 0 and n successes, unlike p +- 2 se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def save_gif(path: str, frames: list[np.ndarray], fps: int = 10) -> bool:
    """Write frames (H, W, 3) uint8 as a GIF with Pillow or imageio; False when neither is installed."""
    try:
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=1000 // fps, loop=0)
        return True
    except ImportError:
        pass
    try:
        import imageio.v2 as imageio

        imageio.mimsave(path, frames, duration=1.0 / fps, loop=0)
        return True
    except ImportError:
        return False


# --- charts: line plots as PNG without a plotting library

# 5x7 bitmap font, one glyph per character of FONT_CHARS: 7 rows of two hex digits each, bit 0x10 the leftmost of
# the 5 pixels. Lowercase has its own shapes, with descenders (g j p q y) squeezed into the 7 rows.
FONT_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz .,-+%()/:_=×"
FONT_HEX = (
    "0E11131519110E 040C040404040E 0E11010204081F 1F02040201110E 02060A121F0202 1F101E0101110E "  # 0 1 2 3 4 5
    "0608101E11110E 1F010204080808 0E11110E11110E 0E11110F01020C 0E11111F111111 1E11111E11111E "  # 6 7 8 9 A B
    "0E11101010110E 1C12111111121C 1F10101E10101F 1F10101E101010 0E11101711110F 1111111F111111 "  # C D E F G H
    "0E04040404040E 0702020202120C 11121418141211 1010101010101F 111B1515111111 11111915131111 "  # I J K L M N
    "0E11111111110E 1E11111E101010 0E11111115120D 1E11111E141211 0F10100E01011E 1F040404040404 "  # O P Q R S T
    "1111111111110E 11111111110A04 1111111515150A 11110A040A1111 11110A04040404 1F01020408101F "  # U V W X Y Z
    "00000E010F110F 1010161911111E 00000E1010110E 01010D1311110F 00000E111F100E 0609081C080808 "  # a b c d e f
    "00000F110F010E 10101619111111 04000C0404040E 0200060202120C 10101214181412 0C04040404040E "  # g h i j k l
    "00001A15151111 00001619111111 00000E1111110E 00001E111E1010 00000D130F0101 00001619101010 "  # m n o p q r
    "00000E100E011E 08081C08080906 0000111111130D 00001111110A04 0000111115150A 0000110A040A11 "  # s t u v w x
    "000011110F010E 00001F0204081F 00000000000000 00000000000C0C 000000000C0408 0000001F000000 "  # y z space . , -
    "0004041F040400 18190204081303 02040808080402 08040202020408 00010204081000 000C0C000C0C00 "  # + % ( ) / :
    "0000000000001F 00001F001F0000 00110A040A1100"  # _ = ×
)


def _glyph(hex_rows: str) -> np.ndarray:
    rows = [int(hex_rows[i : i + 2], 16) for i in range(0, 14, 2)]
    return np.array([[(r >> (4 - c)) & 1 for c in range(5)] for r in rows], bool)  # (7, 5)


FONT = {ch: _glyph(h) for ch, h in zip(FONT_CHARS, FONT_HEX.split(), strict=True)}
FONT_UNKNOWN = _glyph("001F1111111F00")  # a small box for characters the font lacks
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def text_width(text: str, scale: int = 1) -> int:
    return max(6 * len(text) - 1, 0) * scale  # 5 pixels per glyph, 1 between glyphs


def draw_text(canvas: np.ndarray, x: int, y: int, text: str, color, scale: int = 1) -> np.ndarray:
    """Draw `text` with its top-left corner at column x, row y of an (H, W, 3) uint8 canvas (clipped)."""
    for i, ch in enumerate(text):
        r, c = np.nonzero(FONT.get(ch, FONT_UNKNOWN).repeat(scale, 0).repeat(scale, 1))  # (7 * scale, 5 * scale)
        r, c = r + y, c + x + 6 * scale * i
        keep = (r >= 0) & (r < canvas.shape[0]) & (c >= 0) & (c < canvas.shape[1])
        canvas[r[keep], c[keep]] = color
    return canvas


def _paint(canvas, rows, cols, color, size: int, box) -> None:
    """Paint size x size squares centred on (rows, cols), clipped to box = (top, bottom, left, right)."""
    off = np.arange(size) - (size - 1) // 2
    r = (np.round(rows).astype(int)[:, None, None] + off[None, :, None]).repeat(size, 2).ravel()
    c = (np.round(cols).astype(int)[:, None, None] + off[None, None, :]).repeat(size, 1).ravel()
    keep = (r >= box[0]) & (r <= box[1]) & (c >= box[2]) & (c <= box[3])
    canvas[r[keep], c[keep]] = color


def _ticks(lo: float, hi: float, log: bool, fixed: bool = False) -> tuple[float, float, list[float]]:
    """Axis range and 4-6 'nice' ticks: 1, 2 or 5 x 10^k apart, or on a log axis (log10 units) powers of ten,
    plus 2 and 5 (or 3) times them when the range spans only one (two) decades. `fixed` keeps lo, hi as given."""
    if hi - lo < 1e-12:
        pad = 0.5 if log else max(abs(lo) * 0.1, 0.5)
        lo, hi = lo - pad, hi + pad
    if log:
        a, b = math.floor(lo), math.ceil(hi)
        mults = {1: (1, 2, 5), 2: (1, 3)}.get(b - a, (1,))
        ticks = [k + math.log10(m) for k in range(a, b + 1, max(1, math.ceil((b - a) / 5))) for m in mults]
    else:
        mag = 10 ** math.floor(math.log10((hi - lo) / 5))
        for step in (mag, 2 * mag, 5 * mag, 10 * mag, 20 * mag, 50 * mag):
            a, b = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
            if b - a <= 5:
                break
        ticks, a, b = [k * step for k in range(a, b + 1)], a * step, b * step
    a, b = (lo, hi) if fixed else (a, b)
    return a, b, [t for t in ticks if a - 1e-9 <= t <= b + 1e-9]


def line_chart(
    series: dict[str, tuple[list[float], list[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    out_png: str,
    log_y: bool = False,
    width: int = 640,
    height: int = 400,
    ylim: tuple | None = None,
    legend: str = "top",
) -> np.ndarray:
    """Draw each series {name: (xs, ys)} as a 2-px polyline with square markers, the legend in the top or bottom
    right corner (`legend`); write out_png ('' = don't)."""
    img = np.full((height, width, 3), 255, np.uint8)  # (H, W, 3) white
    top, bottom, left, right = 30, height - 42, 64, width - 16  # the plot box in pixels
    pts = {}
    for name, (xs, ys) in series.items():  # drop non-finite points (and non-positive ones on a log axis)
        x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.log10(y) if log_y else y
        ok = np.isfinite(x) & np.isfinite(y)
        pts[name] = (x[ok], y[ok])
    all_x, all_y = (np.concatenate([p[i] for p in pts.values()] + [np.zeros(0)]) for i in (0, 1))
    x_lo, x_hi, x_ticks = _ticks(*((all_x.min(), all_x.max()) if all_x.size else (0.0, 1.0)), log=False)
    y_range = (all_y.min(), all_y.max()) if all_y.size else (0.0, 1.0)
    y_range = y_range if ylim is None else np.log10(ylim) if log_y else ylim
    y_lo, y_hi, y_ticks = _ticks(float(y_range[0]), float(y_range[1]), log=log_y, fixed=ylim is not None)
    sx, sy = (right - left) / (x_hi - x_lo), (bottom - top) / (y_hi - y_lo)  # pixels per data unit
    for t in x_ticks:  # light grid lines, tick labels below and left of the box
        c, label = round(left + (t - x_lo) * sx), f"{t:g}"
        img[top:bottom, c] = 230
        draw_text(img, c - text_width(label) // 2, bottom + 6, label, 0)
    for t in y_ticks:
        r, label = round(bottom - (t - y_lo) * sy), f"{10**t:g}" if log_y else f"{t:g}"
        img[r, left:right] = 230
        draw_text(img, left - 5 - text_width(label), r - 3, label, 0)
    img[[top, bottom], left : right + 1] = 0  # axes box
    img[top : bottom + 1, [left, right]] = 0
    draw_text(img, (width - text_width(title, 2)) // 2, 8, title, 0, scale=2)
    draw_text(img, (left + right - text_width(xlabel)) // 2, height - 14, xlabel, 0)
    vertical = np.rot90(draw_text(np.full((7, text_width(ylabel), 3), 255, np.uint8), 0, 0, ylabel, 0))
    vertical = vertical[: bottom - top]  # (w, 7, 3), reads bottom to top
    r0 = (top + bottom - len(vertical)) // 2
    img[r0 : r0 + len(vertical), 6:13] = vertical
    box = (top + 1, bottom - 1, left + 1, right - 1)  # series are clipped to the inside of the axes box
    for i, (x, y) in enumerate(pts.values()):
        cs, rs, color = left + (x - x_lo) * sx, bottom - (y - y_lo) * sy, PALETTE[i % len(PALETTE)]
        for k in range(len(cs) - 1):  # dense sampling: at least one sample per pixel along the longer side
            f = np.linspace(0, 1, int(max(abs(cs[k + 1] - cs[k]), abs(rs[k + 1] - rs[k]))) + 2)
            _paint(img, rs[k] + f * (rs[k + 1] - rs[k]), cs[k] + f * (cs[k + 1] - cs[k]), color, 2, box)
        _paint(img, rs, cs, color, 5, box)
    if pts:  # legend, in a right corner inside the box: a colour swatch and the name of each series
        w, h = max(text_width(name) for name in pts) + 24, 12 * len(pts) + 6
        x0, y0 = right - 6 - w, top + 6 if legend == "top" else bottom - 7 - h
        img[y0 : y0 + h + 1, x0 : x0 + w + 1] = 160
        img[y0 + 1 : y0 + h, x0 + 1 : x0 + w] = 255
        for i, name in enumerate(pts):
            img[y0 + 6 + 12 * i : y0 + 13 + 12 * i, x0 + 6 : x0 + 13] = PALETTE[i % len(PALETTE)]
            draw_text(img, x0 + 18, y0 + 6 + 12 * i, name, 0)
    if out_png:
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
        envs.save_png(out_png, img)
    return img


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl; a torn line (a kill while it was written) is dropped with a note."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                print(f"{path}: dropping unreadable line {n} ({line.strip()[:40]!r}), left by an interrupted write")
    return rows


def plot_metrics_png(metrics_jsonl: str, out_png: str) -> np.ndarray:
    """Train and val prediction loss (left) and SIGReg loss (right) vs step, log y, from a train.py metrics.jsonl."""
    rows = read_metrics(metrics_jsonl)
    charts = []
    for key, title in (("pred_loss", "prediction loss"), ("sigreg_loss", "SIGReg loss")):
        pts = {
            name: [(r["step"], r[k]) for r in rows if "step" in r and k in r]
            for name, k in (("train", key), ("val", "val_" + key))
        }
        series = {name: tuple(zip(*p)) for name, p in pts.items() if p}
        charts.append(line_chart(series, title=title, xlabel="step", ylabel=key, out_png="", log_y=True))
    img = np.concatenate(charts, axis=1)  # (400, 1280, 3): the two charts side by side
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    envs.save_png(out_png, img)
    return img


def success_curve(
    plan_jsons: list[str], metrics: str | list[str], out_png: str, out_json: str = "", random_json: str = ""
) -> dict:
    """Success against training time: one point per `plan` JSON, of one run's checkpoints (`ckpt_<step>.pt` kept by
    `--keep_every`, or the final `ckpt.pt`) with that run's metrics.jsonl, or of several runs with one metrics.jsonl
    each. Minutes are the summed logged step times up to that step (steps only, no validation). The random floor of
    `random_json` is drawn as a flat line. Writes the PNG and the JSON."""
    logs = [metrics] * len(plan_jsons) if isinstance(metrics, str) else list(metrics)
    if len(logs) != len(plan_jsons):
        raise UsageError(f"{len(plan_jsons)} plan files but {len(logs)} metrics files")
    clocks = {}  # metrics.jsonl -> (logged steps, cumulative training minutes at each), read once per file
    for log in dict.fromkeys(logs):
        rows = [r for r in read_metrics(log) if "ms_per_step" in r]
        if not rows:
            raise UsageError(f"{log}: no training rows (step, ms_per_step)")
        steps = np.array([r["step"] for r in rows], np.float64)
        clocks[log] = steps, np.cumsum(np.diff(steps, prepend=0.0) * [r["ms_per_step"] for r in rows]) / 60000.0
    points, env = [], ""
    for path, log in zip(plan_jsons, logs):
        steps, minutes = clocks[log]
        with open(path) as f:
            res = json.load(f)
        env, name = res.get("env", ""), os.path.basename(res["checkpoint"])
        step = int(name[5:-3]) if name.startswith("ckpt_") else int(steps[-1])  # ckpt_<step>.pt, else the last
        if step > steps[-1]:
            raise UsageError(f"{path}: checkpoint step {step} is past the last step of {log}")
        points.append(
            {
                "step": step,
                "train_minutes": round(float(np.interp(step, steps, minutes)), 2),
                "success_rate": res["success_rate"],
                "successes": res["successes"],
                "episodes": res["episodes"],
                "ci95": res["ci95"],
                "success_rate_unsolved_at_start": res.get("success_rate_unsolved_at_start"),
                "plan_json": path,
                "metrics": log,
            }
        )
    points.sort(key=lambda p: p["train_minutes"])
    xs = [p["train_minutes"] for p in points]
    series = {"planner": (xs, [100 * p["success_rate"] for p in points])}
    if any(p["success_rate_unsolved_at_start"] not in (None, p["success_rate"]) for p in points):
        series["not solved at start"] = (xs, [100 * p["success_rate_unsolved_at_start"] for p in points])
    out = {"points": points}
    if random_json:
        with open(random_json) as f:
            out["random_success_rate"] = json.load(f)["success_rate"]
        series["random actions"] = ([0.0, xs[-1]], [100 * out["random_success_rate"]] * 2)
    line_chart(
        series,
        title=f"{env} success vs training time",
        xlabel="training minutes",
        ylabel="success %",
        out_png=out_png,
        ylim=(0, 100),
        legend="bottom",
    )
    if out_json:
        save_json(out, out_json)
    return out


# --- episode pictures: labelled filmstrips of observation beside goal


def _tile(frame: np.ndarray, scale: int) -> np.ndarray:
    return frame.repeat(scale, 0).repeat(scale, 1)  # nearest-neighbour upscaling keeps the model's pixels visible


def episode_strip(
    frames: list[np.ndarray], goal: np.ndarray, title: str, every: int = 5, per_row: int = 4, min_size: int = 128
) -> np.ndarray:
    """Every `every`-th observation (and the last), each beside the goal with a gap, labelled with its step, under
    a title line; frames are upscaled to at least `min_size` px. (H', W', 3) uint8 on white."""
    steps = list(range(0, len(frames), every)) + ([len(frames) - 1] if (len(frames) - 1) % every else [])
    scale = max(1, -(-min_size // frames[0].shape[0]))
    goal_tile = _tile(goal, scale)
    h, w = goal_tile.shape[:2]
    gap, pad, label_h, title_h = 4, 16, 11, 22  # gap inside a pair, between pairs; label and title bands
    pair_w, pair_h = 2 * w + gap, label_h + h
    rows, cols = -(-len(steps) // per_row), min(per_row, len(steps))
    sheet = np.full((title_h + rows * (pair_h + pad) - pad, cols * (pair_w + pad) - pad, 3), 255, np.uint8)
    draw_text(sheet, 0, 2, title, (0, 0, 0), scale=2)
    for k, t in enumerate(steps):
        r, c = divmod(k, per_row)
        y, x = title_h + r * (pair_h + pad), c * (pair_w + pad)
        draw_text(sheet, x, y + 1, f"step {t}", (60, 60, 60))
        draw_text(sheet, x + w + gap, y + 1, "goal", (60, 60, 60))
        sheet[y + label_h : y + pair_h, x : x + w] = _tile(frames[t], scale)
        sheet[y + label_h : y + pair_h, x + w + gap : x + pair_w] = goal_tile
    return sheet


def stack_sheets(sheets: list[np.ndarray], gap: int = 24) -> np.ndarray:
    """Sheets one above another, left-aligned on white, `gap` rows apart."""
    width = max(s.shape[1] for s in sheets)
    out = np.full((sum(s.shape[0] for s in sheets) + gap * (len(sheets) - 1), width, 3), 255, np.uint8)
    y = 0
    for s in sheets:
        out[y : y + s.shape[0], : s.shape[1]] = s
        y += s.shape[0] + gap
    return out


def summary_picks(per_episode: list[dict]) -> list[int]:
    """Positions in `per_episode` of the episodes summary.png shows: the first success, preferring one that was not
    already solved at the start (a success at step 1 shows no planning), then the first failure."""
    ok = [k for k, r in enumerate(per_episode) if r["success"]]
    fail = [k for k, r in enumerate(per_episode) if not r["success"]]
    planned = [k for k in ok if not per_episode[k].get("solved_at_start", False)]
    return (planned or ok)[:1] + fail[:1]


def save_episode_pictures(folder: str, env: str, videos, goal_frames, per_episode: list[dict]) -> None:
    """episode_NNN_{ok,fail}.png (and .gif with Pillow or imageio) per episode, and summary.png: a success (one
    that needed planning where there is one) above the first failure."""
    os.makedirs(folder, exist_ok=True)
    gifs, picks, shown = True, summary_picks(per_episode), {}
    for k, (r, frames, goal) in enumerate(zip(per_episode, videos, goal_frames, strict=True)):
        i, tag = r["index"], "ok" if r["success"] else "fail"
        outcome = (
            f"success at step {r['first_success_step']}" if r["success"] else f"failure after {len(frames) - 1} steps"
        )
        sheet = episode_strip(frames, goal, f"{env} pair {i}: {outcome}")
        envs.save_png(os.path.join(folder, f"episode_{i:03d}_{tag}.png"), sheet)
        if k in picks:
            shown[k] = sheet
        pairs = [np.concatenate([f, np.full((f.shape[0], 2, 3), 255, np.uint8), goal], axis=1) for f in frames]
        gifs = gifs and save_gif(os.path.join(folder, f"episode_{i:03d}_{tag}.gif"), pairs)
    envs.save_png(os.path.join(folder, "summary.png"), stack_sheets([shown[k] for k in picks]))
    print(
        f"episodes: {folder}/episode_*.png (every 5th step, observation beside goal), summary.png"
        + ("" if gifs else "; GIFs need Pillow or imageio (pip install pillow)")
    )


# --- MPC evaluation (plan): docs/method.md §9, §10


def start_rows(traj: data.Trajectories, episodes, n: int, goal_offset: int, seed: int) -> np.ndarray:
    """`n` distinct start rows (global, sorted) of `episodes` with a goal `goal_offset` raw steps later.

    Valid rows have step_idx <= L - goal_offset - 1, listed in file order; the draw is the reference's
    `np.random.default_rng(seed).choice(len(valid), n, replace=False)`, sorted.
    """
    valid = traj.episode_rows(np.sort(episodes), drop_last=goal_offset)  # (V,)
    if n > len(valid):
        raise ValueError(
            f"{traj.path}: only {len(valid)} valid start rows in the chosen episodes (need step + {goal_offset} "
            f"inside the episode), asked for {n}: lower --episodes or use another --split"
        )
    # DEVIATION: choice(len(valid)) rather than the original LeWM choice(len(valid) - 1), an off-by-one (docs/method.md §10).
    return np.sort(valid[np.random.default_rng(seed=seed).choice(len(valid), n, replace=False)])


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
        # Pairs already solved at the start count as successes; this is the rate on the others (le-wm issue 23).
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


def goal_policy_path(cfg: EvalConfig) -> str:
    """The goal-conditioned policy's file: --policy_file, or policy.pt next to the checkpoint."""
    return cfg.policy_file or os.path.join(os.path.dirname(cfg.ckpt), "policy.pt")


def load_goal_policy(cfg: EvalConfig, world: World):
    """The policy.py policy of --ckpt's world model, on the world's device (refused for another world model)."""
    if not cfg.ckpt:
        raise UsageError(f"--policy {cfg.policy}: needs --ckpt (the policy is trained on our checkpoint's latents)")
    return load_policy(goal_policy_path(cfg), load_checkpoint(cfg.ckpt), cfg.ckpt).to(world.device)


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
            for j, i in enumerate(need):
                queues[i] = raw[j]
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


# --- probing (docs/method.md §11): what the frozen embedding knows about the physical state

PROBE_HIDDEN = 256  # MLP probe: one hidden layer of this width, GELU
PROBE_LR = 1e-3  # MLP probe AdamW peak learning rate (cosine to 0 over the run)
PROBE_BATCH = 256
RIDGE_LAMBDA = 1e-4  # linear probe: ridge weight on standardised embeddings (per-sample loss scale)
ENCODE_BATCH = 256  # frames per encoder call


@torch.inference_mode()
def embed_frames(model: LeWM, frames: np.ndarray, device: torch.device) -> np.ndarray:
    """uint8 frames (N, H, W, 3) -> frozen embeddings z (N, D) float32 numpy, ENCODE_BATCH frames per call."""
    chunks = [frames[i : i + ENCODE_BATCH] for i in range(0, len(frames), ENCODE_BATCH)]
    return np.concatenate([encode_frames(model, c, device)[:, 0].float().cpu().numpy() for c in chunks])


def embed_rows(models: list[LeWM], traj: data.Trajectories, rows: np.ndarray, device: torch.device) -> list:
    """Embeddings (N, D) of the frames at dataset rows under each model; each batch of frames is read once."""
    out = [[] for _ in models]
    for i in tqdm(range(0, len(rows), ENCODE_BATCH), desc=f"embed {len(rows)} frames", unit="batch", leave=False):
        frames = traj.read("pixels", rows[i : i + ENCODE_BATCH])  # (b, H, W, 3)
        for z, model in zip(out, models):
            z.append(embed_frames(model, frames, device))  # (b, D)
    return [np.concatenate(z) for z in out]


def probe_targets(traj: data.Trajectories, env: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Raw physical quantities at dataset rows: name -> (N, k) float64 (angles as sin, cos)."""
    targets = {}
    for name, (sources, is_angle, _) in envs.REGISTRY[env].probe.items():
        found = [(c, lo, hi) for c, lo, hi in sources if c in traj.columns]
        if not found:
            raise ValueError(f"{traj.path} has none of the columns {[s[0] for s in sources]} needed for {name}")
        column, lo, hi = found[0]
        y = traj.read(column, rows).reshape(len(rows), -1)[:, lo:hi].astype(np.float64)  # (N, k)
        targets[name] = np.concatenate([np.sin(y), np.cos(y)], axis=1) if is_angle else y
    return targets


def fit_ridge(x: np.ndarray, y: np.ndarray, lambd: float = RIDGE_LAMBDA):
    """Closed-form ridge regression in float64 with an unpenalised intercept: returns predict(x) -> y."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc = x - mu_x  # (N, D)
    gram = xc.T @ xc / len(x) + lambd * np.eye(x.shape[1])  # (D, D)
    w = np.linalg.solve(gram, xc.T @ (y - mu_y) / len(x))  # (D, k)
    return lambda x_new: (np.asarray(x_new, np.float64) - mu_x) @ w + mu_y


def fit_mlp(x: np.ndarray, y: np.ndarray, epochs: int, seed: int, hidden: int = PROBE_HIDDEN):
    """One-hidden-layer GELU probe trained with AdamW (seeded init and batch order): returns predict(x) -> y."""
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global generator
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, y.shape[1])
        )
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)  # (N, D), (N, k)
    steps = epochs * -(-len(x) // PROBE_BATCH)
    opt = torch.optim.AdamW(net.parameters(), lr=PROBE_LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(PROBE_BATCH):
            loss = (net(xt[idx]) - yt[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()

    def predict(x_new: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.as_tensor(x_new, dtype=torch.float32)).double().numpy()

    return predict


def probe_scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """MSE over all rows and dims, and the mean over dims of the Pearson r between prediction and target."""
    pc, yc = pred - pred.mean(0), y - y.mean(0)
    r = (pc * yc).sum(0) / np.sqrt((pc * pc).sum(0) * (yc * yc).sum(0) + 1e-300)  # (k,)
    return {"mse": float(((pred - y) ** 2).mean()), "r": float(r.mean())}


def probe_model(z_train, z_val, targets_train, targets_val, epochs: int, seed: int) -> dict:
    """Linear and MLP probes per quantity on standardised embeddings and targets (training statistics)."""
    mu, sd = z_train.mean(0), z_train.std(0) + 1e-8  # (D,)
    x_train, x_val = (z_train - mu) / sd, (z_val - mu) / sd
    out = {}
    for name, y_raw in targets_train.items():
        y_mu, y_sd = y_raw.mean(0), y_raw.std(0) + 1e-12  # (k,)
        y_train, y_val = (y_raw - y_mu) / y_sd, (targets_val[name] - y_mu) / y_sd
        linear = fit_ridge(x_train, y_train)
        mlp = fit_mlp(x_train, y_train, epochs, seed)
        out[name] = {"linear": probe_scores(linear(x_val), y_val), "mlp": probe_scores(mlp(x_val), y_val)}
    return out


def sample_rows(traj: data.Trajectories, episodes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n distinct dataset rows drawn uniformly from the given episodes, sorted (chunk-friendly reads)."""
    rows = traj.episode_rows(episodes)
    return np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))


def run_probe(cfg: EvalConfig) -> dict:
    """Probes on frames of training episodes, scored on held-out episodes, against a fresh-init model as floor."""
    t0 = time.time()
    world = load_world(cfg)
    if len(world.val_eps) == 0:
        raise ValueError("probing needs held-out episodes, and this model has no validation split")
    rng = np.random.default_rng(cfg.seed)
    rows_train = sample_rows(world.traj, world.train_eps, cfg.frames, rng)
    rows_val = sample_rows(world.traj, world.val_eps, max(1, cfg.frames // 4), rng)
    targets_train = probe_targets(world.traj, world.env, rows_train)
    targets_val = probe_targets(world.traj, world.env, rows_val)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        untrained = LeWM(world.model.cfg).to(world.device).eval()  # same architecture, fresh init: the floor
    models = {"trained": world.model, "untrained": untrained}
    z_train = embed_rows(list(models.values()), world.traj, rows_train, world.device)  # per model (N_train, D)
    z_val = embed_rows(list(models.values()), world.traj, rows_val, world.device)  # per model (N_val, D)
    results = {
        label: probe_model(zt, zv, targets_train, targets_val, cfg.probe_epochs, cfg.seed)
        for label, zt, zv in tqdm(list(zip(models, z_train, z_val)), desc="probe", unit="model")
    }

    n_train, n_val = len(rows_train), len(rows_val)
    print(
        f"probe {world.env} | {world.source} | {n_train} frames of {len(world.train_eps)} training episodes, "
        f"{n_val} of {len(world.val_eps)} held-out ones | MSE on standardised targets, r: Pearson (mean over dims)"
    )
    print(f"{'quantity':16s} {'model':10s} {'linear MSE':>10s} {'linear r':>9s} {'MLP MSE':>9s} {'MLP r':>7s}")
    for name in envs.REGISTRY[world.env].probe:
        for label in results:
            lin, mlp = results[label][name]["linear"], results[label][name]["mlp"]
            print(f"{name:16s} {label:10s} {lin['mse']:10.4f} {lin['r']:9.3f} {mlp['mse']:9.4f} {mlp['r']:7.3f}")
    summary = {
        "command": "probe",
        "env": world.env,
        "source": world.source,
        "data_source": world.data_source,
        "frames": {"train": n_train, "val": n_val},
        "episodes": {"train": len(world.train_eps), "val": len(world.val_eps)},
        "quantities": {n: "sin, cos" if a else "raw" for n, (_, a, _) in envs.REGISTRY[world.env].probe.items()},
        "results": results,
        "seconds": time.time() - t0,
        "config": dataclasses.asdict(cfg),
    }
    out = default_out(cfg, world, "probe")
    save_json(summary, out)
    return {**summary, "out": out}


# --- surprise (docs/method.md §11): latent prediction error at physically impossible and visual-only events
#
# Along a held-out episode, frame t (every frameskip raw steps) is predicted from frames t-3..t-1 and their action
# blocks, exactly as in training, and surprise_t = ||z_pred_t - z_t||^2 (sum over D). At a few random t per episode the
# target frame is swapped for a perturbed copy and the same z_pred is compared with its embedding.


def teleport_state(env: str, state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The dataset state with its object moved somewhere it cannot reach in one frame (same room / workspace)."""
    s = np.array(state, np.float64)
    for _ in range(1000):
        new = envs.REGISTRY[env].teleport(s, rng)
        if new is not None:
            return new
    raise RuntimeError(f"{env}: found no teleport target for state {state}")


def recolour(env: str, frame: np.ndarray) -> np.ndarray:
    """The same frame with the object's colour changed in pixel space: x + w (f(x) - x), w = per-pixel weight
    of the object's colour (soft at anti-aliased edges), f a colour map. Nothing moves."""
    x = frame.astype(np.float32)  # (H, W, 3)
    w, fx = envs.REGISTRY[env].recolour(x)  # (H, W), (H, W, 3)
    return np.clip(np.rint(x + w[..., None] * (fx - x)), 0, 255).astype(np.uint8)


def render_state(env, name: str, state: np.ndarray, goal_state: np.ndarray | None) -> np.ndarray:
    """A dataset state re-rendered through the env, from the env's replay state (PushT: the pusher at rest) and with
    the recorded goal passed; the other envs re-render recorded states exactly."""
    replay = envs.REGISTRY[name].replay_state
    s = np.array(state, np.float64) if replay is None else replay(state)
    return env.reset(options={"state": s, "goal_state": goal_state})[0]


PERTURBATIONS = {
    "teleport": "object jumps (re-rendered from the dataset state with the object moved): physically impossible",
    "colour": "object recoloured in pixel space, nothing moves: visual only",
    "rerender": "control: the unchanged dataset state re-rendered through the env (should match the original)",
}


def episode_blocks(world: World, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Frames every frameskip raw steps of episode e (n, H, W, 3), their rows (n,), and the action blocks leaving
    frames 0..n-2 (n-1, frameskip*A): z-scored per raw step, NaN -> 0, row-major, exactly as training clips."""
    fs, start, length = world.frameskip, int(world.traj.ep_offset[e]), int(world.traj.ep_len[e])
    rows = start + np.arange(0, length, fs)  # (n,)
    raw = world.traj.rows("action", start, start + fs * (len(rows) - 1))  # (fs (n-1), A)
    blocks = data.normalize_actions(raw, world.stats).reshape(len(rows) - 1, -1)  # (n-1, fs A)
    return world.traj.read("pixels", rows), rows, blocks


@torch.inference_mode()
def predict_next(model: LeWM, z: np.ndarray, blocks: np.ndarray, device: torch.device) -> np.ndarray:
    """z (n, D), blocks (n-1, A) -> z_pred (n-h, D) for frames h..n-1, each from the h previous frames and blocks."""
    h = model.cfg.history
    t = np.arange(h, len(z))[:, None] - h + np.arange(h)  # (n-h, h) context indices of each target
    z_ctx = torch.from_numpy(z[t]).to(device)  # (n-h, h, D)
    a_ctx = torch.from_numpy(blocks[t]).to(device)  # (n-h, h, A)
    return model.predict(z_ctx, a_ctx)[:, -1].float().cpu().numpy()  # (n-h, D): the last position predicts frame t


def sign_flip_test(d: np.ndarray, n_perm: int, rng: np.random.Generator) -> float:
    """One-sided paired permutation test of mean(d) > 0: random sign flips of the differences (exact below 2^16)."""
    n = len(d)
    if n <= 16:
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)  # (2^n, n) every sign pattern
        return float(((signs * d).mean(1) >= d.mean() - 1e-12).mean())
    signs = rng.choice([-1.0, 1.0], size=(n_perm, n))
    return float((1 + ((signs * d).mean(1) >= d.mean() - 1e-12).sum()) / (1 + n_perm))


def measure_surprise(world: World, episodes: int, steps: int, seed: int, n_perm: int = 10000) -> dict:
    """Surprise ||z_pred_t - z_t||^2 along held-out episodes, and at `steps` random frames per episode with the
    target frame replaced by each perturbation (the context frames and actions stay those of the dataset)."""
    model, h, rng = world.model, world.model.cfg.history, np.random.default_rng(seed)
    env = envs.make_env(world.env, img_size=world.img_size)
    has_goal = "goal_state" in world.traj.columns
    eps = [e for e in world.val_eps if (world.traj.ep_len[e] - 1) // world.frameskip >= h][:episodes]
    if not eps:
        raise ValueError(f"no held-out episode has the {h * world.frameskip + 1} rows one prediction needs")
    unperturbed, original, example = [], [], None  # per episode: (n-h,) and (steps,) surprises
    perturbed, pixel_change = {k: [] for k in PERTURBATIONS}, {k: [] for k in PERTURBATIONS}
    for e in tqdm(eps, desc=f"surprise {world.env}", unit="episode", dynamic_ncols=True):
        frames, rows, blocks = episode_blocks(world, e)
        z = embed_frames(model, frames, world.device)  # (n, D)
        z_pred = predict_next(model, z, blocks, world.device)  # (n-h, D) for frames h..n-1
        s = ((z_pred - z[h:]) ** 2).sum(1)  # (n-h,) surprise of every unperturbed frame
        unperturbed.append(s)
        # DEVIATION: only the predicted frame is perturbed and the context keeps the recorded frames (the paper's
        # protocol is unpublished): each event is then one prediction, paired with the same step unperturbed.
        ts = np.sort(rng.choice(np.arange(h, len(frames)), size=min(steps, len(frames) - h), replace=False))
        new = {k: [] for k in PERTURBATIONS}
        goals = world.traj.read("goal_state", rows[ts]) if has_goal else [None] * len(ts)
        for t, state, goal in zip(ts, dataset_states(world, rows[ts]), goals):
            new["teleport"].append(render_state(env, world.env, teleport_state(world.env, state, rng), goal))
            new["colour"].append(recolour(world.env, frames[t]))
            new["rerender"].append(render_state(env, world.env, state, goal))
        original.append(s[ts - h])
        for k, imgs in new.items():
            imgs = np.stack(imgs)  # (steps, H, W, 3)
            z_k = embed_frames(model, imgs, world.device)  # (steps, D)
            perturbed[k].append(((z_pred[ts - h] - z_k) ** 2).sum(1))  # same prediction, perturbed target
            pixel_change[k].append(np.abs(imgs.astype(np.float32) - frames[ts]).mean(axis=(1, 2, 3)))
        if example is None:  # the first episode's curve, for the plot
            example = {"episode": int(e), "frames": list(range(h, len(frames))), "surprise": s.tolist()}
            example.update(perturbed_frames=ts.tolist(), **{k: v[-1].tolist() for k, v in perturbed.items()})
    env.close()
    all_unperturbed = np.concatenate(unperturbed)
    results = {}
    for k, description in PERTURBATIONS.items():
        d = np.array([(p - o).mean() for p, o in zip(perturbed[k], original)])  # (episodes,) paired differences
        p_all, o_all = np.concatenate(perturbed[k]), np.concatenate(original)
        results[k] = {
            "description": description,
            "perturbed": float(p_all.mean()),
            "original_same_steps": float(o_all.mean()),
            "unperturbed": float(all_unperturbed.mean()),
            "ratio": float(p_all.mean() / all_unperturbed.mean()),
            "p_value": sign_flip_test(d, n_perm, rng),
            "pixel_change": float(np.concatenate(pixel_change[k]).mean()),
        }
    return {
        "episodes": len(eps),
        "perturbed_steps": sum(len(o) for o in original),
        "unperturbed_steps": len(all_unperturbed),
        "results": results,
        "example": example,
    }


def plot_surprise(summary: dict, out_png: str) -> None:
    """Surprise along the first held-out episode, unperturbed and at each kind of perturbed step (log scale); the
    legend gives each kind's mean over all episodes."""
    ex, res = summary["example"], summary["results"]
    series = {f"unperturbed (mean {res['teleport']['unperturbed']:.3g})": (ex["frames"], ex["surprise"])}
    for k in PERTURBATIONS:
        series[f"{k} (mean {res[k]['perturbed']:.3g})"] = (ex["perturbed_frames"], ex[k])
    line_chart(
        series,
        title=f"surprise, held-out episode {ex['episode']}",
        xlabel="frame (every frameskip steps)",
        ylabel="||z_pred - z||^2",
        out_png=out_png,
        log_y=True,
        width=800,
    )
    print(f"wrote {out_png}")


def run_surprise(cfg: EvalConfig) -> dict:
    """Surprise on held-out episodes: unperturbed steps against teleported, recoloured and re-rendered targets."""
    t0 = time.time()
    world = load_world(cfg)
    if len(world.val_eps) == 0:
        raise ValueError("surprise is measured on held-out episodes, and this model has no validation split")
    summary = {"command": "surprise", "env": world.env, "source": world.source, "data_source": world.data_source}
    summary.update(measure_surprise(world, cfg.episodes, cfg.perturb_steps, cfg.seed))
    summary.update(seconds=time.time() - t0, config=dataclasses.asdict(cfg))
    n_un, n_pert = summary["unperturbed_steps"], summary["perturbed_steps"]
    print(
        f"surprise {world.env} | {world.source} | {summary['episodes']} held-out episodes, {n_un} unperturbed frames, "
        f"{n_pert} perturbed per kind | surprise = ||z_pred - z||^2, p: one-sided paired sign-flip test"
    )
    header = ("kind", "perturbed", "same steps", "all steps", "ratio", "p", "|dpix|")
    print("{:10s} {:>10s} {:>10s} {:>10s} {:>7s} {:>7s} {:>7s}".format(*header))
    for k, r in summary["results"].items():
        print(
            f"{k:10s} {r['perturbed']:10.4f} {r['original_same_steps']:10.4f} {r['unperturbed']:10.4f} "
            f"{r['ratio']:7.2f} {r['p_value']:7.4f} {r['pixel_change']:7.2f}"
        )
    out = default_out(cfg, world, "surprise")
    save_json(summary, out)
    plot_surprise(summary, os.path.splitext(out)[0] + ".png")
    return {**summary, "out": out}


# --- diagnose: cheap checks of whether a model can plan, on held-out episodes that hold no evaluation pair
#
# Run on every candidate model instead of the full MPC evaluation (minutes instead of tens of minutes). All figures
# come from start/goal pairs of held-out episodes from which the `plan` command's default draw (50 pairs, seed 42)
# takes nothing, so choosing a model with them never looks at the evaluation pairs.


def diagnose_episodes(world: World, eval_pairs: int, goal_offset: int) -> np.ndarray:
    """Held-out episodes minus every episode holding one of the first `eval_pairs` evaluation pairs (the `plan`
    command's draw with its default seed)."""
    n_valid = int(np.maximum(world.traj.ep_len[world.val_eps] - goal_offset, 0).sum())
    eval_rows = start_rows(world.traj, world.val_eps, min(eval_pairs, n_valid), goal_offset, EvalConfig.seed)
    eval_eps = np.searchsorted(world.traj.ep_offset, eval_rows, side="right") - 1
    episodes = np.setdiff1d(world.val_eps, eval_eps)
    if len(episodes) == 0:
        raise UsageError(
            f"every held-out episode holds one of the {eval_pairs} evaluation pairs: nothing left to "
            "diagnose on; collect more episodes or lower --eval_pairs"
        )
    return episodes


@torch.inference_mode()
def action_ranking(world: World, rows: np.ndarray, horizon: int, samples: int, seed: int, batch: int = 16) -> dict:
    """Planning cost of the dataset's own N action blocks against `samples` sequences from CEM's first
    distribution (standard normal in normalised action space), for start rows whose goal is N blocks later.

    Returns per pair the rank of the true sequence: the fraction of random sequences cheaper than it, ties counted
    half (0 = it ranks first; 0.5 = no better than chance, as for a model that ignores actions), and embedding
    distances for the action-sensitivity and rollout-error ratios.
    """
    model, fs, a_dim = world.model, world.frameskip, world.action_dim
    g = torch.Generator(world.device).manual_seed(seed)
    rank, moved, spread, err = [], [], [], []
    for i in range(0, len(rows), batch):
        r = rows[i : i + batch]  # (B,)
        b = len(r)
        frame_rows = r[:, None] + fs * np.arange(horizon + 1)  # (B, N+1): the start and the frame after each block
        z = encode_frames(model, world.traj.read("pixels", frame_rows.reshape(-1)), world.device)
        z = z.view(b, horizon + 1, -1).float()  # (B, N+1, D) true embeddings
        raw = world.traj.read("action", (r[:, None] + np.arange(horizon * fs)).reshape(-1))  # (B*N*fs, A_raw)
        true = torch.from_numpy(data.normalize_actions(raw, world.stats).reshape(b, horizon, fs * a_dim))
        cand = torch.randn((b, samples + 1, horizon, fs * a_dim), generator=g, device=world.device)  # (B, S+1, N, A)
        cand[:, 0] = true.to(world.device)
        z_pred = model.rollout(z[:, :1], cand)[:, :, 1:].float()  # (B, S+1, N, D)
        cost = (z_pred[:, :, -1] - z[:, None, -1]).pow(2).sum(-1)  # (B, S+1) the planning cost, as make_cost
        rank.append(((cost[:, 1:] < cost[:, :1]).float() + 0.5 * (cost[:, 1:] == cost[:, :1]).float()).mean(1))
        moved.append((z[:, 1:] - z[:, :1]).norm(dim=-1))  # (B, N) true movement after k blocks
        spread.append((z_pred[:, 1:] - z_pred[:, :1]).norm(dim=-1).mean(1))  # (B, N) random vs true actions
        err.append((z_pred[:, 0] - z[:, 1:]).norm(dim=-1))  # (B, N) rollout error with the true actions
    rank, moved, spread, err = (torch.cat(x).cpu().numpy() for x in (rank, moved, spread, err))
    return {
        "median_rank": float(np.median(rank)),
        "top10": float(np.mean(rank < 0.1)),
        "mean_rank": float(np.mean(rank)),
        "sensitivity_1": float(spread[:, 0].mean() / moved[:, 0].mean()),
        "sensitivity_n": float(spread[:, -1].mean() / moved[:, -1].mean()),
        "rollout_error_1": float(err[:, 0].mean() / moved[:, 0].mean()),
        "rollout_error_n": float(err[:, -1].mean() / moved[:, -1].mean()),
        "ranks": rank.tolist(),
    }


def diagnose_probes(world: World, episodes: np.ndarray, frames: int, seed: int) -> tuple[dict, dict]:
    """Linear probe of each physical quantity, ridge fitted on frames of half of `episodes` and scored on the rest:
    (r, median error in the success test's units)."""
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(episodes)
    fit_eps, test_eps = np.sort(shuffled[: len(shuffled) // 2]), np.sort(shuffled[len(shuffled) // 2 :])
    rows_fit = sample_rows(world.traj, fit_eps, frames, rng)
    rows_test = sample_rows(world.traj, test_eps, frames, rng)
    z_fit = embed_rows([world.model], world.traj, rows_fit, world.device)[0]
    z_test = embed_rows([world.model], world.traj, rows_test, world.device)[0]
    mu, sd = z_fit.mean(0), z_fit.std(0) + 1e-8  # (D,)
    y_fit, y_test = probe_targets(world.traj, world.env, rows_fit), probe_targets(world.traj, world.env, rows_test)
    pred = {name: fit_ridge((z_fit - mu) / sd, y_fit[name])((z_test - mu) / sd) for name in y_fit}
    r = {name: probe_scores(pred[name], y_test[name])["r"] for name in y_fit}
    return r, probe_errors(np.concatenate(list(pred.values()), axis=1), y_test, world.env)


def probe_errors(pred: np.ndarray, y: np.ndarray, env: str) -> dict[str, float]:
    """Median error of predicted probe targets, per quantity, in the unit of the env's success test: the distance
    between predicted and true positions, or the wrapped angle between predicted and true (sin, cos)."""
    out, col = {}, 0
    for name, (_, is_angle, unit) in envs.REGISTRY[env].probe.items():
        k = y[name].shape[1]
        p = pred[:, col : col + k]
        col += k
        if is_angle:  # (sin..., cos...) -> the angle of each, error wrapped to [0, pi]
            half = k // 2
            diff = np.arctan2(p[:, :half], p[:, half:]) - np.arctan2(y[name][:, :half], y[name][:, half:])
            err = np.abs((diff + np.pi) % (2 * np.pi) - np.pi).max(axis=1)  # (N,) worst angle of the quantity
            err = np.degrees(err) if unit == "deg" else err
        else:
            err = np.linalg.norm(p - y[name], axis=1)  # (N,)
        out[name] = float(np.median(err))
    return out


# --- open-loop plan anatomy: where a plan fails, and whether the planner exploits the model


def execute_open_loop(world: World, cfg: EvalConfig, pairs: Pairs, raw: np.ndarray) -> dict:
    """Reset one env per pair to its start and run the raw actions (B, T, A) open-loop: success at any step, the
    final state's error parts, and the final frames (B, H, W, 3)."""
    env_list = reset_envs(world, cfg, pairs)[0]
    spec = envs.REGISTRY[world.env]
    success, frames, errors = np.zeros(len(raw), bool), [], []
    for i, env in enumerate(env_list):
        obs, info = pairs.start_frames[i], None
        for a in raw[i]:
            obs, _, terminated, _, info = env.step(a)
            success[i] |= bool(terminated)
        frames.append(obs)
        errors.append(spec.errors(info["state"], info["goal_state"]))
        env.close()
    return {"success": success, "frames": np.stack(frames), "errors": errors}


def plan_anatomy(world: World, cfg: EvalConfig, rows: np.ndarray) -> dict:
    """One CEM plan from each start frame, executed for its horizon x frameskip steps in the simulator, beside the
    dataset's true actions and zero actions. For each: the model's predicted cost (the planning cost of the plan)
    against the realised cost (the final frame encoded, compared with the goal embedding), success, and the final
    error split into the success test's parts. A predicted cost far below the realised one means the planner found
    actions the model gets wrong: it exploits the model."""
    model, fs, a_dim, b = world.model, world.frameskip, world.action_dim, len(rows)
    steps = cfg.horizon * fs
    pairs = pairs_at(world, rows, steps)
    with torch.inference_mode():
        z0 = encode_frames(model, pairs.start_frames, world.device)  # (B, 1, D)
        z_goal = encode_frames(model, pairs.goal_frames, world.device)[:, 0]  # (B, D)
    gens = [torch.Generator(world.device).manual_seed(cfg.seed + i) for i in range(b)]
    t0 = time.perf_counter()
    plans = plan_chunks(world, cfg, pairs.start_frames, z_goal, gens, None).float().cpu().numpy()  # (B, N, fs*A)
    plan_seconds = (time.perf_counter() - t0) / b
    true = world.traj.read("action", (rows[:, None] + np.arange(steps)).reshape(-1)).reshape(b, steps, a_dim)
    raw_sets = {
        "cem": data.denormalize_actions(plans.reshape(b, steps, a_dim), world.stats),  # (B, T, A)
        "true": true.astype(np.float32),
        "zero": np.zeros((b, steps, a_dim), np.float32),
    }
    data_abs = np.abs(world.traj.read("action", world.traj.episode_rows(world.train_eps)))  # (R, A) NaN rows kept
    p99 = np.nanpercentile(data_abs, 99, axis=0)  # (A,)
    cost_fn = make_cost(model, z0, z_goal, False)
    report, costs = {}, {}
    for name, raw in raw_sets.items():
        norm = data.normalize_actions(raw, world.stats).reshape(b, 1, cfg.horizon, fs * a_dim)  # (B, 1, N, A)
        with torch.inference_mode():
            predicted = cost_fn(torch.from_numpy(norm).to(world.device))[:, 0].cpu().numpy()  # (B,)
            run = execute_open_loop(world, cfg, pairs, raw)
            z_end = encode_frames(model, run["frames"], world.device)[:, 0]  # (B, D)
            realised = (z_end - z_goal).pow(2).sum(-1).cpu().numpy()  # (B,)
        costs[name] = (predicted, realised)
        report[name] = {
            "success": float(run["success"].mean()),
            "predicted_cost_median": float(np.median(predicted)),
            "realised_cost_median": float(np.median(realised)),
            "final_errors_median": {k: float(np.median([e[k] for e in run["errors"]])) for k in run["errors"][0]},
            "abs_action_p99": np.percentile(np.abs(raw), 99, axis=(0, 1)).tolist(),
            "beyond_data_p99": float((np.abs(raw) > p99).mean()),
            "per_pair": [
                {"predicted_cost": float(p), "realised_cost": float(r), "success": bool(s), "final_errors": e}
                for p, r, s, e in zip(predicted, realised, run["success"], run["errors"], strict=True)
            ],
        }
    predicted, realised = costs["cem"]
    return {
        "pairs": b,
        "steps": steps,
        "plan_seconds": plan_seconds,
        "data_abs_action_p99": p99.tolist(),
        "cem_predicted_realised_r": float(np.corrcoef(predicted, realised)[0, 1]) if b > 1 else None,
        **report,
    }


# --- encoder capacity: can a fresh encoder of this architecture, trained with the state as supervision, resolve
# what the success test asks? A ceiling on what the self-supervised encoder can give, measured in minutes.

CAPACITY_BATCH = 64
CAPACITY_LR = 5e-4  # AdamW peak, cosine to 0 after a 5 % warmup
CAPACITY_FIT_FRAMES = 8000  # frames from training episodes (read once, kept in RAM)
CAPACITY_TEST_FRAMES = 2000  # frames from held-out episodes that hold no evaluation pair


def encoder_capacity(world: World, fit_eps: np.ndarray, test_eps: np.ndarray, steps: int, seed: int) -> dict:
    """Train a fresh ViT of the model's encoder shape plus a linear head to regress the env's probe quantities
    (standardised) from single frames for `steps` AdamW steps, then score it on held-out frames: r per quantity,
    as the probes, and the median error in the success test's units. Seeded: the same call gives the same result."""
    mcfg, device = world.model.cfg, world.device
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    rows_fit = sample_rows(world.traj, fit_eps, CAPACITY_FIT_FRAMES, rng)
    rows_test = sample_rows(world.traj, test_eps, CAPACITY_TEST_FRAMES, rng)
    y_fit, y_test = probe_targets(world.traj, world.env, rows_fit), probe_targets(world.traj, world.env, rows_test)
    y_all = np.concatenate(list(y_fit.values()), axis=1)  # (N, K)
    mu, sd = y_all.mean(0), y_all.std(0) + 1e-8  # (K,)
    target = torch.from_numpy(((y_all - mu) / sd).astype(np.float32))  # (N, K)
    frames_fit = torch.from_numpy(world.traj.read("pixels", rows_fit))  # (N, H, W, 3) uint8
    vit = ViT(mcfg.img_size, mcfg.patch_size, mcfg.embed_dim, mcfg.enc_depth, mcfg.enc_heads, mcfg.enc_mlp)
    net = torch.nn.Sequential(vit, torch.nn.Linear(mcfg.embed_dim, target.shape[1])).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=CAPACITY_LR, weight_decay=0.05)
    warmup = max(1, steps // 20)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    net.train()
    for step in tqdm(range(steps), desc="capacity", unit="step", dynamic_ncols=True):
        lr = CAPACITY_LR * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(frames_fit), (CAPACITY_BATCH,), generator=gen)
        x = preprocess(frames_fit[idx].to(device), mcfg.img_size)  # (B, 3, S, S)
        loss = (net(x) - target[idx].to(device)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    frames_test = world.traj.read("pixels", rows_test)
    with torch.inference_mode():
        pred = np.concatenate(
            [
                net(preprocess(torch.from_numpy(frames_test[i : i + ENCODE_BATCH]).to(device), mcfg.img_size))
                .cpu()
                .numpy()
                for i in range(0, len(frames_test), ENCODE_BATCH)
            ]
        )
    pred = pred * sd + mu  # (N, K) back in raw units (angles as sin, cos)
    r, col = {}, 0
    for name, y in y_test.items():
        r[name] = probe_scores(pred[:, col : col + y.shape[1]], y)["r"]
        col += y.shape[1]
    return {
        "steps": steps,
        "batch": CAPACITY_BATCH,
        "fit_frames": len(rows_fit),
        "test_frames": len(rows_test),
        "img_size": mcfg.img_size,
        "patch_size": mcfg.patch_size,
        "tokens": (mcfg.img_size // mcfg.patch_size) ** 2,
        "r": r,
        "median_error": probe_errors(pred, y_test, world.env),
        "units": {n: u for n, (_, _, u) in envs.REGISTRY[world.env].probe.items()},
        "seconds": time.time() - t0,
    }


def run_diagnose(cfg: EvalConfig) -> dict:
    """Action ranking, action sensitivity and linear probes on held-out episodes (never the evaluation pairs)."""
    t0 = time.time()
    world = load_world(cfg)
    if len(world.val_eps) == 0:
        raise UsageError("diagnose needs held-out episodes, and this model has no validation split")
    if cfg.goal_offset != cfg.horizon * world.frameskip:
        raise UsageError(
            f"diagnose needs goal_offset = horizon x frameskip = {cfg.horizon * world.frameskip}, got {cfg.goal_offset}"
        )
    episodes = diagnose_episodes(world, cfg.eval_pairs, cfg.goal_offset)
    rows = start_rows(world.traj, episodes, cfg.pairs, cfg.goal_offset, cfg.seed)
    samples = cfg.samples or 300
    ranking = action_ranking(world, rows, cfg.horizon, samples, cfg.seed)
    probes, probe_err = diagnose_probes(world, episodes, cfg.frames // 4, cfg.seed)
    anatomy = capacity = None
    if cfg.anatomy_pairs:
        anatomy_rows = start_rows(world.traj, episodes, cfg.anatomy_pairs, cfg.goal_offset, cfg.seed + 1)
        anatomy = plan_anatomy(world, cfg, anatomy_rows)
    if cfg.capacity_steps:
        capacity = encoder_capacity(world, world.train_eps, episodes, cfg.capacity_steps, cfg.seed)
    summary = {
        "command": "diagnose",
        "env": world.env,
        "source": world.source,
        "data_source": world.data_source,
        "pairs": len(rows),
        "episodes": len(episodes),
        "samples": samples,
        "goal_offset": cfg.goal_offset,
        "ranking": {k: v for k, v in ranking.items() if k != "ranks"},
        "probe_linear_r": probes,
        "probe_linear_median_error": probe_err,
        "anatomy": anatomy,
        "capacity": capacity,
        "seconds": time.time() - t0,
        "ranks": ranking["ranks"],
        "config": dataclasses.asdict(cfg),
    }
    rk = summary["ranking"]
    print(
        f"diagnose {world.env} | {world.source} | {len(rows)} pairs from {len(episodes)} held-out episodes "
        f"without evaluation pairs | {samples} random sequences per pair"
    )
    print(
        f"(a) true actions: median rank {100 * rk['median_rank']:.1f} % (0 = cheapest), "
        f"in the top 10 % for {100 * rk['top10']:.0f} % of pairs"
    )
    print(
        f"(b) action sensitivity: {rk['sensitivity_1']:.2f} after one block, {rk['sensitivity_n']:.2f} after "
        f"{cfg.horizon} (random-vs-true prediction gap / true embedding movement); rollout error "
        f"{rk['rollout_error_1']:.2f} / {rk['rollout_error_n']:.2f} of the movement"
    )
    units = {n: u for n, (_, _, u) in envs.REGISTRY[world.env].probe.items()}
    print(
        "(c) linear probe r: "
        + ", ".join(f"{k} {v:.3f} (median error {probe_err[k]:.3g} {units[k]})" for k, v in probes.items())
    )
    if anatomy is not None:
        print(
            f"(d) open-loop plan anatomy, {anatomy['pairs']} pairs, one {anatomy['steps']}-step plan each: "
            f"predicted vs realised cost of CEM's plans r {anatomy['cem_predicted_realised_r']:.2f}"
        )
        for name in ("cem", "true", "zero"):
            a = anatomy[name]
            errs = ", ".join(f"{k} {v:.3g}" for k, v in a["final_errors_median"].items())
            print(
                f"    {name:>4} actions: success {100 * a['success']:.0f} % | cost predicted "
                f"{a['predicted_cost_median']:.2f}, realised {a['realised_cost_median']:.2f} (medians) | final "
                f"error (median) {errs} | {100 * a['beyond_data_p99']:.1f} % of actions beyond the data's 99th pct"
            )
    if capacity is not None:
        print(
            f"(e) encoder capacity: a fresh {capacity['img_size']} px / patch {capacity['patch_size']} encoder "
            f"trained {capacity['steps']} steps on the state: "
            + ", ".join(
                f"{k} r {v:.3f} (median error {capacity['median_error'][k]:.3g} {capacity['units'][k]})"
                for k, v in capacity["r"].items()
            )
        )
    out = default_out(cfg, world, "diagnose")
    save_json(summary, out)
    return {**summary, "out": out}


# --- main


def main(cfg: EvalConfig) -> dict:
    """Run the configured subcommand and return its results."""
    check_config(cfg)
    print(json.dumps(dataclasses.asdict(cfg)))
    if cfg.command == "plan":
        return run_plan(cfg)
    if cfg.command == "probe":
        return run_probe(cfg)
    if cfg.command == "surprise":
        return run_surprise(cfg)
    if cfg.command == "diagnose":
        return run_diagnose(cfg)
    raise ValueError(f"unknown command {cfg.command!r}; valid: {COMMANDS}")


if __name__ == "__main__":
    try:
        main(parse_args())
    except UsageError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(2)
