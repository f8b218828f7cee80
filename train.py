"""Train LeWM from pixels: next-embedding MSE + lambd * SIGReg, nothing else (docs/method.md §6, §8).

One linear `main(cfg)` with one visible loop: learning rate as a pure function of the step, bf16 autocast forward,
backward, global-norm clip, AdamW step, a fixed-format log line, validation and an atomic checkpoint at intervals.
Deliberately absent: EMA target, stop-gradient, pixel decoder, pretrained encoder. The file reads as the config, the
recipe, the data, then the loop; command-line, run-folder, checkpoint, signal and DDP plumbing is cli.py's, data
collection collect.py's, the loss chart charts.py's.

Run:
    python train.py --env pusht                          # collects data if missing; preset: paper on CUDA, else cpu
    python train.py --env pusht --preset tiny --max_steps 50
    python train.py --env pusht --resume                 # continue a killed or interrupted run from its checkpoint
    torchrun --standalone --nproc_per_node=2 train.py --env pusht   # DDP: gloo on CPU, NCCL on GPU

Precedence (`resolve_config`): dataclass defaults < preset (--preset: model sizes) < its recipe < explicit flags.
The final config, every field holding its real value, is printed and saved in <out_dir>/config.json, metrics go to
metrics.jsonl and metrics.png, and summary.json holds steps, final validation losses and wall times (collection; the
optimisation loop, summed over resumed runs).
Arguments are checked before any work (a wrong one: one line naming it, exit code 2). Ctrl-C or SIGTERM finishes
the current step, writes a checkpoint and exits (130 or 143) with the command that resumes.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import cli
import collect
import data
import envs
from charts import plot_metrics_png
from cli import UsageError
from kernels import native_bf16, use_fast_attention
from model import PRESETS, LeWM, ModelConfig, lewm_loss
from sigreg import SIGReg

# --- configuration: flags, presets and recipes


@dataclass
class TrainConfig:
    env: str = "pusht"  # environment: pusht, tworoom, reacher or cube
    preset: str | None = None  # model and recipe preset: paper, cpu or tiny (None = paper with CUDA, else cpu)
    data: str = ""  # HDF5 dataset ('' = the preset's default file, collected first if missing)
    episodes: int | None = None  # episodes to collect when the dataset is missing (None = the recipe's)
    extra_data: str | None = None  # extra episodes for training only, never held out ('' = none; None = the recipe's)
    img_size: int | None = None  # frame side the model sees, and of collected data (None = the preset's)
    patch_size: int | None = None  # ViT patch side; img_size must be a multiple (None = the preset's)
    out_dir: str = ""  # run folder for checkpoints and metrics ('' = runs/<env>_<preset>)
    max_steps: int | None = None  # optimiser steps to run (None = the recipe's; paper: 10 epochs)
    schedule_steps: int | None = None  # length of the warmup + cosine schedule (None = the recipe's)
    warmup: float = 0.01  # linear warmup from lr 0, as a fraction of schedule_steps
    batch_size: int | None = None  # global batch, split across ranks (None = the recipe's)
    lr: float | None = None  # peak AdamW learning rate (None = the recipe's)
    weight_decay: float = 1e-3  # AdamW weight decay on all parameters (official)
    lambd: float = 0.09  # SIGReg weight
    num_proj: int = 1024  # SIGReg random directions
    dropout: float | None = None  # predictor dropout (None = the preset's, 0.1 in the paper)
    grad_clip: float = 1.0  # global L2 norm clip
    val_fraction: float = 0.1  # episodes held out for validation and evaluation, in (0, 1); fixed on resume
    val_batches: int = 20  # batches per validation pass (0 = whole validation split)
    bn_batches: int = 20  # train batches averaged into BN statistics before validating (0 = official running ones)
    log_every: int = 50  # steps between log lines
    eval_every: int = 500  # steps between validation passes
    ckpt_every: int = 500  # steps between checkpoints
    keep_every: int = 0  # also keep a copy ckpt_<step>.pt every this many steps, for curves (0 = latest only)
    device: str = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
    bf16: bool | None = None  # bf16 autocast, SIGReg kept fp32 (None = on where native: CUDA, AVX-512 BF16 or AMX)
    compile: bool = False  # torch.compile the model (the uncompiled model is what gets saved)
    resume: bool = False  # continue from <out_dir>/ckpt.pt
    overwrite: bool = False  # start afresh in an existing run folder, deleting its checkpoint and metrics
    seed: int = 0  # model init, SIGReg directions, dropout and clip order
    workers: int = 2  # processes for data collection
    loader_workers: int | None = None  # batch-making processes (0 = thread; None = min(8, cores-1) / local DDP ranks)


# DEVIATION (PushT): exploration episodes beside the demonstrations, for training only (the held-out episodes and
# so the evaluation pairs are the demonstrations' alone). The demonstrations hold only smooth, goal-directed action
# sequences, and CEM exploits a model that has seen nothing else (docs/results.md, "PushT").
PUSHT_PLAY = {"policy": "play", "noise": 0.4, "episodes": 1500, "episode_steps": 100}


@dataclass(frozen=True)
class Recipe:
    """A preset's training recipe; its model sizes (img_size and patch_size included) are model.PRESETS."""

    batch_size: int  # global batch, split across ranks
    lr: float  # peak AdamW learning rate
    episodes: int  # episodes collected when the dataset is missing
    max_steps: int  # optimiser steps, or epochs of the training clips with per_epoch
    schedule_steps: int | None = None  # warmup + cosine length, counted as max_steps (None = the run itself)
    per_epoch: bool = False  # lengths in epochs (the paper's), made steps once the data is known: clips // batch
    extra: dict | None = None  # exploration episodes for training only (policy, noise, episodes, episode_steps)
    env: dict = dataclasses.field(default_factory=dict)  # per-environment overrides of any field above


RECIPES = {
    # The official recipe (docs/method.md §8): 10 epochs of a 100-epoch schedule.
    "paper": Recipe(batch_size=128, lr=5e-5, episodes=10000, max_steps=10, schedule_steps=100, per_epoch=True),
    # DEVIATION: 2-core CPU recipe: a few thousand steps instead of ~100k, so a larger peak lr and a full cosine
    # over the run (chosen on validation loss). Batch 64: SIGReg tests the batch, keep it >= 64. 6000 steps for
    # every env, chosen on validation loss and `evaluate.py diagnose` (docs/results.md: TwoRoom against 3000 steps,
    # Reacher against 3000 steps at 96 px and at 64 px). 77 to 90 min of training each on 2 AVX2 cores (BENCHMARKS.md).
    # DEVIATION (PushT): 3000 demonstration episodes, with the exploration episodes above.
    "cpu": Recipe(
        batch_size=64, lr=3e-4, episodes=2000, max_steps=6000, env={"pusht": {"episodes": 3000, "extra": PUSHT_PLAY}}
    ),
    "tiny": Recipe(batch_size=16, lr=1e-3, episodes=6, max_steps=20),  # tests and smoke runs: seconds
}


def recipe_for(preset: str, env: str) -> Recipe:
    """The preset's recipe with the environment's overrides applied."""
    return dataclasses.replace(RECIPES[preset], **RECIPES[preset].env.get(env, {}))


# Valid values, checked before any work: choices, and (rule, test) for fields with a range (None: resolved later).
CHOICES = {"env": list(envs.REGISTRY), "preset": [None, *RECIPES], "device": cli.DEVICES}
AT_LEAST_1 = "episodes max_steps schedule_steps batch_size num_proj log_every eval_every ckpt_every workers patch_size"
RANGES = {
    **dict.fromkeys(AT_LEAST_1.split(), (">= 1", lambda v: v >= 1)),
    **dict.fromkeys(("weight_decay", "lambd", "val_batches", "bn_batches", "keep_every"), (">= 0", lambda v: v >= 0)),
    **dict.fromkeys(("lr", "grad_clip"), ("> 0", lambda v: v > 0)),
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "val_fraction": ("in (0, 1): validation and evaluation need held-out episodes", lambda v: 0 < v < 1),
    "warmup": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "img_size": (">= 32", lambda v: v >= 32),
    **dict.fromkeys(("loader_workers", "seed"), (">= 0", lambda v: v >= 0)),
}


# --- the configuration resolved (defaults < preset < recipe < flags) and checked before any work


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """argparse generated from TrainConfig: every field a flag, its trailing comment the help text."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=cli.HelpFormatter)
    cli.add_config_flags(parser, TrainConfig, choices=CHOICES)
    return TrainConfig(**vars(parser.parse_args(argv)))


def resolve_config(
    cfg: TrainConfig, *, cuda: bool, steps_per_epoch: Callable[[TrainConfig], int], bf16: bool = False
) -> TrainConfig:
    """The config with every field holding its real value. Precedence: dataclass defaults < preset (model sizes,
    model.PRESETS) < its recipe (with the env's overrides) < explicit flags, which are the fields not left None.
    `steps_per_epoch(cfg)` (everything but the lengths resolved) is called only for a recipe counted in epochs;
    `bf16` is the value of --bf16 when it is not given (native_bf16 of the device)."""
    preset = cfg.preset or ("paper" if cuda else "cpu")
    recipe, model = recipe_for(preset, cfg.env), PRESETS[preset]
    layers = {"img_size": model.img_size, "patch_size": model.patch_size, "dropout": model.pred_dropout}
    layers |= {k: getattr(recipe, k) for k in ("batch_size", "lr", "episodes")}
    layers["loader_workers"] = data.default_loader_workers()  # not a preset's: this machine's cores and ranks
    given = {k: v for k, v in asdict(cfg).items() if k in layers and v is not None}
    cfg = dataclasses.replace(cfg, preset=preset, **{**layers, **given})
    # The absolute path: evaluation finds the dataset from any working directory.
    path = cfg.data or data.default_data_path(cfg.env, cfg.img_size, cfg.episodes)
    out_dir, bf16 = cfg.out_dir or os.path.join("runs", f"{cfg.env}_{preset}"), bf16 if cfg.bf16 is None else cfg.bf16
    cfg = dataclasses.replace(cfg, data=os.path.abspath(path), out_dir=out_dir, bf16=bf16)
    extra = recipe.extra
    path = data.default_data_path(cfg.env, cfg.img_size, extra["episodes"], extra["policy"]) if extra else ""
    path = path if cfg.extra_data is None else cfg.extra_data  # '' = none
    cfg = dataclasses.replace(cfg, extra_data=path and os.path.abspath(path))
    unit = steps_per_epoch(cfg) if recipe.per_epoch else 1
    max_steps = cfg.max_steps if cfg.max_steps is not None else recipe.max_steps * unit
    schedule = recipe.schedule_steps * unit if recipe.schedule_steps is not None else max_steps
    schedule = cfg.schedule_steps if cfg.schedule_steps is not None else schedule
    return dataclasses.replace(cfg, max_steps=max_steps, schedule_steps=schedule)


def check_config(cfg: TrainConfig) -> None:
    """Raise UsageError, naming the flag and its value, for any argument outside its valid values."""
    cli.check_fields(cfg, CHOICES, RANGES)
    cli.check_device(cfg.device)
    if cfg.resume and cfg.overwrite:
        raise UsageError("--resume and --overwrite: give one of them")
    cli.check_files({"--data": cfg.data, "--extra_data": cfg.extra_data})
    if cfg.keep_every % cfg.eval_every:
        raise UsageError(
            f"--keep_every {cfg.keep_every}: must be a multiple of --eval_every {cfg.eval_every}, so "
            "that each kept checkpoint holds BatchNorm statistics refreshed at its step"
        )


def setup_run(cfg: TrainConfig, cleanup: ExitStack, device, rank: int, world: int, say, timings: dict) -> tuple:
    """(The checked config; the checkpoint to resume or None, cli.load_resume); rank 0 holds the run folder."""
    cuda, native = device.type == "cuda", native_bf16(device)
    if cfg.preset is None:
        say(f"--preset not given: using '{'paper' if cuda else 'cpu'}' ({'CUDA found' if cuda else 'no CUDA'})")
    if cfg.bf16 is None and not native:
        say(f"--bf16 not given: fp32, as {device.type} has no native bf16 here (bf16 would be emulated, far slower)")
    cfg = resolve_config(cfg, cuda=cuda, steps_per_epoch=lambda c: epoch_steps(c, rank, world, timings), bf16=native)
    if cfg.img_size % cfg.patch_size:
        raise UsageError(f"--img_size {cfg.img_size}: not a multiple of --patch_size {cfg.patch_size}")
    if cfg.batch_size % world:
        raise UsageError(f"--batch_size {cfg.batch_size}: not divisible by the {world} ranks")
    if rank == 0:
        cli.prepare_run_folder(cfg.out_dir, cfg.resume, cfg.overwrite, cleanup)
    return cfg, cli.load_resume(cfg.resume, os.path.join(cfg.out_dir, "ckpt.pt"), cfg.max_steps, say)


# --- the recipe: schedule, model, BatchNorm statistics and validation


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 then cosine to 0, per optimiser step (official LinearWarmupCosineAnnealingLR)."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def model_config(cfg: TrainConfig, raw_action_dim: int) -> ModelConfig:
    """The preset's model at the resolved sizes; the action block is frameskip x the dataset's raw action dim."""
    sizes = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "pred_dropout": cfg.dropout}
    return dataclasses.replace(PRESETS[cfg.preset], **sizes, action_dim=PRESETS[cfg.preset].frameskip * raw_action_dim)


@torch.no_grad()
def refresh_bn_stats(model: LeWM, loader, cfg: TrainConfig, device, max_batches: int):
    """Re-estimate every BatchNorm's running statistics at the current weights: the plain average of the batch
    statistics of the first `max_batches` batches of `loader`, dropout off.

    # DEVIATION: the official model keeps the momentum-0.1 running averages from training. They trail the weights:
    # the projector's pre-BN features vary little across frames (std ~ 0.03 around means ~ 0.4 at 64 px), so the
    # drift of a few steps at a high learning rate moves eval-mode embeddings far from the train-mode ones
    # (measured at step 500 of the cpu recipe: relative error 2.5, validation prediction loss 2.7 vs 0.16 in
    # train mode). Planning and validation run in eval mode, so we refresh the statistics before each
    # validation, hence in every checkpoint written after one. Training itself is unchanged.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.train()
    for i, (pixels, actions) in enumerate(loader):
        if i >= max_batches:
            break
        for m in bns:
            m.momentum = 1.0 / (i + 1)  # running = mean of the batch statistics seen so far
        pixels, actions = model.preprocess(pixels.to(device)), actions.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            model(pixels, actions)
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train()


@torch.no_grad()
def validate(model: LeWM, loader, sigreg, cfg: TrainConfig, device, max_batches: int) -> dict:
    """Mean losses over validation clips, model in eval mode (BN running statistics, no dropout)."""
    model.eval()
    totals, n = {"loss": 0.0, "pred_loss": 0.0, "sigreg_loss": 0.0}, 0
    for i, (pixels, actions) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        pixels, actions = model.preprocess(pixels.to(device)), actions.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, parts = lewm_loss(model, pixels, actions, sigreg, cfg.lambd)
        for k, v in (("loss", loss), *parts.items()):
            totals[k] += float(v)
        n += 1
    model.train()
    return {f"val_{k}": v / max(n, 1) for k, v in totals.items()}


# --- the data: collected if missing, split by episode, served as clips


def ensure_dataset(cfg: TrainConfig, rank: int, timings: dict, say=None) -> data.Trajectories:
    """The opened dataset of a resolved config, with its extra episodes after it (a data.TrajectoryUnion) if it has
    any; collected first (rank 0, with its progress bar) if not on disk, the seconds spent added to
    timings["collect_seconds"]. `say`: where notes on the file go (no env recorded, frames of another size)."""
    extra = recipe_for(cfg.preset, cfg.env).extra
    if rank == 0:
        seconds = collect.collect_missing(cfg.data, cfg.env, cfg.episodes, cfg.img_size, cfg.workers)
        if cfg.extra_data and extra:
            policy = {k: extra[k] for k in ("policy", "noise", "episode_steps")}
            args = (cfg.extra_data, cfg.env, extra["episodes"], cfg.img_size, cfg.workers)
            seconds += collect.collect_missing(*args, label="extra episodes", note=" (training only)", **policy)
        timings["collect_seconds"] += seconds
    if dist.is_initialized():
        dist.barrier()
    return cli.open_data({"--data": cfg.data, "--extra_data": cfg.extra_data}, cfg.env, cfg.img_size, say)


def clip_shape(mcfg: ModelConfig) -> dict:
    """The clip layout the model trains on (history, num_preds, frameskip): what data.ClipLoader needs to know."""
    return {"history": mcfg.history, "num_preds": mcfg.num_preds, "frameskip": mcfg.frameskip}


def split(cfg: TrainConfig, traj: data.Trajectories, ckpt=None, say=print) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) episodes: the dataset's split (on resume the checkpoint's), every extra episode for training."""
    base = traj.parts[0].num_episodes if isinstance(traj, data.TrajectoryUnion) else traj.num_episodes
    train_eps, val_eps = cli.held_out_split(base, cfg.val_fraction, ckpt, say)
    return np.concatenate([train_eps, np.arange(base, traj.num_episodes)]), val_eps


def make_loaders(cfg: TrainConfig, traj, mcfg: ModelConfig, rank: int, world: int, ckpt, say) -> tuple:
    """(train, val episodes, training episodes' action statistics, train / val / BN-refresh loaders) or UsageError."""
    batch, kw = cfg.batch_size // world, {**clip_shape(mcfg), "rank": rank, "world_size": world}
    procs = {"workers": cfg.loader_workers, "pin_memory": cli.pick_device(cfg.device).type == "cuda"}
    with cli.data_errors("--data"), warnings.catch_warnings(record=True) as caught:  # notes: once per message
        warnings.simplefilter("always")
        train_eps, val_eps = split(cfg, traj, ckpt, say)
        stats = ckpt["action_stats"] if ckpt else data.action_stats(traj, train_eps)  # resume: the model's own
        loader = data.ClipLoader(traj, train_eps, stats, batch, seed=cfg.seed, **kw, **procs)
        # Validation draws the same random clips every time (epoch 0 of a fixed seed): consecutive clips of a few
        # episodes would make SIGReg, a test of the batch's distribution, meaningless. BN statistics are refreshed
        # on a fixed draw of training clips.
        val_loader = data.ClipLoader(traj, val_eps, stats, batch, drop_last=False, seed=cfg.seed, **kw)
        bn_loader = data.ClipLoader(traj, train_eps, stats, batch, seed=cfg.seed + 1, **kw)
    cli.check_batches(loader, cfg.batch_size)
    for message in dict.fromkeys(str(w.message) for w in caught if rank == 0):
        print(f"note: {message}")
    return train_eps, val_eps, stats, (loader, val_loader, bn_loader)


def epoch_steps(cfg: TrainConfig, rank: int, world: int, timings: dict) -> int:
    """Optimiser steps in one epoch of the training clips of cfg's dataset (collected first if missing)."""
    with ensure_dataset(cfg, rank, timings) as traj:
        train_eps, _ = split(cfg, traj)
        stats = data.action_stats(traj, train_eps)
        kw = {**clip_shape(PRESETS[cfg.preset]), "cache": False, "world_size": world, "rank": rank, "prefetch": 0}
        return len(data.ClipLoader(traj, train_eps, stats, cfg.batch_size // world, **kw))


# --- main


def main(cfg: TrainConfig) -> dict:
    """Train and return summary.json's content; `cleanup` releases the folder's lock and the signal handlers."""
    check_config(cfg)
    with ExitStack() as cleanup:
        return run(cfg, cleanup)


def run(given: TrainConfig, cleanup: ExitStack) -> dict:
    t_start, timings = time.time(), {"collect_seconds": 0.0}
    device, rank, world = cli.setup_device(given.device)
    say = print if rank == 0 else (lambda *a, **k: None)
    cfg, ckpt = setup_run(given, cleanup, device, rank, world, say, timings)
    ckpt_path, metrics_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "metrics.jsonl")
    traj = ensure_dataset(cfg, rank, timings, say)
    mcfg = model_config(cfg, traj.action_dim)
    train_eps, val_eps, stats, (loader, val_loader, bn_loader) = make_loaders(cfg, traj, mcfg, rank, world, ckpt, say)
    torch.manual_seed(cfg.seed)
    model = use_fast_attention(LeWM(mcfg).to(device))  # same maths, a faster kernel in bf16 on CPUs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    sigreg = SIGReg(num_proj=cfg.num_proj).to(device)
    step, seconds_before = cli.resume_run(ckpt, ckpt_path, cfg.env, cfg.data, asdict(mcfg), model, opt, say)
    if rank == 0:  # the final config, printed and saved; metrics.jsonl cut back to the step the run starts from
        cli.write_json(os.path.join(cfg.out_dir, "config.json"), {"train": asdict(cfg), "model": asdict(mcfg)})
        cli.trim_metrics(metrics_path, step)
        print(json.dumps(asdict(cfg)))
    say(
        f"model {cfg.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {len(train_eps)} "
        f"train / {len(val_eps)} val episodes | {len(loader.starts)} train clips, {len(loader)} steps/epoch | "
        f"{cfg.max_steps} steps on {device} x{world}\n{cli.loader_note(loader, cfg.loader_workers)}"
    )
    raw_model, model = model, cli.wrap_model(model, device, world, cfg.compile)  # raw_model: saved and validated
    fields = {"model_config": asdict(mcfg), "train_config": asdict(cfg), "action_stats": stats, "env": cfg.env}
    fields["val_episodes"] = [int(e) for e in val_eps]
    save = functools.partial(cli.save_run, ckpt_path, raw_model, opt, device=device, rank=rank, **fields)
    warmup_steps = max(1, int(cfg.warmup * cfg.schedule_steps))
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    log = bar.write if rank == 0 else say
    stop = cli.stop_on_signals(cleanup, log)
    model.train()
    batches, last = loader.steps(step), {}
    # ms_per_step times the steps alone (the wait for the batch included), over the steps since the last log line:
    # validation, checkpoints and a resume in the middle of an interval leave it as it is.
    busy, since_log = 0.0, 0
    t_loop = time.time()  # train_seconds: this loop's wall time plus seconds_before, the resumed runs' loops
    while step < cfg.max_steps:
        t_step = time.time()
        lr = lr_at(step, cfg.lr, warmup_steps, cfg.schedule_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        pixels, actions = next(batches)
        pixels, actions = raw_model.preprocess(pixels.to(device, non_blocking=True)), actions.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, parts = lewm_loss(model, pixels, actions, sigreg, cfg.lambd)
        cli.check_finite(loss, parts, None, step, ckpt_path)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        cli.check_finite(loss, parts, grad_norm, step, ckpt_path)
        opt.step()
        step += 1
        busy, since_log = busy + time.time() - t_step, since_log + 1
        bar.update(1)

        end = step == cfg.max_steps
        if step % cfg.log_every == 0 or end:
            dt, busy, since_log = busy / since_log, 0.0, 0
            last = cli.metrics_row(step, loss, parts, grad_norm, lr, dt, cfg.batch_size, cfg.lambd)
            log(
                f"step {step:6d} | loss {last['loss']:.4f} | pred {last['pred_loss']:.4f} | sigreg "
                f"{last['sigreg_loss']:.3f} | lr {lr:.2e} | {last['ms_per_step']:.0f} ms/step | "
                f"{last['samples_per_s']:.0f} samples/s"
            )
        if step % cfg.eval_every == 0 or end:
            if cfg.bn_batches:
                refresh_bn_stats(raw_model, bn_loader, cfg, device, cfg.bn_batches)
            last = {**last, "step": step, **validate(raw_model, val_loader, sigreg, cfg, device, cfg.val_batches)}
            log(
                f"step {step:6d} | val loss {last['val_loss']:.4f} | val pred {last['val_pred_loss']:.4f}"
                f" | val sigreg {last['val_sigreg_loss']:.3f}"
            )
        if rank == 0 and (step % cfg.log_every == 0 or step % cfg.eval_every == 0 or end):
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
        kept = rank == 0 and cfg.keep_every and step % cfg.keep_every == 0 and not end
        cli.sync_stop(stop, device)  # under DDP every rank stops at the same step
        if step % cfg.ckpt_every == 0 or end or kept or stop:  # a kept copy or a stop needs this step's checkpoint
            save(step, train_seconds=seconds_before + time.time() - t_loop)
        if kept:
            cli.copy_file(ckpt_path, os.path.join(cfg.out_dir, f"ckpt_{step}.pt"))
        if stop and not end:
            cli.exit_after_signal(stop[0], step, ckpt_path, cli.resume_command(cfg, "train.py", given), bar, log)
    bar.close()

    summary = {"checkpoint": ckpt_path, "steps": step, "minutes": (time.time() - t_start) / 60, **timings}
    summary |= {"train_seconds": seconds_before + time.time() - t_loop, **last}
    if rank == 0:
        plot_metrics_png(metrics_path, os.path.join(cfg.out_dir, "metrics.png"))  # no plotting library needed
        cli.finish_run(summary, cfg.out_dir, cfg.env)
    if world > 1:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    with cli.exit_codes("train.py"):  # a wrong flag 2, a non-finite loss 1, a signal 128 + its number
        main(parse_args(sys.argv[1:]))
