"""Collect trajectory datasets with the environments' scripted policies: several processes, resumable after any
interruption, the same file whatever the number of workers (docs/envs.md §6).

Serves train.py (a missing dataset is collected first), evaluate.py (our simulator's data for a released model) and
the command line; the layout it writes and every reader of it are data.py's. Episode e is rolled out with
`np.random.default_rng(seed + e)`; each finished episode is saved at once as its own part file in `<out>.parts/`
(a temporary name, then a rename), and when all are there they are merged in order into `<out>`. Running the same
command again after Ctrl-C, SIGTERM, `kill -9` or a crash collects only the missing parts. A collection holds
`<out>.lock` while it runs: a second one to the same `<out>` is refused.

Run (`python data.py ...` runs the same command):
    python collect.py --env pusht --episodes 1000 --img_size 64 --out data/pusht_64.h5
    python collect.py --env pusht --episodes 200 --out data/pusht_64.h5 --append   # 200 more, same seed stream
    python collect.py --env pusht --episodes 1500 --policy play --noise 0.4 --episode_steps 100   # PushT exploration
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import ExitStack

import h5py
import numpy as np
from tqdm import tqdm

import data
import envs
from cli import HelpFormatter, UsageError, check_writable_file, lock_file, remove_quietly
from data import Trajectories, append_episode, default_data_path

# --- one episode, in a worker process

_worker_env: tuple | None = None  # ((name, img_size), env): one env per worker process, reused across episodes


def _rollout(job: tuple) -> dict[str, np.ndarray]:
    """Roll out one episode with the env's scripted policy; returns its columns (T steps -> T+1 rows)."""
    global _worker_env
    name, img_size, policy, noise, episode_steps, episode_seed = job
    if _worker_env is None or _worker_env[0] != (name, img_size):
        _worker_env = ((name, img_size), envs.make_env(name, img_size=img_size))
    env = _worker_env[1]
    rng = np.random.default_rng(episode_seed)  # the episode's own stream: results do not depend on worker count
    obs, info = env.reset(seed=int(rng.integers(2**31 - 1)))
    pi = envs.make_policy(name, env, kind=policy, noise=noise, rng=rng)
    pi.reset(info)
    frames, infos, actions = [obs], [info], []
    for _ in range(episode_steps):
        a = np.asarray(pi(info), dtype=np.float32)
        if getattr(pi, "done", False):  # the policy's own end of episode (PushT demo: the T is placed)
            break
        obs, _, terminated, truncated, info = env.step(a)
        frames.append(obs)
        infos.append(info)
        actions.append(a)
        if truncated or (terminated and envs.REGISTRY[name].stop_on_success):
            break
    nan_row = np.full((1, len(actions[0])), np.nan, dtype=np.float32)  # no action is taken at the last observation
    episode = {"pixels": np.stack(frames), "action": np.concatenate([np.stack(actions), nan_row])}
    for key in infos[0]:
        column = key.replace("/", "_")  # as the official recorder sanitises keys
        if column not in episode and column not in data.INDEX_COLUMNS + data.EPISODE_COLUMNS + ("step_idx",):
            episode[column] = np.stack([np.asarray(i[key]) for i in infos])
    return episode


def _init_worker() -> None:
    """Workers leave Ctrl-C to the main process, which stops them; they also die with it, however it ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler: Pool.terminate() must end a worker
    parent = os.getppid()

    def watch() -> None:  # a worker whose parent was killed (kill -9 included) exits within 0.2 s
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _start_pool(workers: int):
    """Worker processes, all started now; `terminate()` stops them at once, mid-episode."""
    # fork where available: workers start instantly and need no importable __main__; they never touch torch.
    context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return context.Pool(workers, initializer=_init_worker)


# --- part files: one finished episode each, merged in order at the end


def _part_path(parts: str, e: int) -> str:
    return os.path.join(parts, f"episode_{e:07d}.h5")


def _write_part(path: str, episode: dict[str, np.ndarray]) -> None:
    """One finished episode in its own file, written under a temporary name, synced, then renamed: a part file that
    exists is complete, whenever the collection was killed."""
    tmp = f"{path}.tmp{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        for c, x in episode.items():
            f.create_dataset(c, data=x, **(data.PIXEL_COMPRESSION if c == "pixels" else {}))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _collect_part(job: tuple) -> int:
    """Roll out one episode and save it as a part file; returns its index."""
    path, rollout_job = job
    _write_part(path, _rollout(rollout_job))
    return int(path.rsplit("_", 1)[1].split(".")[0])


def _check_settings(f: h5py.File, meta: dict) -> None:
    """Appending must use the settings the file was collected with (they are its attributes)."""
    stored = {k: v.item() if isinstance(v, np.generic) else v for k, v in f.attrs.items() if k in meta}
    if stored != meta:
        raise UsageError(f"{f.filename}: collected with {stored}, not {meta}; use the same settings or another --out")


def _read_meta(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError:  # torn by a kill: it is rewritten below
        return None


def _write_json(path: str, obj: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _merge(
    parts: str, base: str | None, first: int, target: int, tmp: str, meta: dict, pixel_format: str = "gzip"
) -> list[int]:
    """Write `tmp`: the episodes of `base` (appending) then the parts first..target-1, in order, a new file's pixels
    in `pixel_format` (the parts are always gzip). Returns the indices of unreadable part files (deleted, to be
    collected again); empty when `tmp` is complete."""
    if base:
        shutil.copyfile(base, tmp)
    bad = []
    with h5py.File(tmp, "a" if base else "w") as f:
        if not base:
            f.attrs.update(meta)
        for e in range(first, target):
            try:
                with h5py.File(_part_path(parts, e), "r") as p:
                    episode = {c: p[c][()] for c in p}
            except OSError:
                bad.append(e)
                os.remove(_part_path(parts, e))
                continue
            if not bad:
                append_episode(f, episode, pixel_format)
    return bad


# --- the collection


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received; `signum` says which (exit code 128 + signum, the shell convention)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


def check_collect_args(
    env: str,
    episodes: int,
    out: str,
    img_size: int,
    policy: str | None,
    noise: float | None,
    workers: int,
    episode_steps: int | None,
    seed: int = 0,
    pixel_format: str = "gzip",
) -> None:
    """Every collection argument checked before any work: a UsageError naming the flag and its value."""
    if env not in envs.REGISTRY:
        raise UsageError(f"--env {env}: unknown environment; valid: {', '.join(envs.REGISTRY)}")
    if policy is not None and policy not in envs.REGISTRY[env].policies:
        raise UsageError(f"--policy {policy}: not a policy of {env}; valid: {', '.join(envs.REGISTRY[env].policies)}")
    for flag, value, ok, rule in (
        ("--episodes", episodes, episodes >= 1, ">= 1"),
        ("--workers", workers, workers >= 1, ">= 1"),
        ("--seed", seed, seed >= 0, ">= 0"),
        ("--episode_steps", episode_steps, episode_steps is None or episode_steps >= 1, ">= 1"),
        ("--noise", noise, noise is None or (math.isfinite(noise) and noise >= 0), "finite and >= 0"),
    ):
        if not ok:
            raise UsageError(f"{flag} {value}: must be {rule}")
    try:
        data.pixel_compression(pixel_format)
    except ValueError as e:
        raise UsageError(f"--compression {pixel_format}: {e}") from e
    try:
        envs.make_env(env, img_size=img_size).close()
    except ValueError as e:
        raise UsageError(f"--img_size {img_size}: {e}") from e
    check_writable_file(out, "--out")


def _open_parts(out: str, parts: str, tmp: str, meta: dict, episodes: int, append: bool, progress) -> tuple:
    """Check `out` and an interrupted collection's `parts` folder against this request; create or clean the folder.
    Returns (first, target, state): the episodes [first, target) to collect and the progress record."""
    first = 0
    if append:
        if not os.path.isfile(out):
            raise UsageError(f"--out {out}: nothing to append to (--append needs an existing file)")
        with Trajectories(out) as traj:
            _check_settings(traj.file, meta)
            first = traj.num_episodes
    elif os.path.exists(out):
        raise UsageError(f"--out {out}: already exists; pass --append to add episodes, or delete it")
    target = first + episodes
    state = {**meta, "first": first, "target": target}
    if progress is not None and {k: progress.get(k) for k in state} != state:
        raise UsageError(
            f"{parts} holds an interrupted collection with {progress}, not {state}: rerun that "
            "command to finish it, or delete the folder"
        )
    os.makedirs(parts, exist_ok=True)
    _write_json(os.path.join(parts, "progress.json"), state)
    for name in os.listdir(parts):  # parts being written when the last run was killed
        if ".tmp" in name:
            os.remove(os.path.join(parts, name))
    if os.path.exists(tmp):
        print(f"{tmp}: partial file of an interrupted run; rebuilding it from {parts}")
    return first, target, state


def collect(
    env: str,
    episodes: int,
    out: str,
    img_size: int = 64,
    policy: str | None = None,
    noise: float | None = None,
    seed: int = 0,
    workers: int = 2,
    episode_steps: int | None = None,
    append: bool = False,
    pixel_format: str = "gzip",
) -> str:
    """Collect `episodes` episodes of `env` into `out` (or add them to it with `append`); returns `out`. A new file
    stores its pixels in `pixel_format` (data.PIXEL_FORMATS; appending keeps the file's own).

    Episode e (its position in the file) is rolled out with `np.random.default_rng(seed + e)`, so the content
    depends neither on `workers` nor on interruptions. Each finished episode is saved at once as its own part file
    in `<out>.parts/` (written under a temporary name, then renamed, so a part is complete whenever the process is
    killed); when all are there they are merged in order into `<out>.tmp`, renamed to `out`. Running the same
    command again after any interruption, `kill -9` included, collects only the missing parts.
    """
    out = os.fspath(out)
    check_collect_args(env, episodes, out, img_size, policy, noise, workers, episode_steps, seed, pixel_format)
    with ExitStack() as cleanup:  # a second collection to the same `out` is refused while this one runs
        lock_file(out + ".lock", f"--out {out}", "collection", cleanup)
        cleanup.callback(remove_quietly, out + ".lock")  # runs first (LIFO): removed while held
        settings = (img_size, policy, noise, seed, workers, episode_steps, append, pixel_format)
        return _collect_locked(env, episodes, out, *settings)


def _collect_locked(
    env, episodes, out, img_size, policy, noise, seed, workers, episode_steps, append, pixel_format
) -> str:
    """`collect`, its arguments checked and `<out>.lock` held."""
    spec = envs.REGISTRY[env]
    meta = {
        "env": env,
        "img_size": int(img_size),
        "policy": policy or spec.policy,
        "noise": float(spec.noise if noise is None else noise),
        "seed": int(seed),
        "episode_steps": int(episode_steps or spec.episode_steps),
    }
    tmp, parts = out + ".tmp", out + ".parts"
    progress = _read_meta(os.path.join(parts, "progress.json"))
    if progress and progress.get("merged") and os.path.isfile(out) and not os.path.exists(tmp):
        shutil.rmtree(parts)  # the previous run finished; it was killed while cleaning up
        print(f"{out}: complete (removed the leftover {parts})")
        return out
    first, target, state = _open_parts(out, parts, tmp, meta, episodes, append, progress)
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    pool = None
    try:
        while True:
            todo = [e for e in range(first, target) if not os.path.exists(_part_path(parts, e))]
            settings = (meta["img_size"], meta["policy"], meta["noise"], meta["episode_steps"])
            jobs = [(_part_path(parts, e), (env, *settings, seed + e)) for e in todo]
            with tqdm(total=target, initial=target - len(todo), desc=f"collect {env} {img_size}px", unit="ep") as bar:
                if min(workers, len(jobs)) > 1:
                    pool = _start_pool(min(workers, len(jobs)))
                    results = pool.imap_unordered(_collect_part, jobs)
                else:
                    results = map(_collect_part, jobs)
                for _ in results:
                    bar.update(1)
            if pool is not None:
                pool.close()
                pool.join()
                pool = None
            bad = _merge(parts, out if append else None, first, target, tmp, meta, pixel_format)
            if not bad:
                break
            print(f"{parts}: unreadable part files for episodes {bad}; collecting them again")
        Trajectories(tmp).close()  # validate before the file looks finished
        _write_json(os.path.join(parts, "progress.json"), {**state, "merged": True})
        os.replace(tmp, out)
        shutil.rmtree(parts)
    except KeyboardInterrupt:
        done = sum(os.path.exists(_part_path(parts, e)) for e in range(first, target))
        print(
            f"\ncollection interrupted: {done} of {target} episodes saved in {parts}; run the same command again "
            "to resume"
        )
        raise
    finally:
        if pool is not None:  # stop the workers now, mid-episode: their finished parts are already on disk
            pool.terminate()
            pool.join()
        for s, h in handlers.items():
            signal.signal(s, h)
    return out


def collect_missing(
    path: str,
    env: str,
    episodes: int,
    img_size: int,
    workers: int,
    label: str = "dataset",
    note: str = "",
    **policy,
) -> float:
    """Collect `path` if it is not on disk, saying so (`label` names it, `note` ends the line); `policy`: the
    policy, noise and episode_steps of `collect`. Returns the seconds spent collecting (0 when it existed)."""
    if os.path.exists(path):
        return 0.0
    kind = f"{policy['policy']!r} " if policy.get("policy") else ""
    print(f"{label} {path} not found: collecting {episodes} {kind}episodes of {env} at {img_size} px{note}")
    t0 = time.time()
    collect(env, episodes, path, img_size=img_size, workers=workers, **policy)
    return time.time() - t0


SIMULATOR_WORKERS = 2  # processes collecting our own data for a released model (evaluate.py --official, no --data)


def simulator_dataset(env: str, img_size: int, episodes: int) -> tuple[str, str]:
    """Our simulator's data for a released model: data/<env>_<img>px_<N>ep.h5 at the model's image size, with the
    env's default data policy, collected first if missing. Returns (path, where the data comes from in words)."""
    path = default_data_path(env, img_size, episodes)
    policy = envs.REGISTRY[env].policy
    if not os.path.exists(path):
        print(
            f"no --data: collecting {episodes} episodes of our {env} simulator at {img_size} px ({policy!r} "
            f"policy) into {path}"
        )
        collect(env, episodes, path, img_size=img_size, workers=SIMULATOR_WORKERS)
    source = (
        f"own simulator, collected by collect.collect({env!r}, episodes={episodes}, img_size={img_size}) with "
        f"the {policy!r} policy"
    )
    print(f"data: {path} ({source})")
    return path, source


# --- command line


def main(argv: list[str] | None = None) -> None:
    """Parse the collection flags, collect, print the file's path; a wrong flag is one line and exit code 2."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--env", required=True, choices=list(envs.REGISTRY), help="environment")
    parser.add_argument("--episodes", type=int, required=True, help="episodes to collect (to add, with --append)")
    parser.add_argument("--img_size", type=int, default=64, help="frame side in pixels (224 in the paper)")
    parser.add_argument("--out", default=None, help="output .h5 (default data/<env>_<img>px_<episodes>ep.h5)")
    parser.add_argument("--policy", default=None, help="scripted policy kind (default: the env's, envs.REGISTRY)")
    parser.add_argument("--noise", type=float, default=None, help="policy noise (default: the env's, envs.REGISTRY)")
    parser.add_argument("--episode_steps", type=int, default=None, help="max steps (default: the env's, envs.REGISTRY)")
    parser.add_argument("--seed", type=int, default=0, help="episode e uses np.random.default_rng(seed + e)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes rolling out episodes")
    parser.add_argument("--append", action="store_true", help="add --episodes episodes to an existing --out")
    parser.add_argument(
        "--compression",
        default="gzip",
        choices=data.PIXEL_FORMATS,
        help="pixel storage: gzip level 1 (any h5py reads it) or blosc-zstd (0.64x the size; needs "
        "pip install hdf5plugin to write and to read); --append keeps the file's own",
    )
    args = parser.parse_args(argv)
    out = args.out or default_data_path(args.env, args.img_size, args.episodes)
    try:
        collect(
            args.env,
            args.episodes,
            out,
            args.img_size,
            args.policy,
            args.noise,
            args.seed,
            args.workers,
            args.episode_steps,
            args.append,
            args.compression,
        )
    except UsageError as e:
        parser.exit(2, f"{os.path.basename(sys.argv[0])}: error: {e}\n")
    except KeyboardInterrupt as e:
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    print(out)


if __name__ == "__main__":
    main()
