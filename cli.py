"""Command-line and run-folder plumbing shared by train.py, evaluate.py, analyses.py, policy.py and collect.py:
none of it is the method, all of it is how the scripts behave at a terminal and on disk.

- Flags from a config dataclass: `add_config_flags` makes one `--field` per field, the trailing comment its help,
  booleans as `--x/--no-x` (the dataclass is the single source of truth); `check_fields` validates them and
  `UsageError` is what a script prints as one line before exiting with code 2 (`exit_codes`).
- Devices and DDP: `pick_device` (cuda > mps > cpu), `setup_device` (torchrun's process group), `wrap_model` (DDP,
  global-batch BatchNorm, torch.compile), `sync_stop`.
- Outputs: checked by creating a file where they go (`check_writable_file`) and never one of the inputs
  (`check_output`); atomic JSON writes that remove their temporary file on failure, and a fallback copy of finished
  results whose own file cannot be written (`save_json`, `save_checkpoint_or_copy`).
- Run folders: a lock held for the whole run (`lock_file`, also collection's), refusal of a folder holding another
  run, removal of the temporary files of dead writers, `metrics.jsonl` reading and trimming.
- Signals and resume: Ctrl-C / SIGTERM finish the current step, and the command that resumes the run.
- A training run's plumbing: its dataset files opened and checked (`open_dataset`: square frames; `data_errors`,
  `check_batches`: what the data cannot give is one line), what makes its batches (`loader_note`), checkpoints that
  resume exactly (model, optimiser, RNG) with their structure checked, held-out episodes and end step fixed by the
  checkpoint (`load_resume`, `held_out_split`), finite checks, metrics rows, summary.json.

Below the scripts, above the library files it serves: it imports data.py (datasets, and `UsageError`, defined there
and re-exported here), model.py (checkpoint files) and sigreg.py (an all-reduce with a gradient, for the
global-batch BatchNorm); none of them imports it.
"""

import argparse
import dataclasses
import inspect
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import ExitStack, contextmanager
from typing import get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import data
from data import UsageError
from model import check_checkpoint, check_state_dict, load_checkpoint, save_checkpoint
from sigreg import AllReduceSum

DEVICES = ["auto", "cuda", "mps", "cpu"]  # the valid values of every script's --device
# Config fields that, when not given, are resolved from the machine (train.py's --loader_workers, from its cores): a
# resume command names them only when given, so that the resumed run resolves them again on its own machine.
MACHINE_FIELDS = ("loader_workers",)

# --- arguments: flags from config dataclasses, checked before any work


def check_fields(cfg, choices: dict, ranges: dict) -> None:
    """Raise UsageError naming the flag and value for a non-finite float, an invalid choice or a value out of range
    among the fields of the dataclass `cfg`; ranges: name -> (description, predicate)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:  # not given: resolved later from a preset
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{f.name} {value}: must be a finite number")
        if f.name in choices and value not in choices[f.name]:
            raise UsageError(f"--{f.name} {value!r}: invalid choice; valid: {', '.join(map(repr, choices[f.name]))}")
        if f.name in ranges and not ranges[f.name][1](value):
            raise UsageError(f"--{f.name} {value}: must be {ranges[f.name][0]}")


def check_device(name: str) -> None:
    """--device names one that exists here."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available (use --device auto or cpu)")


def check_files(paths: dict[str, str]) -> None:
    """Every path given ({flag: path}, '' = not given) is an existing file."""
    for flag, path in paths.items():
        if path and not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such file")


def check_writable_file(path: str, flag: str) -> None:
    """`path` can be created or replaced: not a folder, and a file can really be created in its nearest existing
    parent folder (tried and removed: `os.access` says yes to root where nothing can be written, as in /proc)."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
        parent = os.path.dirname(parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_check", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create a file in {parent} ({e.strerror})") from None


def same_file(a: str, b: str) -> bool:
    """`a` and `b` name the same file (the same path, or links to one file)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def check_output(path: str, flag: str, inputs: dict[str, str]) -> None:
    """An output file: never one of the input files {flag: path} ('' = not given), and can be written."""
    for other, given in inputs.items():
        if given and same_file(path, given):
            raise UsageError(f"{flag} {path}: is the {other} input; it would be destroyed, choose another file")
    check_writable_file(path, flag)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and every flag's default after its help text."""


def field_comments(cls) -> dict[str, str]:
    """The trailing comment of every field of the dataclass `cls` (`name: type = default  # comment`)."""
    found = (re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)", line) for line in inspect.getsource(cls).splitlines())
    return {m[1]: m[2] for m in found if m}


def add_config_flags(
    parser: argparse.ArgumentParser, cls, *, names=None, choices=None, nargs=None, metavars=None
) -> None:
    """One flag per field of the config dataclass `cls` (only those in `names`, if given): `--field value`, typed as
    the default (or as the annotation when the default is None); booleans as --field/--no-field (also `bool |
    None`, None meaning not given); tuples take `nargs[field]` values (default: one or more). The field's trailing
    comment is the help text, followed by the default; `choices[field]` (None, meaning not given, left out) are
    enforced and listed."""
    helps, choices, nargs, metavars = field_comments(cls), choices or {}, nargs or {}, metavars or {}
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        if isinstance(f.default, bool) or f.type == (bool | None):
            kind = {"action": argparse.BooleanOptionalAction}
        elif isinstance(f.default, tuple):
            kind = {"nargs": nargs.get(f.name, "+"), "metavar": metavars.get(f.name)}
        else:
            types = [t for t in get_args(f.type) if t is not type(None)]
            kind = {"type": type(f.default) if f.default is not None else types[0]}
            if f.name in choices:
                kind["choices"] = [c for c in choices[f.name] if c is not None]
        text = helps.get(f.name, "").replace("%", "%%")
        parser.add_argument(f"--{f.name}", default=f.default, help=text, **kind)


# --- devices and DDP


def pick_device(name: str) -> torch.device:
    """`name`, or for "auto" the best available: CUDA (the device of this torchrun rank, LOCAL_RANK) > MPS > CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_device(name: str) -> tuple[torch.device, int, int]:
    """(device, rank, world size); under torchrun the process group is started (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(name)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device, dist.get_rank() if world > 1 else 0, world


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics cover the global batch of all ranks (SyncBatchNorm is GPU-only).

    Under DDP this makes the projectors see the same statistics as one process with the whole batch, so a
    torchrun run computes the same loss as a single-process run. Same parameters and buffers as BatchNorm1d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        x32 = x.float()
        sums = AllReduceSum.apply(torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_ones(1) * x.shape[0]]))
        c = x.shape[1]
        n = sums[-1]
        mean, var = sums[:c] / n, sums[c : 2 * c] / n - (sums[:c] / n) ** 2  # (C,), biased variance
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        return ((x32 - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias).to(x.dtype)


def wrap_model(model: nn.Module, device: torch.device, world: int, compile_model: bool) -> nn.Module:
    """The model the loop steps: DDP-wrapped under torchrun, compiled with --compile (the raw one is saved)."""
    if world > 1:
        # DEVIATION: BN statistics over the global batch under DDP (Lightning's default is per-GPU statistics), so
        # a torchrun run computes the same loss as one process with the whole batch.
        for m in model.modules():
            if type(m) is nn.BatchNorm1d:
                m.__class__ = GlobalBatchNorm1d
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if compile_model else model


def sync_stop(stop: list, device) -> None:
    """Under DDP every rank stops at the same step when any of them got the signal (one process: nothing to do)."""
    if not dist.is_initialized():
        return
    flag = torch.tensor([stop[0] if stop else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag) and not stop:
        stop.append(int(flag))


# --- run folders


def lock_file(path: str, flag: str, what: str, cleanup: ExitStack) -> None:
    """Hold an exclusive lock on the file `path` (created, with its folder) until `cleanup` closes: a second
    process asking for it is refused with a UsageError naming `flag` and `what` it is used by. The operating system
    drops the lock when the process ends, however it ends (kill -9 included)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        f = cleanup.enter_context(open(path, "a+"))
    except OSError as e:
        raise UsageError(f"{flag}: cannot write {path} ({e.strerror})") from e
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): nothing is locked
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise UsageError(f"{flag}: in use by another {what} (pid {f.read().strip() or '?'})") from None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()


def lock_run_folder(out_dir: str, cleanup: ExitStack) -> None:
    """Hold an exclusive lock on <out_dir>/.lock until `cleanup` closes: a second run on the folder is refused. A
    folder this call creates is removed again if the run ends before writing anything into it (a refused command
    leaves nothing behind)."""
    if not os.path.isdir(out_dir):
        cleanup.callback(remove_if_unused, out_dir)  # registered first, so it runs after the lock file is closed
    lock_file(os.path.join(out_dir, ".lock"), f"--out_dir {out_dir}", "run", cleanup)


def remove_if_unused(folder: str) -> None:
    """Remove `folder` if it holds nothing but its lock file."""
    try:
        if os.listdir(folder) == [".lock"]:
            os.remove(os.path.join(folder, ".lock"))
            os.rmdir(folder)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    """A process `pid` exists (ours included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def remove_orphans(folder: str) -> None:
    """Remove the temporary files (`NAME.tmp<pid>`) that a process killed mid-write, or failing on a full disk,
    left in `folder`: only those whose process is gone, and say so."""
    for name in sorted(os.listdir(folder)):
        m = re.fullmatch(r".+\.tmp(\d+)", name)
        if m and (int(m[1]) == os.getpid() or not pid_alive(int(m[1]))):
            remove_quietly(os.path.join(folder, name))
            print(f"{folder}: removed {name}, left by an interrupted write (process {m[1]} is gone)")


def prepare_run_folder(out_dir: str, resume: bool, overwrite: bool, cleanup: ExitStack) -> None:
    """Lock the run folder and remove the temporary files of dead writers; refuse a folder holding a run unless
    resuming, or empty it for --overwrite."""
    lock_run_folder(out_dir, cleanup)
    remove_orphans(out_dir)
    found = [n for n in ("ckpt.pt", "metrics.jsonl", "config.json") if os.path.exists(os.path.join(out_dir, n))]
    if found and not resume and not overwrite:
        raise UsageError(
            f"--out_dir {out_dir}: already holds a run ({', '.join(found)}); pass --resume to "
            "continue it or --overwrite to start afresh"
        )
    if overwrite:
        for n in (*found, "metrics.png", "summary.json"):
            if os.path.exists(os.path.join(out_dir, n)):
                os.remove(os.path.join(out_dir, n))


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


def trim_metrics(path: str, step: int) -> None:
    """Keep only the rows of metrics.jsonl up to the step the run (re)starts from."""
    if os.path.exists(path):
        rows = [r for r in read_metrics(path) if r["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)  # atomic: a kill now leaves the old file or the new one


def remove_quietly(path: str) -> None:
    """Remove a temporary file of ours if it is there (on a failure path: nothing more to report)."""
    try:
        os.remove(path)
    except OSError:
        pass


def write_json(path: str, obj) -> None:
    """Write obj as indented JSON, creating the folder; atomically (temporary file, then rename). On failure the
    temporary file is removed and the target is untouched."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise


def copy_file(src: str, dst: str) -> None:
    """Copy `src` to `dst` atomically (a temporary file, then rename; removed on failure): a kept checkpoint is
    whole or absent."""
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        remove_quietly(tmp)
        raise


def fallback_copy(write, suffix: str) -> str:
    """When a finished result's own file cannot be written: `write(path)` it to a new file in the working folder,
    else in the system's temporary folder. Returns the copy's path ('' when neither can be written)."""
    for folder in (os.getcwd(), tempfile.gettempdir()):
        try:
            fd, path = tempfile.mkstemp(prefix="results_", suffix=suffix, dir=folder)
            os.close(fd)
        except OSError:
            continue
        try:
            write(path)
            return path
        except OSError:
            remove_quietly(path)
    return ""


def save_json(results: dict, out: str) -> None:
    """write_json, and say where the results went; when the write fails (a full disk, a folder gone), the results
    go to a fallback copy (printed when none can be written) and a UsageError says where."""
    try:
        write_json(out, results)
    except OSError as e:
        copy = fallback_copy(lambda path: write_json(path, results), ".json")
        if not copy:
            print(json.dumps(results))
        where = copy or "stdout (the line above)"
        raise UsageError(f"cannot write {out} ({e.strerror}); the results are saved in {where}") from e
    print(f"results: {out}")


def save_checkpoint_or_copy(path: str, ckpt: dict) -> None:
    """save_checkpoint for a finished result (a trained policy): when it fails, a copy goes to fallback_copy and a
    UsageError says where."""
    try:
        save_checkpoint(path, ckpt)
    except OSError as e:
        where = fallback_copy(lambda p: save_checkpoint(p, ckpt), ".pt") or "no file (none could be written)"
        raise UsageError(f"cannot write {path} ({e.strerror}); the result is saved in {where}") from e


# --- signals, exit codes and resume


@contextmanager
def exit_codes(script: str):
    """Around a script's main: a UsageError is one line and exit code 2, a FloatingPointError (a non-finite loss)
    one line and 1, Ctrl-C or SIGTERM (during collection, or a second one) 128 + the signal's number."""
    try:
        yield
    except UsageError as e:
        print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"{script}: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))


def stop_on_signals(cleanup: ExitStack, log) -> list:
    """SIGINT / SIGTERM: finish the current step, checkpoint, exit (the returned list gets the signal number). A
    second signal stops at once (the last checkpoint stays valid: checkpoints are written atomically)."""
    stop = []

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        log(f"{signal.Signals(signum).name}: stopping after this step (again to stop now)")

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            cleanup.callback(signal.signal, s, signal.signal(s, on_signal))
    return stop


def resume_command(cfg, script: str, given=None) -> str:
    """The command that resumes the run of `python script` with the config dataclass `cfg`: every flag that
    differs from its default, and --resume; a field of MACHINE_FIELDS only when `given` (the config as parsed,
    before it was resolved) sets it."""
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("resume", "overwrite") or value == f.default:
            continue
        if given is not None and f.name in MACHINE_FIELDS and getattr(given, f.name) is None:
            continue
        flags += (
            [f"--{f.name}" if value is True else f"--no-{f.name}"]
            if isinstance(value, bool)
            else [f"--{f.name}", shlex.quote(str(value))]
        )
    return " ".join([f"python {script}", *flags, "--resume"])


# --- a training run: its data files, checkpoints, finite checks, metrics rows, its end


def open_dataset(path: str, flag: str) -> data.Trajectories:
    """The dataset file `path` opened and checked: readable, square frames (the model takes square images; a
    non-square frame would be squashed). Errors are one UsageError line naming `flag`."""
    try:
        traj = data.Trajectories(path)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"{flag} {path}: {e}") from e
    if traj.img_shape[0] != traj.img_shape[1]:
        h, w = traj.img_shape[:2]
        traj.close()
        raise UsageError(f"{flag} {path}: frames are {h}x{w} px, not square; collect square frames (--img_size)")
    return traj


def open_data(paths: dict[str, str], env: str, img_size: int, say=None) -> data.Trajectories:
    """The dataset files {flag: path} ('' = none) opened and checked (open_dataset) to hold `env`, read as one file
    (a data.TrajectoryUnion, episodes numbered file after file) when there are several; errors name the flag.
    `say`: where notes on the first file go (no env recorded, frames of another size than `img_size`)."""
    parts, given = [], [(flag, path) for flag, path in paths.items() if path]
    for flag, path in given:
        parts.append(open_dataset(path, flag))
        data.check_env(parts[-1], env)
    try:
        traj = data.TrajectoryUnion(parts) if len(parts) > 1 else parts[0]
    except ValueError as e:  # a later file of another frame size or action dim than the first
        raise UsageError(f"{given[-1][0]} {given[-1][1]}: {e}") from e
    first = parts[0].path
    if say is not None and "env" not in traj.file.attrs:
        say(f"note: {first} does not record its environment; trusting --env {env}")
    if say is not None and traj.img_shape[0] != img_size:
        say(f"note: {first} holds {traj.img_shape[0]} px frames; the model resizes them to {img_size} px")
    return traj


@contextmanager
def data_errors(flag: str):
    """What the data cannot give (no clip fits its episodes, fewer clips than a batch) as one UsageError line."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from e


def check_batches(loader: data.ClipLoader, batch_size: int) -> None:
    """The training episodes give at least one batch of clips (else the first step would fail)."""
    if len(loader) == 0:
        raise UsageError(
            f"--batch_size {batch_size}: above the {len(loader.starts)} training clips of the data; lower it"
        )


def loader_note(loader: data.ClipLoader, workers: int) -> str:
    """The line saying what assembles the training batches: `loader.processes` worker processes or the background
    thread, and why not the `workers` asked for (--loader_workers) when they are not used."""
    n = loader.processes
    how = f"{n} worker process{'es' if n > 1 else ''}" if n else "a background thread"
    why = ", as the frames are in RAM" if loader.in_ram else ", as this platform cannot fork"
    why = why if workers and not n else ""
    return f"training batches: {how} (--loader_workers {workers}{why})"


def save_run(path: str, model: nn.Module, opt: torch.optim.Optimizer, step: int, device, rank: int, **fields) -> None:
    """Checkpoint the raw model, the optimiser, the step and the RNG state with `fields` (rank 0 writes, atomically;
    every rank refuses non-finite weights, which are never saved): plain data, loads with weights_only=True."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise FloatingPointError(
            f"non-finite weights at step {step} ({', '.join(bad[:3])}, ...); not saved. "
            f"The last good checkpoint {path} is untouched; try a lower --lr"
        )
    if rank == 0:
        rng = {"torch": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state()
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": rng}
        try:
            save_checkpoint(path, {**state, **fields})
        except OSError as e:  # a full disk: the temporary file is gone, the last checkpoint is whole
            raise UsageError(
                f"cannot write {path} at step {step} ({e.strerror}); the last checkpoint there is untouched: free "
                "space and rerun with --resume"
            ) from e


def load_resume(resume: bool, ckpt_path: str, max_steps: int, say) -> dict | None:
    """With --resume, the checkpoint to continue, its structure checked (None: starting afresh). A finished run
    (its step is --max_steps) says so and exits 0, changing nothing; a --max_steps below its step is refused."""
    if not resume or not os.path.exists(ckpt_path):
        if resume:
            say(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
        return None
    try:
        ckpt = load_checkpoint(ckpt_path)
        check_checkpoint(ckpt, ckpt_path, keys=("optimizer", "rng", "step", "train_config", "env"))
    except ValueError as e:
        raise UsageError(f"--resume: {e}") from e
    if max_steps < ckpt["step"]:
        raise UsageError(f"--max_steps {max_steps}: {ckpt_path} is already at step {ckpt['step']}; give that or more")
    if max_steps == ckpt["step"]:
        say(f"{ckpt_path}: the run is finished at step {ckpt['step']}; nothing to do (a larger --max_steps goes on)")
        raise SystemExit(0)
    return ckpt


def held_out_split(num_episodes: int, val_fraction: float, ckpt: dict | None, say) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) episodes of a dataset: data.split_episodes, except on resume, where the checkpoint's held-out
    episodes stay held out (another --val_fraction, or a file grown by --append, would move trained-on episodes
    into the held-out set that evaluation uses); the difference is said. Episodes appended since go to training;
    the action statistics stay the checkpoint's (train.make_loaders)."""
    train_eps, val_eps = data.split_episodes(num_episodes, val_fraction)
    if ckpt is None or "val_episodes" not in ckpt:
        return train_eps, val_eps
    held = np.sort(np.asarray(ckpt["val_episodes"], dtype=np.int64))
    if len(held) and held.max() >= num_episodes:
        raise UsageError(f"--resume: the checkpoint holds out episode {held.max()}, the data has {num_episodes}")
    if not np.array_equal(held, val_eps):
        say(
            f"--resume: keeping the checkpoint's {len(held)} held-out episodes (--val_fraction {val_fraction} on "
            f"these {num_episodes} episodes would hold out {len(val_eps)} others)"
        )
    return np.setdiff1d(np.arange(num_episodes), held), held


def resume_run(ckpt: dict | None, ckpt_path: str, env: str, data_path: str, model_config: dict, model, opt, say):
    """Load a `load_resume` checkpoint into model and optimiser, and its RNG state, refused for another env,
    dataset or model config. Returns its step and the seconds its optimisation loop had run (0.0 if it does not
    say); (0, 0.0) when starting afresh (ckpt None)."""
    if ckpt is None:
        return 0, 0.0
    saved_data, saved_model = ckpt["train_config"]["data"], ckpt["model_config"]
    if ckpt["env"] != env:
        raise UsageError(f"--env {env}: {ckpt_path} is a {ckpt['env']} run; resume it with --env {ckpt['env']}")
    if os.path.realpath(saved_data) != os.path.realpath(data_path):
        raise UsageError(f"--data {data_path}: {ckpt_path} was trained on {saved_data}; resume it with that --data")
    if saved_model != model_config:
        diff = {k: (v, saved_model.get(k)) for k, v in model_config.items() if saved_model.get(k) != v}
        raise UsageError(f"--resume: {ckpt_path} has another model config; (now, checkpoint): {diff}")
    try:
        check_state_dict(model, ckpt["model"], ckpt_path)
    except ValueError as e:
        raise UsageError(f"--resume: {e}") from e
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if next(model.parameters()).is_cuda and "cuda" in ckpt["rng"]:
        torch.cuda.set_rng_state(ckpt["rng"]["cuda"])
    say(f"resumed from {ckpt_path} at step {ckpt['step']}")
    return ckpt["step"], ckpt.get("train_seconds", 0.0)


def check_finite(loss, parts: dict, grad_norm, step: int, ckpt_path: str) -> None:
    """Stop (before the update) on a non-finite loss or gradient norm; the last good checkpoint is untouched."""
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss {loss.item()} at step {step} (pred_loss {parts['pred_loss'].item()}, sigreg_loss "
            f"{parts['sigreg_loss'].item()}); stopping. The last good checkpoint {ckpt_path} is untouched; "
            "try a lower --lr or --no-bf16."
        )
    if grad_norm is not None and not torch.isfinite(grad_norm):  # the same on every rank: all-reduced gradients
        raise FloatingPointError(
            f"non-finite gradient norm {grad_norm.item()} at step {step}; stopping before the update. The last "
            f"good checkpoint {ckpt_path} is untouched; try a lower --lr or --no-bf16."
        )


def metrics_row(step: int, loss, parts: dict, grad_norm, lr: float, seconds: float, batch: int, lambd: float) -> dict:
    """The metrics.jsonl row of a logged step: the losses of the global batch (under DDP the prediction loss is
    averaged over ranks here; SIGReg is already global), the gradient norm, lr and speed (`seconds` per step)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(parts["pred_loss"])
        parts["pred_loss"] /= dist.get_world_size()
        loss = parts["pred_loss"] + lambd * parts["sigreg_loss"]
    row = {"step": step, "loss": loss.item(), "pred_loss": parts["pred_loss"].item()}
    row |= {"sigreg_loss": parts["sigreg_loss"].item(), "grad_norm": grad_norm.item(), "lr": lr}
    return row | {"ms_per_step": 1000 * seconds, "samples_per_s": batch / seconds}


def exit_after_signal(signum: int, step: int, ckpt_path: str, resume: str, bar, log) -> None:
    """After a signal and its checkpoint: say how to resume, exit with 128 + signum (130 Ctrl-C, 143 SIGTERM)."""
    bar.close()
    log(f"interrupted at step {step}: checkpoint {ckpt_path}\nresume with: {resume}")
    raise SystemExit(128 + signum)


def finish_run(summary: dict, out_dir: str, env: str) -> None:
    """The end of a training run: <out_dir>/summary.json (atomically), and lines saying steps, wall times, final
    validation losses and the command that evaluates the model."""
    write_json(os.path.join(out_dir, "summary.json"), summary)
    nan = float("nan")
    print(
        f"done: {summary['steps']} steps in {summary['minutes']:.1f} min (training {summary['train_seconds'] / 60:.1f}"
        f" min, collection {summary['collect_seconds'] / 60:.1f} min) | val pred_loss "
        f"{summary.get('val_pred_loss', nan):.4f} | val sigreg {summary.get('val_sigreg_loss', nan):.3f} | model: "
        f"{summary['checkpoint']}"
    )
    print(f"next: python evaluate.py --ckpt {summary['checkpoint']} --env {env}")
