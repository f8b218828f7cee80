"""Benchmarks: simulator steps/s, loader clips/s, size and clip read time per pixel storage format, training
samples/s and FLOP/s, seconds per CEM plan; and how close our renderers come to a frame of the reference renderer
(SSIM and mean absolute difference).

Run: python bench.py            (everything)
     python bench.py --only envs (one area: envs, data, decode, train, plan)
     python bench.py render-match --env pusht --image FRAME.png   (fit our renderer's state to a 224 px frame)
"""

import argparse
import os
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import replace

import h5py
import numpy as np
import torch

import collect
import data
import envs
from charts import load_png
from kernels import native_bf16, use_fast_attention
from model import PRESETS, LeWM
from planner import cem, make_cost
from train import clip_shape

# --- simulators


def bench_envs(sizes: tuple[int, ...] = (64, 224), seconds: float = 2.0) -> list[dict]:
    """Env steps/s including rendering the observation frame, uniform random actions, one process."""
    rows = []
    for name in envs.REGISTRY:
        for size in sizes:
            env = envs.make_env(name, img_size=size)
            rng = np.random.default_rng(0)
            env.reset(seed=0)
            steps, start = 0, None
            while start is None or time.perf_counter() - start < seconds:
                if start is None and steps == 20:  # warm-up (caches, first-step checks) excluded
                    steps, start = 0, time.perf_counter()
                _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
                if terminated or truncated:
                    env.reset()
                steps += 1
            rows.append({"env": name, "img_size": size, "steps_per_s": steps / (time.perf_counter() - start)})
            env.close()
    print(f"{'env':<10}{'img_size':>10}{'steps/s':>12}")
    for r in rows:
        print(f"{r['env']:<10}{r['img_size']:>10}{r['steps_per_s']:>12.0f}")
    return rows


# --- data loading


def _inflaters() -> dict[str, Callable[..., bytes]]:
    """The gzip inflaters data.Trajectories.read can use, by name: zlib's always, ISA-L's when isal is installed."""
    isal = data.isal_inflate()
    if isal is None:
        print("isal is not installed: no ISA-L rows (pip install isal)")
    return {"zlib": zlib.decompress} | ({"isal": isal} if isal else {})


def bench_data(
    env: str = "pusht",
    episodes: int = 30,
    sizes: tuple = (64, 224),
    batches: int = 20,
    workers: tuple = (0, 1, 2),
    decode_frames: int = 512,
    pixel_format: str = "gzip",
) -> list[dict]:
    """Collect a small dataset per frame size (pixels stored in `pixel_format`, data.PIXEL_FORMATS), then time the
    clip loader (batch 64) with pixels cached and streamed, each with the background thread (0) and with `workers`
    worker processes (1, 2), in clips/s; and the decode time per frame: `decode_frames` frames read in order (each
    chunk decompressed once) / frames. Streamed rows and decode times are given for each gzip inflater (`_inflaters`:
    zlib, and ISA-L when installed), as the main thread and worker processes use it; the background thread always
    inflates with zlib (data.inflater). A cached loader reads through h5py, so its row has none.

    Streamed reads run with no HDF5 chunk cache, as for a dataset far larger than RAM (the small file itself still
    sits in the OS page cache, so this measures decompression and assembly, not the disk). A cached loader uses
    the thread whatever its `workers` (data.ClipLoader), so its columns should agree.
    """
    rows, chosen, inflaters = [], data.inflater(), _inflaters()
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            start = time.perf_counter()
            out = os.path.join(tmp, f"{env}_{size}.h5")
            path = collect.collect(env, episodes, out, img_size=size, workers=2, pixel_format=pixel_format)
            info = {"env": env, "img_size": size, "episodes": episodes, "collect_s": time.perf_counter() - start}
            info["pixel_format"] = pixel_format
            info["file_MB"] = os.path.getsize(path) / 1e6
            runs = [("cached", None)] + [("streamed", name) for name in inflaters]
            try:
                for mode, name in runs:
                    row = {**info, "mode": mode, "inflate": name}
                    cache = mode == "cached"
                    data.INFLATE = inflaters.get(name, chosen)  # set before the readers (and workers) exist
                    with data.Trajectories(path, chunk_cache_bytes=data.READ_CACHE_BYTES if cache else 0) as traj:
                        if not cache:
                            n = min(decode_frames, traj.num_rows)
                            block = traj.file["pixels"].chunks[0] * max(1, 64 // traj.file["pixels"].chunks[0])
                            start = time.perf_counter()
                            for lo in range(0, n, block):  # whole chunks, in order
                                traj.read("pixels", np.arange(lo, min(lo + block, n)))
                            row["decode_ms_per_frame"] = 1000 * (time.perf_counter() - start) / n
                        episodes_all = range(traj.num_episodes)
                        stats = data.action_stats(traj, episodes_all)
                        for w in workers:
                            loader = data.ClipLoader(
                                traj, episodes_all, stats, cache=cache, workers=w, **clip_shape(PRESETS["paper"])
                            )
                            stream = loader.steps()
                            next(stream)  # warm-up: thread or worker start (and the RAM cache is already filled)
                            start = time.perf_counter()
                            for _ in range(batches):
                                next(stream)
                            row[f"clips_per_s_{w}"] = batches * loader.batch_size / (time.perf_counter() - start)
                            stream.close()
                    rows.append(row)
            finally:
                data.INFLATE = chosen
    names = {w: "thread" if w == 0 else f"{w} worker{'s' if w > 1 else ''}" for w in workers}
    widths = {"img": 5, "episodes": 10, "collect s": 11, "file MB": 9, "pixels": 10, "inflate": 9}
    widths |= {"decode ms/frame": 17} | {name: len(name) + 2 for name in names.values()}
    print(f"{'env':<8}" + "".join(f"{h:>{w}}" for h, w in widths.items()))
    for r in rows:
        decode = f"{r['decode_ms_per_frame']:>17.3f}" if "decode_ms_per_frame" in r else f"{'-':>17}"
        print(
            f"{r['env']:<8}{r['img_size']:>5}{r['episodes']:>10}{r['collect_s']:>11.1f}{r['file_MB']:>9.1f}"
            f"{r['mode']:>10}{r['inflate'] or '-':>9}{decode}"
            + "".join(f"{r[f'clips_per_s_{w}']:>{widths[name]}.0f}" for w, name in names.items())
        )
    print("(clips/s by the background thread and by worker processes; a cached loader always uses the thread)")
    return rows


# --- pixel storage formats: bytes per frame and clip read time


def _storage_options(frame_shape: tuple, chunk_rows: int) -> dict[str, dict | None]:
    """h5py `create_dataset` keywords of the pixels for each storage format, by name; None: a raw .npy file.

    Chunks of `chunk_rows` frames of `frame_shape` (H, W, 3), as data.append_episode writes them, unless the name
    says otherwise; gzip-1 with those chunks is the format collect.py writes (data.PIXEL_COMPRESSION). The Blosc
    formats need the optional hdf5plugin package and are left out, with a note, without it.
    """
    chunks = (chunk_rows, *frame_shape)
    gzip = {f"gzip-{level}": {"compression": "gzip", "compression_opts": level} for level in (4, 9)}
    gzip = {"gzip-1": data.pixel_compression("gzip"), **gzip}  # gzip 1: what data.py writes
    options = {name: {"chunks": chunks, **opts} for name, opts in gzip.items()}
    options["lzf"] = {"chunks": chunks, "compression": "lzf"}
    options["none"] = {"chunks": chunks}
    options["gzip-1 1 frame/chunk"] = {"chunks": (1, *frame_shape), **gzip["gzip-1"]}
    try:
        zstd = data.pixel_compression("blosc-zstd")  # what data.py --compression blosc-zstd writes
    except ValueError:
        print("hdf5plugin is not installed: no Blosc rows (pip install hdf5plugin)")
    else:
        import hdf5plugin  # byte shuffle (Blosc's default) leaves 1-byte pixels as they are

        lz4 = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
        options["blosc-lz4"] = {"chunks": chunks, "compression": lz4}
        options["blosc-zstd"] = {"chunks": chunks, **zstd}
    options["npy (raw, mmap)"] = None
    return options


def _write_pixels(src: str, dst: str, pixels: np.ndarray, opts: dict) -> None:
    """Copy the trajectory file `src` to `dst`, its pixels (N, H, W, 3) uint8 stored with the `create_dataset`
    keywords `opts`; every other column and the file's attributes as they are."""
    with h5py.File(src, "r") as s, h5py.File(dst, "w") as d:
        d.attrs.update(s.attrs)
        for name in s:
            if name != "pixels":
                s.copy(s[name], d)
        d.create_dataset("pixels", data=pixels, **opts)


def _clip_rows(traj: data.Trajectories, clips: int, seed: int) -> np.ndarray:
    """Rows (clips, T) int64 of random training clips of the paper preset (T = 4 frames, frameskip rows apart),
    drawn from np.random.default_rng(seed) among data.ClipLoader's starts (a whole clip ahead in the episode)."""
    shape = clip_shape(PRESETS["paper"])
    T, f = shape["history"] + shape["num_preds"], shape["frameskip"]
    starts = traj.episode_rows(range(traj.num_episodes), drop_last=T * f - 1)  # (R,) every clip start
    return np.random.default_rng(seed).choice(starts, clips)[:, None] + f * np.arange(T)  # (clips, T)


def _time_clips(read: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, clip_rows: np.ndarray) -> float:
    """Seconds per clip of `read(rows)` -> (T, H, W, 3) over `clip_rows` (K, T), after one untimed warm-up read.
    Outside the timing each clip must equal the original frames `pixels` (N, H, W, 3) uint8 bit for bit."""
    read(clip_rows[0])
    seconds = 0.0
    for rows in clip_rows:
        start = time.perf_counter()
        clip = read(rows)  # (T, H, W, 3)
        seconds += time.perf_counter() - start
        if clip.dtype != np.uint8 or not np.array_equal(clip, pixels[rows]):
            raise RuntimeError(f"rows {rows.tolist()} read back differ from the frames written")
    return seconds / len(clip_rows)


def _read_clips(path: str, pixels: np.ndarray, clip_rows: np.ndarray) -> tuple[int, float]:
    """(bytes of pixels on disk, seconds per clip) of a rewritten file: an .h5 read through data.Trajectories.read
    with no chunk cache (as the loader streams), a .npy through a read-only memory map (frames already decoded)."""
    if path.endswith(".npy"):
        frames = np.load(path, mmap_mode="r")  # (N, H, W, 3) uint8
        return os.path.getsize(path), _time_clips(lambda rows: frames[rows], pixels, clip_rows)
    with data.Trajectories(path, chunk_cache_bytes=0) as traj:
        size = traj.file["pixels"].id.get_storage_size()  # allocated chunks, so a partly filled last one counts whole
        return size, _time_clips(lambda rows: traj.read("pixels", rows), pixels, clip_rows)


def bench_decode(
    env: str = "pusht", episodes: int = 30, img_size: int = 224, clips: int = 1000, seed: int = 0
) -> list[dict]:
    """Collection speed of one worker, then the size on disk and the clip read time of each pixel storage format.

    Collects `episodes` episodes at `img_size` px with one worker process (episodes/s per worker), loads their
    pixels (N, H, W, 3) uint8 into RAM and rewrites them once per format of `_storage_options`, one file at a time.
    Per format: KB per frame on disk (1 KB = 1000 bytes), write ms per frame, and the time to read `clips` training
    clips one at a time on one core (ms/clip, clips/s), the clips as data.ClipLoader reads them (`_clip_rows`), from
    starts drawn with `seed`, the same for every format. Every clip read is checked bit-identical to the original
    frames. The files sit in the OS page cache, so this times decoding and assembly, not the disk. A gzip format is
    read once with each inflater of `_inflaters` (zlib's; ', isal' names ISA-L's).
    """
    rows, chosen, inflaters = [], data.inflater(), _inflaters()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"{env}_{img_size}.h5")
        start = time.perf_counter()
        collect.collect(env, episodes, path, img_size=img_size, workers=1)
        collect_s = time.perf_counter() - start
        with data.Trajectories(path) as traj:
            pixels = traj.cache("pixels")  # (N, H, W, 3) uint8: the original frames
            chunk_rows = traj.file["pixels"].chunks[0]
            clip_rows = _clip_rows(traj, clips, seed)  # (clips, T)
        n = len(pixels)
        info = {"env": env, "img_size": img_size, "episodes": episodes, "frames": n}
        info["collect_episodes_per_s"] = episodes / collect_s
        for name, opts in _storage_options(pixels.shape[1:], chunk_rows).items():
            out = os.path.join(tmp, f"{len(rows)}.npy" if opts is None else f"{len(rows)}.h5")
            start = time.perf_counter()
            if opts is None:
                np.save(out, pixels)
            else:
                _write_pixels(path, out, pixels, opts)
            write_s = time.perf_counter() - start
            gzip = opts is not None and opts.get("compression") == "gzip"
            for inflate, fn in (inflaters if gzip else {"": None}).items():  # gzip: read once per inflater
                data.INFLATE = fn or chosen
                try:
                    size, clip_s = _read_clips(out, pixels, clip_rows)
                finally:
                    data.INFLATE = chosen
                row = {**info, "option": name + (f", {inflate}" if inflate not in ("", "zlib") else "")}
                row |= {"kb_per_frame": size / n / 1e3, "write_ms_per_frame": 1e3 * write_s / n}
                rows.append(row | {"ms_per_clip": 1e3 * clip_s, "clips_per_s": 1 / clip_s})
            os.remove(out)  # one rewritten copy on disk at a time
    base = next(r for r in rows if r["option"] == "gzip-1")
    for r in rows:
        r["size_vs_gzip1"] = r["kb_per_frame"] / base["kb_per_frame"]
        r["speed_vs_gzip1"] = r["clips_per_s"] / base["clips_per_s"]
    print(
        f"collect: {episodes} {env} episodes ({n} frames) at {img_size} px by 1 worker in {collect_s:.1f} s, "
        f"{info['collect_episodes_per_s']:.2f} episodes/s per worker"
    )
    print(f"{'option':<30}{'KB/frame':>10}{'size':>7}{'write ms/frame':>16}{'ms/clip':>9}{'clips/s':>10}{'speed':>9}")
    for r in rows:
        print(
            f"{r['option']:<30}{r['kb_per_frame']:>10.2f}{r['size_vs_gzip1']:>6.2f}x{r['write_ms_per_frame']:>16.3f}"
            f"{r['ms_per_clip']:>9.3f}{r['clips_per_s']:>10.0f}{r['speed_vs_gzip1']:>8.2f}x"
        )
    print("(size and speed relative to gzip-1, the format collect.py writes; one core, clips read one at a time)")
    return rows


# --- the yardstick: this machine's matmul peak, measured in the same run


_PEAKS: dict[torch.dtype, float] = {}


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` on this machine: best of 3 timings of `reps` (cached per run).

    Achieved FLOP/s are reported as a fraction of it, so the figures stay comparable on a shared machine whose
    absolute speed varies from run to run."""
    if dtype not in _PEAKS:
        a = torch.randn(n, n).to(dtype)
        a @ a  # warm-up
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ a
            best = min(best, time.perf_counter() - t0)
        _PEAKS[dtype] = 2 * n**3 * reps / best / 1e9
    return _PEAKS[dtype]


def precisions() -> tuple[bool, ...]:
    """The bf16 settings to time: (False, True), or only fp32 on a CPU without native bf16 (no AVX-512 BF16 or AMX),
    where bf16 is emulated: a `cpu` training step took 15 to 20 times as long there, a 1024^2 matmul 100 times."""
    if native_bf16(torch.device("cpu")):
        return (False, True)
    print("this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 rows left out, emulated bf16 is far slower")
    return (False,)


def matmul_peaks(bf16: bool = True) -> dict[str, float]:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s} from `matmul_peak` (bf16 left out unless `bf16`), printed above a
    benchmark table."""
    peaks = {"fp32": matmul_peak(torch.float32)} | ({"bf16": matmul_peak(torch.bfloat16)} if bf16 else {})
    print("matmul peak (2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    return peaks


def count_flops(fn) -> int:
    """FLOPs of fn() by torch.utils.flop_counter, under bf16 autocast: there every attention of a model given
    kernels.use_fast_attention runs as explicit matmuls, which the counter sees (it does not count PyTorch's fused CPU attention kernel). The count is the same
    maths in fp32."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
        fn()
    return counter.get_total_flops()


# --- training


def _train_step_time(preset: str, batch: int, bf16: bool, steps: int) -> tuple[float, float]:
    """Seconds per training step (median of `steps`, after one warm-up step) and FLOPs per step, synthetic clips."""
    from model import lewm_loss
    from sigreg import SIGReg

    torch.manual_seed(0)
    cfg = PRESETS[preset]
    model, sig = use_fast_attention(LeWM(cfg).train()), SIGReg()  # the kernels train.py uses
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    pixels = torch.randint(0, 256, (batch, 4, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8)
    actions = torch.randn(batch, 4, cfg.action_dim)

    def step(bf16: bool = bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = lewm_loss(model, model.preprocess(pixels), actions, sig)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    flops = count_flops(lambda: step(True))  # the bf16 path's count: the same maths, every attention counted
    step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), flops


def bench_train(cases: tuple = (("paper", 8, 3), ("cpu", 64, 5), ("tiny", 64, 5))) -> list[dict]:
    """Training throughput per preset in fp32 and bf16 autocast: samples/s, ms/step, achieved GFLOP/s and its
    fraction of the matmul peak measured in the same run (`of_peak`)."""
    rows = []
    print(f"training on CPU ({torch.get_num_threads()} threads), synthetic clips of 4 frames")
    cases_bf16 = precisions()
    peaks = matmul_peaks(bf16=True in cases_bf16)
    print(
        f"{'preset':8s} {'batch':>5s} {'dtype':>5s} {'ms/step':>9s} {'samples/s':>10s} {'GFLOP/step':>11s} {'GFLOP/s':>8s}"
        f" {'of peak':>8s}"
    )
    for preset, batch, steps in cases:
        for bf16 in cases_bf16:
            sec, flops = _train_step_time(preset, batch, bf16, steps)
            row = {
                "preset": preset,
                "batch": batch,
                "dtype": "bf16" if bf16 else "fp32",
                "ms_per_step": 1e3 * sec,
                "samples_per_s": batch / sec,
                "gflop_per_step": flops / 1e9,
                "gflop_per_s": flops / 1e9 / sec,
                "peak_gflop_per_s": peaks["bf16" if bf16 else "fp32"],
            }
            row["of_peak"] = row["gflop_per_s"] / row["peak_gflop_per_s"]
            rows.append(row)
            print(
                f"{preset:8s} {batch:5d} {row['dtype']:>5s} {row['ms_per_step']:9.0f} {row['samples_per_s']:10.1f} "
                f"{row['gflop_per_step']:11.1f} {row['gflop_per_s']:8.0f} {row['of_peak']:8.0%}"
            )
    return rows


# --- planning


PLAN_ACTION_DIM = 10  # PushT action block: frameskip 5 x 2-d actions
PLAN_ITERS = 30  # docs/method.md §9: 300 samples x 30 iterations, top 30, horizon 5


def _plan_model(preset: str) -> LeWM:
    """A frozen eval-mode model with random weights whose predictions depend on the actions.

    At initialisation every AdaLN-zero gate is 0, so all candidates would cost the same; all-zero parameters get
    small random values so the bf16/fp32 ranking comparison is meaningful (timing is unaffected).
    """
    torch.manual_seed(0)
    model = LeWM(replace(PRESETS[preset], action_dim=PLAN_ACTION_DIM)).eval().requires_grad_(False)
    use_fast_attention(model)  # the kernels evaluate.py plans with
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model


def _plan_embeddings(model: LeWM, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z0 (B, 1, D) and z_goal (B, D) of random current and goal frames, encoded once per plan (newer swm)."""
    g = torch.Generator().manual_seed(batch)
    size = model.cfg.img_size
    frames = torch.randint(0, 256, (batch, 2, size, size, 3), dtype=torch.uint8, generator=g)  # (B, 2, H, W, 3)
    z = model.encode(model.preprocess(frames))  # (B, 2, D)
    return z[:, :1], z[:, 1]


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Rank correlation of two 1-d cost vectors (no ties expected for continuous costs)."""
    rx, ry = (v.argsort().argsort().double() for v in (x, y))  # (S,), (S,)
    rx, ry = rx - rx.mean(), ry - ry.mean()  # (S,), (S,)
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def _time_plan(model: LeWM, batch: int, bf16: bool, iterations: int) -> tuple[float, float, torch.Tensor]:
    """One planning call over `batch` problems (encode once + CEM) -> (wall s, robust s, plan (B, N, A)).

    Both times are extrapolated to 30 iterations; the robust one uses the median iteration, because the 2 shared
    cores make single iterations vary by up to several times.
    """
    gens = [torch.Generator().manual_seed(42 + b) for b in range(batch)]  # per problem: batched == one at a time
    starts = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        z0, z_goal = _plan_embeddings(model, batch)  # (B, 1, D), (B, D)
        t_encode = time.perf_counter() - t0
        cost = make_cost(model, z0, z_goal, bf16)

        def cost_fn(candidates: torch.Tensor) -> torch.Tensor:  # (B, S, N, A) -> (B, S)
            starts.append(time.perf_counter())  # one call per iteration
            return cost(candidates)

        plan = cem(cost_fn, batch, 5, PLAN_ACTION_DIM, iterations=iterations, generator=gens)  # (B, N, A)
        starts.append(time.perf_counter())
    per_iter = torch.tensor(starts).diff()  # (iterations,) seconds
    scale = PLAN_ITERS / iterations
    return t_encode + float(per_iter.sum()) * scale, t_encode + float(per_iter.median()) * PLAN_ITERS, plan


def _plan_flops(model: LeWM) -> int:
    """FLOPs of one plan for one problem: encoding the two frames plus 30 iterations of 300 candidate rollouts."""
    with torch.inference_mode():
        encode = count_flops(lambda: _plan_embeddings(model, 1))
        z0, z_goal = _plan_embeddings(model, 1)  # (1, 1, D), (1, D)
        cost = make_cost(model, z0, z_goal, False)
        iteration = count_flops(lambda: cost(torch.randn(1, 300, 5, PLAN_ACTION_DIM)))
    return encode + PLAN_ITERS * iteration


def _bf16_agreement(model: LeWM) -> dict:
    """Run an fp32 CEM plan and score the bf16 costs of every iteration's 300 candidates against the fp32 ones."""
    spearman, overlap = [], []
    with torch.inference_mode():
        z0, z_goal = _plan_embeddings(model, 1)  # (1, 1, D), (1, D)
        cost32, cost16 = make_cost(model, z0, z_goal, False), make_cost(model, z0, z_goal, True)

        def cost_fn(candidates: torch.Tensor) -> torch.Tensor:  # (1, S, N, A) -> (1, S)
            c32, c16 = cost32(candidates)[0], cost16(candidates)[0]  # (S,), (S,)
            spearman.append(_spearman(c32, c16))
            top32, top16 = (set(c.topk(30, largest=False).indices.tolist()) for c in (c32, c16))
            overlap.append(len(top32 & top16) / 30)
            return c32[None]  # (1, S)

        cem(cost_fn, 1, 5, PLAN_ACTION_DIM, generator=torch.Generator().manual_seed(42))
    return {
        "spearman_first": round(spearman[0], 4),
        "spearman_last": round(spearman[-1], 4),
        "spearman_min": round(min(spearman), 4),
        "top30_shared_first": round(overlap[0], 3),
        "top30_shared_last": round(overlap[-1], 3),
        "top30_shared_mean": round(sum(overlap) / len(overlap), 3),
    }


def bench_plan(presets: tuple[str, ...] | None = None, batches: tuple[int, ...] = (1, 50)) -> list[dict]:
    """Seconds per CEM plan (300 x 30, horizon 5, 10-d action blocks) per preset, fp32 and bf16 autocast rollout.

    Batch 1 runs all 30 iterations; larger batches run 3 and extrapolate (every iteration does identical work:
    no early stopping). s_per_plan = (encode + 30 x median iteration) / batch; s_per_plan_wall sums the iterations
    instead, so it includes interference from other jobs on the shared cores. gflop_per_s divides the plan's
    counted FLOPs by s_per_plan; of_peak is its fraction of the matmul peak measured in the same run. A last row
    per preset scores bf16 against fp32: rank agreement of each iteration's 300 candidate costs, shared top-30
    elites, and the fp32 cost of the bf16 plan relative to the fp32 plan.
    """
    rows = []
    cases_bf16 = precisions()
    peaks = matmul_peaks(bf16=True in cases_bf16)
    for preset in presets or tuple(PRESETS):
        model = _plan_model(preset)
        flops = _plan_flops(model)
        for bf16 in cases_bf16:  # warm-up: one-off kernel selection for each precision
            _time_plan(model, 2, bf16, 1)
        plans = {}
        for batch in batches:
            iterations = PLAN_ITERS if batch == 1 else 3
            for bf16 in cases_bf16:
                wall, robust, plan = _time_plan(model, batch, bf16, iterations)  # plan (B, N, A)
                if batch == 1:
                    plans[bf16] = plan  # full-length plans, compared below
                row = {"preset": preset, "rollout": "bf16" if bf16 else "fp32", "batch": batch}
                row |= {"iterations_timed": iterations, "s_per_plan": round(robust / batch, 3)}
                row["s_per_plan_wall"] = round(wall / batch, 3)
                row["gflop_per_plan"] = round(flops / 1e9, 1)
                row["gflop_per_s"] = round(flops / 1e9 / (robust / batch), 1)
                row["of_peak"] = round(row["gflop_per_s"] / peaks[row["rollout"]], 3)
                rows.append(row)
                print(row, flush=True)
        if len(cases_bf16) == 1:
            continue
        row = {"preset": preset, "check": "bf16 vs fp32"} | _bf16_agreement(model)
        if len(plans) == 2:
            with torch.inference_mode():
                z0, z_goal = _plan_embeddings(model, 1)  # (1, 1, D), (1, D)
                cost32 = make_cost(model, z0, z_goal, False)
                c32, c16 = (cost32(plans[bf16][:, None]) for bf16 in (False, True))  # (1, 1) each
            row["bf16_plan_fp32_cost_ratio"] = round(float(c16 / c32), 4)
        rows.append(row)
        print(row, flush=True)
    return rows


# --- main

# --- render similarity: our renderer against a frame of the reference renderer at a fitted state


def _gaussian_filter(x: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """'valid' separable Gaussian filter of a 2-D float array: (H, W) -> (H - size + 1, W - size + 1)."""
    k = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    k /= k.sum()
    x = np.lib.stride_tricks.sliding_window_view(x, size, axis=0) @ k  # (H', W)
    return np.lib.stride_tricks.sliding_window_view(x, size, axis=1) @ k  # (H', W')


def ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of two uint8 images, (H, W) grey or (H, W, 3) RGB taken to
    luma (ITU-R 601 weights): 11 x 11 Gaussian window, sigma 1.5, C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 255."""
    if a.shape != b.shape or a.ndim not in (2, 3) or min(a.shape[:2]) < size:
        raise ValueError(
            f"ssim needs two images of the same (H, W) or (H, W, 3) shape, at least {size} px, "
            f"got {a.shape} and {b.shape}"
        )
    luma = np.array([0.299, 0.587, 0.114])
    x, y = (im.astype(np.float64) @ luma if im.ndim == 3 else im.astype(np.float64) for im in (a, b))
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _gaussian_filter(x, size, sigma), _gaussian_filter(y, size, sigma)
    vx = _gaussian_filter(x * x, size, sigma) - mx * mx
    vy = _gaussian_filter(y * y, size, sigma) - my * my
    cxy = _gaussian_filter(x * y, size, sigma) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def render_at(env, state: np.ndarray) -> np.ndarray:
    """Our frame of `env` (an env instance) at `state`."""
    env.reset(seed=0, options={"state": np.asarray(state, np.float64)})
    return env.render()


def _mask_centroid(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()]) if len(xs) else None


def _initial_states(name: str, image: np.ndarray, env) -> list[np.ndarray]:
    """Coarse candidates from colour masks: the agent's centroid; for PushT the block's centroid under 72 angles
    (the T's area centroid lies 40.7 world units from its origin along the stem)."""
    im = image.astype(np.int32)
    r, g, b = im[..., 0], im[..., 1], im[..., 2]
    size = image.shape[0]
    if name == "tworoom":
        c = _mask_centroid((r > 200) & (g < 150) & (b < 150))  # the red agent blob
        return [np.array([112.0, 112.0]) if c is None else (c + 0.5) * (envs.TWOROOM_IMG / size)]
    s = size / envs.PUSHT_WORLD
    agent = _mask_centroid((b > r + 80) & (b > g + 60))  # blue pusher
    block = _mask_centroid((b - r > 20) & (b - r < 50) & (g - r > 5) & (r < 180))  # slate-grey T
    agent = np.array([256.0, 256.0]) if agent is None else (agent + 0.5) / s - 0.5
    block = np.array([256.0, 256.0]) if block is None else (block + 0.5) / s - 0.5
    out = []
    for angle in np.linspace(0, 2 * np.pi, 72, endpoint=False):
        origin = block - 40.71 * np.array([-np.sin(angle), np.cos(angle)])  # centroid = origin + R(angle) (0, 40.7)
        out.append(np.array([*agent, *origin, angle, 0.0, 0.0]))
    return out


def fit_state(name: str, image: np.ndarray, rounds: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """The state whose frame of our renderer is closest (pixel MSE) to `image`: best coarse candidate, then a
    pattern search over each fitted coordinate with steps halving every round. Returns (state, our frame)."""
    env = envs.make_env(name, img_size=image.shape[0])
    target = image.astype(np.float64)

    def loss(state):
        return float(((render_at(env, state).astype(np.float64) - target) ** 2).mean())

    best = min(_initial_states(name, image, env), key=loss)
    dims, steps = (
        ([0, 1], np.array([4.0, 4.0])) if name == "tworoom" else ([0, 1, 2, 3, 4], np.array([8.0] * 4 + [0.1]))
    )
    best_loss = loss(best)
    for _ in range(rounds):
        improved = True
        while improved:
            improved = False
            for i, d in enumerate(dims):
                for sign in (1, -1):
                    trial = best.copy()
                    trial[d] += sign * steps[i]
                    trial_loss = loss(trial)
                    if trial_loss < best_loss:
                        best, best_loss, improved = trial, trial_loss, True
        steps = steps / 2
    frame = render_at(env, best)
    env.close()
    return best, frame


def render_match(name: str, image_path: str) -> dict:
    """Fit our `name` renderer's state to a frame of the reference renderer; our frame vs that frame."""
    if name not in ("pusht", "tworoom"):
        raise ValueError(f"render-match fits pusht or tworoom, got {name!r}")
    image = load_png(image_path)
    if image.shape[0] != image.shape[1]:
        raise ValueError(f"{image_path}: a square frame is needed, got {image.shape[1]} x {image.shape[0]}")
    t0 = time.perf_counter()
    state, frame = fit_state(name, image)
    diff = np.abs(frame.astype(np.int32) - image.astype(np.int32))
    result = {
        "env": name,
        "image": image_path,
        "img_size": image.shape[0],
        "state": [round(float(v), 2) for v in state],
        "mean_abs_diff": float(diff.mean()),
        "ssim": ssim(frame, image),
        "pixels_off_by_more_than_32": float((diff.max(axis=2) > 32).mean()),
        "seconds": time.perf_counter() - t0,
    }
    print(
        f"{name}: fitted state {result['state']} | our {image.shape[0]} px frame vs the reference frame: mean "
        f"|diff| {result['mean_abs_diff']:.2f}/255, SSIM {result['ssim']:.4f}, "
        f"{100 * result['pixels_off_by_more_than_32']:.2f} % of pixels off by > 32"
    )
    return result


BENCHES = {"envs": bench_envs, "data": bench_data, "decode": bench_decode, "train": bench_train, "plan": bench_plan}

if __name__ == "__main__":
    if sys.argv[1:2] == ["render-match"]:
        parser = argparse.ArgumentParser(prog="bench.py render-match", description=render_match.__doc__)
        parser.add_argument("--env", choices=["pusht", "tworoom"], required=True, help="simulator to fit")
        parser.add_argument("--image", required=True, help="PNG frame of the reference renderer (square, 8-bit)")
        args = parser.parse_args(sys.argv[2:])
        try:
            render_match(args.env, args.image)
        except (OSError, ValueError, zlib.error) as e:
            parser.error(str(e))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(BENCHES), default=None, help="run one benchmark area")
    args = parser.parse_args()
    for name, fn in BENCHES.items():
        if args.only in (None, name):
            fn()
