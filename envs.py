"""The four LeWM pixel environments (PushT, TwoRoom, Reacher, Cube) as headless Gymnasium envs, plus scripted policies.

Each simulator follows the reference behaviour described in docs/envs.md (stable-worldmodel / DINO-WM PushT,
TwoRoom, dm_control Reacher, OGBench Cube) closely enough that the same start state and actions give the same states,
and renders RGB frames directly at the requested image size with the small anti-aliased numpy rasteriser below
(no pygame, no OpenCV, no MuJoCo). Observations are frames; everything numeric lives in `info`, so a data collector
can record every info key as a column (docs/envs.md §6).

Deliberately absent: human rendering, reward shaping (rewards are the reference's, LeWM never uses them), variation
spaces (colours and sizes are the reference defaults), a TimeLimit in the registration (callers pass
max_episode_steps).

Everything the rest of the project needs to know about an environment (its id, policies, success test, data
defaults, goal and distance dims, state columns, probes, perturbation hooks) is its `REGISTRY` entry at the end of
the file; adding an environment means one new section and one entry.

Usage:
    import envs
    env = envs.make_env("pusht", img_size=64, max_episode_steps=100)   # or gym.make("LeWM/PushT-v0", img_size=64)
    obs, info = env.reset(seed=0)
    policy = envs.make_policy("pusht", env, rng=np.random.default_rng(0))
    policy.reset(info)
    obs, reward, terminated, truncated, info = env.step(policy(info))
"""

import functools
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pymunk
from gymnasium import spaces

# --- common: anti-aliased drawing helpers
#
# Canvases are float32 (H, W, 3) arrays holding 0..255 colour values; convert with `to_uint8` at the end.
# Coordinates are continuous pixel coordinates: x right, y down, pixel (row i, column j) covers [j, j+1) x [i, i+1),
# so its centre is (j + 0.5, i + 0.5). Coverage of a pixel by a shape is approximated from the signed distance d
# (pixels, negative inside) of its centre to the shape boundary: alpha = clip(0.5 - d, 0, 1), i.e. an exact box-filter
# for a straight edge and a good approximation elsewhere. Only the shape's bounding box is touched, so drawing a
# small shape on a large canvas is cheap. To draw into a sub-window, pass a view `canvas[y0:y1, x0:x1]` and shift
# the coordinates by (-x0, -y0).


def to_uint8(canvas: np.ndarray) -> np.ndarray:
    """Round a float canvas (values in [0, 255]) to uint8."""
    return (canvas + 0.5).astype(np.uint8)


def _bbox(canvas: np.ndarray, lo_x: float, lo_y: float, hi_x: float, hi_y: float):
    """Integer pixel window [x0, x1) x [y0, y1) covering the float box, clipped to the canvas; None if empty."""
    h, w = canvas.shape[:2]
    x0, y0 = max(math.floor(lo_x), 0), max(math.floor(lo_y), 0)
    x1, y1 = min(math.ceil(hi_x), w), min(math.ceil(hi_y), h)
    if x0 >= x1 or y0 >= y1:
        return None
    xs = np.arange(x0, x1, dtype=np.float32) + 0.5  # (w,) pixel centres
    ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5  # (h, 1)
    return x0, y0, x1, y1, xs, ys


def _blend(canvas: np.ndarray, box, alpha: np.ndarray, color) -> None:
    """canvas <- canvas * (1 - alpha) + color * alpha inside the box (alpha is (h, w) in [0, 1])."""
    x0, y0, x1, y1 = box[:4]
    region = canvas[y0:y1, x0:x1]
    region += (np.asarray(color, np.float32) - region) * alpha[..., None]


def _coverage(d: np.ndarray, grow: float = 0.0) -> np.ndarray:
    """Pixel coverage of the region {signed distance < grow} from the centre distance d."""
    return np.clip(0.5 + grow - d, 0.0, 1.0)


def capsule_alpha(canvas: np.ndarray, *, a, b, radius: float):
    """(box, alpha) coverage of the capsule (fat segment) of `radius` around segment a-b; box None if off-canvas."""
    ax, ay, bx, by = float(a[0]), float(a[1]), float(b[0]), float(b[1])
    pad = radius + 1
    box = _bbox(canvas, min(ax, bx) - pad, min(ay, by) - pad, max(ax, bx) + pad, max(ay, by) + pad)
    if box is None:
        return None, None
    xs, ys = box[4], box[5]
    ex, ey = bx - ax, by - ay
    t = ((xs - ax) * ex + (ys - ay) * ey) / max(ex * ex + ey * ey, 1e-12)  # (h, w) projection parameter
    t = np.clip(t, 0.0, 1.0)
    d = np.sqrt((xs - ax - t * ex) ** 2 + (ys - ay - t * ey) ** 2) - radius  # (h, w)
    return box, _coverage(d)


def _box_downsample(img: np.ndarray, k: int) -> np.ndarray:
    """Average the k x k sample blocks of an (H k, W k, C) float image: box-filter anti-aliasing."""
    h, w, c = img.shape[0] // k, img.shape[1] // k, img.shape[2]
    return img.reshape(h, k, w, k, c).mean(axis=(1, 3))


def save_png(path: str, image: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as a PNG (zlib only, no imaging library)."""
    img = np.ascontiguousarray(image, np.uint8)
    h, w = img.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()  # filter 0 rows

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
        )


# --- common: scripted policies


def _clip_action(a: np.ndarray) -> np.ndarray:
    """A policy's action as the env expects it: float32, clipped to the action box [-1, 1]."""
    return np.clip(a, -1.0, 1.0).astype(np.float32)


# --- PushT (docs/envs.md §2): pymunk pusher disc and T block, 512 x 512 world, y down

PUSHT_WORLD = 512.0
PUSHT_TEE_BAR = ((-60.0, 30.0), (60.0, 30.0), (60.0, 0.0), (-60.0, 0.0))  # body-local vertices, order as the reference
PUSHT_TEE_STEM = ((-15.0, 30.0), (-15.0, 120.0), (15.0, 120.0), (15.0, 30.0))
PUSHT_TEE_COG = (0.0, 45.0)  # mean of the two rectangle centroids (reference), not the area centroid (0, 40.7)
PUSHT_GOAL_POSE = (256.0, 256.0, math.pi / 4)  # where the green T is drawn; fixed for every episode
PUSHT_AGENT_RADIUS = 15.0
PUSHT_K_P, PUSHT_K_V = 100, 20  # PD gains of the pusher
PUSHT_DT, PUSHT_SUBSTEPS = 0.01, 10  # 10 substeps of 0.01 s per env step (control at 10 Hz)
PUSHT_WALLS = (((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506)))
PUSHT_WALL_RADIUS = 2.0
PUSHT_GOAL_COLOR = (144, 238, 144)  # LightGreen
PUSHT_BLOCK_COLOR = (119, 136, 153)  # LightSlateGray: outlines
PUSHT_BLOCK_FILL = (142, 163, 183)  # min(1.2 c, 255): pymunk debug-draw fill
PUSHT_AGENT_COLOR = (65, 105, 225)  # RoyalBlue
PUSHT_AGENT_FILL = (78, 126, 255)
PUSHT_WALL_COLOR = (211, 211, 211)  # LightGray


def pusht_success(state, goal_state) -> bool:
    """docs/envs.md §2: agent xy and block xy jointly within 20 px, and block angle within pi/9 (mod 2 pi)."""
    s, g = np.asarray(state, np.float64), np.asarray(goal_state, np.float64)
    pos_diff = np.linalg.norm(g[:4] - s[:4])
    angle_diff = np.abs(g[4] - s[4]) % (2 * np.pi)
    angle_diff = min(angle_diff, 2 * np.pi - angle_diff)
    return bool(pos_diff < 20 and angle_diff < np.pi / 9)


def pusht_errors(state, goal_state) -> dict[str, float]:
    """The parts of the success test: agent and block position errors (px), the two jointly (the tested
    distance, < 20) and the block angle error (degrees, < 20)."""
    s, g = np.asarray(state, np.float64), np.asarray(goal_state, np.float64)
    d = np.abs(g[4] - s[4]) % (2 * np.pi)
    return {
        "agent_px": float(np.linalg.norm(g[:2] - s[:2])),
        "block_px": float(np.linalg.norm(g[2:4] - s[2:4])),
        "joint_px": float(np.linalg.norm(g[:4] - s[:4])),
        "angle_deg": float(np.degrees(min(d, 2 * np.pi - d))),
    }


def rotate(points, angle: float) -> np.ndarray:
    """Rotate (N, 2) points by `angle` radians: R = [[c, -s], [s, c]] (counter-clockwise for y up)."""
    c, s = math.cos(angle), math.sin(angle)
    p = np.asarray(points, np.float64)
    return np.stack([c * p[..., 0] - s * p[..., 1], s * p[..., 0] + c * p[..., 1]], axis=-1)


def polygon_distance(xs: np.ndarray, ys: np.ndarray, vertices) -> np.ndarray:
    """Signed distance (negative inside) of points to a convex polygon, as the max over its edges' half-planes.

    Exact near edges (which is what anti-aliasing needs); outside corners it under-estimates (square corners).
    xs (w,) and ys (h, 1) broadcast to (h, w); vertices (K, 2) in either winding order.
    """
    px, py = zip(*np.asarray(vertices, np.float64).tolist())  # plain floats: K is tiny, numpy calls cost more
    k = len(px)
    area2 = sum(px[i] * py[(i + 1) % k] - px[(i + 1) % k] * py[i] for i in range(k))
    sign = 1.0 if area2 > 0 else -1.0  # outward normal is (ey, -ex) for positive shoelace area
    d = None
    for i in range(k):
        ex, ey = px[(i + 1) % k] - px[i], py[(i + 1) % k] - py[i]
        length = math.hypot(ex, ey)
        if length == 0.0:
            continue
        nx, ny = sign * ey / length, -sign * ex / length
        dk = xs * nx + (ys * ny - (px[i] * nx + py[i] * ny))  # (h, w): 1-D products, one broadcast add
        d = dk if d is None else np.maximum(d, dk, out=d)
    return d


def draw_polygon(canvas: np.ndarray, *, vertices, color) -> None:
    """Fill a convex polygon (vertices (K, 2) in pixel coordinates)."""
    v = np.asarray(vertices, np.float64)
    box = _bbox(canvas, v[:, 0].min() - 1.0, v[:, 1].min() - 1.0, v[:, 0].max() + 1.0, v[:, 1].max() + 1.0)
    if box is None:
        return
    _blend(canvas, box, _coverage(polygon_distance(box[4], box[5], v)), color)


def composite(background: np.ndarray, layers) -> np.ndarray:
    """Alpha-composite constant-colour layers, bottom to top, over a channel-first (3, h, w) float background.

    layers: list of (alpha (h, w) in [0, 1], colour (3,)). Equivalent to blending them one after another, but the
    per-layer work is on single-channel arrays and the colours are mixed with one small matmul:
    out = bg * prod_i (1 - a_i) + sum_i c_i a_i prod_{j > i} (1 - a_j). Returns float32 (3, h, w).
    """
    n, (h, w) = len(layers), background.shape[1:]
    weights = np.empty((n, h, w), np.float32)  # (N, h, w) visible share of each layer
    above = np.ones((h, w), np.float32)  # (h, w) transmittance of everything above
    for i in range(n - 1, -1, -1):
        np.multiply(layers[i][0], above, out=weights[i])
        above -= weights[i]  # above * (1 - alpha_i)
    colors = np.array([c for _, c in layers], np.float32)  # (N, 3)
    out = (colors.T @ weights.reshape(n, h * w)).reshape(3, h, w)  # (3, h, w)
    out += background * above
    return out


def _to_px(points_world, img_size: int) -> np.ndarray:
    """World (512-px canvas) -> pixel coordinates at img_size. The + 0.5 puts world point x at the centre of the
    512-canvas pixel x, as pygame rasterises; cv2's resize then maps canvas coordinates by img_size / 512."""
    return (np.asarray(points_world, np.float64) + 0.5) * (img_size / PUSHT_WORLD)


def _tee_world(pose, part) -> np.ndarray:
    """World vertices (4, 2) of one T rectangle at pose (x, y, angle): world = position + R(angle) v."""
    return np.asarray(pose[:2], np.float64) + rotate(part, pose[2])


# DEVIATION: frames are drawn directly at img_size with analytic anti-aliasing, instead of pygame at 512 px followed
# by cv2's bilinear resize (which aliases the 4-px outlines), and vertices / disc centres are not rounded to whole
# 512-canvas pixels; shapes, colours and draw order are the reference's, pixel values differ slightly at edges.
@functools.lru_cache(maxsize=16)
def _pusht_background(img_size: int, goal_pose: tuple):
    """Static layers, cached per (size, goal pose): white + goal T (under the moving parts, channel-first), the
    wall coverage (drawn over them, as pymunk's debug-draw draws the walls last) and the full static uint8 frame."""
    under = np.full((img_size, img_size, 3), 255.0, np.float32)  # white
    for part in (PUSHT_TEE_BAR, PUSHT_TEE_STEM):
        draw_polygon(under, vertices=_to_px(_tee_world(goal_pose, part), img_size), color=PUSHT_GOAL_COLOR)
    wall_alpha = np.zeros((img_size, img_size), np.float32)
    for a, b in PUSHT_WALLS:
        pa, pb = _to_px([a, b], img_size)
        box, alpha = capsule_alpha(wall_alpha[..., None], a=pa, b=pb, radius=PUSHT_WALL_RADIUS * img_size / PUSHT_WORLD)
        x0, y0, x1, y1 = box[:4]
        np.maximum(wall_alpha[y0:y1, x0:x1], alpha, out=wall_alpha[y0:y1, x0:x1])
    full = under + (np.asarray(PUSHT_WALL_COLOR, np.float32) - under) * wall_alpha[..., None]
    # walls reach (506 + 0.5 + 2) world px from the origin; pixels farther than `band` from the border never see them
    band = math.ceil((5 + 0.5 + PUSHT_WALL_RADIUS) * img_size / PUSHT_WORLD) + 2
    under = np.ascontiguousarray(under.transpose(2, 0, 1))  # (3, H, W) channel-first for `composite`
    full = to_uint8(full)
    for arr in (under, wall_alpha, full):
        arr.flags.writeable = False
    return under, wall_alpha, full, band


class PushTEnv(gym.Env):
    """
    ## Description
    Push a T-shaped block with a disc-shaped pusher on a frictionless 512 x 512 table (pymunk), seen from above.
    Re-implementation of stable-worldmodel's `swm/PushT-v1` (docs/envs.md §2): same bodies, PD control, solver
    settings and reset/setter semantics, so the same start state and actions give the same states. A green T is
    always drawn at the fixed pose (256, 256, pi/4) as a visual anchor; the task goal is `goal_state`.

    ## Action Space
    `Box(-1, 1, (2,), float32)`: relative target offset of the pusher in units of 100 px (not clipped by the env).
    Per env step the target `agent_pos + 100 a` is fixed and 10 substeps of 0.01 s apply the PD law
    `v <- v + dt (k_p (target - p) - k_v v)` with k_p = 100, k_v = 20 to the kinematic pusher.

    ## Observation Space
    `Box(0, 255, (img_size, img_size, 3), uint8)`: the RGB frame. Numbers are in `info`:
    `state` (7,) = [agent x, agent y, block x, block y, block angle mod 2 pi, agent vx, agent vy] (block position is
    the body origin = middle of the bar's top edge), `proprio` (4,) = [agent x, y, vx, vy], `goal_state` (7,),
    `goal_proprio` (4,), `is_success`, `pos_agent` (2,), `vel_agent` (2,), `block_pose` (3,) with the unwrapped
    angle, `goal_pose` (3,) (where the green T is drawn) and `n_contacts` (contact points per substep, rounded up).

    ## Rewards
    `-||goal_state - state||_2` over the 7-D state (as the reference; LeWM does not use it).

    ## Starting State
    Agent position ~ U([50, 450]^2), block position ~ U([100, 400]^2), block angle ~ U[-2 pi, 2 pi], agent at rest;
    the goal state is drawn the same way. `options={"state": s, "goal_state": g}` overrides either (7-D, or 5-D
    meaning zero velocity). Setting a state sets the agent velocity and position, then the block angle, then the
    block position, then runs one 0.01 s physics step (so the agent moves by v * 0.01 and may push the block).

    ## Episode End
    `terminated` when ||goal[0:4] - state[0:4]|| < 20 and the wrapped block-angle error < pi / 9 (docs/envs.md §2).
    The env never truncates by itself; pass `max_episode_steps` to `gym.make` / `make_env`.

    ## Arguments
    `img_size` (int >= 32, default 224): side of the rendered frame, drawn directly at that size.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, img_size: int = 224, render_mode: str | None = "rgb_array"):
        if img_size < 32:
            raise ValueError(f"img_size must be >= 32, got {img_size}")
        self.img_size = int(img_size)
        self.render_mode = render_mode
        self.action_scale = 100
        self.k_p, self.k_v = PUSHT_K_P, PUSHT_K_V
        self.dt = PUSHT_DT
        self.n_substeps = PUSHT_SUBSTEPS
        self.goal_pose = np.array(PUSHT_GOAL_POSE)
        self.observation_space = spaces.Box(0, 255, (self.img_size, self.img_size, 3), np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.space = None
        self.goal_state = None
        self._frame = None

    # physics

    def _setup(self, agent_position, block_position, block_angle) -> None:
        """Build a fresh pymunk space in the reference's order (walls, agent, block), so solver order matches."""
        self.space = pymunk.Space()
        self.space.gravity = 0, 0
        self.space.damping = 0  # velocities are multiplied by 0**dt = 0 each substep: the block has no momentum
        walls = [pymunk.Segment(self.space.static_body, a, b, PUSHT_WALL_RADIUS) for a, b in PUSHT_WALLS]
        self.space.add(*walls)

        self.agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)  # infinite mass, passes through walls
        self.agent.position = agent_position
        self.space.add(self.agent, pymunk.Circle(self.agent, PUSHT_AGENT_RADIUS))

        # The reference adds the bar's moment twice (about the body origin: 1500 each) -> moment 3000; reproduce it.
        moment = pymunk.moment_for_poly(1, vertices=PUSHT_TEE_BAR) + pymunk.moment_for_poly(1, vertices=PUSHT_TEE_BAR)
        self.block = pymunk.Body(1, moment)
        bar, stem = pymunk.Poly(self.block, PUSHT_TEE_BAR), pymunk.Poly(self.block, PUSHT_TEE_STEM)
        self.block.center_of_gravity = (bar.center_of_gravity + stem.center_of_gravity) / 2
        self.block.position = block_position
        self.block.angle = block_angle
        self.space.add(self.block, bar, stem)  # friction and elasticity stay at pymunk's default 0

        self.space.on_collision(0, 0, post_solve=self._count_contacts)
        self.n_contact_points = 0

    def _count_contacts(self, arbiter, space, data) -> None:
        self.n_contact_points += len(arbiter.contact_point_set.points)

    def _set_state(self, state) -> None:
        """Reference setter: agent velocity and position, block angle (rotates about the CoG) *then* position, then
        one 0.01 s physics step to let it take effect."""
        state = np.asarray(state, np.float64).tolist()
        self.agent.velocity = tuple(state[5:7]) if len(state) == 7 else (0.0, 0.0)
        self.agent.position = state[:2]
        self.block.angle = state[4]
        self.block.position = state[2:4]
        self.space.step(self.dt)
        self._frame = None

    def _set_goal_state(self, goal_state) -> None:
        """Reference setter for the 7-D goal used by the success test (a 5-D goal gets zero velocity)."""
        g = np.asarray(goal_state, np.float64).reshape(-1)
        self.goal_state = np.concatenate([g, np.zeros(7 - len(g))]) if len(g) < 7 else g[:7].copy()

    def _get_state(self) -> np.ndarray:
        # Python float % keeps the reference's exact arithmetic for the angle wrap.
        return np.array(
            (*self.agent.position, *self.block.position, self.block.angle % (2 * np.pi), *self.agent.velocity),
            dtype=np.float64,
        )

    def _get_info(self, state: np.ndarray) -> dict:
        # DEVIATION: no `env_name` (a string) and no `goal` (the rendered goal image): info holds numbers only, so
        # every key can be recorded as a column; `state`, `proprio` and `is_success` are added.
        return {
            "state": state,
            "proprio": np.concatenate([state[:2], state[5:7]]),
            "goal_state": self.goal_state.copy(),
            "goal_proprio": np.concatenate([self.goal_state[:2], self.goal_state[5:7]]),
            "is_success": pusht_success(state, self.goal_state),
            "pos_agent": state[:2].copy(),
            "vel_agent": state[5:7].copy(),
            "block_pose": np.array([*self.block.position, self.block.angle]),
            "goal_pose": self.goal_pose.copy(),
            "n_contacts": int(np.ceil(self.n_contact_points / self.n_substeps)),
        }

    # gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        rng = self.np_random
        # DEVIATION: drawn from gymnasium's np_random, not swm's variation spaces, so a seed gives other tasks than
        # the reference (its streams cannot be reproduced; the distributions are the same).
        # Start state first, then a goal drawn the same way (the reference's sampling order); always drawn so the
        # random stream does not depend on the options.
        start = np.concatenate(
            [rng.uniform(50, 450, 2), rng.uniform(100, 400, 2), rng.uniform(-2 * np.pi, 2 * np.pi, 1)]
        )
        goal = np.concatenate(
            [rng.uniform(50, 450, 2), rng.uniform(100, 400, 2), rng.uniform(-2 * np.pi, 2 * np.pi, 1)]
        )
        goal = np.concatenate([goal, np.zeros(2)])
        state = np.concatenate([start, np.zeros(2)])
        if options.get("goal_state") is not None:
            goal = options["goal_state"]
        if options.get("state") is not None:
            state = options["state"]

        # As the reference: fresh space with the bodies at the sampled start, goal state applied (one step), then the
        # start state (one step). The goal step matters only through pymunk's contact cache, but costs nothing.
        self._setup(start[:2].tolist(), start[2:4].tolist(), float(start[4]))
        self._set_state(goal)
        self._set_goal_state(goal)
        self._set_state(state)

        state = self._get_state()
        return self._render_frame(), self._get_info(state)

    def step(self, action):
        self.n_contact_points = 0
        # Reference arithmetic, operation for operation, including numpy's type promotion: with a float32 action the
        # target and the acceleration are float32 (NEP 50), which changes trajectories in the last bits.
        # The loop is the reference's Vec2d expression
        #     acceleration = k_p * (target - p) + k_v * (Vec2d(0, 0) - v);  v += acceleration * dt
        # written per component (the same operations on the same types, ~2x faster); the kinematic pusher keeps the
        # velocity it is given, so v is tracked here as the float pymunk would return.
        action = np.asarray(action)
        tx, ty = self.agent.position + action * self.action_scale
        k_p, k_v, dt, agent, space = self.k_p, self.k_v, self.dt, self.agent, self.space
        vx, vy = agent.velocity
        for _ in range(self.n_substeps):
            px, py = agent.position
            vx = vx + (k_p * (tx - px) + k_v * (0 - vx)) * dt
            vy = vy + (k_p * (ty - py) + k_v * (0 - vy)) * dt
            agent.velocity = (vx, vy)
            vx, vy = float(vx), float(vy)
            space.step(dt)
        self._frame = None

        state = self._get_state()
        info = self._get_info(state)
        reward = -float(np.linalg.norm(self.goal_state - state))
        return self._render_frame(), reward, info["is_success"], False, info

    def render(self) -> np.ndarray:
        """The current frame, identical to the last observation."""
        return self._render_frame().copy()

    # rendering

    def _render_frame(self) -> np.ndarray:
        """Composite the moving parts (T block, then pusher, then the walls over them, pymunk's debug-draw order)
        inside their bounding boxes on a copy of the cached static frame. Geometry is done with Python floats and
        both T rectangles are measured in the block's own frame: at these window sizes numpy call overhead, not
        arithmetic, is the cost."""
        if self._frame is not None:
            return self._frame
        size = self.img_size
        under, wall_alpha, full, band = _pusht_background(size, tuple(self.goal_pose.tolist()))
        frame = full.copy()
        s = size / PUSHT_WORLD
        (bx, by), angle = self.block.position, self.block.angle
        (ax, ay), c, sn = self.agent.position, math.cos(angle), math.sin(angle)
        ox, oy, cx, cy = (bx + 0.5) * s, (by + 0.5) * s, (ax + 0.5) * s, (ay + 0.5) * s  # see _to_px
        outline = 4.0 * s  # pygame fat segments of radius 2 on every edge
        r_out, r_in = PUSHT_AGENT_RADIUS * s, 11.0 * s

        # Rectangles as (centre, half extents) in block-local pixel units, and their world bounding boxes.
        rects = [((0.0, 15.0 * s), (60.0 * s, 15.0 * s)), ((0.0, 75.0 * s), (15.0 * s, 45.0 * s))]  # bar, stem
        lo_x = lo_y = math.inf
        hi_x = hi_y = -math.inf
        for (u, v), (hu, hv) in rects:
            wx, wy = ox + c * u - sn * v, oy + sn * u + c * v  # rectangle centre in pixels
            ex = abs(c) * hu + abs(sn) * hv + outline / 2 + 1  # half extent of the rotated rectangle, padded
            ey = abs(sn) * hu + abs(c) * hv + outline / 2 + 1
            lo_x, lo_y, hi_x, hi_y = min(lo_x, wx - ex), min(lo_y, wy - ey), max(hi_x, wx + ex), max(hi_y, wy + ey)
        block_box = [lo_x, lo_y, hi_x, hi_y]
        agent_box = [cx - r_out - 1, cy - r_out - 1, cx + r_out + 1, cy + r_out + 1]
        overlap = agent_box[0] < block_box[2] and block_box[0] < agent_box[2]
        overlap = overlap and agent_box[1] < block_box[3] and block_box[1] < agent_box[3]
        if overlap:  # one window with both layers, so the pusher is drawn over the block
            box = [min(block_box[0], agent_box[0]), min(block_box[1], agent_box[1])]
            windows = [(box + [max(block_box[2], agent_box[2]), max(block_box[3], agent_box[3])], True, True)]
        else:
            windows = [(block_box, True, False), (agent_box, False, True)]

        for (lo_x, lo_y, hi_x, hi_y), with_block, with_agent in windows:
            x0, y0 = max(math.floor(lo_x), 0), max(math.floor(lo_y), 0)
            x1, y1 = min(math.ceil(hi_x), size), min(math.ceil(hi_y), size)
            if x0 >= x1 or y0 >= y1:
                continue
            xs = np.arange(x0 + 0.5, x1, dtype=np.float32)  # (w,) pixel centres
            ys = np.arange(y0 + 0.5, y1, dtype=np.float32)[:, None]  # (h, 1)
            layers = []
            if with_block:
                u = xs * c + (ys * sn - (ox * c + oy * sn))  # (h, w) block-local x of each pixel centre
                v = ys * c - (xs * sn + (oy * c - ox * sn))  # (h, w) block-local y
                for (mu, mv), (hu, hv) in rects:
                    d = np.maximum(np.abs(u - mu) - hu, np.abs(v - mv) - hv)  # (h, w) box distance (square corners)
                    layers += [
                        (_coverage(d, outline / 2), PUSHT_BLOCK_COLOR),
                        (_coverage(d, -outline / 2), PUSHT_BLOCK_FILL),
                    ]
            if with_agent:
                d = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)  # (h, w)
                layers += [(_coverage(d, r_out), PUSHT_AGENT_COLOR), (_coverage(d, r_in), PUSHT_AGENT_FILL)]
            if x0 < band or y0 < band or x1 > size - band or y1 > size - band:
                layers.append((wall_alpha[y0:y1, x0:x1], PUSHT_WALL_COLOR))
            frame[y0:y1, x0:x1] = to_uint8(composite(under[:, y0:y1, x0:x1], layers)).transpose(1, 2, 0)
        self._frame = frame
        return frame


# --- PushT scripted policies


def _box_distance(p: np.ndarray, lo, hi) -> np.ndarray:
    """Exact distance (negative inside) of local points p (..., 2) to the axis-aligned box [lo, hi]."""
    c = (np.asarray(lo) + np.asarray(hi)) / 2
    h = (np.asarray(hi) - np.asarray(lo)) / 2
    q = np.abs(p - c) - h
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)


def tee_distance(points, pose) -> np.ndarray:
    """Distance (negative inside) of world points (..., 2) to the T block at pose (x, y, angle)."""
    local = rotate(np.asarray(points, np.float64) - np.asarray(pose[:2]), -pose[2])
    return np.minimum(_box_distance(local, (-60, 0), (60, 30)), _box_distance(local, (-15, 30), (15, 120)))


class PushTRandomPolicy:
    """The reference's random-near-block data policy (swm WeakPolicy, dist_constraint 100, docs/envs.md §2): a uniform
    random relative target, clipped to a 200 x 200 box around the block origin so the pusher keeps touching it."""

    def __init__(self, env=None, noise: float = 0.0, rng: np.random.Generator | None = None, dist: float = 100.0):
        self.noise, self.dist = noise, dist
        self.rng = rng if rng is not None else np.random.default_rng()

    def reset(self, info: dict) -> None:
        pass

    def __call__(self, info: dict) -> np.ndarray:
        agent, block = info["state"][:2], info["state"][2:4]
        target = np.clip(agent + 100 * self.rng.uniform(-1, 1, 2), block - self.dist, block + self.dist)
        a = np.clip((target - agent) / 100, -1, 1)
        if self.noise > 0:
            a = a + self.rng.normal(0.0, self.noise, 2)
        return _clip_action(a)


# Contact candidates for the expert, in body-local coordinates: (outward normal, points on the edge). Ranges keep
# the pusher disc (radius 15) clear of the other part of the T and away from corners, where it would slide off.
_PUSHT_EDGES = (
    ((0, -1), [(x, 0) for x in np.linspace(-56, 56, 9)]),  # bar top
    ((1, 0), [(60, y) for y in (8, 15, 22)]),  # bar right end
    ((-1, 0), [(-60, y) for y in (8, 15, 22)]),  # bar left end
    ((0, 1), [(x, 30) for x in (36, 46, 56)]),  # bar underside, right of the stem
    ((0, 1), [(x, 30) for x in (-36, -46, -56)]),  # bar underside, left of the stem
    ((1, 0), [(15, y) for y in np.linspace(50, 116, 5)]),  # stem right side
    ((-1, 0), [(-15, y) for y in np.linspace(50, 116, 5)]),  # stem left side
    ((0, 1), [(x, 120) for x in (-10, 0, 10)]),  # stem bottom
)
_PUSHT_CONTACT_N = np.array([n for n, pts in _PUSHT_EDGES for _ in pts], np.float64)  # (K, 2) outward normals
_PUSHT_CONTACT_P = np.array([p for _, pts in _PUSHT_EDGES for p in pts], np.float64)  # (K, 2) contact points
_PUSHT_PUSH_LENGTHS = np.array([4.0, 8.0, 16.0, 32.0])  # candidate push depths (px) evaluated by the expert


def _pd_step_gains(k_p: float, k_v: float, dt: float, substeps: int) -> tuple[float, float]:
    """Gains (g_d, g_v) of the action that moves the PushT pusher by exactly `d` px in one env step:
    PD target offset = g_d * d - g_v * v. Derived from the env's linear substep map on (x - target, v)."""
    sub = np.array([[1 - dt * dt * k_p, dt * (1 - dt * k_v)], [-dt * k_p, 1 - dt * k_v]])  # semi-implicit Euler
    m = np.linalg.matrix_power(sub, substeps)  # (x1 - T) = m00 (x0 - T) + m01 v0
    return 1.0 / (1.0 - m[0, 0]), m[0, 1] / (1.0 - m[0, 0])


class PushTExpertPolicy:
    """Goal-directed pusher for PushT (a scripted stand-in for the paper's expert demonstrations).

    Each step it scores every (contact point on the T's edges) x (push depth) with a quasi-static model of
    frictionless pushing: a push of depth delta along f = -n at lever arm r from the CoG gives the impulse
    J = delta / (1/m + (r x f)^2 / I), which moves the block by J f / m and turns it by J (r x f) / I (m = 1,
    I = 3000). The score is the predicted pose error ||cog_goal - cog|| + W |angle error| plus a cost for walking to
    the contact; the best push (kept unless another is clearly better) is executed if the pusher already sits on
    the outside of that edge, otherwise the pusher walks there around the block (through a ring of waypoints, never
    across the T). Once the block is within tolerance it walks to the goal pusher position. Gaussian noise of std
    `noise` is added to every action.
    """

    angle_weight = 100.0  # px per radian in the pose error (a 20 deg error weighs like 35 px)
    travel_weight = 0.08  # pose-error px per px walked to a new contact
    switch_margin = 3.0  # keep the current contact unless another scores this much better
    ring_radius = 110.0  # circumnavigation radius around the CoG (T extends 77 px from its CoG, pusher 15)
    max_step = 40.0  # px: the pusher's largest move per env step
    step_gains = _pd_step_gains(PUSHT_K_P, PUSHT_K_V, PUSHT_DT, PUSHT_SUBSTEPS)

    def __init__(self, env=None, noise: float = 0.0, rng: np.random.Generator | None = None):
        self.noise = noise
        self.rng = rng if rng is not None else np.random.default_rng()
        self.reset({})

    def reset(self, info: dict) -> None:
        self.placing = False
        self.contact = None

    # geometry helpers

    def _clear(self, a: np.ndarray, b: np.ndarray, pose, margin: float) -> np.ndarray:
        """Whether segments a[i]-b[i] (world) keep the pusher `margin` px clear of the T. a, b: (N, 2) -> (N,)."""
        t = np.linspace(0.0, 1.0, 12)[:, None, None]
        pts = a[None] + t * (b - a)[None]  # (12, N, 2)
        return tee_distance(pts, pose).min(0) > PUSHT_AGENT_RADIUS + margin

    def _waypoint(self, agent: np.ndarray, goal: np.ndarray, pose, cog: np.ndarray) -> np.ndarray:
        """Next point on a short block-avoiding path agent -> goal (straight, or via a ring around the block)."""
        if self._clear(agent[None], goal[None], pose, 1.0)[0]:
            return goal
        n = 16
        ang = np.arange(n) * (2 * np.pi / n)
        ring = cog + self.ring_radius * np.stack([np.cos(ang), np.sin(ang)], -1)  # (n, 2)
        from_agent = self._clear(np.repeat(agent[None], n, 0), ring, pose, 1.0)
        to_goal = self._clear(ring, np.repeat(goal[None], n, 0), pose, 1.0)
        if not from_agent.any():  # boxed in next to the T: step straight away from it
            away = agent - cog
            return agent + 40 * away / (np.linalg.norm(away) + 1e-9)
        if not to_goal.any():
            to_goal[:] = True
        # shortest path agent -> ring[i] -> (along the ring) -> ring[j] -> goal
        hop = 2 * self.ring_radius * math.sin(math.pi / n)
        i_idx, j_idx = np.nonzero(from_agent)[0], np.nonzero(to_goal)[0]
        steps = np.abs(i_idx[:, None] - j_idx[None])
        steps = np.minimum(steps, n - steps)
        cost = (
            np.linalg.norm(ring[i_idx] - agent, axis=-1)[:, None]
            + hop * steps
            + np.linalg.norm(ring[j_idx] - goal, axis=-1)[None]
        )
        i, j = np.unravel_index(np.argmin(cost), cost.shape)
        i, j = i_idx[i], j_idx[j]
        if np.linalg.norm(ring[i] - agent) > 25 or i == j:
            return ring[i]
        direction = 1 if (j - i) % n <= n // 2 else -1  # already on the ring: head to the next ring point
        return ring[(i + direction) % n]

    def _move(self, agent: np.ndarray, vel: np.ndarray, target: np.ndarray, gain: float = 0.7) -> np.ndarray:
        """Action moving the pusher a fraction `gain` of the way to `target` (at most `max_step` px) during the next
        step, compensating its current velocity exactly (see _pd_step_gains)."""
        d = gain * (target - agent)
        dist = np.linalg.norm(d)
        if dist > self.max_step:
            d = d * (self.max_step / dist)
        g_d, g_v = self.step_gains
        a = (g_d * d - g_v * vel) / 100.0
        return a / max(1.0, np.abs(a).max())  # scale (not clip per axis) to keep the direction

    # policy

    def __call__(self, info: dict) -> np.ndarray:
        a = _clip_action(self._act(info))
        if self.noise > 0:
            a = _clip_action(a + self.rng.normal(0.0, self.noise, 2))
        return a

    def _act(self, info: dict) -> np.ndarray:
        s, g = np.asarray(info["state"], np.float64), np.asarray(info["goal_state"], np.float64)
        agent, vel = s[:2], s[5:7]
        pose = (s[2], s[3], s[4])
        cog = s[2:4] + rotate(PUSHT_TEE_COG, s[4])
        goal_cog = g[2:4] + rotate(PUSHT_TEE_COG, g[4])
        d_ang = (g[4] - s[4] + np.pi) % (2 * np.pi) - np.pi
        block_err = np.linalg.norm(g[2:4] - s[2:4])

        # Block placed: walk to the goal pusher position (hysteresis so a light touch does not flip the mode back).
        if self.placing:
            self.placing = block_err < 12 and abs(d_ang) < 0.2
        else:
            self.placing = block_err < 5 and abs(d_ang) < 0.07
        if self.placing:
            self.contact = None
            return self._move(agent, vel, self._waypoint(agent, g[:2], pose, cog))

        # Score all (contact, depth) pushes with the quasi-static frictionless model (body-local frame).
        f = -_PUSHT_CONTACT_N  # (K, 2) push direction = into the block
        r = _PUSHT_CONTACT_P - np.asarray(PUSHT_TEE_COG)  # (K, 2) lever arm from the CoG
        cross = r[:, 0] * f[:, 1] - r[:, 1] * f[:, 0]  # (K,)
        impulse = _PUSHT_PUSH_LENGTHS[None] / (1.0 + cross[:, None] ** 2 / 3000.0)  # (K, L)
        move = rotate(f, s[4])[:, None] * impulse[..., None]  # (K, L, 2) world CoG displacement
        turn = impulse * cross[:, None] / 3000.0  # (K, L)
        err = np.linalg.norm(goal_cog - cog - move, axis=-1) + self.angle_weight * np.abs(d_ang - turn)  # (K, L)

        # Where the pusher is relative to every contact: on the outside of its edge and near the push line = ready.
        contact_w = s[2:4] + rotate(_PUSHT_CONTACT_P, s[4])  # (K, 2) world contact points
        normal_w = rotate(_PUSHT_CONTACT_N, s[4])  # (K, 2)
        rel = agent - contact_w  # (K, 2)
        normal = np.sum(rel * normal_w, -1)  # (K,) pusher-centre height above the edge
        lateral = rel[:, 0] * -normal_w[:, 1] + rel[:, 1] * normal_w[:, 0]  # (K,) offset along the edge
        ready = (np.abs(lateral) < 12) & (normal > PUSHT_AGENT_RADIUS - 4) & (normal < PUSHT_AGENT_RADIUS + 30)
        standoff = contact_w + normal_w * (PUSHT_AGENT_RADIUS + 8)  # where the pusher waits before pushing
        travel = np.linalg.norm(standoff - agent, axis=-1)
        blocked = ~self._clear(np.repeat(agent[None], len(travel), 0), standoff, pose, 0.0)
        travel = np.where(ready, 0.0, travel + 150.0 * blocked)  # going around costs about half a circumference
        err_now = np.linalg.norm(goal_cog - cog) + self.angle_weight * abs(d_ang)
        best = err.min(1)  # (K,)
        # Only pushes that reduce the error are worth walking to (otherwise the pusher would nudge the block back
        # and forth next to itself); if none does, take the least harmful one.
        score = best + self.travel_weight * travel + np.where(best < err_now - 0.5, 0.0, 1e3)  # (K,)
        k = int(np.argmin(score))
        if self.contact is not None and score[self.contact] < score[k] + self.switch_margin:
            k = self.contact
        self.contact = k
        depth = _PUSHT_PUSH_LENGTHS[int(np.argmin(err[k]))]

        if ready[k]:
            end = contact_w[k] + normal_w[k] * (PUSHT_AGENT_RADIUS - depth)
            return self._move(agent, vel, end, gain=1.0)
        return self._move(agent, vel, self._waypoint(agent, standoff[k], pose, cog))


class PushTDemoPolicy(PushTExpertPolicy):
    """Stand-in for the paper's PushT data: replayed human demonstrations with noise (DINO-WM's `pusht_noise`).

    The human demonstrators pushed the T onto the green one drawn at the fixed pose (256, 256, pi/4), slowly and in
    long contacts; the expert of this file does the same planning, but with the pusher's step capped at
    `max_step` px (the demonstrations move the pusher ~10 px per step) and with the green T as the block's target
    (the env's random `goal_state` is ignored). Noise is an AR(1) process of stationary std `noise`, smooth over
    a few steps as a human hand's tremor is, so it perturbs the pushes without turning them into jitter. The
    episode is over (`done`) once the block lies on the green T within `tolerance`.
    """

    max_step = 10.0  # px per env step
    tolerance = (5.0, 0.07)  # block origin px, block angle rad: the T covers the green one
    noise_corr = 0.7  # AR(1) coefficient of the action noise per step

    def __init__(self, env=None, noise: float = 0.0, rng: np.random.Generator | None = None):
        super().__init__(env, noise=0.0, rng=rng)
        self.demo_noise = noise

    def reset(self, info: dict) -> None:
        super().reset(info)
        self.done = False
        self.eps = np.zeros(2)

    def __call__(self, info: dict) -> np.ndarray:
        s = np.asarray(info["state"], np.float64)
        goal_pose = np.asarray(info.get("goal_pose", PUSHT_GOAL_POSE), np.float64)
        goal = np.concatenate([s[:2], goal_pose, np.zeros(2)])  # block target = the green T; pusher: anywhere
        d_ang = abs((goal_pose[2] - s[4] + np.pi) % (2 * np.pi) - np.pi)
        self.done = bool(np.linalg.norm(goal_pose[:2] - s[2:4]) < self.tolerance[0] and d_ang < self.tolerance[1])
        a = self._act({**info, "goal_state": goal})
        if self.demo_noise > 0:
            c = self.noise_corr
            self.eps = c * self.eps + math.sqrt(1 - c * c) * self.rng.normal(0.0, self.demo_noise, 2)
            a = a + self.eps
        return _clip_action(a)


class PushTPlayPolicy(PushTDemoPolicy):
    """Exploration data for PushT, used for training only: the demo pusher with *white* action noise whose std is
    drawn per episode from U(0, noise), and segments of `segment` steps that are, with probability
    `random_share`, random pushes near the block instead (`PushTRandomPolicy`). A sampling planner proposes
    jittery sequences of independent per-step actions that the smooth demonstrations never contain; a model that
    has seen only demonstrations predicts them wrongly and the planner exploits that (docs/results.md, "PushT"). These
    episodes show the model what such actions do, while the demonstrations stay the evaluation's task.
    """

    segment = 10  # steps per segment of one kind (demo or random pushes)
    random_share = 0.3  # probability that a segment is random pushes near the block

    def __init__(self, env=None, noise: float = 0.4, rng: np.random.Generator | None = None):
        self.max_noise = noise
        super().__init__(env, noise=0.0, rng=rng)
        self.random = PushTRandomPolicy(rng=self.rng)

    def reset(self, info: dict) -> None:
        super().reset(info)
        self.demo_noise = float(self.rng.uniform(0.0, self.max_noise))
        self.noise_corr = 0.0  # white: independent per step, as a sampling planner's candidates
        self.t = 0
        self.in_random = False

    def __call__(self, info: dict) -> np.ndarray:
        if self.t % self.segment == 0:
            self.in_random = bool(self.rng.uniform() < self.random_share)
        self.t += 1
        a = super().__call__(info)  # keeps the demo's state (contact, noise stream) going through random segments
        self.done = False  # play until the step limit: the episode is not a demonstration
        return self.random(info) if self.in_random else a


# --- PushT evaluation hooks (analyses.py: surprise events)


def pusht_teleport(state: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One try: the T block shifted 100 px (of 512) in a random direction; None unless it stays on the table."""
    a = rng.uniform(0, 2 * np.pi)
    new = state[2:4] + 100.0 * np.array([np.cos(a), np.sin(a)])
    if not np.all((new >= 100) & (new <= 412)):
        return None
    s = np.array(state, np.float64)
    s[2:4] = new
    return s


def pusht_recolour(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T block (fill and outline) -> its complementary colour, dark brown: (weight (H, W), recoloured (H, W, 3))."""
    d = np.minimum(*(np.linalg.norm(x - np.float32(c), axis=-1) for c in (PUSHT_BLOCK_FILL, PUSHT_BLOCK_COLOR)))
    return np.clip(1 - d / 40, 0, 1), 255 - x


def pusht_replay_state(state: np.ndarray) -> np.ndarray:
    """The state a recorded frame is re-rendered from: reset runs one 0.01 s physics step (after one for the goal,
    which warm-starts the contact solver), so the pusher's velocity is zeroed. The frame then equals the recorded
    one, except where the recorded pose interpenetrates and the solver nudges the block (< 0.2 px of 512, a few
    grey levels)."""
    s = np.array(state, np.float64)
    s[5:7] = 0.0
    return s


# --- TwoRoom (docs/envs.md §3): point agent, two rooms, one door; 224-px image coordinates, no physics engine

TWOROOM_IMG = 224  # reference image size; all TwoRoom geometry is in 224-px image coordinates (x = column, y = row)
TWOROOM_BORDER = 14
TWOROOM_WALL_X = 112
TWOROOM_WALL_HALF = 5  # wall thickness 10 -> half 10 // 2
TWOROOM_DOOR_Y = 49
TWOROOM_DOOR_HALF = 14
TWOROOM_RADIUS = 7  # agent radius, also the sigma of the rendered Gaussian blob
TWOROOM_SPEED = 5.0
TWOROOM_SUCCESS_DIST = 16.0
TWOROOM_POS_LOW = TWOROOM_BORDER + TWOROOM_RADIUS  # 21: border clamp
TWOROOM_POS_HIGH = TWOROOM_IMG - TWOROOM_BORDER - TWOROOM_RADIUS  # 203
TWOROOM_DOOR_LOW = TWOROOM_DOOR_Y - TWOROOM_DOOR_HALF - 1.75  # 33.25: door band of the wall test
TWOROOM_DOOR_HIGH = TWOROOM_DOOR_Y + TWOROOM_DOOR_HALF + 1.75  # 64.75
TWOROOM_LEFT_LIMIT = TWOROOM_WALL_X - TWOROOM_WALL_HALF - TWOROOM_RADIUS  # 100: blocked beyond it from the left
TWOROOM_RIGHT_LIMIT = TWOROOM_WALL_X + TWOROOM_WALL_HALF + TWOROOM_RADIUS  # 124: blocked below it from the right
TWOROOM_LEFT_SNAP, TWOROOM_RIGHT_SNAP = 99.5, 124.5
TWOROOM_MIN_DOOR_PATH = 125.0  # reset: (|agent - door| + |door - target|) / speed >= 25 steps
TWOROOM_DOOR = (112.0, 49.0)


def tworoom_success(state, goal_state) -> bool:
    """docs/envs.md §3: agent within 16 px of the target."""
    diff = np.asarray(state, np.float32)[:2] - np.asarray(goal_state, np.float32)[:2]
    return bool(np.sqrt(np.sum(diff * diff)) < TWOROOM_SUCCESS_DIST)


def tworoom_errors(state, goal_state) -> dict[str, float]:
    """The success test's one part: the agent's distance to the goal (px of 224, < 16)."""
    diff = np.asarray(state, np.float64)[:2] - np.asarray(goal_state, np.float64)[:2]
    return {"distance_px": float(np.linalg.norm(diff))}


@functools.lru_cache(maxsize=16)
def _tworoom_background(img_size: int) -> np.ndarray:
    """Static uint8 frame: the pixel-grid rule of docs/envs.md §3 (black wall columns 107..117 except door rows
    35..63, 4-px border lines at 10..13 and 210..213) evaluated on 8 x 8 samples per pixel and averaged; exactly
    one sample per pixel at 224, i.e. the reference raster."""
    k = 1 if img_size == TWOROOM_IMG else 8
    c = np.floor((np.arange(img_size * k) + 0.5) / k * (TWOROOM_IMG / img_size))  # reference pixel of each sample
    x, y = c[None, :], c[:, None]
    wall = (np.abs(x - TWOROOM_WALL_X) <= TWOROOM_WALL_HALF) & (np.abs(y - TWOROOM_DOOR_Y) > TWOROOM_DOOR_HALF)
    lo, hi = TWOROOM_BORDER - 4, TWOROOM_IMG - TWOROOM_BORDER
    border = ((x >= lo) & (x < lo + 4)) | ((x >= hi) & (x < hi + 4))
    border = border | ((y >= lo) & (y < lo + 4)) | ((y >= hi) & (y < hi + 4))
    ink = _box_downsample((wall | border).astype(np.float32)[..., None], k)  # (img_size, img_size, 1)
    frame = to_uint8(np.repeat(255.0 * (1.0 - ink), 3, axis=2))
    frame.flags.writeable = False
    return frame


class TwoRoomEnv(gym.Env):
    """
    ## Description
    A point agent moves between two rooms joined by one door. Re-implementation of stable-worldmodel's
    `swm/TwoRoom-v1` (the torch rewrite that recorded the LeWM data, docs/envs.md §3). The 224 x 224 px arena is
    split by a vertical wall at x = 112 with a door at y = 49. A step moves the agent by 5 px times the action,
    clamps it to [21, 203] and applies the reference's endpoint-only wall test: a proposed position past the wall
    (x > 100 coming from the left, x < 124 from the right) outside the door band 33.25 <= y <= 64.75 is snapped to
    x = 99.5 / 124.5. Only the end point is tested, so the agent may cut the door corners; this is in the data and
    reproduced. All positions are float32 in 224-px image coordinates (x = column, y = row) whatever `img_size`.

    ## Action Space
    `Box(-1, 1, (2,), float32)`: displacement (dx, dy) in units of 5 px, clipped to [-1, 1].

    ## Observation Space
    `Box(0, 255, (img_size, img_size, 3), uint8)`: white rooms, black walls and border, the agent as a red Gaussian
    blob (sigma 7 px, peak 1); the target is not drawn. Numbers are in `info`: `state` = `proprio` = `pos_agent`
    (2,), `goal_state` = `pos_target` (2,), `distance_to_target`, `is_success`.

    ## Rewards
    Always 0, as the reference.

    ## Starting State
    Agent ~ U([14, 209]^2) rejecting the wall zone 100 <= x <= 124; target ~ U([14, 209]^2) rejected unless it is
    in the other room, outside the wall zone, and |agent - door| + |door - target| >= 125 px (at most 1000 tries).
    `options={"state": agent_xy, "goal_state": target_xy}` overrides either, without collision checks.

    ## Episode End
    `terminated` when |agent - target| < 16 px. The env never truncates by itself; pass `max_episode_steps`.

    ## Arguments
    `img_size` (int >= 32, default 224): side of the rendered frame, drawn directly at that size with every length
    scaled by img_size / 224 and anti-aliased walls (at 224 exactly the reference raster).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, img_size: int = 224, render_mode: str | None = "rgb_array"):
        if img_size < 32:
            raise ValueError(f"img_size must be >= 32, got {img_size}")
        self.img_size = int(img_size)
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, (self.img_size, self.img_size, 3), np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.agent = np.zeros(2, np.float32)
        self.target = np.zeros(2, np.float32)
        # pixel centres in 224-px coordinates (pixel i spans [i, i+1) at img_size), for the Gaussian blob
        self._centres = ((np.arange(self.img_size) + 0.5) * (TWOROOM_IMG / self.img_size) - 0.5).astype(np.float32)

    def _set_state(self, state) -> None:
        """Reference setter: agent position (no collision check)."""
        self.agent = np.array(np.asarray(state, np.float32).reshape(-1)[:2])

    def _set_goal_state(self, goal_state) -> None:
        """Reference setter: target position, used by the success test."""
        self.target = np.array(np.asarray(goal_state, np.float32).reshape(-1)[:2])

    def _get_info(self) -> dict:
        return {
            "state": self.agent.copy(),
            "goal_state": self.target.copy(),
            "is_success": tworoom_success(self.agent, self.target),
            "proprio": self.agent.copy(),
            "pos_agent": self.agent.copy(),
            "pos_target": self.target.copy(),
            "distance_to_target": np.float32(np.linalg.norm(self.agent - self.target)),
        }

    def _sample_position(self) -> np.ndarray:
        return self.np_random.uniform(TWOROOM_BORDER, TWOROOM_IMG - TWOROOM_BORDER - 1, size=2).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if options.get("state") is not None:
            self._set_state(options["state"])
        else:
            self.agent = self._sample_position()
            while TWOROOM_LEFT_LIMIT <= self.agent[0] <= TWOROOM_RIGHT_LIMIT:
                self.agent = self._sample_position()
        if options.get("goal_state") is not None:
            self._set_goal_state(options["goal_state"])
        else:
            agent, door = self.agent.astype(np.float64), np.array(TWOROOM_DOOR)
            for _ in range(1000):  # after 1000 rejected tries the last sample is kept
                self.target = self._sample_position()
                other_room = (self.target[0] < TWOROOM_WALL_X) != (agent[0] < TWOROOM_WALL_X)
                in_wall = TWOROOM_LEFT_LIMIT <= self.target[0] <= TWOROOM_RIGHT_LIMIT
                path = np.linalg.norm(agent - door) + np.linalg.norm(door - self.target)
                if other_room and not in_wall and path >= TWOROOM_MIN_DOOR_PATH:
                    break
        return self.render(), self._get_info()

    def step(self, action):
        a = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        x_prev = self.agent[0]
        p = np.clip(self.agent + np.float32(TWOROOM_SPEED) * a, TWOROOM_POS_LOW, TWOROOM_POS_HIGH).astype(np.float32)
        in_door = TWOROOM_DOOR_LOW <= p[1] <= TWOROOM_DOOR_HIGH  # wall test on the end point only (docs/envs.md §3)
        if x_prev < TWOROOM_WALL_X and p[0] > TWOROOM_LEFT_LIMIT and not in_door:
            p[0] = TWOROOM_LEFT_SNAP
        elif x_prev >= TWOROOM_WALL_X and p[0] < TWOROOM_RIGHT_LIMIT and not in_door:
            p[0] = TWOROOM_RIGHT_SNAP
        self.agent = p
        info = self._get_info()
        return self.render(), 0.0, info["is_success"], False, info

    def render(self) -> np.ndarray:
        """Gaussian blob over the static frame, in float32 then truncated to uint8 as the reference (docs/envs.md §3).
        Farther than 48 px from the agent alpha < 2^-25, so 1 - alpha == 1 in float32 and the pixel is unchanged:
        only that window is computed."""
        frame = _tworoom_background(self.img_size).copy()
        c, (px, py) = self._centres, self.agent
        x0, x1 = np.searchsorted(c, [px - 48.0, px + 48.0])
        y0, y1 = np.searchsorted(c, [py - 48.0, py + 48.0])
        dx, dy = c[x0:x1] - px, c[y0:y1] - py  # (w,), (h,) in 224-px units
        alpha = np.exp(-(dx[None, :] ** 2 + dy[:, None] ** 2) / np.float32(2 * TWOROOM_RADIUS**2))  # (h, w)
        alpha = (alpha / alpha.max())[..., None]  # (h, w, 1), peak pixel = 1
        window = frame[y0:y1, x0:x1].astype(np.float32)
        red = np.array([255.0, 0.0, 0.0], np.float32)
        frame[y0:y1, x0:x1] = (window * (np.float32(1.0) - alpha) + red * alpha).astype(np.uint8)  # truncation
        return frame


class TwoRoomExpertPolicy:
    """The reference's noisy door-seeking expert (docs/envs.md §3): head for the door centre while the target is in the
    other room and the door is more than 10.5 px away, else for the target; unit direction plus N(0, noise^2) per
    component, clipped. The reference's action-repeat branch never triggers and is not implemented."""

    def __init__(self, env=None, noise: float = 2.0, rng: np.random.Generator | None = None):
        self.noise = noise
        self.rng = rng if rng is not None else np.random.default_rng()

    def reset(self, info: dict) -> None:
        pass

    def __call__(self, info: dict) -> np.ndarray:
        agent = np.asarray(info["pos_agent"], np.float64)
        target = np.asarray(info["pos_target"], np.float64)
        door = np.array(TWOROOM_DOOR)
        other_room = (agent[0] < TWOROOM_WALL_X) != (target[0] < TWOROOM_WALL_X)
        waypoint = door if other_room and np.linalg.norm(door - agent) > 10.5 else target
        direction = waypoint - agent
        norm = np.linalg.norm(direction)
        a = direction / norm if norm >= 1e-8 else np.zeros(2)
        return _clip_action(a + self.rng.normal(0.0, self.noise, 2))


# --- TwoRoom evaluation hooks (analyses.py: surprise events)


def tworoom_teleport(state: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One try: the agent moved to a random point of its own room; None unless it moved >= 60 px (of 224)."""
    left_room = state[0] < TWOROOM_WALL_X
    lo, hi = (TWOROOM_POS_LOW, TWOROOM_LEFT_LIMIT) if left_room else (TWOROOM_RIGHT_LIMIT, TWOROOM_POS_HIGH)
    new = rng.uniform((lo, TWOROOM_POS_LOW), (hi, TWOROOM_POS_HIGH))  # (x, y)
    if np.linalg.norm(new - state[:2]) < 60:
        return None
    s = np.array(state, np.float64)
    s[:2] = new
    return s


def tworoom_recolour(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Red agent -> blue: the blob is red over white or black, so its redness is its alpha."""
    return np.clip((x[..., 0] - x[..., 1]) / 255, 0, 1), x[..., ::-1]


# --- Reacher (docs/envs.md §4): dm_control two-link arm, equations of motion written out

REACHER_DT = 0.02  # MuJoCo timestep (Euler)
REACHER_SUBSTEPS = 2  # the swm wrapper repeats each action for 2 physics steps
REACHER_GEAR = 0.05  # N m per unit control
REACHER_DAMPING = 0.01  # joint damping, N m s / rad
REACHER_WRIST_LIMIT = math.radians(160.0)
REACHER_L1 = 0.12  # shoulder -> wrist
REACHER_L2 = 0.10  # hand capsule length
REACHER_FINGER = 0.12  # wrist -> finger sphere centre
REACHER_RADIUS = 0.01  # capsule and finger sphere radius
REACHER_DENSITY = 1000.0
REACHER_SUCCESS_TOL = 0.05  # rad per joint, raw angles
REACHER_TARGET_SIZE = 0.015  # 'hard' task target sphere radius
REACHER_CAM_Z = 0.75  # camera 0 "fixed" height, looking straight down
REACHER_FOCAL = 112.0 / math.tan(math.radians(22.5))  # 270.4 px at 224 (vertical FOV 45 deg)
REACHER_FLOOR_LIGHT = (77.0, 115.0, 155.0)  # checker colours as rendered (docs/envs.md §4, approximate)
REACHER_FLOOR_DARK = (36.0, 74.0, 110.0)
REACHER_DECOR = (100.0, 143.0, 187.0)  # arena walls and root cylinder, material (.3, .5, .7)
REACHER_ARM_COLOR = (250.0, 230.0, 145.0)  # material (.7, .5, .3) where lit
REACHER_FINGER_COLOR = (250.0, 184.0, 97.0)  # material (.7, .4, .2) with the arm's per-channel brightness


def _capsule_inertia(length: float) -> tuple[float, float]:
    """Mass and transverse inertia about its centre of a reacher capsule (cylinder + two hemispheres)."""
    r = REACHER_RADIUS
    m_cyl = REACHER_DENSITY * math.pi * r**2 * length
    m_hemi = REACHER_DENSITY * 2.0 / 3.0 * math.pi * r**3
    inertia = m_cyl * (length**2 / 12 + r**2 / 4) + 2 * m_hemi * (2 * r**2 / 5 + length**2 / 4 + 3 * length * r / 8)
    return m_cyl + 2 * m_hemi, inertia


def _reacher_inertias() -> tuple[float, float, float, float]:
    """(I1 about the shoulder, I2 about the wrist, m2, c2) of dm_control's reacher.xml (docs/envs.md §4)."""
    m1, i1 = _capsule_inertia(REACHER_L1)
    m_hand, i_hand = _capsule_inertia(REACHER_L2)
    m_finger = REACHER_DENSITY * 4.0 / 3.0 * math.pi * REACHER_RADIUS**3
    m2 = m_hand + m_finger
    c2 = (m_hand * REACHER_L2 / 2 + m_finger * REACHER_FINGER) / m2
    i2 = i_hand + m_hand * (REACHER_L2 / 2) ** 2 + m_finger * (0.4 * REACHER_RADIUS**2 + REACHER_FINGER**2)
    return i1 + m1 * (REACHER_L1 / 2) ** 2, i2, m2, c2


REACHER_I1, REACHER_I2, REACHER_M2, REACHER_C2 = _reacher_inertias()  # 2.141e-4, 1.887e-4, 0.039794, 0.05737


def reacher_success(state, goal_state) -> bool:
    """docs/envs.md §4 (task qpos_match): both joint angles within 0.05 rad of the goal, no angle wrapping."""
    diff = np.asarray(state, np.float64)[:2] - np.asarray(goal_state, np.float64)[:2]
    return bool(np.all(np.abs(diff) < REACHER_SUCCESS_TOL))


def reacher_errors(state, goal_state) -> dict[str, float]:
    """The parts of the success test: each joint's angle error (rad, raw angles, each < 0.05)."""
    diff = np.abs(np.asarray(state, np.float64)[:2] - np.asarray(goal_state, np.float64)[:2])
    return {"shoulder_rad": float(diff[0]), "wrist_rad": float(diff[1])}


def reacher_finger_pos(qpos) -> np.ndarray:
    """World xy of the finger sphere for joint angles (shoulder, wrist); links point along +x at zero angle."""
    q1, q12 = float(qpos[0]), float(qpos[0] + qpos[1])
    return np.array(
        [
            REACHER_L1 * math.cos(q1) + REACHER_FINGER * math.cos(q12),
            REACHER_L1 * math.sin(q1) + REACHER_FINGER * math.sin(q12),
        ]
    )


def draw_disc(canvas: np.ndarray, *, center, radius: float, color) -> None:
    """Fill a disc of `radius` pixels centred at `center` (x, y) in pixel coordinates."""
    cx, cy = float(center[0]), float(center[1])
    box = _bbox(canvas, cx - radius - 1, cy - radius - 1, cx + radius + 1, cy + radius + 1)
    if box is None:
        return
    d = np.sqrt((box[4] - cx) ** 2 + (box[5] - cy) ** 2) - radius  # (h, w)
    _blend(canvas, box, _coverage(d), color)


def draw_capsule(canvas: np.ndarray, *, a, b, radius: float, color) -> None:
    """Fill the capsule (segment a-b thickened by `radius` pixels, round ends): walls, robot links."""
    box, alpha = capsule_alpha(canvas, a=a, b=b, radius=radius)
    if box is not None:
        _blend(canvas, box, alpha, color)


@functools.lru_cache(maxsize=16)
def _reacher_background(img_size: int) -> np.ndarray:
    """Static uint8 frame seen by camera 0: checker floor quadrants, arena wall lines and the root cylinder,
    evaluated on 4 x 4 samples per pixel and averaged."""
    k, s = 4, img_size / 224.0
    c = (np.arange(img_size * k) + 0.5) / (k * s)  # sample positions in 224-px image coordinates
    u, v = c[None, :], c[:, None]
    light = (u >= 112.0) == (v < 112.0)  # quadrants (+x, +y) and (-x, -y): image y points down = world -y
    img = np.where(light[..., None], REACHER_FLOOR_LIGHT, REACHER_FLOOR_DARK)  # (H k, W k, 3)
    # DEVIATION: the arena walls (planes at x, y = +-0.3) are drawn as the thin light-blue lines 3-5 px inside the
    # image edges, with a darker strip outside (docs/envs.md §4), not ray-cast (UNKNOWN exact look)
    edge = np.minimum(np.minimum(u, 224.0 - u), np.minimum(v, 224.0 - v))
    img = np.where((edge < 3.0)[..., None], 0.7 * img, img)
    img = np.where(((edge >= 3.0) & (edge < 5.0))[..., None], REACHER_DECOR, img)
    root_radius = 0.011 * REACHER_FOCAL / (REACHER_CAM_Z - 0.02)  # cylinder top at z = 0.02
    img = np.where(((u - 112.0) ** 2 + (v - 112.0) ** 2 < root_radius**2)[..., None], REACHER_DECOR, img)
    frame = to_uint8(_box_downsample(img.astype(np.float32), k))
    frame.flags.writeable = False
    return frame


class ReacherEnv(gym.Env):
    """
    ## Description
    A planar two-link arm driven by two joint motors, seen from above. Re-implementation of stable-worldmodel's
    `swm/ReacherDMControl-v0` (dm_control `reacher`, MuJoCo, docs/envs.md §4) with the two-link equations of
    motion written out: M(q) qacc = tau - bias(q, qdot) with tau = 0.05 u - 0.01 qdot, integrated like MuJoCo's Euler
    integrator (joint damping implicit: (M + dt 0.01 I) qacc = tau - bias, then qdot += dt qacc, q += dt qdot),
    timestep 0.02 s, 2 physics steps per env step. The wrist is limited to +-160 deg, the shoulder is unlimited and
    angles are never wrapped. There are no contacts (as in reacher.xml).

    ## Action Space
    `Box(-1, 1, (2,), float32)`: shoulder and wrist motor controls, clipped to [-1, 1]; torque = 0.05 N m x control.

    ## Observation Space
    `Box(0, 255, (img_size, img_size, 3), uint8)`: camera 0 (top-down, vertical FOV 45 deg at 0.75 m): checker floor,
    arena walls, the arm as tan capsules; the target is invisible as in all LeWM images. Numbers are in `info`:
    `state` = `proprio` (4,) = [shoulder, wrist, shoulder velocity, wrist velocity], `goal_state` (2,) = goal joint
    angles, `qpos` (2,), `qvel` (2,), `target_pos` (2,) and `finger_pos` (2,) (world xy), `observation` (6,) float32
    = [qpos, target_pos - finger_pos, qvel] (dm_control's observation), `is_success`.

    ## Rewards
    dm_control's 'hard' reward summed over the 2 physics steps: 1 per step with the finger touching the target
    sphere (distance <= 0.015 + 0.01 m), else 0.

    ## Starting State
    Velocities 0, shoulder ~ U(-pi, pi), wrist ~ U(-160, 160) deg; target sphere at angle U(0, 2 pi) and radius
    U(0.05, 0.20) m, (x, y) = r (sin, cos); goal joint angles drawn like the start angles.
    `options={"state": (q1, q2, dq1, dq2), "goal_state": (q1, q2)}` overrides either (a 2-D state means zero
    velocity).

    ## Episode End
    `terminated` when |q_i - goal_i| < 0.05 rad for both joints, tested after each physics step (the `qpos_match`
    evaluation task). The env never truncates by itself; pass `max_episode_steps`.

    ## Arguments
    `img_size` (int >= 32, default 224): side of the rendered frame, drawn directly at that size (focal length
    270.4 px x img_size / 224).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(self, img_size: int = 224, render_mode: str | None = "rgb_array"):
        if img_size < 32:
            raise ValueError(f"img_size must be >= 32, got {img_size}")
        self.img_size = int(img_size)
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, (self.img_size, self.img_size, 3), np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.qpos, self.qvel = np.zeros(2), np.zeros(2)
        self.target_qpos = np.zeros(2)
        self.target_pos = np.zeros(2)

    def _set_state(self, state) -> None:
        """Reference setter: joint angles and velocities (q1, q2, dq1, dq2); a 2-D state means zero velocity."""
        state = np.asarray(state, np.float64).reshape(-1)
        self.qpos = state[:2].copy()
        self.qvel = state[2:4].copy() if len(state) >= 4 else np.zeros(2)

    def _set_goal_state(self, goal_state) -> None:
        """Reference setter (qpos_match task): goal joint angles of the success test."""
        self.target_qpos = np.array(goal_state, np.float64).reshape(-1)[:2]

    def _physics_step(self, u: np.ndarray) -> None:
        """One 0.02 s Euler step of the two-link arm (docs/envs.md §4)."""
        (q1, q2), (v1, v2) = self.qpos, self.qvel
        k = REACHER_M2 * REACHER_L1 * REACHER_C2
        m12 = REACHER_I2 + k * math.cos(q2)
        m11 = REACHER_I1 + REACHER_I2 + REACHER_M2 * REACHER_L1**2 + 2 * k * math.cos(q2)
        m22 = REACHER_I2
        h = k * math.sin(q2)
        f1 = REACHER_GEAR * u[0] - REACHER_DAMPING * v1 + h * (2 * v1 * v2 + v2 * v2)  # tau - bias
        f2 = REACHER_GEAR * u[1] - REACHER_DAMPING * v2 - h * v1 * v1
        a11, a22 = m11 + REACHER_DT * REACHER_DAMPING, m22 + REACHER_DT * REACHER_DAMPING  # implicit damping
        det = a11 * a22 - m12 * m12
        v1 += REACHER_DT * (a22 * f1 - m12 * f2) / det
        v2 += REACHER_DT * (a11 * f2 - m12 * f1) / det
        q1, q2 = q1 + REACHER_DT * v1, q2 + REACHER_DT * v2
        if abs(q2) > REACHER_WRIST_LIMIT:
            # DEVIATION: hard clamp with velocity zeroing instead of MuJoCo's soft joint limit (docs/envs.md §4)
            q2, v2 = math.copysign(REACHER_WRIST_LIMIT, q2), 0.0
        self.qpos, self.qvel = np.array([q1, q2]), np.array([v1, v2])

    def _get_info(self) -> dict:
        finger = reacher_finger_pos(self.qpos)
        state = np.concatenate([self.qpos, self.qvel])
        return {
            "state": state,
            "goal_state": self.target_qpos.copy(),
            "is_success": reacher_success(self.qpos, self.target_qpos),
            "proprio": state.copy(),
            "qpos": self.qpos.copy(),
            "qvel": self.qvel.copy(),
            "target_pos": self.target_pos.copy(),
            "finger_pos": finger,
            "observation": np.concatenate([self.qpos, self.target_pos - finger, self.qvel]).astype(np.float32),
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        rng = self.np_random  # all draws happen whatever the options, so the stream does not depend on them
        self._set_state([rng.uniform(-np.pi, np.pi), rng.uniform(-REACHER_WRIST_LIMIT, REACHER_WRIST_LIMIT)])
        angle, radius = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.05, 0.20)
        self.target_pos = radius * np.array([math.sin(angle), math.cos(angle)])
        # UNKNOWN how the reference's qpos_match task initialises its goal (eval always sets it): drawn like the start
        self._set_goal_state([rng.uniform(-np.pi, np.pi), rng.uniform(-REACHER_WRIST_LIMIT, REACHER_WRIST_LIMIT)])
        if options.get("state") is not None:
            self._set_state(options["state"])
        if options.get("goal_state") is not None:
            self._set_goal_state(options["goal_state"])
        return self.render(), self._get_info()

    def step(self, action):
        u = np.clip(np.asarray(action, np.float64), -1.0, 1.0)
        reward, terminated = 0.0, False
        for _ in range(REACHER_SUBSTEPS):
            self._physics_step(u)
            touch = np.linalg.norm(reacher_finger_pos(self.qpos) - self.target_pos) <= REACHER_TARGET_SIZE + 0.01
            reward += float(touch)
            if reacher_success(self.qpos, self.target_qpos):
                # UNKNOWN whether the reference finishes the action repeat after success; a finished dm_control
                # episode must be reset before it can step again, so we stop at the terminating physics step
                terminated = True
                break
        return self.render(), reward, terminated, False, self._get_info()

    def render(self) -> np.ndarray:
        """Flat-shaded arm over the static frame; pixel (u, v) = (112 + f x / (0.75 - z), 112 - f y / (0.75 - z))
        at 224 with the links at z = 0.01, scaled by img_size / 224. Only the arm's bounding window is redrawn."""
        frame = _reacher_background(self.img_size).copy()
        s = self.img_size / 224.0
        scale = s * REACHER_FOCAL / (REACHER_CAM_Z - 0.01)  # px per metre in the arm plane
        q1, q12 = float(self.qpos[0]), float(self.qpos[0] + self.qpos[1])
        wrist = np.array([math.cos(q1), math.sin(q1)]) * REACHER_L1
        hand = np.array([math.cos(q12), math.sin(q12)])
        world = np.stack([np.zeros(2), wrist, wrist + REACHER_L2 * hand, wrist + REACHER_FINGER * hand])  # (4, 2)
        pix = np.stack([112.0 * s + scale * world[:, 0], 112.0 * s - scale * world[:, 1]], axis=1)  # (4, 2) x, y
        r = REACHER_RADIUS * scale
        x0, y0 = np.maximum(np.floor(pix.min(0) - r - 1), 0).astype(int)
        x1, y1 = np.minimum(np.ceil(pix.max(0) + r + 1), self.img_size).astype(int)
        window = frame[y0:y1, x0:x1].astype(np.float32)
        pix -= (x0, y0)
        draw_capsule(window, a=pix[0], b=pix[1], radius=r, color=REACHER_ARM_COLOR)
        draw_capsule(window, a=pix[1], b=pix[2], radius=r, color=REACHER_ARM_COLOR)
        draw_disc(window, center=pix[3], radius=r, color=REACHER_FINGER_COLOR)
        frame[y0:y1, x0:x1] = to_uint8(window)
        return frame


class ReacherRandomPolicy:
    """The LeWM Reacher data policy (docs/envs.md §4): a fresh uniform action in [-1, 1]^2 every env step, plus
    N(0, noise^2) per component, clipped (noise 0, the LeWM data, draws nothing more)."""

    def __init__(self, env=None, noise: float = 0.0, rng: np.random.Generator | None = None):
        self.noise = noise
        self.rng = rng if rng is not None else np.random.default_rng()

    def reset(self, info: dict) -> None:
        pass

    def __call__(self, info: dict) -> np.ndarray:
        a = self.rng.uniform(-1.0, 1.0, 2).astype(np.float32)
        if self.noise > 0:
            a = _clip_action(a + self.rng.normal(0.0, self.noise, 2))
        return a


# --- Reacher evaluation hooks (analyses.py: surprise events)


def reacher_teleport(state: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The whole arm rotated by 90 degrees about the shoulder (always possible)."""
    s = np.array(state, np.float64)
    s[0] += rng.choice([-1.0, 1.0]) * np.pi / 2
    return s


def reacher_recolour(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tan arm -> light blue (red and blue swapped); the floor is blue (R < B): untouched."""
    return np.clip((x[..., 0] - x[..., 2]) / 100, 0, 1), x[..., ::-1]


# --- Cube (docs/envs.md §5): kinematic single-cube pick-and-place, numpy perspective rasteriser
#
# The scene is a set of boxes (cube, gripper parts, cartoon arm) drawn with a pinhole model of the reference's front
# camera. Shapes: B boxes, C shadow casters, K quads drawn together, P quads in total, S image size, (h, w) a window.

CUBE_DT = 0.05  # control period in seconds (20 Hz, as the original 25 x 0.002 s substeps)
CUBE_ACTION_SCALE = np.array(
    [0.05, 0.05, 0.05, 0.3, 1.0]
)  # action 1 = 5 cm, 0.3 rad, full gripper stroke (docs/envs.md §5)
CUBE_WS_LOW = np.array([0.25, -0.35, 0.02])  # effector workspace (docs/envs.md §5)
CUBE_WS_HIGH = np.array([0.60, 0.35, 0.35])
CUBE_WALL_LOW = np.array([0.24, -0.36])  # cube-centre limits from the invisible walls x = 0.22 / 0.63, y = +-0.38
CUBE_WALL_HIGH = np.array([0.61, 0.36])
CUBE_HALF = 0.02  # cube half-size; a resting cube's centre is at z = CUBE_HALF
CUBE_EE_START = np.array([0.425, 0.0, 0.275])  # effector position at reset (docs/envs.md §5)
CUBE_SPAWN_LOW = np.array([0.30, -0.30])  # cube and target (x, y) box at reset (docs/envs.md §5)
CUBE_SPAWN_HIGH = np.array([0.55, 0.30])
CUBE_TRACK = 0.9  # effector moves this fraction of the way to its target per step (UNKNOWN; MuJoCo servo lag)
CUBE_GRIP_SPEED = 0.35  # max gripper closure change per step, full stroke in ~3 steps (UNKNOWN)
CUBE_GRIP_CONTACT = 1.0 - 2 * CUBE_HALF / 0.085  # 0.53: closure at which the 85 mm 2F-85 stroke meets a 4 cm cube
CUBE_RELEASE = 0.5  # a grasped cube is let go when the gripper target drops below this closure
CUBE_GRASP_TOL = 0.02  # pinch point within 2 cm of the cube centre, horizontally and vertically
CUBE_GRASP_YAW_TOL = math.radians(30)  # max yaw misalignment (mod 90 deg) for the fingers to close on two faces
CUBE_GRAVITY = 9.81
CUBE_SUCCESS_DIST = 0.04  # success: cube centre within 4 cm of the target centre, 3-D (docs/envs.md §5)
CUBE_STATE_DIM = 11  # [cube xyz, cube yaw, effector xyz, effector yaw, gripper closure, grasped, cube vz]

# Camera "front_pixels" (docs/envs.md §5): position, orthonormal image axes (x right, y up, z backwards), vertical FOV.
CUBE_CAM_POS = np.array([1.053, -0.014, 0.639])
_CUBE_CAM_X = np.array([0.0, 1.0, 0.0])  # xyaxes from the MJCF; MuJoCo orthonormalises y against x
_CUBE_CAM_Y = np.array([-0.628, 0.0, 0.778]) / np.linalg.norm([-0.628, 0.0, 0.778])
CUBE_CAM_AXES = np.stack([_CUBE_CAM_X, _CUBE_CAM_Y, np.cross(_CUBE_CAM_X, _CUBE_CAM_Y)])  # right, up, backwards
CUBE_CAM_FOVY = 45.0

# Colours (0-255) and lighting: a directional light from straight above (it also casts the shadows), a headlight
# and ambient, roughly the original's mix (docs/envs.md §5).
# Floor quadrant colours as rendered, keyed by (sign x, sign y); image right = world +y, robot base at x = 0.
CUBE_FLOOR_COLORS = {(1, 1): (55, 64, 89), (1, -1): (26, 39, 56), (-1, 1): (50, 59, 84), (-1, -1): (26, 36, 54)}
CUBE_LINE_COLOR = (135, 140, 152)  # the light cross lines along x = 0 and y = 0
CUBE_LINE_HALF_WIDTH = 0.004  # metres
CUBE_RED = (245, 66, 84)  # (0.96, 0.26, 0.33)
CUBE_PURPLE = (156, 71, 209)  # (0.61, 0.28, 0.82)
CUBE_ARM_GRAY = (175, 178, 185)
CUBE_BASE_GRAY = (95, 100, 112)
CUBE_LIGHT = (0.25, 0.55, 0.35)  # ambient, top light, headlight
CUBE_SHADOW = 0.45  # fraction of floor light removed under an object

# Boxes drawn every frame, in this order: (half sizes in their own frame, colour, casts a shadow).
# Links have local x along the link and local y horizontal; gripper parts and the cube are rotated by their yaw.
CUBE_BOXES = (
    ((0.22, 0.035, 0.035), CUBE_ARM_GRAY, True),  # upper arm: shoulder -> elbow
    ((0.21, 0.03, 0.03), CUBE_ARM_GRAY, True),  # forearm: elbow -> wrist
    ((0.016, 0.016, 0.045), CUBE_ARM_GRAY, False),  # wrist column above the palm
    ((0.02, 0.05, 0.015), CUBE_PURPLE, True),  # palm
    ((0.011, 0.006, 0.025), CUBE_PURPLE, False),  # finger (+y side of the gripper)
    ((0.011, 0.006, 0.025), CUBE_PURPLE, False),  # finger (-y side)
    ((CUBE_HALF,) * 3, CUBE_RED, True),  # cube
)
CUBE_BASE_BOX = (np.array([0.0, 0.0, 0.08]), np.array([0.06, 0.06, 0.08]), CUBE_BASE_GRAY)  # static pedestal
CUBE_SHOULDER = (0.0, 0.0, 0.16)
CUBE_LINK = 0.4  # upper arm and forearm length of the cartoon arm (m)

# Unit box: corner i has signs (bit2, bit1, bit0) for local (x, y, z); faces list corners in cyclic order, in
# pairs (-x, +x, -y, +y, -z, +z) so that at most one face of each pair is visible.
_CUBE_BOX_CORNERS = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float)
_CUBE_BOX_FACES = np.array([[0, 1, 3, 2], [4, 5, 7, 6], [0, 1, 5, 4], [2, 3, 7, 6], [0, 2, 6, 4], [1, 3, 7, 5]])
_CUBE_BOX_HALF = np.array([b[0] for b in CUBE_BOXES])  # (B, 3)
_CUBE_BOX_LOCAL = _CUBE_BOX_CORNERS[None] * _CUBE_BOX_HALF[:, None]  # (B, 8, 3) corners in box frames
_CUBE_BOX_COLOR = np.array([b[1] for b in CUBE_BOXES], dtype=float)  # (B, 3)
_CUBE_FACE_SIGN = np.array([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0])[:, None]
_CUBE_SHADOW_IDS = np.flatnonzero([b[2] for b in CUBE_BOXES])  # (C,) boxes that cast a shadow
_CUBE_FOOT_SIGNS = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [-1.0, 1.0]])  # (4, 2) footprint corners
_CUBE_STATIC_CACHE: dict[int, tuple] = {}


def _cube_wrap(angle):
    """Angle(s) brought to [-pi, pi)."""
    return (np.asarray(angle) + np.pi) % (2 * np.pi) - np.pi


def _cube_yaw_axes(yaw: float) -> np.ndarray:
    """Rows = world directions of the local x, y, z axes of a frame rotated by yaw about +z."""
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def cube_project(points: np.ndarray, img_size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """World points (..., 3) -> continuous pixel coordinates (..., 2) as (u = column, v = row), and depth (...).

    Pixel (row i, column j) covers [j, j+1) x [i, i+1); the optical axis hits (S/2, S/2), as in MuJoCo.
    """
    f = img_size / 2 / math.tan(math.radians(CUBE_CAM_FOVY) / 2)  # 270.4 px at 224
    cam = (points - CUBE_CAM_POS) @ CUBE_CAM_AXES.T  # (..., 3) camera coordinates, looking along -z
    depth = -cam[..., 2]
    uv = cam[..., :2] * (f / depth)[..., None] * [1.0, -1.0] + img_size / 2  # (..., 2)
    return uv, depth


def _cube_edge_functions(polys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Convex quads (P, 4, 2) in pixels -> coefficients (3, P, 4, 1, 1) of 0.5 + signed distance to each edge.

    The anti-aliased coverage of pixel centre (x, y) is clip(min over edges of cy*y + cx*x + c0, 0, 1): exact for a
    straight edge crossing the pixel. Invalid (hidden) quads get c0 = -1e9 and cover nothing.
    """
    e = polys[:, [1, 2, 3, 0]] - polys  # (P, 4, 2) edge vectors
    area = (polys[..., 0] * e[..., 1] - polys[..., 1] * e[..., 0]).sum(-1, keepdims=True)  # (P, 1) twice the area
    scale = np.sign(area) / np.maximum(np.hypot(e[..., 0], e[..., 1]), 1e-9)  # (P, 4) unit inward normals
    coef = np.empty((3,) + scale.shape, np.float32)
    coef[0] = e[..., 0] * scale
    coef[1] = -e[..., 1] * scale
    coef[2] = np.where(valid & (area != 0), (e[..., 1] * polys[..., 0] - e[..., 0] * polys[..., 1]) * scale + 0.5, -1e9)
    return coef[..., None, None]


def _cube_coverage(coef: np.ndarray, y0: int, y1: int, x0: int, x1: int, grid: np.ndarray) -> np.ndarray:
    """Coverage (K, h, w) of K quads with edge functions coef (3, K, 4, 1, 1) over rows y0:y1, columns x0:x1."""
    dist = coef[0] * grid[y0:y1, None] + (coef[1] * grid[x0:x1] + coef[2])  # (K, 4, h, w)
    cov = dist.min(1)  # (K, h, w)
    return np.minimum(np.maximum(cov, 0.0, out=cov), 1.0, out=cov)


def _cube_box_faces(centres: np.ndarray, axes: np.ndarray, local: np.ndarray, colors: np.ndarray):
    """Camera-side faces of B boxes: world quads (B, 3, 4, 3), visible (B, 3), Lambert-shaded colours (B, 3, 3).

    A box shows at most one face of each opposite pair, so 3 candidate faces per box suffice.
    """
    verts = centres[:, None] + local @ axes  # (B, 8, 3) world corners
    normals = axes[:, [0, 0, 1, 1, 2, 2]] * _CUBE_FACE_SIGN  # (B, 6, 3) outward normals
    to_cam = CUBE_CAM_POS - verts[:, _CUBE_BOX_FACES[:, 0]]  # (B, 6, 3) from a corner of each face to the camera
    facing = (normals * to_cam).sum(-1) / np.sqrt((to_cam * to_cam).sum(-1))  # (B, 6) cosine to the view ray
    rows = np.arange(len(centres))[:, None]
    pick = (facing[:, 1::2] > facing[:, 0::2]) + np.array([0, 2, 4])  # (B, 3) camera-side face of each pair
    facing, normal_z = facing[rows, pick], normals[rows, pick, 2]  # (B, 3)
    amb, top, head = CUBE_LIGHT
    shade = amb + top * np.maximum(normal_z, 0.0) + head * np.maximum(facing, 0.0)  # (B, 3)
    face_rgb = np.minimum(colors[:, None] * shade[..., None], 255.0).astype(np.float32)  # (B, 3, 3)
    return verts[rows[..., None], _CUBE_BOX_FACES[pick]], facing > 1e-6, face_rgb


def _cube_static_layers(img_size: int):
    """Per-size cache: floor (3, S, S) float32, the pedestal as (bbox, alpha, premultiplied colour), pixel grid."""
    if img_size not in _CUBE_STATIC_CACHE:
        ss = 4  # 4x4 supersampling of the floor lines
        f = img_size / 2 / math.tan(math.radians(CUBE_CAM_FOVY) / 2)
        t = (np.arange(img_size * ss) + 0.5) / ss - img_size / 2  # sub-pixel offsets from the image centre
        xc, yc = np.meshgrid(t / f, -t / f)  # camera-frame ray (xc, yc, -1) per sub-pixel
        rays = xc[..., None] * CUBE_CAM_AXES[0] + yc[..., None] * CUBE_CAM_AXES[1] - CUBE_CAM_AXES[2]
        hit = CUBE_CAM_POS - rays * (CUBE_CAM_POS[2] / rays[..., 2:3])  # ray-plane z=0 intersection
        sub = np.zeros(hit.shape[:2] + (3,))
        for (sx, sy), color in CUBE_FLOOR_COLORS.items():
            sub[(np.sign(hit[..., 0]) == sx) & (np.sign(hit[..., 1]) == sy)] = color
        line = (np.abs(hit[..., 0]) < CUBE_LINE_HALF_WIDTH) | (np.abs(hit[..., 1]) < CUBE_LINE_HALF_WIDTH)
        sub[line] = CUBE_LINE_COLOR
        floor = sub.reshape(img_size, ss, img_size, ss, 3).mean((1, 3)).transpose(2, 0, 1)  # (3, S, S)
        grid = np.arange(img_size, dtype=np.float32) + 0.5  # pixel-centre coordinates
        centre, half, color = CUBE_BASE_BOX
        corners = (_CUBE_BOX_CORNERS * half)[None]
        quads, visible, face_rgb = _cube_box_faces(centre[None], np.eye(3)[None], corners, np.array([color], float))
        uv, _ = cube_project(quads[0], img_size)  # (3, 4, 2)
        y0, x0 = np.maximum(np.floor(uv.min((0, 1))).astype(int) - 1, 0)[::-1]
        y1, x1 = np.minimum(np.ceil(uv.max((0, 1))).astype(int) + 1, img_size)[::-1]
        cov = _cube_coverage(_cube_edge_functions(uv, visible[0, :, None]), y0, y1, x0, x1, grid)  # (3, h, w)
        total = cov.sum(0)  # faces of one convex box do not overlap: summed coverage = silhouette
        paint = np.tensordot(face_rgb[0], cov / np.maximum(total, 1.0), (0, 0))  # (3, h, w) premultiplied
        base = ((y0, y1, x0, x1), np.minimum(total, 1.0), paint.astype(np.float32))
        _CUBE_STATIC_CACHE[img_size] = (floor.astype(np.float32), base, grid)
    return _CUBE_STATIC_CACHE[img_size]


def _cube_scene(state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Poses of the CUBE_BOXES for a state: centres (B, 3) and axes (B, 3, 3) (plain floats: this runs every step)."""
    cx, cy, cz, cube_yaw, ex, ey, ez, ee_yaw, closure = (float(v) for v in state[:9])
    # Cartoon arm: shoulder above the pedestal, two equal links bent (elbow up) to reach a wrist point above the palm.
    sx, sy, sz = CUBE_SHOULDER
    wx, wy, wz = ex, ey, ez + 0.155
    horiz = max(math.hypot(wx - sx, wy - sy), 1e-6)
    chord = math.hypot(horiz, wz - sz)
    pitch = math.atan2(wz - sz, horiz) + math.acos(min(chord / (2 * CUBE_LINK), 1.0))
    reach, lift = CUBE_LINK * math.cos(pitch), CUBE_LINK * math.sin(pitch)
    elbow = (sx + reach * (wx - sx) / horiz, sy + reach * (wy - sy) / horiz, sz + lift)
    centres, axes = [], []
    for (ax, ay, az), (bx, by, bz) in (((sx, sy, sz), elbow), (elbow, (wx, wy, wz))):
        n = math.sqrt((bx - ax) ** 2 + (by - ay) ** 2 + (bz - az) ** 2)
        ux, uy, uz = (bx - ax) / n, (by - ay) / n, (bz - az) / n  # along the link
        m = max(math.hypot(ux, uy), 1e-9)
        vx, vy = -uy / m, ux / m  # horizontal, across the link
        centres.append(((ax + bx) / 2, (ay + by) / 2, (az + bz) / 2))
        axes.append(((ux, uy, uz), (vx, vy, 0.0), (-uz * vy, uz * vx, ux * vy - uy * vx)))
    c, s = math.cos(ee_yaw), math.sin(ee_yaw)
    off = (1.0 - closure) * 0.085 / 2 + 0.006  # finger centre from the pinch point; pads (1-closure)*85 mm apart
    centres += [(ex, ey, ez + 0.11), (ex, ey, ez + 0.05), (ex - s * off, ey + c * off, ez + 0.01)]
    centres += [(ex + s * off, ey - c * off, ez + 0.01), (cx, cy, cz)]
    axes += [((c, s, 0.0), (-s, c, 0.0), (0.0, 0.0, 1.0))] * 4
    c, s = math.cos(cube_yaw), math.sin(cube_yaw)
    axes.append(((c, s, 0.0), (-s, c, 0.0), (0.0, 0.0, 1.0)))
    return np.array(centres), np.array(axes)


def cube_render(state: np.ndarray, img_size: int = 224) -> np.ndarray:
    """Render a Cube state (layout of CubeEnv) as an RGB uint8 (S, S, 3) frame from the front camera.

    Painter's algorithm over boxes sorted far to near; within one convex box the visible faces never overlap, so
    their anti-aliased coverages are summed (no seams on shared edges). Shadows (light straight from above) are the
    casters' floor footprints, merged with a max so that overlaps do not darken twice. All geometry is projected
    in one batch; only the per-box compositing loops.
    """
    floor, base, grid = _cube_static_layers(img_size)
    centres, axes = _cube_scene(state)  # (B, 3), (B, 3, 3)
    quads, visible, face_rgb = _cube_box_faces(centres, axes, _CUBE_BOX_LOCAL, _CUBE_BOX_COLOR)  # (B, 3, 4, 3), ...
    n_box, n_shadow = len(centres), len(_CUBE_SHADOW_IDS)
    # Shadow of a caster: parallelogram spanned by its local x and y half-extents around its centre, at z = 0.
    e1 = _CUBE_BOX_HALF[_CUBE_SHADOW_IDS, 0, None] * axes[_CUBE_SHADOW_IDS, 0]  # (C, 3)
    e2 = _CUBE_BOX_HALF[_CUBE_SHADOW_IDS, 1, None] * axes[_CUBE_SHADOW_IDS, 1]
    foot = centres[_CUBE_SHADOW_IDS, None] + _CUBE_FOOT_SIGNS[:, :1] * e1[:, None]  # (C, 4, 3)
    foot += _CUBE_FOOT_SIGNS[:, 1:] * e2[:, None]
    foot[..., 2] = 0.0
    points = np.concatenate([quads.reshape(-1, 3), foot.reshape(-1, 3), centres])
    uv, depth = cube_project(points, img_size)
    polys = uv[:-n_box].reshape(-1, 4, 2)  # (3B + C, 4, 2)
    coef = _cube_edge_functions(polys, np.concatenate([visible.ravel(), np.ones(n_shadow, bool)])[:, None])
    lo = np.maximum(np.floor(polys.min(1)).astype(int) - 1, 0)  # (3B + C, 2) pixel bounding boxes (x, y)
    hi = np.minimum(np.ceil(polys.max(1)).astype(int) + 1, img_size)
    lo = np.concatenate([lo[: 3 * n_box].reshape(n_box, 3, 2).min(1), lo[3 * n_box :]]).tolist()
    hi = np.concatenate([hi[: 3 * n_box].reshape(n_box, 3, 2).max(1), hi[3 * n_box :]]).tolist()

    img = floor.copy()  # (3, S, S): channel-first keeps the per-pixel broadcasts fast
    (ux0, uy0), (ux1, uy1) = np.min(lo[n_box:], 0), np.max(hi[n_box:], 0)
    if ux1 > ux0 and uy1 > uy0:
        mask = np.zeros((uy1 - uy0, ux1 - ux0), np.float32)
        for i in range(n_shadow):
            (x0, y0), (x1, y1) = lo[n_box + i], hi[n_box + i]
            if x1 > x0 and y1 > y0:
                win = mask[y0 - uy0 : y1 - uy0, x0 - ux0 : x1 - ux0]
                k = 3 * n_box + i
                np.maximum(win, _cube_coverage(coef[:, k : k + 1], y0, y1, x0, x1, grid)[0], out=win)
        img[:, uy0:uy1, ux0:ux1] *= 1.0 - CUBE_SHADOW * mask
    (y0, y1, x0, x1), alpha, paint = base
    win = img[:, y0:y1, x0:x1]
    win *= 1.0 - alpha
    win += paint
    for b in np.argsort(-depth[-n_box:]).tolist():  # far to near
        (x0, y0), (x1, y1) = lo[b], hi[b]
        if x1 <= x0 or y1 <= y0:
            continue
        cov = _cube_coverage(coef[:, 3 * b : 3 * b + 3], y0, y1, x0, x1, grid)  # (3, h, w)
        total = cov.sum(0)  # (h, w)
        cov /= np.maximum(total, 1.0)  # weights of the faces; they sum to the box's alpha
        win = img[:, y0:y1, x0:x1]  # (3, h, w)
        win *= 1.0 - cov.sum(0)
        win += (face_rgb[b].T @ cov.reshape(3, -1)).reshape(win.shape)
    return (img.transpose(1, 2, 0) + 0.5).astype(np.uint8)  # (S, S, 3)


def cube_success(state, goal_state) -> bool:
    """docs/envs.md §5: cube centre (state[:3]) within 4 cm of the target centre (goal_state[:3]), 3-D, yaw ignored."""
    return bool(np.linalg.norm(np.asarray(state)[:3] - np.asarray(goal_state)[:3]) <= CUBE_SUCCESS_DIST)


def cube_errors(state, goal_state) -> dict[str, float]:
    """The success test's one part: the cube centre's distance to the target centre (m, <= 0.04)."""
    diff = np.asarray(state, np.float64)[:3] - np.asarray(goal_state, np.float64)[:3]
    return {"distance_m": float(np.linalg.norm(diff))}


class CubeEnv(gym.Env):
    """
    ## Description
    Single-cube pick-and-place in front of a robot arm, seen by a fixed oblique front camera: a numpy stand-in for
    OGBench "cube-single" (`swm/OGBCube-v0`, docs/envs.md §5). The agent moves the pinch point of a parallel
    gripper with relative commands; closing the fingers around the 4 cm red cube grasps it, opening them drops it,
    and gravity brings a dropped cube back to the table. The goal is to bring the cube centre within 4 cm of a
    target position, which is invisible in the image (as the original with `visualize_info=False`).
    DEVIATION: kinematic simplification of the MuJoCo scene (docs/envs.md §5): no UR5e, IK or joint dynamics (the arm
    is a drawn cartoon), no contact physics (an ungrasped cube never gets pushed, slips or tumbles; the cube stays
    upright), an idealised grasp and approximate gripper timing, and non-photoreal rendering.

    Per step (dt = 0.05 s): the effector covers 90 % of the way to its target, the yaw snaps to its target, and the
    gripper closure moves toward its target by at most 0.35. The fingers grasp the cube when their closure crosses
    0.53 (pads touching a 4 cm cube) while the pinch point is within 2 cm of the cube centre (horizontally and
    vertically) and the yaw is within 30 deg of the cube's faces; a grasped cube keeps its pose relative to the
    gripper and holds the fingers at 0.53 (reported opening; contact = 1). It is released when the gripper target
    drops below 0.5 and then falls under gravity. The cube centre stays within the invisible walls, x in
    [0.24, 0.61], y in [-0.36, 0.36], and above the table, z >= 0.02.

    ## Action Space
    `Box(-1, 1, (5,), float32)`: (dx, dy, dz, dyaw, dgrip), scaled by (0.05 m, 0.05 m, 0.05 m, 0.3 rad, 1.0).
    Effector target = position + (dx, dy, dz) clipped to x in [0.25, 0.60], y in [-0.35, 0.35], z in [0.02, 0.35];
    yaw target = yaw + dyaw wrapped to [-pi, pi); gripper target = clip(opening + dgrip, 0, 1), 0 open, 1 closed.

    ## Observation Space
    `Box(0, 255, (img_size, img_size, 3), uint8)`: the RGB frame. Numbers are in `info`:
    `state` (11,) = [cube x, y, z, cube yaw, effector x, y, z, effector yaw, gripper closure, grasped (0/1),
    cube z-velocity] (metres, radians, m/s), `goal_state` (4,) = target [x, y, z, yaw] (= `state[:4]` of a goal
    configuration), `proprio` (5,) = [effector x, y, z, yaw, opening], `is_success`, and the reference's columns
    `privileged_block_0_pos` (3,), `privileged_block_0_quat` (4, wxyz), `privileged_block_0_yaw` (1,),
    `privileged_target_block_pos` (3,), `privileged_target_block_yaw` (1,), `proprio_effector_pos` (3,),
    `proprio_effector_yaw` (1,), `proprio_gripper_opening` (1,), `proprio_gripper_contact` (1,), `qpos` (12,) =
    [effector xyz, yaw, closure, cube xyz, cube quat], `qvel` (11,) = [effector velocity, yaw rate, closure rate,
    cube velocity, cube angular velocity] and `time` (1,).

    ## Rewards
    1.0 when the cube is within 4 cm of the target after the step, else 0.0 (as the reference).

    ## Starting State
    Effector at (0.425, 0, 0.275) with yaw ~ U(-pi, pi), gripper open; cube on the table at (x, y) ~
    U([0.30, 0.55] x [-0.30, 0.30]) with yaw ~ U(0, 2 pi); target drawn from the same box at z = 0.02 with yaw ~
    U(0, 2 pi) (docs/envs.md §5). `options={"state": s, "goal_state": g}` overrides either exactly; g may be (3,)
    (yaw 0), (4,), or a full (11,) state whose first four entries are used.

    ## Episode End
    `terminated` when ||cube - target|| <= 0.04 (docs/envs.md §5). The env never truncates by itself; pass
    `max_episode_steps` to `gym.make` / `make_env`.

    ## Arguments
    `img_size` (int >= 32, default 224): side of the rendered frame, drawn directly at that size.
    `terminate_at_goal` (bool, default True): as OGBench's flag; the LeWM data were collected with it off
    (`gym.make("LeWM/Cube-v0", terminate_at_goal=False)`), so that every episode runs its 200 steps.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, img_size: int = 224, render_mode: str | None = "rgb_array", terminate_at_goal: bool = True):
        if img_size < 32:
            raise ValueError(f"img_size must be >= 32, got {img_size}")
        self.img_size = int(img_size)
        self.render_mode = render_mode
        self.terminate_at_goal = terminate_at_goal
        self.action_space = spaces.Box(-1.0, 1.0, (5,), np.float32)
        self.observation_space = spaces.Box(0, 255, (self.img_size, self.img_size, 3), np.uint8)
        self.state = np.zeros(CUBE_STATE_DIM)
        self.goal_state = np.zeros(4)
        self.qvel = np.zeros(11)
        self.time = 0.0
        self._frame = None

    def _set_state(self, state) -> None:
        """The full (11,) state, exactly."""
        self.state = np.array(state, dtype=np.float64).reshape(CUBE_STATE_DIM)

    def _set_goal_state(self, goal_state) -> None:
        """Target (x, y, z[, yaw]) (yaw 0 if absent); a full (11,) state gives its first four entries."""
        g = np.asarray(goal_state, dtype=np.float64).reshape(-1)
        self.goal_state = np.array([*g[:3], g[3] if len(g) > 3 else 0.0])

    def _get_info(self) -> dict:
        s, g = self.state, self.goal_state
        cube_yaw = float(_cube_wrap(s[3]))
        quat = np.array([math.cos(cube_yaw / 2), 0.0, 0.0, math.sin(cube_yaw / 2)])  # wxyz of an upright cube
        return {
            "state": s.copy(),
            "goal_state": g.copy(),
            "is_success": cube_success(s, g),
            "proprio": s[4:9].copy(),
            "privileged_block_0_pos": s[0:3].copy(),
            "privileged_block_0_quat": quat,
            "privileged_block_0_yaw": np.array([cube_yaw]),
            "privileged_target_block_pos": g[0:3].copy(),
            "privileged_target_block_yaw": g[3:4].copy(),
            "proprio_effector_pos": s[4:7].copy(),
            "proprio_effector_yaw": s[7:8].copy(),
            "proprio_gripper_opening": s[8:9].copy(),
            "proprio_gripper_contact": s[9:10].copy(),
            # DEVIATION: own qpos/qvel layout (no arm joints): not interchangeable with the MuJoCo (21,)/(20,) ones
            "qpos": np.concatenate([s[4:9], s[0:3], quat]),
            "qvel": self.qvel.copy(),
            "time": np.array([self.time]),
        }

    # gymnasium API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        s = np.zeros(CUBE_STATE_DIM)
        s[0:2] = rng.uniform(CUBE_SPAWN_LOW, CUBE_SPAWN_HIGH)
        s[2] = CUBE_HALF
        s[3] = rng.uniform(0.0, 2 * np.pi)
        s[4:7] = CUBE_EE_START
        s[7] = rng.uniform(-np.pi, np.pi)
        goal = np.array([*rng.uniform(CUBE_SPAWN_LOW, CUBE_SPAWN_HIGH), CUBE_HALF, rng.uniform(0.0, 2 * np.pi)])
        self.state, self.goal_state = s, goal
        options = options or {}
        if options.get("state") is not None:
            self._set_state(options["state"])
        if options.get("goal_state") is not None:
            self._set_goal_state(options["goal_state"])
        self.qvel = np.zeros(11)
        self.time = 0.0
        self._frame = cube_render(self.state, self.img_size)
        return self._frame, self._get_info()

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0) * CUBE_ACTION_SCALE
        old, s = self.state, self.state.copy()
        # DEVIATION: the effector follows its target with a fixed lag instead of IK + position servos.
        ee_target = np.clip(s[4:7] + a[0:3], CUBE_WS_LOW, CUBE_WS_HIGH)
        s[4:7] += CUBE_TRACK * (ee_target - s[4:7])
        s[7] = _cube_wrap(s[7] + a[3])
        grip_target = min(max(s[8] + a[4], 0.0), 1.0)
        if s[9] and grip_target < CUBE_RELEASE:
            s[9] = 0.0  # fingers open: the cube is let go
        s[8] += min(max(grip_target - s[8], -CUBE_GRIP_SPEED), CUBE_GRIP_SPEED)
        if s[9]:
            # Carried rigidly; the grip offset is re-derived from the previous state, so the state is complete.
            s[8] = min(s[8], CUBE_GRIP_CONTACT)
            offset = _cube_yaw_axes(old[7]) @ (old[0:3] - old[4:7])  # cube centre in the old gripper frame
            s[0:3] = s[4:7] + _cube_yaw_axes(s[7]).T @ offset
            s[3] = old[3] + _cube_wrap(s[7] - old[7])
        elif old[8] < CUBE_GRIP_CONTACT <= s[8]:  # fingers closing through the cube's width: grasp if it is there
            near = math.hypot(*(s[0:2] - s[4:6])) <= CUBE_GRASP_TOL and abs(s[2] - s[6]) <= CUBE_GRASP_TOL
            misalign = abs(_cube_wrap(4 * (s[3] - s[7]))) / 4  # yaw difference modulo 90 deg
            if near and misalign <= CUBE_GRASP_YAW_TOL:
                s[8], s[9], s[10] = CUBE_GRIP_CONTACT, 1.0, 0.0
        if not s[9] and (s[2] > CUBE_HALF or s[10] != 0.0):
            s[10] -= CUBE_GRAVITY * CUBE_DT  # free fall, semi-implicit Euler, stopped by the table
            s[2] += s[10] * CUBE_DT
            if s[2] <= CUBE_HALF:
                s[2], s[10] = CUBE_HALF, 0.0
        s[0:2] = np.clip(s[0:2], CUBE_WALL_LOW, CUBE_WALL_HIGH)
        s[2] = max(s[2], CUBE_HALF)
        d = s - old
        self.qvel = np.array([*d[4:7], _cube_wrap(d[7]), d[8], *d[0:3], 0.0, 0.0, d[3]]) / CUBE_DT
        self.state = s
        self.time += CUBE_DT
        self._frame = cube_render(self.state, self.img_size)
        info = self._get_info()
        terminated = info["is_success"] and self.terminate_at_goal
        return self._frame, float(info["is_success"]), terminated, False, info

    def render(self) -> np.ndarray:
        """The current frame, identical to the last observation."""
        return self._frame.copy()


# --- Cube scripted policy: OGBench plan oracle (docs/envs.md §5)


def _cube_gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter along axis 0 as scipy.ndimage.gaussian_filter1d (mode 'reflect', truncate 4), numpy only."""
    r = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / max(sigma, 1e-9)) ** 2)
    k /= k.sum()
    xp = np.pad(x, [(r, r)] + [(0, 0)] * (x.ndim - 1), mode="symmetric")  # numpy 'symmetric' = scipy 'reflect'
    return sum(k[i] * xp[i : i + len(x)] for i in range(2 * r + 1))


def _cube_quarter_turn(yaw: float, reference: float) -> float:
    """The angle among yaw + k * 90 deg closest to reference (a cube looks the same every quarter turn)."""
    return reference + float(_cube_wrap(4 * (yaw - reference))) / 4


class CubeOraclePolicy:
    """The LeWM Cube data policy (docs/envs.md §5): OGBench's plan oracle with smoothed noise.

    A subtask picks the cube and places it at the target (both read from info), then moves to a random pose. Its
    keyframes (pose = xyz + yaw, gripper 0/1) and durations: initial (current pose, open) -> pick, 0.1-0.2 m above
    the cube (0.4 s) -> at the cube (0.6 s) -> closed (0.4 s) -> back to pick (0.4 s) -> clearance between the cube
    and the target (0.4 s) -> place, 0.1-0.2 m above the target (0.4 s) -> at the target (0.6 s) -> open (0.4 s) ->
    back to place (0.4 s) -> random final pose (0.4 s); every time but the first jittered by U(-0.08, 0.08) s.
    Grasp yaws are the cube's (target's) yaw modulo 90 deg closest to the current effector yaw. The plan samples the
    keyframes every 0.05 s (linear in position and gripper, shortest-arc in yaw: ~88 steps), plus Gaussian noise of
    std noise * action scale per step, smoothed along time with sigma = 0.5 steps. The action at plan step k is the
    normalised difference between plan[k] and the current (effector position, yaw, opening). When the plan is used
    up the next subtask is planned from the current state with the same target (the swm data re-place the cube).
    """

    DURATIONS = np.array([0.0, 0.4, 0.6, 0.4, 0.4, 0.4, 0.4, 0.6, 0.4, 0.4, 0.4])  # keyframe spacing (s)
    GRIPPER = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # gripper closure at each keyframe

    def __init__(self, env=None, noise: float = 0.1, rng: np.random.Generator | None = None, smoothing: float = 0.5):
        self.noise = noise  # plan noise std as a fraction of the action scale (0.1 in the LeWM data)
        self.smoothing = smoothing  # std (in steps) of the Gaussian smoothing of the noise along time
        self.rng = rng if rng is not None else np.random.default_rng()
        self.plan, self.k = None, 0

    def _make_plan(self, info: dict) -> np.ndarray:
        """Plan (N, 5) of absolute targets [x, y, z, yaw, closure], one per 0.05 s step."""
        rng = self.rng
        ee, ee_yaw = info["proprio_effector_pos"], float(info["proprio_effector_yaw"][0])
        cube, target = info["privileged_block_0_pos"], info["privileged_target_block_pos"]
        pick_yaw = _cube_quarter_turn(float(info["privileged_block_0_yaw"][0]), ee_yaw)
        place_yaw = _cube_quarter_turn(float(info["privileged_target_block_yaw"][0]), pick_yaw)
        pick = np.array([*cube[:2], cube[2] + 0.1 + rng.uniform(0.0, 0.1), pick_yaw])
        at_cube = np.array([*cube, pick_yaw])
        place = np.array([*target[:2], target[2] + 0.1 + rng.uniform(0.0, 0.1), place_yaw])
        at_target = np.array([*target, place_yaw])
        clear_xy = (pick[:2] + place[:2]) / 2 + rng.uniform(-0.1, 0.1, 2)
        clear = np.array([*clear_xy, ee[2] + rng.uniform(0.0, 0.2), pick_yaw + _cube_wrap(place_yaw - pick_yaw) / 2])
        final = np.array([*rng.uniform([0.25, -0.35, 0.20], [0.60, 0.35, 0.35]), rng.uniform(-np.pi, np.pi)])
        initial = np.array([*ee, ee_yaw])
        poses = np.stack([initial, pick, at_cube, at_cube, pick, clear, place, at_target, at_target, place, final])
        poses[1:, 3] = poses[0, 3] + np.cumsum(_cube_wrap(np.diff(poses[:, 3])))  # unwrapped: interp = slerp in yaw
        times = np.cumsum(self.DURATIONS)
        times[1:] += rng.uniform(-1.0, 1.0, len(times) - 1) * 0.08
        keys = np.concatenate([poses, self.GRIPPER[:, None]], 1)  # (11, 5)
        t = np.arange(0.0, times[-1] + 1e-9, CUBE_DT)
        plan = np.stack([np.interp(t, times, keys[:, i]) for i in range(5)], 1)  # (N, 5)
        noise = rng.standard_normal(plan.shape) * CUBE_ACTION_SCALE * self.noise
        return plan + _cube_gaussian_smooth(noise, self.smoothing)

    def reset(self, info: dict) -> None:
        self.plan, self.k = self._make_plan(info), 0

    def __call__(self, info: dict) -> np.ndarray:
        if self.plan is None or self.k >= len(self.plan):
            self.reset(info)  # subtask done: plan the next one from here
        target = self.plan[self.k]
        self.k += 1
        delta = np.array([*(target[:3] - info["proprio_effector_pos"]), 0.0, 0.0])
        delta[3] = _cube_wrap(target[3] - info["proprio_effector_yaw"][0])
        delta[4] = target[4] - info["proprio_gripper_opening"][0]
        return np.clip(delta / CUBE_ACTION_SCALE, -1.0, 1.0).astype(np.float32)  # normalize(), docs/envs.md §5


# --- Cube evaluation hooks (analyses.py: surprise events)


def cube_teleport(state: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One try: the cube moved 12 cm on the table (dropped there if it was held); None if that leaves the walls."""
    a = rng.uniform(0, 2 * np.pi)
    new = state[0:2] + 0.12 * np.array([np.cos(a), np.sin(a)])
    if not np.all((new >= CUBE_WALL_LOW) & (new <= CUBE_WALL_HIGH)):
        return None
    s = np.array(state, np.float64)
    s[0:2], s[2], s[9], s[10] = new, CUBE_HALF, 0.0, 0.0
    return s


def cube_recolour(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Red cube -> green (red and green swapped); shading scales all channels, so it is kept."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    redness = (r - np.maximum(g, b)) / np.maximum(r, 1)  # 0.66 on every shaded face of the cube, < 0 elsewhere
    return np.clip((redness - 0.2) / 0.4, 0, 1), x[..., [1, 0, 2]]


# --- registry: one entry per environment, everything the other files need to know about it


@dataclass(frozen=True)
class EnvSpec:
    """One environment as the rest of the project sees it: data collection, evaluation and probing read only this."""

    id: str  # Gymnasium id
    env_class: type  # the gym.Env
    policies: dict  # scripted policy kind (the name data files record) -> class(env, noise=, rng=)
    success: Callable  # (state, goal_state) -> bool: the env's termination test on raw state vectors
    errors: Callable  # (state, goal_state) -> {part: error}: the success test's parts, in its units
    policy: str  # data collection default: policy kind
    noise: float  # data collection default: noise of that policy
    episode_steps: int  # data collection default: steps per episode at most
    stop_on_success: bool  # data collection: an episode ends when the env terminates (else it runs on)
    goal_dims: int  # leading dims of a recorded `state` that are the `goal_state` reaching that state asks for
    distance_dims: int  # leading state dims of `goal_distance` (the ones the success test compares)
    state_columns: tuple  # dataset columns that give the `state` reset option, alternatives in order (concatenated)
    probe: dict  # physical quantity -> (candidate (column, first, last) sources, is_angle, unit of its errors)
    teleport: Callable  # (state, rng) -> the object moved where it cannot get in one frame, or None (one try)
    recolour: Callable  # float frame (H, W, 3) -> (weight (H, W) of the object's pixels, the recoloured frame)
    replay_state: Callable | None = None  # state -> the state a recorded frame is re-rendered from (None: as is)

    def goal_from_state(self, state) -> np.ndarray:
        """The `goal_state` option (reset) that asks the env to reach the recorded `state`."""
        return np.asarray(state, np.float64).reshape(-1)[: self.goal_dims].copy()

    def goal_distance(self, state, goal_state) -> float:
        """Distance to the goal in state units over the dims the success test uses (angles, velocities ignored)."""
        k = self.distance_dims
        diff = np.asarray(state, np.float64).reshape(-1)[:k] - np.asarray(goal_state, np.float64).reshape(-1)[:k]
        return float(np.linalg.norm(diff))


# Data collection defaults: PushT's paper data are noisy replays of human demonstrations that push the T onto the
# green one (paper, data of DINO-WM's PushT); the `demo` policy reproduces their statistics (docs/envs.md §2):
# action std ~0.2, pusher speed std ~75 px/s, ~125-150 steps per episode, which ends when the T is placed (the policy
# says `done`) or after 300 steps. TwoRoom and Reacher: as the LeWM data (docs/envs.md §3, §4). Cube: 200-step
# plan-oracle episodes, as the LeWM data.
# Goal dims (docs/envs.md §1; what the reference evaluation's goal setters set): PushT the full 7-D state,
# TwoRoom the agent xy, Reacher the two joint angles, Cube the cube position and yaw. Distances: PushT agent and
# block xy jointly, px of the 512 canvas (success < 20, and block angle < 20 deg); TwoRoom agent xy, px of 224
# (success < 16); Reacher the two joint angles, rad; Cube the cube centre, metres (success <= 0.04). Probes: an
# angle is regressed as (sin, cos) so that wrap-around is no discontinuity; Reacher's raw joint angles are never
# wrapped (the shoulder is unlimited).
REGISTRY = {
    "pusht": EnvSpec(
        id="LeWM/PushT-v0",
        env_class=PushTEnv,
        policies={
            "demo": PushTDemoPolicy,
            "expert": PushTExpertPolicy,
            "random": PushTRandomPolicy,
            "play": PushTPlayPolicy,
        },
        success=pusht_success,
        errors=pusht_errors,
        policy="demo",
        noise=0.1,
        episode_steps=300,
        stop_on_success=True,
        goal_dims=7,
        distance_dims=4,
        state_columns=(("state",),),
        probe={
            "agent_pos": ([("state", 0, 2)], False, "px"),
            "block_pos": ([("state", 2, 4)], False, "px"),
            "block_angle": ([("state", 4, 5)], True, "deg"),
        },
        teleport=pusht_teleport,
        recolour=pusht_recolour,
        replay_state=pusht_replay_state,
    ),
    "tworoom": EnvSpec(
        id="LeWM/TwoRoom-v0",
        env_class=TwoRoomEnv,
        policies={"expert": TwoRoomExpertPolicy},
        success=tworoom_success,
        errors=tworoom_errors,
        policy="expert",
        noise=2.0,
        episode_steps=100,
        stop_on_success=True,
        goal_dims=2,
        distance_dims=2,
        state_columns=(("state",), ("proprio",)),  # official files: the agent xy is `proprio` (docs/envs.md §6)
        probe={"agent_pos": ([("state", 0, 2), ("proprio", 0, 2)], False, "px")},
        teleport=tworoom_teleport,
        recolour=tworoom_recolour,
    ),
    "reacher": EnvSpec(
        id="LeWM/Reacher-v0",
        env_class=ReacherEnv,
        policies={"random": ReacherRandomPolicy},
        success=reacher_success,
        errors=reacher_errors,
        policy="random",
        noise=0.0,
        episode_steps=200,
        stop_on_success=False,
        goal_dims=2,
        distance_dims=2,
        state_columns=(("state",), ("qpos", "qvel")),
        probe={
            "shoulder_angle": ([("state", 0, 1), ("qpos", 0, 1), ("observation", 0, 1)], True, "rad"),
            "wrist_angle": ([("state", 1, 2), ("qpos", 1, 2), ("observation", 1, 2)], True, "rad"),
        },
        teleport=reacher_teleport,
        recolour=reacher_recolour,
    ),
    "cube": EnvSpec(
        id="LeWM/Cube-v0",
        env_class=CubeEnv,
        policies={"oracle": CubeOraclePolicy},
        success=cube_success,
        errors=cube_errors,
        policy="oracle",
        noise=0.1,
        episode_steps=200,
        stop_on_success=False,
        goal_dims=4,
        distance_dims=3,
        state_columns=(("state",),),
        probe={
            "cube_pos": ([("state", 0, 3), ("privileged_block_0_pos", 0, 3)], False, "m"),
            "effector_pos": ([("state", 4, 7), ("proprio_effector_pos", 0, 3)], False, "m"),
        },
        teleport=cube_teleport,
        recolour=cube_recolour,
    ),
}

for _spec in REGISTRY.values():
    if _spec.id not in gym.registry:
        gym.register(id=_spec.id, entry_point=f"{__name__}:{_spec.env_class.__name__}")


def spec(name: str) -> EnvSpec:
    """The registry entry of env `name` ("pusht", ...); ValueError naming the valid names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown env {name!r}; valid names: {sorted(REGISTRY)}")
    return REGISTRY[name]


def make_env(name: str, img_size: int = 224, max_episode_steps: int | None = None) -> gym.Env:
    """Build a registered env by short name ("pusht", ...); frames are img_size x img_size."""
    return gym.make(spec(name).id, img_size=img_size, max_episode_steps=max_episode_steps)


def make_policy(
    name: str, env, kind: str | None = None, noise: float | None = None, rng: np.random.Generator | None = None
):
    """Scripted policy for env `name`: kind None -> the env's data-collection default; noise None -> that default's
    noise for the default kind, 0 for other kinds."""
    s = spec(name)
    kind = s.policy if kind is None else kind
    if kind not in s.policies:
        raise ValueError(f"unknown policy {kind!r} for {name}; valid kinds: {sorted(s.policies)}")
    if noise is None:  # the default noise belongs to the default data policy
        noise = s.noise if kind == s.policy else 0.0
    return s.policies[kind](env, noise=noise, rng=rng if rng is not None else np.random.default_rng())


def success(name: str, state, goal_state) -> bool:
    """The env's termination predicate on raw state vectors (evaluation uses `terminated` from step())."""
    return spec(name).success(state, goal_state)


def goal_from_state(name: str, state) -> np.ndarray:
    """The `goal_state` option (reset) that asks the env to reach the recorded `state`."""
    return spec(name).goal_from_state(state)
