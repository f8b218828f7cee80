"""Trajectory datasets for LeWM: the HDF5 layout, reading it (ours and the official files), the split by episode and
the training clips of frames and action blocks.

Layout (docs/envs.md §6, stable-worldmodel `HDF5Dataset`): one file, every dataset at the root, axis 0 = global row.
`ep_len` (E,) int32 and `ep_offset` (E,) int64 describe the episodes, which are stored one after another; every
other dataset is a per-row column: `ep_idx` (or `episode_idx` in the official files) int32, `step_idx` int64,
`pixels` (N, H, W, 3) uint8, `action` (N, A) float32 with row t holding the action taken at observation t (so the
last row of each episode is NaN), and the env's info columns (state, goal_state, proprio, ...).

Clips (docs/method.md §3, §4): T = history + num_preds = 3 + 1 frames at raw rows s, s+5, s+10, s+15, for every start
s = 0..len-20 of every episode, with all 20 raw actions z-scored per raw step, NaN -> 0, and reshaped row-major into
T blocks of frameskip * A (history, num_preds and frameskip are the model config's, passed in by the caller). The
model's `preprocess` turns the uint8 frames into floats; this file never does.

Deliberately absent: image transforms, lance/folder formats, clip-level splitting (see the DEVIATION in
`split_episodes`). Collecting files with the scripted policies (resumable, several processes) is collect.py's.

Run (collection, collect.py's command; `--workers` processes each roll out whole episodes, seeded by seed + episode):
    python data.py --env pusht --episodes 1000 --img_size 64 --out data/pusht_64.h5
    python data.py --env pusht --episodes 200 --out data/pusht_64.h5 --append   # 200 more, same seed stream
Each finished episode is saved at once in `<out>.parts/`; after an interruption (Ctrl-C, SIGTERM, kill -9, a crash)
running the same command again collects only the missing episodes and writes the same file.

Dimension letters: B batch, T frames per clip, H/W image, A raw action dim, E episodes, N rows.
"""

import copy
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Self

import h5py
import numpy as np
import torch

SPLIT_SEED = 3072  # seed of the train / validation split of episodes (training and evaluation must agree)
INDEX_COLUMNS = ("ep_idx", "episode_idx")  # our name, the official files' name
EPISODE_COLUMNS = ("ep_len", "ep_offset")  # per-episode datasets; every other dataset is per-row
REQUIRED_COLUMNS = ("ep_len", "ep_offset", "pixels", "action")
PIXEL_CHUNK_BYTES = 1 << 18  # ~256 KB of raw pixels per chunk: 21 frames at 64 px, 1 frame at 224 px
# gzip level 1, measured on PushT frames: 0.5 KB/frame at 64 px (lzf 1.2 KB), 4 KB at 224 px (lzf 5 KB), and
# uncached clip reads as fast as or faster than lzf; level 4 saves another ~20% but writes at half the speed.
PIXEL_COMPRESSION = {"compression": "gzip", "compression_opts": 1}
# Pixel storage formats a collection can write (`python data.py --compression`). gzip 1 is the default, which any
# h5py reads; Blosc zstd (the optional hdf5plugin to write and to read) is 0.64x its size and reads about as fast at
# 224 px (BENCHMARKS.md, "Pixel storage formats").
PIXEL_FORMATS = ("gzip", "blosc-zstd")
TABLE_CHUNK_ROWS = 1024  # chunk rows of the small per-row columns (uncompressed, as in the official files)
CACHE_FRACTION = 0.4  # ClipLoader keeps pixels in RAM when they take at most this fraction of the available memory
READ_CACHE_BYTES = 64 << 20  # HDF5 chunk cache per open file
LOADER_WORKERS_MAX = 8  # default ClipLoader worker processes: one per core less the training loop's, at most this


class UsageError(ValueError):
    """A mistake in what the user asked for (a flag, a file): the scripts print it as one line and exit with code 2.
    Defined here, the lowest file that raises it (for a dataset of another env, or with an outlier), so that data.py
    needs no other project file; cli.py, which every script imports it from, re-exports it."""


def _import_hdf5plugin() -> bool:
    """Register the extra HDF5 filters (Blosc, used by the official files) when the optional package is installed."""
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        return False
    return True


def pixel_compression(name: str) -> dict:
    """The h5py `create_dataset` keywords storing pixels in format `name` (one of PIXEL_FORMATS); ValueError (one
    line) for an unknown name, or for Blosc without hdf5plugin."""
    if name == "gzip":
        return dict(PIXEL_COMPRESSION)
    if name == "blosc-zstd":
        if not _import_hdf5plugin():
            raise ValueError("blosc-zstd needs the optional hdf5plugin package: pip install hdf5plugin")
        import hdf5plugin

        return {"compression": hdf5plugin.Blosc(cname="zstd", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)}
    raise ValueError(f"unknown pixel format {name!r}; valid: {', '.join(PIXEL_FORMATS)}")


# --- reading


def _take(array: np.ndarray, rows: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """array[rows], into `out` when given (np.take with mode="raise" would copy through a temporary buffer)."""
    if out is None:
        return array[rows]
    if len(rows) and (rows.min() < 0 or rows.max() >= len(array)):
        raise IndexError(f"rows {rows.min()}..{rows.max()} out of range 0..{len(array) - 1}")
    return np.take(array, rows, axis=0, out=out, mode="clip")


class Trajectories:
    """Read-only view of one trajectory file: validated on open, any column readable by rows or by episode.

    `ep_len`, `ep_offset` (int64 numpy arrays), `num_episodes`, `num_rows`, `columns` (per-row column names),
    `index_column` ("ep_idx" or "episode_idx"). Reads: `rows(col, start, stop)`, `read(col, rows)` for arbitrary
    row indices (chunk-aware), `episode(e, cols)`. `cache(col)` keeps a column in RAM for all later reads.
    """

    def __init__(self, path: str | os.PathLike, chunk_cache_bytes: int = READ_CACHE_BYTES):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: dataset file not found")
        _import_hdf5plugin()
        if not h5py.is_hdf5(self.path):
            raise ValueError(f"{self.path}: not an HDF5 file")
        try:
            self.file = h5py.File(self.path, "r", rdcc_nbytes=chunk_cache_bytes, rdcc_nslots=100_003)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot open as HDF5, the file is truncated or corrupted ({e})") from e
        self._cache: dict[str, np.ndarray] = {}
        self._decoders: dict[str, Callable | None] = {}  # column -> _chunk_decoder, found on its first read
        try:
            self._validate()
        except OSError as e:
            self.file.close()
            raise ValueError(f"{self.path}: cannot read, the file is truncated or corrupted ({e})") from e
        except Exception:
            self.file.close()
            raise

    def _validate(self) -> None:
        f, name = self.file, self.path
        keys = list(f.keys())
        index = [c for c in INDEX_COLUMNS if c in f]
        missing = [c for c in REQUIRED_COLUMNS if c not in f] + ([] if index else ["ep_idx (or episode_idx)"])
        if missing:
            raise ValueError(f"{name}: missing columns {missing} (found {sorted(keys)})")
        self.index_column = index[0]
        for key in keys:
            _check_filters(f[key], name)
        self.ep_len = f["ep_len"][()].astype(np.int64).reshape(-1)
        self.ep_offset = f["ep_offset"][()].astype(np.int64).reshape(-1)
        if len(self.ep_len) != len(self.ep_offset) or len(self.ep_len) == 0:
            raise ValueError(f"{name}: ep_len has {len(self.ep_len)} entries, ep_offset {len(self.ep_offset)}")
        if (self.ep_len < 1).any():
            raise ValueError(f"{name}: ep_len has entries < 1 (episode {int(np.argmax(self.ep_len < 1))})")
        expected = np.concatenate([[0], np.cumsum(self.ep_len)[:-1]])
        if not np.array_equal(self.ep_offset, expected):
            e = int(np.argmax(self.ep_offset != expected))
            raise ValueError(f"{name}: ep_offset is not the cumulative sum of ep_len (first mismatch at episode {e})")
        self.num_episodes, self.num_rows = len(self.ep_len), int(self.ep_len.sum())
        self.columns = [k for k in keys if k not in EPISODE_COLUMNS]
        for c in self.columns:
            if f[c].shape[:1] != (self.num_rows,):
                raise ValueError(f"{name}: column {c} has shape {f[c].shape}, but ep_len sums to {self.num_rows} rows")
        episode_of_row = np.repeat(np.arange(self.num_episodes), self.ep_len)  # (N,)
        ep_idx = f[self.index_column][()].reshape(-1)
        if not np.array_equal(ep_idx, episode_of_row):
            r = int(np.argmax(ep_idx != episode_of_row))
            raise ValueError(
                f"{name}: {self.index_column} does not match ep_len/ep_offset (row {r} holds {ep_idx[r]}, "
                f"expected episode {episode_of_row[r]})"
            )
        if "step_idx" in f:
            step = np.arange(self.num_rows) - np.repeat(self.ep_offset, self.ep_len)  # (N,)
            got = f["step_idx"][()].reshape(-1)
            if not np.array_equal(got, step):
                r = int(np.argmax(got != step))
                raise ValueError(f"{name}: step_idx does not count 0..ep_len-1 (row {r} holds {got[r]})")
        pixels = f["pixels"]
        if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"{name}: pixels must be uint8 (N, H, W, 3), got {pixels.dtype} {pixels.shape}")
        action = f["action"]
        if action.ndim != 2 or action.dtype.kind != "f":
            raise ValueError(f"{name}: action must be float (N, A), got {action.dtype} {action.shape}")
        action = self.cache("action")
        bad = ~np.isfinite(action).all(axis=1)  # (N,)
        bad[self.ep_offset + self.ep_len - 1] = False  # only the last row of an episode may be NaN
        if bad.any():
            r = int(np.argmax(bad))
            e = int(episode_of_row[r])
            raise ValueError(
                f"{name}: non-finite action inside episode {e} at step {r - self.ep_offset[e]} "
                f"(only the last row of an episode may be NaN)"
            )
        self.img_shape = tuple(pixels.shape[1:])  # (H, W, 3)
        self.action_dim = int(action.shape[1])

    def shape(self, column: str) -> tuple:
        return tuple(self.file[column].shape)

    def cache(self, column: str) -> np.ndarray:
        """Load a whole column into RAM (once); later reads of it never touch the disk."""
        if column not in self._cache:
            self._cache[column] = self.file[column][()]
        return self._cache[column]

    def rows(self, column: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of a column."""
        if column in self._cache:
            return self._cache[column][start:stop]
        return self.file[column][start:stop]

    def read(self, column: str, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows at arbitrary indices (any order, repeats allowed), reading each touched chunk once, into `out` if
        given (len(rows), *row shape). A gzip-compressed (or uncompressed) chunked column is decoded here, chunk by
        chunk (`_chunk_decoder`), straight into place; any other goes through h5py's selection, whose fixed cost per
        read (~0.2 ms) exceeded gzip's decompression of a 224 px frame."""
        rows = np.asarray(rows, dtype=np.int64)
        if column in self._cache:
            return _take(self._cache[column], rows, out)
        ds = self.file[column]
        if out is None:
            out = np.empty((len(rows), *ds.shape[1:]), ds.dtype)
        if column not in self._decoders:
            self._decoders[column] = _chunk_decoder(ds)
        decode = self._decoders[column]
        uniq, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)  # sorted
        at = np.argsort(inverse.reshape(-1), kind="stable")  # positions in `rows` of uniq[0], then of uniq[1], ...
        ends = np.cumsum(counts)  # at[ends[k] - counts[k] : ends[k]] are those of uniq[k]
        chunk = ds.chunks[0] if ds.chunks else 1
        breaks = np.flatnonzero(np.diff(uniq // chunk)) + 1  # start of each run of rows sharing a chunk
        for group in np.split(np.arange(len(uniq)), breaks):
            i, j = group[0], group[-1] + 1
            lo, hi = int(uniq[i]), int(uniq[j - 1]) + 1
            where = at[ends[i] - counts[i] : ends[j - 1]]  # (n,) the output positions of this group's rows
            row = np.repeat(uniq[i:j], counts[i:j])  # (n,) the row each of them holds
            if decode is not None:  # one raw chunk read (no HDF5 chunk cache), decompressed here
                first = lo // chunk * chunk
                try:
                    mask, raw = ds.id.read_direct_chunk((first,) + (0,) * (ds.ndim - 1))
                except RuntimeError:  # a chunk never written (no storage): h5py below fills it in
                    pass
                else:
                    out[where] = np.frombuffer(decode(raw, mask), ds.dtype).reshape(ds.chunks)[row - first]
                    continue
            out[where] = ds[lo:hi][row - lo]  # one read of the span (its chunk is decompressed once anyway)
        return out

    def episode_rows(self, episodes: Sequence[int], drop_last: int = 0) -> np.ndarray:
        """Global rows (R,) int64 of `episodes`, in the given order, each episode without its last `drop_last` rows."""
        rows = [self.ep_offset[e] + np.arange(max(0, self.ep_len[e] - drop_last)) for e in episodes]
        return np.concatenate([*rows, np.zeros(0, np.int64)])

    def episode(self, e: int, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """All rows of episode e for the given columns (default: every per-row column)."""
        if not 0 <= e < self.num_episodes:
            raise IndexError(f"episode {e} out of range 0..{self.num_episodes - 1}")
        start, stop = int(self.ep_offset[e]), int(self.ep_offset[e] + self.ep_len[e])
        return {c: self.rows(c, start, stop) for c in (columns or self.columns)}

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TrajectoryUnion(Trajectories):
    """Several opened trajectory files of one env read as one: episodes and rows numbered file after file, so the
    first file's episode and row indices are unchanged (training adds exploration episodes this way)."""

    def __init__(self, parts: Sequence[Trajectories]):
        self.parts = list(parts)
        first = self.parts[0]
        for p in self.parts[1:]:
            if p.img_shape != first.img_shape or p.action_dim != first.action_dim:
                raise ValueError(
                    f"{p.path}: frames {p.img_shape} and {p.action_dim}-d actions, but {first.path} has "
                    f"{first.img_shape} and {first.action_dim}-d: not the same env and frame size"
                )
        self.path = " + ".join(p.path for p in self.parts)
        self.file = first.file  # attributes (env, policy) are the first file's
        self.index_column, self.columns = first.index_column, first.columns
        self.img_shape, self.action_dim = first.img_shape, first.action_dim
        self.ep_len = np.concatenate([p.ep_len for p in self.parts])
        self.ep_offset = np.concatenate([[0], np.cumsum(self.ep_len)[:-1]]).astype(np.int64)
        self.num_episodes, self.num_rows = len(self.ep_len), int(self.ep_len.sum())
        self._row0 = np.cumsum([0] + [p.num_rows for p in self.parts])  # first global row of each file
        self._cache = {}

    def shape(self, column: str) -> tuple:
        return (self.num_rows, *self.parts[0].shape(column)[1:])

    def cache(self, column: str) -> np.ndarray:
        if column not in self._cache:  # read without caching in the parts: one copy in RAM, not two
            self._cache[column] = np.concatenate([p.rows(column, 0, p.num_rows) for p in self.parts])
        return self._cache[column]

    def rows(self, column: str, start: int, stop: int) -> np.ndarray:
        return self.read(column, np.arange(start, stop))

    def read(self, column: str, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if column in self._cache:
            return _take(self._cache[column], rows, out)
        if out is None:
            out = np.empty((len(rows), *self.shape(column)[1:]), self.parts[0].file[column].dtype)
        part = np.searchsorted(self._row0, rows, side="right") - 1  # (R,) file of each row
        for k in np.unique(part):
            mask = part == k
            out[mask] = self.parts[k].read(column, rows[mask] - self._row0[k])
        return out

    def close(self) -> None:
        for p in self.parts:
            p.close()


def check_env(traj: Trajectories, env: str) -> None:
    """The environment a file records (ours record it; official files do not) must be `env`."""
    recorded = traj.file.attrs.get("env")
    if recorded is not None and str(recorded) != env:
        raise UsageError(f"--data {traj.path}: holds {recorded} episodes, but the environment is {env} (--env)")


def _check_filters(ds: h5py.Dataset, name: str) -> None:
    """Fail on open, not on the first read, when a dataset needs a compression filter this HDF5 lacks."""
    dcpl = ds.id.get_create_plist()
    for i in range(dcpl.get_nfilters()):
        code, _, _, filter_name = dcpl.get_filter(i)
        if not h5py.h5z.filter_avail(code):
            hint = "pip install hdf5plugin" if not _import_hdf5plugin() else "update hdf5plugin"
            raise ValueError(
                f"{name}: column {ds.name[1:]} is compressed with HDF5 filter {code} "
                f"({filter_name.decode(errors='replace') or 'unknown'}, e.g. Blosc in the official files), "
                f"which this HDF5 cannot decode: {hint}"
            )


# Inflating a gzip chunk: zlib's decompress releases the GIL while it works; ISA-L's (the optional isal package) is
# about 2.5x faster on 224 px frames but holds the GIL (BENCHMARKS.md, "Data loading"). So a read in the main thread
# (a loader worker process, an evaluation) takes ISA-L's when it is installed, and a read in any other thread (the
# loader's background thread, beside the training loop) takes zlib's. INFLATE is the main thread's choice, made on
# first use; bench.py sets it to compare the two.
INFLATE: Callable[..., bytes] | None = None


def isal_inflate() -> Callable[..., bytes] | None:
    """ISA-L's inflate, isal.isal_zlib.decompress, or None when the optional isal package is not installed."""
    try:
        from isal import isal_zlib
    except ImportError:  # optional: pip install isal
        return None
    return isal_zlib.decompress


def inflater() -> Callable[..., bytes]:
    """The inflate function (zlib.decompress's signature) for a read in the calling thread: zlib.decompress outside
    the main thread; in it `INFLATE`, chosen on the first call: `isal_inflate()` if installed, else zlib.decompress."""
    global INFLATE
    if threading.current_thread() is not threading.main_thread():
        return zlib.decompress
    if INFLATE is None:
        INFLATE = isal_inflate() or zlib.decompress
    return INFLATE


def _chunk_decoder(ds: h5py.Dataset) -> Callable[[bytes, int], bytes] | None:
    """A function (raw chunk bytes, filter mask) -> the chunk's bytes, for a column whose chunks hold whole rows and
    whose only filters are gzip and a byte shuffle of 1-byte items (the identity); None for any other column (lzf,
    Blosc, fletcher32, ...), which h5py decodes. Bit i of the mask set means filter i was skipped for that chunk."""
    if ds.chunks is None or ds.chunks[1:] != ds.shape[1:]:
        return None
    dcpl = ds.id.get_create_plist()
    deflate = []  # pipeline positions of the gzip filters, undone last to first
    for i in range(dcpl.get_nfilters()):
        code = dcpl.get_filter(i)[0]
        if code == h5py.h5z.FILTER_DEFLATE:
            deflate.insert(0, i)
        elif not (code == h5py.h5z.FILTER_SHUFFLE and ds.dtype.itemsize == 1):
            return None

    size = int(np.prod(ds.chunks)) * ds.dtype.itemsize  # a chunk's bytes, decoded

    def decode(raw: bytes, mask: int) -> bytes:
        for i in deflate:
            if not mask >> i & 1:
                raw = inflater()(raw, bufsize=size)  # one output buffer of the right size, never grown
        return raw

    return decode


# --- split and normalisation


def split_episodes(
    num_episodes: int, val_fraction: float = 0.1, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random split of episode indices into (train, val), each sorted."""
    # DEVIATION: split by episode, not by clip (the official code splits clips 90/10, so validation clips share
    # frames with training clips; evaluation and an honest validation loss need held-out episodes).
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(num_episodes)
    num_val = min(round(val_fraction * num_episodes), num_episodes - 1)
    if val_fraction > 0 and num_episodes > 1:
        num_val = max(num_val, 1)
    return np.sort(perm[num_val:]), np.sort(perm[:num_val])


def action_stats(traj: Trajectories, episodes: Sequence[int]) -> dict[str, list[float]]:
    """Per-dimension mean and std (ddof=1, as torch.std) of the actions of `episodes`, NaN rows dropped.

    Plain lists, so they can be saved in a checkpoint and loaded with `torch.load(weights_only=True)`.
    """
    # DEVIATION: statistics over the training episodes only (the official code uses the whole file, train and val).
    episodes = np.asarray(episodes, dtype=np.int64)
    rows = traj.episode_rows(episodes)
    action = traj.read("action", rows).astype(np.float64)  # (rows, A)
    action = action[np.isfinite(action).all(axis=1)]
    if len(action) < 2:
        raise ValueError(f"{traj.path}: fewer than 2 finite action rows in the given episodes")
    mean, std = action.mean(axis=0), action.std(axis=0, ddof=1)
    # One row holding most of a dimension's variance (an outlier such as 3e38) would z-score every other row of
    # that dimension to ~0: a constant input the model cannot learn from.
    share = ((action - mean) ** 2 / np.maximum((len(action) - 1) * std**2, 1e-300)).max(axis=0)  # (A,)
    if not np.isfinite(std).all() or ((share > 0.5) & (std > 0)).any():
        d = int(np.argmax(np.where(np.isfinite(share), share, np.inf)))
        r = int(np.argmax(np.abs(action[:, d] - mean[d])))
        raise UsageError(
            f"{traj.path}: action dimension {d} is dominated by one outlier ({action[r, d]:.3g}); "
            "z-scored, it would be constant: fix or drop that episode"
        )
    # DEVIATION: a constant action dim gets std 1 instead of a division by zero (the official code has no eps).
    std = np.where(std > 0, std, 1.0)
    return {"mean": mean.tolist(), "std": std.tolist()}


def normalize_actions(action: np.ndarray, stats: dict) -> np.ndarray:
    """Raw actions (..., A) -> z-scored float32 (..., A); non-finite (the NaN last rows) -> 0 after scaling."""
    a = (np.asarray(action, np.float64) - np.asarray(stats["mean"])) / np.asarray(stats["std"])
    return np.where(np.isfinite(a), a, 0.0).astype(np.float32)


def denormalize_actions(action: np.ndarray, stats: dict) -> np.ndarray:
    """z-scored actions (..., A) -> raw float32 actions (..., A); the inverse of `normalize_actions`."""
    return (np.asarray(action, np.float64) * np.asarray(stats["std"]) + np.asarray(stats["mean"])).astype(np.float32)


# --- clip loader


def cache_limit_bytes() -> int:
    """Largest pixel array the loader keeps in RAM: CACHE_FRACTION of the memory available now (2 GiB if unknown)."""
    try:
        return int(CACHE_FRACTION * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows) or the name is unknown
        return 2 << 30


def default_loader_workers() -> int:
    """Worker processes for the training ClipLoader when not told: the cores this process may run on, less one for
    the training loop, at most LOADER_WORKERS_MAX, divided among the ranks on this machine under torchrun (its
    LOCAL_WORLD_SIZE), so that DDP does not start more processes than cores (0: the background thread)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(LOADER_WORKERS_MAX, cores - 1)) // local_ranks


def _file_handles(traj: Trajectories) -> list[tuple[str, int, int]]:
    """(path, chunk-cache slots, chunk-cache bytes) of every file behind `traj`: read in the main process, so that
    a worker opens its own handles with the same chunk cache."""
    files = traj.parts if isinstance(traj, TrajectoryUnion) else [traj]
    return [(t.path, *t.file.id.get_access_plist().get_cache()[1:3]) for t in files]


def _reopened(traj: Trajectories, handles: list[tuple[str, int, int]]) -> Trajectories:
    """A copy of `traj` reading through new file handles opened in this process (an open h5py handle must not be
    used across a fork), sharing `traj`'s RAM-cached columns; no validation (`traj` was validated on open)."""
    files = [copy.copy(t) for t in (traj.parts if isinstance(traj, TrajectoryUnion) else [traj])]
    for t, (path, slots, nbytes) in zip(files, handles, strict=True):
        t.file = h5py.File(path, "r", rdcc_nbytes=nbytes, rdcc_nslots=slots)
    if not isinstance(traj, TrajectoryUnion):
        return files[0]
    union = copy.copy(traj)
    union.parts, union.file = files, files[0].file
    return union


class _WorkerBatches(torch.utils.data.Dataset):
    """The batches of a ClipLoader as a dataset for DataLoader worker processes: item `starts` (B,) is the batch of
    the clips starting at those rows, made by `make_batch(starts, traj)` on the worker's own file handles (opened
    on its first batch, with the main process's chunk-cache size)."""

    def __init__(self, make_batch: Callable, traj: Trajectories):
        self.make_batch, self.traj, self.handles, self.opened = make_batch, traj, _file_handles(traj), None

    def __getitem__(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.opened is None:
            self.opened = _reopened(self.traj, self.handles)
        return self.make_batch(starts, self.opened)


def _init_loader_worker(worker_id: int) -> None:
    """A loader worker leaves Ctrl-C and SIGTERM to the main process (it inherited the main process's handlers,
    train.py's included), which finishes its step and then stops the workers; torch's watchdog ends a worker
    whose main process died."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _ended_workers(workers: list, timeout: float = 1.0) -> list[str]:
    """'pid (how it ended)' of the worker processes that have ended, waiting up to `timeout` s for one that is
    ending (its pipes close an instant before its exit status is known)."""
    ended = mp.connection.wait([w.sentinel for w in workers], timeout)
    out = []
    for w in workers:
        if w.sentinel in ended:
            w.join()
            code = w.exitcode
            out.append(f"{w.pid} ({f'killed by {signal.Signals(-code).name}' if code < 0 else f'exit code {code}'})")
    return out


class ClipLoader:
    """Batches of clips from some episodes: (pixels uint8 (B, T, H, W, 3), actions float32 (B, T, frameskip * A)).

    One clip per raw start row s = 0..len - T*frameskip of each episode (docs/method.md §3), T = history + num_preds
    frames every `frameskip` raw rows (the model config's fields of those names). Iterate one epoch with
    `for batch in loader` / `loader.epoch(k)`, or forever (resumable by step) with `loader.steps(start_step)`.
    The order of epoch k is a permutation from `np.random.default_rng([seed, k])`, so it is deterministic and
    independent of how many epochs were run before. Pixels are kept in RAM when they fit in `cache_limit_bytes()`
    (`cache=None`), else streamed with chunk-aware reads (rows of a batch sorted, each chunk decompressed once).
    With `world_size` > 1 each rank gets an equal, disjoint share of every epoch (for torchrun).

    Batches are assembled `prefetch` batches ahead by a background thread (`workers=0`), or, for streamed pixels,
    by `workers` processes (a torch DataLoader, forked): h5py decompresses under one lock per process, so one
    process is the ceiling on 224 px frames. The order stays in this process, which hands batch k to
    worker k mod `workers` and yields the batches in order, so the stream is the thread's, batch for batch, for
    every seed, epoch, `steps(start_step)` and rank. Each worker opens its own file handles on its first batch,
    with its own chunk cache; `pin_memory` puts the batches in page-locked memory (for CUDA). With the pixels in
    RAM the batches come from the thread whatever `workers` says: a batch is then a gather from one array, far
    cheaper than a training step, and worker processes would only add a copy through shared memory. So do
    platforms without fork (workers inherit the loader instead of receiving a pickled copy).
    """

    def __init__(
        self,
        traj: Trajectories,
        episodes: Sequence[int],
        stats: dict,
        batch_size: int = 64,
        *,
        history: int,
        num_preds: int,
        frameskip: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        prefetch: int = 4,
        cache: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        self.traj, self.batch_size, self.frameskip = traj, batch_size, frameskip
        self.num_frames = history + num_preds
        self.shuffle, self.drop_last, self.seed, self.prefetch = shuffle, drop_last, seed, prefetch
        self.rank, self.world_size = rank, world_size
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers, self.pin_memory = workers, pin_memory
        span = self.num_frames * frameskip  # raw rows (and raw actions) per clip
        episodes = np.asarray(episodes, dtype=np.int64).reshape(-1)
        if len(episodes) == 0:
            raise ValueError(f"{traj.path}: no episodes to draw clips from")
        if len(stats["mean"]) != traj.action_dim or len(stats["std"]) != traj.action_dim:
            raise ValueError(f"action statistics have {len(stats['mean'])} dims, {traj.path} has {traj.action_dim}")
        lens = traj.ep_len[episodes]
        short = int((lens < span).sum())
        if short == len(episodes):
            raise ValueError(f"{traj.path}: all {len(episodes)} episodes are shorter than one clip ({span} rows)")
        if short:
            warnings.warn(
                f"{traj.path}: skipping {short} of {len(episodes)} episodes shorter than one clip ({span} rows)",
                stacklevel=2,
            )
        self.starts = traj.episode_rows(episodes[lens >= span], drop_last=span - 1)  # (clips,) first row of each clip
        self.action = normalize_actions(traj.cache("action"), stats)  # (N, A), normalised once for every clip
        pixel_bytes = traj.num_rows * int(np.prod(traj.img_shape))
        if cache or (cache is None and pixel_bytes <= cache_limit_bytes()):
            traj.cache("pixels")

    @property
    def in_ram(self) -> bool:
        """Whether the pixels are read from RAM (cached), not streamed from the file."""
        return "pixels" in self.traj._cache

    @property
    def processes(self) -> int:
        """Worker processes that assemble the batches: `workers`, or 0 (the background thread) when the pixels are
        in RAM or this platform cannot fork."""
        return 0 if self.in_ram or "fork" not in mp.get_all_start_methods() else self.workers

    def __len__(self) -> int:
        per_rank = len(self.starts) // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.starts)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        if self.world_size == 1:
            return order
        # Rank r takes the r-th slice of every global batch, so the ranks' batch b together are exactly batch b of
        # one process with batch_size * world_size; the last partial global batch is shared out evenly.
        g = self.batch_size * self.world_size
        full = n // g * g
        head = order[:full].reshape(-1, self.world_size, self.batch_size)[:, self.rank].reshape(-1)
        tail = order[full:]
        return np.concatenate([head, tail[self.rank :: self.world_size][: len(tail) // self.world_size]])

    def _batch_starts(self, epoch: int, start_batch: int = 0) -> Iterator[np.ndarray]:
        order = self._order(epoch)
        for b in range(start_batch, len(self)):
            yield self.starts[order[b * self.batch_size : (b + 1) * self.batch_size]]

    def _make_batch(self, starts: np.ndarray, traj: Trajectories | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The clips starting at rows `starts`, read through `traj` (a worker's own handles; default self.traj)."""
        traj = self.traj if traj is None else traj
        B, T, f = len(starts), self.num_frames, self.frameskip
        obs_rows = starts[:, None] + f * np.arange(T)  # (B, T): rows s, s+5, s+10, s+15
        act_rows = starts[:, None] + np.arange(T * f)  # (B, T*f): rows s..s+19
        if torch.utils.data.get_worker_info() is not None:
            # a worker's batch reaches the main process through shared memory: decode straight into it, not into
            # private memory that the transfer would then copy
            shape = (B, T, *traj.img_shape)  # (B, T, H, W, 3)
            shared = torch.UntypedStorage._new_shared(int(np.prod(shape)))  # uint8: one byte per element
            pixels = torch.empty(0, dtype=torch.uint8).set_(shared, 0, shape)
        else:  # numpy asks for huge pages for large arrays: a fresh 224 px batch is first written 3-4x faster
            pixels = torch.from_numpy(np.empty((B, T, *traj.img_shape), np.uint8))
        traj.read("pixels", obs_rows.reshape(-1), out=pixels.view(B * T, *traj.img_shape).numpy())
        actions = self.action[act_rows].reshape(B, T, -1)  # (B, T, f*A): block k = raw actions 5k..5k+4, row-major
        return pixels, torch.from_numpy(actions)

    def _from_workers(self, batch_starts: Iterator[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `batch_starts`, in order, assembled by `self.processes` forked worker processes."""
        loader = torch.utils.data.DataLoader(
            _WorkerBatches(self._make_batch, self.traj),
            batch_size=None,  # an item is a whole batch
            sampler=batch_starts,  # read here, in order: worker k mod n makes batch k
            num_workers=self.processes,
            pin_memory=self.pin_memory,
            prefetch_factor=max(2, -(-self.prefetch // self.processes)),  # batches in flight per worker
            worker_init_fn=_init_loader_worker,
            multiprocessing_context="fork",  # workers inherit the loader: no pickled copy of its arrays
            generator=torch.Generator(),  # the workers' seed is drawn from this, not from the global RNG (training's)
        )
        batches = iter(loader)
        try:
            yield from map(tuple, batches)  # torch hands a batch back as a list
        except Exception as e:  # a worker that died breaks the stream in several ways; name the cause
            ended = _ended_workers(batches._workers)
            if ended:
                raise RuntimeError(f"loader worker process {', '.join(ended)} ended unexpectedly") from e
            raise
        finally:  # stop the workers now, not when the last reference goes (a traceback may hold one)
            batches._shutdown_workers()

    def _prefetched(self, batch_starts: Iterator[np.ndarray]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.processes:
            yield from self._from_workers(batch_starts)
            return
        if self.prefetch <= 0:
            yield from map(self._make_batch, batch_starts)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop, end = threading.Event(), object()

        def put(item) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def work() -> None:
            try:
                for starts in batch_starts:
                    if stop.is_set():
                        return
                    put(self._make_batch(starts))
                put(end)
            except Exception as e:  # noqa: BLE001 (handed to the consumer, which re-raises it)
                put(e)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while (item := q.get()) is not end:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch, from batch `start_batch` on."""
        return self._prefetched(self._batch_starts(epoch, start_batch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def steps(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches forever, epoch after epoch; batch i of the stream is global step start_step + i."""
        if len(self) == 0:
            raise ValueError(f"{self.traj.path}: fewer clips ({len(self.starts)}) than one batch ({self.batch_size})")

        def all_starts() -> Iterator[np.ndarray]:
            epoch, batch = divmod(start_step, len(self))
            while True:
                yield from self._batch_starts(epoch, batch)
                epoch, batch = epoch + 1, 0

        return self._prefetched(all_starts())


# --- writing (the layout above, one episode at a time)


def append_episode(f: h5py.File, episode: dict[str, np.ndarray], pixel_format: str = "gzip") -> None:
    """Append one episode: the per-row columns first, ep_len/ep_offset last, so a crash leaves a repairable tail.
    A new file's pixels are stored in `pixel_format` (PIXEL_FORMATS); a file that has them keeps its own format."""
    num = len(episode["pixels"])
    e = len(f["ep_len"]) if "ep_len" in f else 0
    columns = dict(episode, ep_idx=np.full(num, e, np.int32), step_idx=np.arange(num, dtype=np.int64))
    if "ep_len" not in f:
        for c, x in columns.items():
            if c == "pixels":
                rows = max(1, PIXEL_CHUNK_BYTES // x[0].nbytes)
                opts = {"chunks": (rows, *x.shape[1:]), **pixel_compression(pixel_format)}
            else:
                opts = {"chunks": (TABLE_CHUNK_ROWS, *x.shape[1:])}
            f.create_dataset(c, shape=(0, *x.shape[1:]), maxshape=(None, *x.shape[1:]), dtype=x.dtype, **opts)
        f.create_dataset("ep_len", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(TABLE_CHUNK_ROWS,))
        f.create_dataset("ep_offset", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(TABLE_CHUNK_ROWS,))
    expected = set(f.keys()) - set(EPISODE_COLUMNS)
    if set(columns) != expected:
        raise ValueError(f"{f.filename}: episode columns {sorted(columns)} differ from the file's {sorted(expected)}")
    start = int(f["ep_offset"][-1] + f["ep_len"][-1]) if e else 0
    for c, x in columns.items():
        f[c].resize(start + num, axis=0)
        f[c][start:] = x
    for c, value in (("ep_len", num), ("ep_offset", start)):
        f[c].resize(e + 1, axis=0)
        f[c][e] = value
    f.flush()


def default_data_path(env: str, img_size: int, episodes: int, policy: str | None = None) -> str:
    """data/<env>_<size>px_<episodes>ep.h5, with _<policy> before .h5 for another than the env's default policy."""
    return os.path.join("data", f"{env}_{img_size}px_{episodes}ep{'_' + policy if policy else ''}.h5")


def describe(path: str, goal_offset: int = 25) -> dict:
    """Summary statistics of a dataset: episode lengths, action and state mean/std per dim, and the fraction of
    (t, t + goal_offset) pairs whose start already satisfies the env's success test for that goal."""
    import envs

    with Trajectories(path) as traj:
        env = str(traj.file.attrs.get("env", ""))
        action = traj.cache("action")
        finite = np.isfinite(action).all(1)
        out = {
            "path": path,
            "env": env,
            "episodes": traj.num_episodes,
            "rows": traj.num_rows,
            "episode_length": {
                "mean": float(traj.ep_len.mean()),
                "min": int(traj.ep_len.min()),
                "max": int(traj.ep_len.max()),
            },
            "action_mean": action[finite].mean(0).tolist(),
            "action_std": action[finite].std(0).tolist(),
        }
        if "state" in traj.columns and env in envs.REGISTRY:
            state = traj.cache("state").astype(np.float64)
            out["state_mean"], out["state_std"] = state.mean(0).tolist(), state.std(0).tolist()
            solved = total = 0
            for e in range(traj.num_episodes):
                s = state[traj.ep_offset[e] : traj.ep_offset[e] + traj.ep_len[e]]
                for t in range(len(s) - goal_offset):
                    solved += envs.success(env, s[t], envs.goal_from_state(env, s[t + goal_offset]))
                    total += 1
            out["solved_pairs"] = solved / max(total, 1)
    return out


# --- command line: collection lives in collect.py

if __name__ == "__main__":
    import collect  # imported here: collect.py builds on this file, never the reverse

    collect.main()
