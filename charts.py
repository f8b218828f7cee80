"""PNG charts and episode pictures without a plotting library: a 5x7 bitmap font, line charts, the training curves
of train.py's metrics.jsonl, and filmstrips of planning episodes (observation beside goal).

Serves train.py (metrics.png), evaluate.py (--video filmstrips and summary.png) and analyses.py (the surprise plot
and the success-against-training-time curve). `python charts.py compare --pair N --out F.png DIR:LABEL ...` stacks
one pair's filmstrips from several --video folders (say, CEM's and the policy's). Only numpy: images are (H, W, 3)
uint8 arrays written with envs.save_png; GIFs need Pillow or imageio and are skipped without them. Nothing here is
part of the method.
"""

import argparse
import glob
import math
import os
import struct
import sys
import zlib

import numpy as np

import envs
from cli import read_metrics

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


# --- episode pictures: labelled filmstrips of observation beside goal


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


# --- comparing two ways of planning on one pair


def load_png(path: str) -> np.ndarray:
    """Read an 8-bit, non-interlaced grey, RGB or RGBA PNG as (H, W, 3) uint8 (zlib only, no imaging library)."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG file")
    pos, idat, header = 8, [], None
    while pos + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[pos : pos + 8])
        body = raw[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    if header is None:
        raise ValueError(f"{path}: PNG without a header chunk")
    w, h, depth, colour, _, _, interlace = header
    channels = {0: 1, 2: 3, 6: 4}.get(colour)
    if depth != 8 or channels is None or interlace:
        raise ValueError(
            f"{path}: only 8-bit non-interlaced grey, RGB or RGBA PNGs are read (bit depth {depth}, "
            f"colour type {colour}, interlace {interlace})"
        )
    stride = w * channels
    data_rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, stride + 1)
    out = np.zeros((h, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for y in range(h):  # undo the per-row filters (PNG spec: none, sub, up, average, Paeth)
        kind, line = data_rows[y, 0], data_rows[y, 1:].astype(np.int32)
        if kind in (0, 2):
            cur = (line + (prev if kind == 2 else 0)) & 255
        else:
            cur = np.zeros(stride, np.int32)
            for x in range(stride):
                left = cur[x - channels] if x >= channels else 0
                up_left = prev[x - channels] if x >= channels else 0
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + prev[x]) // 2
                else:
                    p = left + prev[x] - up_left
                    pa, pb, pc = abs(p - left), abs(p - prev[x]), abs(p - up_left)
                    pred = left if pa <= pb and pa <= pc else prev[x] if pb <= pc else up_left
                cur[x] = (line[x] + pred) & 255
        out[y], prev = cur, cur
    img = out.astype(np.uint8).reshape(h, w, channels)
    return np.repeat(img, 3, axis=2) if channels == 1 else img[..., :3]


def compare_episodes(folders: list[str], labels: list[str], pair: int) -> np.ndarray:
    """The filmstrips of one pair from several --video folders (episode_NNN_ok/fail.png), one above another, each
    under its label (say, the planner that made it). (H, W, 3) uint8; ValueError (one line) when one is missing."""
    sheets = []
    for folder, label in zip(folders, labels, strict=True):
        hits = sorted(glob.glob(os.path.join(folder, f"episode_{pair:03d}_*.png")))
        if not hits:
            raise ValueError(f"{folder}: no filmstrip of pair {pair} (episode_{pair:03d}_ok.png or _fail.png)")
        sheet = load_png(hits[0])  # (h, w, 3)
        band = np.full((22, sheet.shape[1], 3), 255, np.uint8)
        draw_text(band, 0, 2, label, (0, 0, 160), scale=2)
        sheets.append(np.concatenate([band, sheet]))
    return stack_sheets(sheets)


def main(argv: list[str]) -> None:
    """python charts.py compare --pair N --out FILE.png DIR:LABEL DIR:LABEL ..."""
    parser = argparse.ArgumentParser(prog="charts.py", description="Pictures from files other commands wrote.")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compare", help="one pair's filmstrips from several evaluate.py --video folders, stacked")
    comp.add_argument("folders", nargs="+", metavar="DIR:LABEL", help="a --video folder and the label above it")
    comp.add_argument("--pair", type=int, required=True, help="the pair's index (the NNN of episode_NNN_*.png)")
    comp.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    split = [f.rsplit(":", 1) if ":" in f else (f, os.path.basename(os.path.normpath(f))) for f in args.folders]
    try:
        sheet = compare_episodes([d for d, _ in split], [label for _, label in split], args.pair)
    except (OSError, ValueError, zlib.error) as e:
        parser.error(str(e).splitlines()[0])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    envs.save_png(args.out, sheet)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
