"""Analyses of a trained LeWM beyond the planning success rate: what its frozen embeddings know (probes), whether its
predictions are surprised by impossible events (surprise), whether it can plan at all (diagnose), and the success
rate against training time (success_curve). docs/method.md §11.

Serves `python evaluate.py probe|surprise|diagnose ...`: evaluate.py's command line parses the flags and, for these
three subcommands only, imports this file and calls `run_probe`, `run_surprise` or `run_diagnose`. This file builds
on evaluate.py's protocol (the frozen model and dataset of `load_world`, its start/goal pairs, reset envs and
batched CEM), so it imports evaluate.py, never the reverse at import time: evaluate.py reads as the protocol alone.

Run:
    python evaluate.py probe --ckpt runs/pusht_cpu/ckpt.pt          # linear and MLP probes, trained vs fresh init
    python evaluate.py surprise --ckpt runs/pusht_cpu/ckpt.pt       # teleported, recoloured, re-rendered frames
    python evaluate.py diagnose --ckpt runs/pusht_cpu/ckpt.pt       # ranking, sensitivity, anatomy, capacity
    python -c "import analyses; analyses.success_curve(['plan.json'], 'runs/x/metrics.jsonl', 'curve.png')"
    python analyses.py capacity --env pusht --data data/pusht_128px_300ep.h5 --img_size 128 --patch_size 16
                                                                    # before training: can this shape resolve it?

Dimension letters: B pairs, S samples, N horizon (blocks), A action block (frameskip x raw action dim), D embedding.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import cli
import data
import envs
from charts import line_chart
from cli import UsageError, read_metrics, save_json
from evaluate import (
    EvalConfig,
    Pairs,
    World,
    dataset_states,
    default_out,
    encode_frames,
    load_world,
    pairs_at,
    plan_chunks,
    reset_envs,
    start_rows,
)
from model import PRESETS, LeWM, ViT, preprocess
from planner import make_cost

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
    if len(episodes) < 2:  # the probes fit on half of them and score on the other half
        raise UsageError(
            f"{len(episodes)} held-out episode(s) hold none of the {eval_pairs} evaluation pairs, and diagnose needs "
            "2: train on more --episodes (or a larger --val_fraction), or lower --eval_pairs"
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
    return fresh_encoder_capacity(world.traj, world.env, world.model.cfg, world.device, fit_eps, test_eps, steps, seed)


def fresh_encoder_capacity(
    traj: data.Trajectories, env: str, mcfg, device: torch.device, fit_eps, test_eps, steps: int, seed: int
) -> dict:
    """`encoder_capacity` for any encoder shape `mcfg` (a model.ModelConfig), no trained model needed."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    rows_fit = sample_rows(traj, fit_eps, CAPACITY_FIT_FRAMES, rng)
    rows_test = sample_rows(traj, test_eps, CAPACITY_TEST_FRAMES, rng)
    y_fit, y_test = probe_targets(traj, env, rows_fit), probe_targets(traj, env, rows_test)
    y_all = np.concatenate(list(y_fit.values()), axis=1)  # (N, K)
    mu, sd = y_all.mean(0), y_all.std(0) + 1e-8  # (K,)
    target = torch.from_numpy(((y_all - mu) / sd).astype(np.float32))  # (N, K)
    frames_fit = torch.from_numpy(traj.read("pixels", rows_fit))  # (N, H, W, 3) uint8
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
    frames_test = traj.read("pixels", rows_test)
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
        "enc_depth": mcfg.enc_depth,
        "tokens": (mcfg.img_size // mcfg.patch_size) ** 2,
        "r": r,
        "median_error": probe_errors(pred, y_test, env),
        "units": {n: u for n, (_, _, u) in envs.REGISTRY[env].probe.items()},
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


# --- success against training time: one point per plan JSON of a run's kept checkpoints


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


# --- encoder capacity before training: `python analyses.py capacity`, no checkpoint needed


CAPACITY_CHOICES = {"env": list(envs.REGISTRY), "preset": list(PRESETS), "device": cli.DEVICES}


@dataclasses.dataclass
class CapacityConfig:
    env: str = "pusht"  # environment whose probe quantities the fresh encoder regresses
    data: str = ""  # HDF5 dataset of that env with frames of at least img_size pixels (required)
    preset: str = "cpu"  # model preset whose encoder shape is trained (model.PRESETS)
    img_size: int = 0  # frame side the encoder sees (0 = the preset's); the data's frames are resized to it
    patch_size: int = 0  # ViT patch side, img_size a multiple of it (0 = the preset's)
    enc_depth: int = 0  # encoder layers (0 = the preset's)
    steps: int = 1000  # AdamW steps of batch 64 (diagnose's default budget)
    val_fraction: float = 0.1  # held-out episodes the figures are measured on (data.split_episodes)
    seed: int = 42  # frame draw and initialisation
    device: str = "auto"  # auto, cuda, mps or cpu
    out: str = ""  # JSON results ('' = capacity_<env>_<img>px_p<patch>[_depth<d>].json beside --data)


def run_capacity(cfg: CapacityConfig) -> dict:
    """The capacity check of `diagnose` (e) for a chosen encoder shape on a dataset, before any training."""
    cli.check_fields(
        cfg,
        CAPACITY_CHOICES,
        {
            "img_size": (">= 0", lambda v: v >= 0),
            "patch_size": (">= 0", lambda v: v >= 0),
            "enc_depth": (">= 0", lambda v: v >= 0),
            "steps": (">= 1", lambda v: v >= 1),
            "val_fraction": ("in (0, 1)", lambda v: 0 < v < 1),
            "seed": (">= 0", lambda v: v >= 0),
        },
    )
    if not cfg.data:
        raise UsageError(
            "--data is required: an HDF5 dataset of the env, e.g. python data.py --env pusht --img_size 128"
        )
    cli.check_files({"--data": cfg.data})
    mcfg = PRESETS[cfg.preset]
    mcfg = dataclasses.replace(
        mcfg,
        img_size=cfg.img_size or mcfg.img_size,
        patch_size=cfg.patch_size or mcfg.patch_size,
        enc_depth=cfg.enc_depth or mcfg.enc_depth,
    )
    if mcfg.img_size % mcfg.patch_size:
        raise UsageError(f"--patch_size {mcfg.patch_size}: must divide the image size {mcfg.img_size}")
    depth = f"_depth{cfg.enc_depth}" if cfg.enc_depth else ""
    name = f"capacity_{cfg.env}_{mcfg.img_size}px_p{mcfg.patch_size}{depth}.json"
    out = cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.data)), name)
    cli.check_output(out, "--out", {"--data": cfg.data})
    traj = cli.open_dataset(cfg.data, "--data")
    data.check_env(traj, cfg.env)
    if min(traj.img_shape[:2]) < mcfg.img_size:
        raise UsageError(
            f"--data {cfg.data}: {traj.img_shape[0]} px frames, smaller than --img_size {mcfg.img_size}: upsampling "
            f"adds no detail; collect at that size (python data.py --env {cfg.env} --img_size {mcfg.img_size})"
        )
    fit_eps, test_eps = data.split_episodes(traj.num_episodes, cfg.val_fraction)
    if len(test_eps) == 0:
        raise UsageError(f"--data {cfg.data}: {traj.num_episodes} episodes leave none held out; collect more")
    device = cli.pick_device(cfg.device)
    res = fresh_encoder_capacity(traj, cfg.env, mcfg, device, fit_eps, test_eps, cfg.steps, cfg.seed)
    res = {"command": "capacity", "env": cfg.env, "data": cfg.data, "preset": cfg.preset, **res}
    res["config"] = dataclasses.asdict(cfg)
    save_json(res, out)
    print(
        f"{cfg.env} capacity, {res['img_size']} px / patch {res['patch_size']} ({res['tokens']} tokens), "
        f"{res['steps']} steps: "
        + ", ".join(
            f"{k} r {v:.3f} (median error {res['median_error'][k]:.3g} {res['units'][k]})" for k, v in res["r"].items()
        )
        + f" | {res['seconds']:.0f} s -> {out}"
    )
    return res


def parse_capacity_args(argv: list[str]) -> CapacityConfig:
    """argparse generated from CapacityConfig; argv starts with the subcommand `capacity`."""
    if not argv or argv[0] != "capacity":
        raise UsageError("the one command is capacity: python analyses.py capacity --env E --data FILE (--help)")
    parser = argparse.ArgumentParser(
        prog="analyses.py capacity", description=run_capacity.__doc__, formatter_class=cli.HelpFormatter
    )
    cli.add_config_flags(parser, CapacityConfig, choices=CAPACITY_CHOICES)
    return CapacityConfig(**vars(parser.parse_args(argv[1:])))


if __name__ == "__main__":
    with cli.exit_codes("analyses.py"):  # a wrong flag or file: one line, exit code 2; Ctrl-C 130
        run_capacity(parse_capacity_args(sys.argv[1:]))
