"""Tests for LeWM: model, SIGReg, simulators, data, training, planning and evaluation (CPU only).

Run: python -m pytest -q test_lewm.py                  # everything (what CI runs)
     python -m pytest -q test_lewm.py -m "not slow"    # the quick loop: without the subprocess-heavy tests
"""

import dataclasses
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from gymnasium.utils.env_checker import check_env
from pymunk.vec2d import Vec2d

import analyses
import charts
import cli
import collect
import data
import envs
import evaluate
import kernels
import policy
import train
from kernels import native_bf16
from model import PRESETS, LeWM, lewm_loss, load_checkpoint, model_from_checkpoint, save_checkpoint
from official import export_official, load_official, load_pretrained
from planner import cem, gradient_plan, make_cost, warm_start
from sigreg import SIGReg

# --- shared helpers and fixtures

CLIP = train.clip_shape(PRESETS["tiny"])  # history, num_preds, frameskip of the clips the model trains on
REPO = os.path.dirname(os.path.abspath(__file__))


def tiny_model(action_dim: int = 10, seed: int = 0) -> LeWM:
    torch.manual_seed(seed)
    return LeWM(dataclasses.replace(PRESETS["tiny"], action_dim=action_dim))


def randomise(model: LeWM, seed: int = 1) -> LeWM:
    """Give every parameter (the zero-initialised AdaLN included) and BN buffer a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


def _train_ckpt(tmp_path, model: LeWM) -> str:
    """A checkpoint laid out as train.py writes it, optimizer and RNG state included."""
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4, 3, 32, 32), torch.randn(2, 4, 10))[1].sum().backward()
    opt.step()
    ckpt = {
        "model": model.state_dict(),
        "model_config": dataclasses.asdict(model.cfg),
        "optimizer": opt.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "step": 7,
        "env": "pusht",
        "action_stats": {"mean": [0.0, 0.0], "std": [1.0, 1.0]},
    }
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, ckpt)
    return path


def _no_network(*args, **kwargs):
    raise OSError("network access in a test")


def offline_hub_cache(tmp_path, monkeypatch, model: LeWM, repo: str = "someone/lewm-tiny") -> None:
    """Lay `model` out in tmp_path/hub as the hub cache holds a download of `repo`, and switch the network off."""
    pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hub"
    snap = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / ("ab" * 20)
    export_official(model, str(snap))
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("ab" * 20)
    for name, value in (("HF_HOME", tmp_path / "hf_home"), ("HF_HUB_CACHE", hub), ("HF_HUB_OFFLINE", "1")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(socket, "socket", _no_network)
    import huggingface_hub.constants as hub_constants  # read at import: the environment alone is too late

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def _data_file(path, lens=(25, 30, 22), img=4, index="ep_idx", **edit):
    """Write a tiny file in the dataset layout whose pixels and actions encode the global row index."""
    lens = np.asarray(lens)
    n, rows = int(lens.sum()), np.arange(int(lens.sum()))
    offset = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    code = np.stack([rows % 256, rows // 256, np.full(n, 7)], -1).astype(np.uint8)  # (N, 3)
    action = np.stack([rows, 1.0 - 2.0 * rows**0.5], -1).astype(np.float32)  # (N, 2)
    action[offset + lens - 1] = np.nan
    cols = {
        "ep_len": lens.astype(np.int32),
        "ep_offset": offset,
        index: np.repeat(np.arange(len(lens)), lens).astype(np.int32),
        "step_idx": rows - np.repeat(offset, lens),
        "pixels": np.ascontiguousarray(np.broadcast_to(code[:, None, None], (n, img, img, 3))),
        "action": action,
        "state": np.stack([rows, rows * 10], -1).astype(np.float64),
    }
    cols.update(edit)
    with h5py.File(path, "w") as f:
        for k, v in cols.items():
            if v is not None:
                f.create_dataset(k, data=v, chunks=(10, *v.shape[1:]) if k == "pixels" else None)
    return str(path)


def _collect(path, episodes=3, **kw):
    kw = {"img_size": 32, "episode_steps": 25, "workers": 1, "seed": 5, **kw}
    return collect.collect("pusht", episodes, str(path), **kw)


def _assert_same_file(a, b):
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert set(fa) == set(fb) and dict(fa.attrs) == dict(fb.attrs)
        for k in fa:
            assert np.array_equal(fa[k][()], fb[k][()], equal_nan=fa[k].dtype.kind == "f"), k


def tiny_cfg(tmp_path, data_path, **kw) -> "train.TrainConfig":
    base = {
        "env": "pusht",
        "preset": "tiny",
        "data": data_path,
        "out_dir": str(tmp_path / "run"),
        "max_steps": 8,
        "log_every": 1,
        "eval_every": 4,
        "ckpt_every": 4,
        "val_batches": 2,
        "num_proj": 128,
        "device": "cpu",
    }
    return train.TrainConfig(**{**base, **kw})


def read_metrics(out_dir) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _eval_ckpt(path, data_path, env, block_dims=None, seed=0) -> str:
    """A tiny-preset checkpoint in train.py's format (random weights) for the dataset at data_path."""
    traj = data.Trajectories(data_path)
    train_eps, val_eps = data.split_episodes(traj.num_episodes, 0.34, seed=data.SPLIT_SEED)
    mcfg = dataclasses.replace(PRESETS["tiny"], action_dim=block_dims or PRESETS["tiny"].frameskip * traj.action_dim)
    torch.manual_seed(seed)
    save_checkpoint(
        str(path),
        {
            "model": LeWM(mcfg).state_dict(),
            "model_config": dataclasses.asdict(mcfg),
            "env": env,
            "action_stats": data.action_stats(traj, train_eps),
            "val_episodes": [int(e) for e in val_eps],
            "train_config": {"data": data_path},
            "step": 0,
        },
    )
    traj.close()
    return str(path)


def _eval_cfg(ckpt, tmp_path, **kw) -> "evaluate.EvalConfig":
    base = {
        "ckpt": ckpt,
        "episodes": 4,
        "samples": 16,
        "iterations": 2,
        "topk": 4,
        "device": "cpu",
        "out": str(tmp_path / "r.json"),
    }
    return evaluate.EvalConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pusht_file(tmp_path_factory):
    """Three PushT episodes at 32 px collected with two worker processes (the uninterrupted reference)."""
    return _collect(tmp_path_factory.mktemp("collect") / "ref.h5", workers=2)


@pytest.fixture(scope="module")
def tiny_pusht(tmp_path_factory):
    """A 6-episode, 32-px PushT dataset collected with the real collector."""
    path = str(tmp_path_factory.mktemp("data") / "pusht_tiny.h5")
    return collect.collect("pusht", 6, path, img_size=32, workers=1)


@pytest.fixture(scope="module")
def tiny_tworoom(tmp_path_factory):
    """A 6-episode, 32-px TwoRoom dataset collected with the real collector."""
    return collect.collect(
        "tworoom", 6, str(tmp_path_factory.mktemp("data") / "tworoom_tiny.h5"), img_size=32, workers=1
    )


# --- sigreg


def test_sigreg_gaussian_vs_degenerate():
    """SIGReg is about 1.05 for Gaussian embeddings and far larger for collapsed, shifted or mis-scaled ones."""
    torch.manual_seed(0)
    sig = SIGReg()
    gauss = torch.stack([sig(torch.randn(4, 256, 64)) for _ in range(5)]).mean()
    assert abs(gauss.item() - 1.0525) < 0.05
    for bad in (
        torch.zeros(4, 256, 64),
        torch.randn(4, 256, 64) + 2.0,
        0.1 * torch.randn(4, 256, 64),
        3.0 * torch.randn(4, 256, 64),
        torch.randn(4, 256, 1).expand(4, 256, 64),
    ):
        assert sig(bad).item() > 10 * gauss.item()


def test_sigreg_characteristic_sums_backward_matches_autograd():
    """The reused-cosine backward of CharacteristicSums is the gradient of the plain expression (checked
    numerically in fp64, and against autograd through cos/sin to fp32 round-off)."""
    from sigreg import CharacteristicSums

    y = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.linspace(0.0, 3.0, 17, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda y: CharacteristicSums.apply(y, t), (y,))
    y32, t32 = torch.randn(4, 64, 32, requires_grad=True), t.float()
    g_cos, g_sin = torch.randn(4, 32, 17), torch.randn(4, 32, 17)
    ty = y32.unsqueeze(-1) * t32
    plain = torch.autograd.grad([ty.cos().sum(1), ty.sin().sum(1)], y32, [g_cos, g_sin])[0]
    fast = torch.autograd.grad(CharacteristicSums.apply(y32, t32), y32, [g_cos, g_sin])[0]
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_sigreg_differentiable_and_fp32():
    """SIGReg runs in fp32 under bf16 autocast and its gradient moves embeddings toward lower statistic."""
    torch.manual_seed(0)
    sig = SIGReg(num_proj=256)
    z = (0.3 * torch.randn(4, 128, 32)).requires_grad_()
    dirs = torch.nn.functional.normalize(torch.randn(32, 256), dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sig(z.to(torch.bfloat16), directions=dirs)
    assert value.dtype == torch.float32
    value = sig(z, directions=dirs)
    (grad,) = torch.autograd.grad(value, z)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert sig(z - 0.01 * grad / grad.norm() * z.norm(), directions=dirs) < value


def _ddp_sigreg_worker(rank: int, world: int, port: int, z_all, weight, queue):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    ddp = DistributedDataParallel(layer)
    torch.manual_seed(123 + rank)  # ranks draw different directions; rank 0's draw must be the one all use
    n = z_all.shape[1] // world
    value = SIGReg(num_proj=128)(ddp(z_all[:, rank * n : (rank + 1) * n]))
    value.backward()
    queue.put((rank, value.item(), layer.weight.grad.tolist()))  # plain data: the process exits next
    dist.destroy_process_group()


@pytest.mark.slow
def test_sigreg_ddp_matches_single_process():
    """Under DDP (2 gloo processes) value and gradient equal single-process SIGReg on the concatenated batch."""
    torch.manual_seed(0)
    z_all, weight = torch.randn(2, 64, 16), torch.randn(16, 16) * 0.3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_sigreg_worker, args=(r, 2, port, z_all, weight, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    layer = torch.nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    torch.manual_seed(123)
    value = SIGReg(num_proj=128)(layer(z_all))
    value.backward()
    for _, v, grad in results:
        assert abs(v - value.item()) < 1e-4
        torch.testing.assert_close(torch.tensor(grad), layer.weight.grad, rtol=1e-4, atol=1e-6)


# --- model


def test_model_paper_parameter_count():
    """The paper preset with 10-d action blocks has exactly the official 18,034,478 parameters."""
    model = LeWM(dataclasses.replace(PRESETS["paper"], action_dim=10))
    assert sum(p.numel() for p in model.parameters()) == 18_034_478
    assert sum(p.numel() for p in model.encoder.parameters()) == 5_501_376
    assert sum(p.numel() for p in model.predictor.parameters()) == 10_791_360


def test_model_api_shapes():
    """preprocess, encode, predict, rollout and the loss return the documented shapes on the tiny preset."""
    model = tiny_model()
    frames = torch.randint(0, 256, (2, 4, 48, 48, 3), dtype=torch.uint8)
    x = model.preprocess(frames)
    assert x.shape == (2, 4, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(model.preprocess(frames.permute(0, 1, 4, 2, 3)), x)  # channels-first input, same result
    z = model.encode(x)
    assert z.shape == (2, 4, 32)
    a = torch.randn(2, 4, 10)
    assert model.predict(z[:, :3], a[:, :3]).shape == (2, 3, 32)
    model.eval()
    assert model.rollout(z[:, :1], torch.randn(2, 7, 5, 10)).shape == (2, 7, 6, 32)
    loss, parts = lewm_loss(model.train(), x, a, SIGReg(num_proj=64))
    assert loss.dim() == 0 and set(parts) == {"pred_loss", "sigreg_loss"}
    torch.testing.assert_close(loss.detach(), parts["pred_loss"] + 0.09 * parts["sigreg_loss"])


def test_model_preprocess_normalises_without_mutating():
    """preprocess maps 0 and 255 to the ImageNet-normalised extremes and leaves its input untouched."""
    frames = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    frames[..., 1] = 255
    before = frames.clone()
    x = tiny_model().preprocess(frames)
    assert torch.equal(frames, before)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-0.485 / 0.229, (1 - 0.456) / 0.224, -0.406 / 0.225]))
    with pytest.raises(TypeError, match="uint8"):
        tiny_model().preprocess(frames.float())


def test_model_inputs_not_mutated():
    """encode, predict and rollout never modify the tensors they are given."""
    model = randomise(tiny_model()).eval()
    x, a = torch.randn(2, 4, 3, 32, 32), torch.randn(2, 4, 10)
    x0, a0 = x.clone(), a.clone()
    z = model.encode(x)
    z0 = z.clone()
    model.predict(z[:, :3], a[:, :3])
    model.rollout(z[:, :1], a[:, None])
    assert torch.equal(x, x0) and torch.equal(a, a0) and torch.equal(z, z0)


def test_model_predictor_is_causal():
    """Changing frame t+1 and its action leaves the predictions at positions <= t unchanged."""
    model = randomise(tiny_model()).eval()
    z, a = torch.randn(3, 3, 32), torch.randn(3, 3, 10)
    for t in range(2):
        z2, a2 = z.clone(), a.clone()
        z2[:, t + 1] += 1.0
        a2[:, t + 1] += 1.0
        p, p2 = model.predict(z, a), model.predict(z2, a2)
        torch.testing.assert_close(p[:, : t + 1], p2[:, : t + 1])
        assert not torch.allclose(p[:, t + 1], p2[:, t + 1])


def test_model_adaln_zero_ignores_actions_until_trained():
    """A fresh predictor ignores the actions (AdaLN-zero); after one optimiser step it no longer does."""
    model = tiny_model()
    x = torch.randn(8, 4, 3, 32, 32)
    a1, a2 = torch.randn(8, 4, 10), torch.randn(8, 4, 10)
    model.eval()
    with torch.no_grad():
        z = model.encode(x)
        torch.testing.assert_close(model.predict(z[:, :3], a1[:, :3]), model.predict(z[:, :3], a2[:, :3]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, _ = lewm_loss(model.train(), x, a1, SIGReg(num_proj=64))
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        z = model.encode(x)
        assert not torch.allclose(model.predict(z[:, :3], a1[:, :3]), model.predict(z[:, :3], a2[:, :3]))


def test_model_rollout_truncates_history():
    """rollout equals step-by-step predict on windows of the last 3 embeddings, positions re-indexed from 0, for a
    1- and a 2-frame context (the rollout reuses cached keys/values while its window grows; predict never does)."""
    model = randomise(tiny_model()).eval()
    for t0 in (1, 2):
        z0, acts, hist = torch.randn(2, t0, 32), torch.randn(2, 4, 5, 10), torch.randn(2, t0 - 1, 10)
        out = model.rollout(z0, acts, hist if t0 > 1 else None)
        assert out.shape == (2, 4, t0 + 5, 32)
        b = 1  # check one candidate by hand
        zs, a = list(z0.unbind(1)), torch.cat([hist, acts[:, b]], dim=1)
        for k in range(t0, t0 + 5):
            lo = max(0, k - 3)
            zs.append(model.predict(torch.stack(zs[lo:], 1), a[:, lo:k])[:, -1])
        torch.testing.assert_close(out[:, b], torch.stack(zs, 1))


@pytest.mark.parametrize("causal", [False, True])
def test_kernels_attend_bf16_cpu_matches_sdpa(causal):
    """The explicit bf16 CPU attention (forward, and the hand-written backward of the unmasked case) gives the
    outputs and gradients of PyTorch's kernel to bf16 round-off, for a ViT-like and a predictor-like shape."""
    for shape in [(4, 3, 17, 16), (6, 2, 3, 8)]:
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(shape, generator=g) for _ in range(4))
        results = []
        for fn, dtype in ((kernels.attend, torch.bfloat16), (F.scaled_dot_product_attention, torch.float64)):
            qkv = [t.to(dtype).requires_grad_() for t in (q, k, v)]
            out = fn(*qkv, is_causal=causal)
            out.backward(do.to(dtype))
            results.append([t.double() for t in (out, *(t.grad for t in qkv))])
        for got, ref in zip(*results):
            err = (got - ref).abs().max() / ref.abs().max()
            assert err < 0.03, (shape, causal, float(err))


def test_kernels_fast_attention_is_a_swap_in():
    """A model runs on F.scaled_dot_product_attention until use_fast_attention swaps kernels.attend into every
    attention layer; its bf16 training loss and gradients then equal the plain kernel's to bf16 round-off, and
    its fp32 outputs are bit for bit the same (fp32 keeps PyTorch's kernel)."""

    def run(fast: bool, bf16: bool = True):  # no dropout: the two kernels would draw different masks
        torch.manual_seed(0)
        m = randomise(LeWM(dataclasses.replace(PRESETS["tiny"], action_dim=10, pred_dropout=0.0))).train()
        layers = [x for x in m.modules() if hasattr(x, "sdpa")]
        assert len(layers) == 4 and all(x.sdpa is F.scaled_dot_product_attention for x in layers)
        if fast:
            kernels.use_fast_attention(m)
            assert all(x.sdpa is kernels.attend for x in layers)
        torch.manual_seed(3)
        x, a = torch.randn(4, 4, 3, 32, 32), torch.randn(4, 4, 10)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = lewm_loss(m, x, a, SIGReg(num_proj=16), lambd=0.09)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])

    fast, plain = run(True), run(False)
    torch.testing.assert_close(fast[0], plain[0], rtol=0.02, atol=0.0)
    cos = F.cosine_similarity(fast[1].double(), plain[1].double(), dim=0)
    assert cos > 0.999 and (fast[1].norm() / plain[1].norm() - 1).abs() < 0.02
    fast32, plain32 = run(True, bf16=False), run(False, bf16=False)
    assert torch.equal(fast32[0], plain32[0]) and torch.equal(fast32[1], plain32[1])


def test_model_loss_has_no_stop_gradient():
    """The prediction loss sends gradient into the encoder through the target branch as well (no stop-gradient)."""
    model = randomise(tiny_model()).train()
    x, a = torch.randn(4, 4, 3, 32, 32), torch.randn(4, 4, 10)
    loss, _ = lewm_loss(model, x, a, SIGReg(num_proj=16), lambd=0.0)
    g_full = torch.autograd.grad(loss, model.encoder.cls_token)[0]
    z = model.encode(x)
    pred = model.predict(z[:, :3], a[:, :3])
    g_detached = torch.autograd.grad((pred - z[:, 1:].detach()).pow(2).mean(), model.encoder.cls_token)[0]
    assert not torch.allclose(g_full, g_detached)


@pytest.mark.parametrize("hf5", [False, True])
def test_model_official_format_round_trip(tmp_path, hf5):
    """A model exported under the official key names (transformers 4.x or 5.x) loads back with identical outputs."""
    model = randomise(tiny_model(action_dim=25)).eval()
    weights, config = export_official(model, str(tmp_path), hf5=hf5)
    keys = torch.load(weights, weights_only=True).keys()
    layer = (
        "encoder.layers.0.attention.q_proj.weight"
        if hf5
        else "encoder.encoder.layer.0.attention.attention.query.weight"
    )
    assert layer in keys and "predictor.transformer.layers.1.adaLN_modulation.1.weight" in keys
    # The official vit_hf looks `size` up in its table of named ViT sizes, then applies the explicit fields.
    with open(config) as f:
        enc = json.load(f)["encoder"]
    assert enc["size"] in ("tiny", "small", "base", "large", "huge") and enc["image_size"] == 32
    assert (enc["hidden_size"], enc["num_hidden_layers"], enc["num_attention_heads"], enc["intermediate_size"]) == (
        32,
        2,
        2,
        64,
    )
    loaded = load_official(weights, config)
    assert not loaded.training and loaded.cfg == model.cfg
    x, a = torch.randn(2, 4, 3, 32, 32), torch.randn(2, 3, 25)
    with torch.no_grad():
        z = model.encode(x)
        torch.testing.assert_close(loaded.encode(x), z, rtol=0, atol=0)
        torch.testing.assert_close(loaded.predict(z[:, :3], a), model.predict(z[:, :3], a), rtol=0, atol=0)


@pytest.mark.slow
def test_model_export_cli_writes_weights_only_files(tmp_path):
    """`model.py export` writes three weights-only files; each rebuilds the model with identical outputs."""
    model = randomise(tiny_model()).eval()
    ckpt = _train_ckpt(tmp_path, model)
    out = tmp_path / "export"
    subprocess.run(
        [sys.executable, "model.py", "export", "--ckpt", ckpt, "--out", str(out)],
        check=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True,
    )
    assert sorted(os.listdir(out)) == ["config.json", "model.pt", "weights.pt"]
    shared = torch.load(out / "model.pt", weights_only=True)
    assert "optimizer" not in shared and "rng" not in shared and shared["step"] == 7 and shared["env"] == "pusht"
    assert os.path.getsize(out / "model.pt") < 0.6 * os.path.getsize(ckpt)
    assert isinstance(torch.load(out / "weights.pt", weights_only=True), dict)
    x = torch.randint(0, 256, (2, 4, 32, 32, 3), dtype=torch.uint8)
    want = model.embed(x)
    for loaded in (load_pretrained(str(out)), load_pretrained(str(out / "model.pt"))):
        torch.testing.assert_close(loaded.embed(x), want, rtol=0, atol=0)
    assert json.loads((out / "config.json").read_text())["action_encoder"]["input_dim"] == 10


def test_model_hub_name_served_from_offline_cache(tmp_path, monkeypatch):
    """load_pretrained("owner/name") reads a hub-cache folder with the network off; an uncached name fails clearly."""
    model = randomise(tiny_model()).eval()
    offline_hub_cache(tmp_path, monkeypatch, model)
    x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    for name in ("someone/lewm-tiny", "hf:someone/lewm-tiny"):
        torch.testing.assert_close(load_pretrained(name).embed(x), model.embed(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="cannot get 'someone/other'"):
        load_pretrained("someone/other")


def test_model_embed_accepts_frame_shapes():
    """embed maps (H, W, 3), (T, H, W, 3), (B, T, H, W, 3) uint8 frames to matching embeddings; others fail clearly."""
    model = randomise(tiny_model()).eval()
    frames = torch.randint(0, 256, (2, 3, 48, 48, 3), dtype=torch.uint8)
    z = model.embed(frames)
    assert z.shape == (2, 3, 32)
    torch.testing.assert_close(model.embed(frames[1]), z[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.embed(frames[1, 2].numpy()), z[1, 2], rtol=0, atol=1e-6)
    torch.testing.assert_close(z, model.encode(model.preprocess(frames)), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"embed expects uint8 frames.*\(1, 2, 3, 48, 48, 3\)"):
        model.embed(frames[None])
    with pytest.raises(ValueError, match="embed expects uint8"):
        model.embed(frames.float())
    with pytest.raises(ValueError, match=r"encode expects normalised pixels \(B, T, 3, H, W\).*model.embed"):
        model.encode(model.preprocess(frames[0, 0]))


def test_model_official_mismatch_names_keys(tmp_path):
    """A weights file with a missing and a mis-shaped key fails with an error naming both."""
    weights, config = export_official(randomise(tiny_model()), tmp_path)
    state = torch.load(weights, weights_only=True)
    del state["pred_proj.net.3.bias"]
    state["projector.net.0.bias"] = torch.zeros(7)
    torch.save(state, weights)
    with pytest.raises(
        ValueError, match=r"(?s)missing keys.*pred_proj\.net\.3\.bias.*mis-shaped.*projector\.net\.0\.bias"
    ):
        load_official(weights, config)


def test_model_checkpoint_round_trip(tmp_path):
    """save_checkpoint/load_checkpoint is plain data (weights_only) and rebuilds an identical model."""
    model = randomise(tiny_model()).eval()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg), "step": 3})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind
    ckpt = torch.load(path, weights_only=True)
    loaded = model_from_checkpoint(load_checkpoint(path))
    assert ckpt["step"] == 3 and not loaded.training
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)


def test_model_checkpoint_other_architecture_fails(tmp_path):
    """Loading a checkpoint into another architecture, or a corrupt file, fails with a clear message."""
    model = tiny_model()
    ckpt = {"model": model.state_dict(), "model_config": dataclasses.asdict(model.cfg)}
    other = dataclasses.replace(model.cfg, pred_depth=3)
    with pytest.raises(ValueError, match="another architecture.*pred_depth"):
        model_from_checkpoint(ckpt, other)
    ckpt["model_config"] = dataclasses.asdict(other)
    with pytest.raises(ValueError, match="missing keys.*predictor.blocks.2"):
        model_from_checkpoint(ckpt)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(str(bad))


# --- envs


def _rollout(env, seed: int, actions) -> tuple[list, list]:
    obs, info = env.reset(seed=seed)
    frames, infos = [obs], [info]
    for a in actions:
        obs, _, _, _, info = env.step(a)
        frames.append(obs)
        infos.append(info)
    return frames, infos


def assert_same_rollouts(frames1, infos1, frames2, infos2):
    """Frames and every info entry of two rollouts are identical."""
    for a, b in zip(frames1, frames2):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(infos1, infos2):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def _cube_state(cube=(0.45, 0.1, 0.02), cube_yaw=0.0, ee=(0.45, 0.1, 0.02), ee_yaw=0.0, closure=0.0, grasped=0.0):
    """A hand-made Cube state: [cube xyz, cube yaw, effector xyz, effector yaw, closure, grasped, cube vz]."""
    return np.array([*cube, cube_yaw, *ee, ee_yaw, closure, grasped, 0.0])


def _cube_act(dx=0.0, dy=0.0, dz=0.0, dyaw=0.0, dgrip=0.0):
    return np.array([dx, dy, dz, dyaw, dgrip], np.float32)


_PUSHT_GOAL = np.array([200.0, 200.0, 300.0, 300.0, 0.05, 0.0, 0.0])
_CUBE_HIGH = _cube_state(ee=(0.45, 0.1, 0.3))
_CUBE_DIRECTION = np.array([0.6, 0.0, 0.8])  # 3-D offset, part of it vertical
# env -> (state, goal_state, action, success expected, reward expected or None) for a reset followed by one step
SUCCESS_CASES = {
    "pusht": [
        (_PUSHT_GOAL, _PUSHT_GOAL, np.zeros(2, np.float32), True, None),
        (
            _PUSHT_GOAL + np.array([25.0 / 2, 0, 0, 25.0 * np.sqrt(3) / 2, 0, 50, 50]),
            _PUSHT_GOAL,
            np.zeros(2, np.float32),
            False,
            None,
        ),
    ],
    "tworoom": [
        ([50.0, 100.0], [61.0, 111.0], np.zeros(2, np.float32), True, None),  # 15.56 px
        ([50.0, 100.0], [66.0, 100.0], np.array([-1.0, 0.0], np.float32), False, None),  # 16 px
    ],
    "reacher": [
        ([0.3, -0.2, 0.0, 0.0], np.array([0.3, -0.2]), np.zeros(2, np.float32), True, None),
        ([0.2, -0.2, 0.0, 0.0], np.array([0.3, -0.2]), np.zeros(2, np.float32), False, None),
    ],
    "cube": [
        (
            _CUBE_HIGH,
            np.array([*(_CUBE_HIGH[:3] + dist * _CUBE_DIRECTION), 0.0]),
            _cube_act(),
            expected,
            float(expected),
        )
        for dist, expected in ((0.039, True), (0.041, False))
    ],
}


def test_env_make_env_rejects_unknown_name():
    """make_env raises ValueError naming the valid envs."""
    with pytest.raises(ValueError, match="pusht"):
        envs.make_env("nope")


@pytest.mark.parametrize("name", list(envs.REGISTRY))
def test_env_check_env(name):
    """Every registered env passes gymnasium's env checker (spaces, seeding, render)."""
    assert envs.REGISTRY[name].id in gym.registry
    check_env(gym.make(envs.REGISTRY[name].id, img_size=64).unwrapped, skip_render_check=False)


@pytest.mark.parametrize("name", list(envs.REGISTRY))
def test_env_deterministic(name):
    """Same seed and actions give identical frames, states and infos, through gym.make and the env class itself."""
    spec = envs.REGISTRY[name]
    shape = gym.make(spec.id, img_size=64).action_space.shape
    actions = np.random.default_rng(0).uniform(-1, 1, (10, *shape)).astype(np.float32)
    (f1, i1), (f2, i2) = (_rollout(gym.make(spec.id, img_size=64), 3, actions) for _ in range(2))
    assert_same_rollouts(f1, i1, f2, i2)
    actions = np.random.default_rng(0).uniform(-1, 1, (40, *shape)).astype(np.float32)
    (f1, i1), (f2, i2) = (_rollout(spec.env_class(img_size=64), 7, actions) for _ in range(2))
    assert_same_rollouts(f1, i1, f2, i2)


@pytest.mark.parametrize("name", list(envs.REGISTRY))
def test_env_success_through_reset_and_step(name):
    """reset's is_success and step's terminated (never truncated) follow the env's success test, on and off the goal."""
    env = envs.REGISTRY[name].env_class(img_size=32)
    for state, goal, action, expected, reward in SUCCESS_CASES[name]:
        assert envs.success(name, state, goal) == expected
        _, info = env.reset(seed=0, options={"state": state, "goal_state": goal})
        assert info["is_success"] == expected
        _, r, terminated, truncated, info = env.step(action)
        assert terminated == expected and not truncated and info["is_success"] == expected
        if reward is not None:
            assert r == reward


@pytest.mark.parametrize("name", [n for n in envs.REGISTRY if n != "pusht"])  # PushT: test_env_pusht_options_set_state
def test_env_options_reproduce_state(name):
    """reset(options) from a recorded info reproduces the state, goal, info and frame exactly."""
    cls = envs.REGISTRY[name].env_class
    env = cls(img_size=64)
    env.reset(seed=3)
    for _ in range(7):
        frame, _, _, _, info = env.step(env.action_space.sample())
    other = cls(img_size=64)
    frame2, info2 = other.reset(seed=11, options={"state": info["state"], "goal_state": info["goal_state"]})
    np.testing.assert_array_equal(frame, frame2)
    for key in ("state", "goal_state", "proprio", "is_success"):
        np.testing.assert_array_equal(info[key], info2[key])


def test_env_pusht_step_matches_reference_arithmetic():
    """The per-component PD loop is bit-identical to the reference's Vec2d expression, for float32 and float64."""

    def reference_step(env, action):
        target = env.agent.position + action * env.action_scale
        for _ in range(10):
            acceleration = env.k_p * (target - env.agent.position) + env.k_v * (Vec2d(0, 0) - env.agent.velocity)
            env.agent.velocity += acceleration * env.dt
            env.space.step(env.dt)

    for dtype in (np.float32, np.float64):
        ours, ref = envs.PushTEnv(img_size=32), envs.PushTEnv(img_size=32)
        start = {"state": [230.0, 300.0, 250.0, 250.0, 0.3, 0.0, 0.0], "goal_state": [0, 0, 0, 0, 0, 0, 0]}
        ours.reset(seed=0, options=start)
        ref.reset(seed=0, options=start)
        actions = np.random.default_rng(1).uniform(-1, 1, (60, 2)).astype(dtype)
        for a in actions:
            ours.step(a)
            reference_step(ref, a)
        np.testing.assert_array_equal(ours._get_state(), ref._get_state())
        assert ours.block.position != (250.0, 250.0)  # the pusher did touch the block


def test_env_pusht_options_set_state():
    """options["state"] reproduces the state after the setter's one 0.01 s step (agent moves by v * 0.01)."""
    env = envs.PushTEnv(img_size=32)
    goal = np.array([400.0, 100.0, 300.0, 320.0, 1.0, 0.0, 0.0])
    at_rest = np.array([80.0, 90.0, 250.0, 260.0, 2.5, 0.0, 0.0])
    _, info = env.reset(seed=1, options={"state": at_rest, "goal_state": goal})
    np.testing.assert_allclose(info["state"], at_rest, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(info["goal_state"], goal)
    moving = np.array([80.0, 90.0, 250.0, 260.0, 2.5 + 2 * np.pi, 120.0, -40.0])  # angle is stored mod 2 pi
    _, info = env.reset(seed=2, options={"state": moving, "goal_state": goal})
    expected = moving.copy()
    expected[:2] += 0.01 * moving[5:7]
    expected[4] = 2.5
    np.testing.assert_allclose(info["state"], expected, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(info["proprio"], info["state"][[0, 1, 5, 6]])


def test_env_pusht_success_thresholds():
    """PushT success needs ||d(agent, block xy)|| < 20 and wrapped angle error < pi/9."""
    g = _PUSHT_GOAL
    shift = lambda dist: g + np.array([dist / 2, 0, 0, dist * np.sqrt(3) / 2, 0, 50, 50])
    assert envs.pusht_success(shift(19.9), g) and not envs.pusht_success(shift(20.1), g)
    turn = lambda d: g + np.array([0, 0, 0, 0, d, 0, 0])
    assert envs.pusht_success(turn(np.pi / 9 - 0.01), g) and not envs.pusht_success(turn(np.pi / 9 + 0.01), g)
    assert envs.pusht_success(turn(-0.1 + 2 * np.pi), g)  # wraps around 2 pi


def test_env_pusht_expert_solves_most_tasks():
    """The scripted expert reaches the PushT success criterion within 300 steps on most random tasks."""
    env = envs.make_env("pusht", img_size=32)
    solved = 0
    for seed in range(12):
        _, info = env.reset(seed=seed)
        policy = envs.make_policy("pusht", env, kind="expert", noise=0.0, rng=np.random.default_rng(seed))
        policy.reset(info)
        for _ in range(300):
            _, _, terminated, _, info = env.step(policy(info))
            if terminated:
                solved += 1
                break
    assert solved >= 8, f"expert solved {solved}/12"  # about 90 % over seeds 0..199


def test_env_pusht_demo_data_match_reference_statistics():
    """The default PushT data policy's episodes match the reference data's statistics within 25 % (few solved pairs)."""
    eps = [collect._rollout(("pusht", 32, None, None, 300, e)) for e in range(80)]  # the defaults: demo, noise 0.1
    act = np.concatenate([e["action"][:-1] for e in eps])  # (N, 2), the NaN last row dropped
    state = np.concatenate([e["state"] for e in eps])  # (N, 7)
    lengths = np.array([len(e["state"]) for e in eps])
    ref = {
        "action std": (act.std(0), 0.20),
        "agent velocity std": (state[:, 5:7].std(0), 75.0),
        "block position std": (state[:, 2:4].std(0), np.array([53.0, 57.0])),
        "mean episode length": (lengths.mean(), 125.0),
    }
    for name, (ours, theirs) in ref.items():
        assert np.all(np.abs(np.asarray(ours) / theirs - 1) <= 0.25), f"{name}: {ours} vs reference {theirs}"
    assert np.all(np.abs(act.mean(0)) < 0.03), act.mean(0)
    pairs = [(s[t], s[t + 25]) for s in (e["state"] for e in eps) for t in range(len(s) - 25)]
    solved = np.mean([envs.pusht_success(a, b) for a, b in pairs])
    assert solved <= 0.005, f"{100 * solved:.2f} % of (t, t + 25) pairs already solved"


@pytest.mark.parametrize("img_size", [64, 224])
def test_env_pusht_frames(img_size):
    """Frames are uint8 (img_size, img_size, 3), render() equals the observation, and the pusher shows up."""
    env = envs.make_env("pusht", img_size=img_size)
    obs, _ = env.reset(seed=0, options={"state": [100.0, 100.0, 300.0, 300.0, 0.0, 0.0, 0.0]})
    assert obs.dtype == np.uint8 and obs.shape == (img_size, img_size, 3)
    np.testing.assert_array_equal(env.render(), obs)
    obs2 = env.step(np.array([1.0, 1.0], np.float32))[0]
    np.testing.assert_array_equal(env.render(), obs2)
    assert (obs2 != obs).any()
    x = int(100.5 * img_size / 512)  # the pusher's centre pixel is its inner (light blue) colour
    np.testing.assert_allclose(obs[x, x], envs.PUSHT_AGENT_FILL, atol=2)


def test_env_tworoom_success_threshold():
    """TwoRoom succeeds strictly inside 16 px of the target."""
    assert envs.tworoom_success(np.array([50.0, 100.0]), np.array([50.0, 115.9]))
    assert not envs.tworoom_success(np.array([50.0, 100.0]), np.array([50.0, 116.0]))


def test_env_tworoom_wall_rule():
    """TwoRoom endpoint-only wall test: snap to 99.5 / 124.5 outside the door band, free passage inside it."""
    env = envs.TwoRoomEnv(img_size=32)
    goal = [200.0, 200.0]

    def step_from(pos, action):
        env.reset(seed=0, options={"state": pos, "goal_state": goal})
        return env.step(np.asarray(action, np.float32))[4]["pos_agent"]

    np.testing.assert_array_equal(step_from([97.0, 150.0], [1, 0]), [99.5, 150.0])  # blocked from the left
    np.testing.assert_array_equal(step_from([127.0, 150.0], [-1, 0]), [124.5, 150.0])  # blocked from the right
    np.testing.assert_array_equal(step_from([99.0, 80.0], [1, 0]), [99.5, 80.0])  # just below the door band
    np.testing.assert_array_equal(step_from([98.0, 49.0], [1, 0]), [103.0, 49.0])  # passes in the door band
    np.testing.assert_array_equal(step_from([126.0, 64.0], [-1, 0]), [121.0, 64.0])  # band edge 64.75 is inside
    np.testing.assert_array_equal(step_from([110.0, 62.0], [0, 1]), [99.5, 67.0])  # leaves the doorway: snapped
    np.testing.assert_array_equal(step_from([114.0, 62.0], [0, 1]), [124.5, 67.0])
    np.testing.assert_array_equal(step_from([23.0, 202.0], [-1, 1]), [21.0, 203.0])  # border clamp


def test_env_tworoom_reset_sampling():
    """TwoRoom reset puts agent and target in different rooms, outside the wall zone, >= 125 px apart via the door."""
    env = envs.TwoRoomEnv(img_size=32)
    door = np.array([112.0, 49.0])
    for seed in range(50):
        _, info = env.reset(seed=seed)
        agent, target = (
            info["pos_agent"].astype(np.float64),
            info["pos_target"].astype(np.float64),
        )
        assert np.all((agent >= 14) & (agent <= 209)) and np.all((target >= 14) & (target <= 209))
        assert not 100 <= agent[0] <= 124 and not 100 <= target[0] <= 124
        assert (agent[0] < 112) != (target[0] < 112)
        assert np.linalg.norm(agent - door) + np.linalg.norm(door - target) >= 125.0 - 1e-3


def test_env_tworoom_expert_crosses_door():
    """TwoRoom expert (noise 2.0) goes through the door and reaches the target from a fixed seed."""
    env = envs.make_env("tworoom", img_size=32)
    policy = envs.make_policy("tworoom", env, rng=np.random.default_rng(0))  # default: expert, noise 2.0
    _, info = env.reset(seed=0, options={"state": [40.0, 180.0], "goal_state": [180.0, 180.0]})
    policy.reset(info)
    path, terminated = [info["pos_agent"]], False
    for _ in range(300):
        _, _, terminated, _, info = env.step(policy(info))
        path.append(info["pos_agent"])
        if terminated:
            break
    assert terminated and info["is_success"]
    path = np.array(path)
    crossing = np.argmax(path[:, 0] >= 112)  # first position in the right room
    assert crossing > 0 and 33.25 <= path[crossing, 1] <= 64.75  # entered it through the door band


def test_env_tworoom_render_geometry():
    """TwoRoom 224-px frame: black wall columns 107..117 outside the door, border lines, red peak at the agent."""
    env = envs.TwoRoomEnv(img_size=224)
    frame, _ = env.reset(seed=0, options={"state": [60.0, 150.0], "goal_state": [180.0, 60.0]})
    assert frame.shape == (224, 224, 3) and frame.dtype == np.uint8
    assert np.all(frame[100, 107:118] == 0) and np.all(frame[100, [106, 118]] == 255)
    assert np.all(frame[35:64, 107:118] == 255) and np.all(frame[[34, 64], 112] == 0)  # door rows 35..63
    assert np.all(frame[5, [10, 13, 210, 213]] == 0) and np.all(frame[5, [9, 14, 209, 214]] == 255)
    assert tuple(frame[150, 60]) == (
        255,
        0,
        0,
    )  # blob peak (alpha = 1) at the agent pixel
    small = envs.TwoRoomEnv(img_size=64).reset(seed=0)[0]
    assert small.shape == (64, 64, 3)


def test_env_reacher_success_threshold():
    """Reacher succeeds when both joints are within 0.05 rad of the goal, with no angle wrapping."""
    goal = np.array([0.3, -0.2])
    assert envs.reacher_success(goal + [0.049, -0.049], goal)
    assert not envs.reacher_success(goal + [0.051, 0.0], goal)
    assert not envs.reacher_success(goal + [0.0, -0.051], goal)
    assert not envs.reacher_success(goal + [2 * math.pi, 0.0], goal)  # raw angles: a full turn is not success


def test_env_reacher_wrist_limit():
    """Reacher wrist angle never exceeds +-160 deg and its velocity is zeroed at the limit."""
    env = envs.ReacherEnv(img_size=32)
    limit = math.radians(160)
    for sign in (1.0, -1.0):
        env.reset(
            seed=0,
            options={"state": [0.0, sign * 2.5, 0.0, 0.0], "goal_state": [3.0, 0.0]},
        )
        for _ in range(30):
            info = env.step(np.array([0.0, sign], np.float32))[4]
            assert abs(info["qpos"][1]) <= limit
        assert info["qpos"][1] == sign * limit and info["qvel"][1] == 0.0


def test_env_reacher_dynamics():
    """Reacher: rest stays at rest, damping dissipates energy without torque, and random actions give a mean
    |qdot| near (1.1, 2.1) rad/s, as in the reference data."""
    env = envs.ReacherEnv(img_size=32)
    _, info = env.reset(seed=0, options={"state": [0.4, 1.0, 0.0, 0.0], "goal_state": [3.0, 0.0]})
    info = env.step(np.zeros(2, np.float32))[4]
    np.testing.assert_array_equal(info["state"], [0.4, 1.0, 0.0, 0.0])

    def kinetic_energy(q, v):
        c = envs.REACHER_M2 * envs.REACHER_L1 * envs.REACHER_C2 * math.cos(q[1])
        m = np.array(
            [
                [
                    envs.REACHER_I1 + envs.REACHER_I2 + envs.REACHER_M2 * envs.REACHER_L1**2 + 2 * c,
                    envs.REACHER_I2 + c,
                ],
                [envs.REACHER_I2 + c, envs.REACHER_I2],
            ]
        )
        return 0.5 * v @ m @ v

    env.reset(seed=0, options={"state": [0.0, 0.5, 3.0, -4.0], "goal_state": [3.0, 0.0]})
    energies = [kinetic_energy(np.array([0.0, 0.5]), np.array([3.0, -4.0]))]
    for _ in range(10):
        info = env.step(np.zeros(2, np.float32))[4]
        energies.append(kinetic_energy(info["qpos"], info["qvel"]))
    assert np.all(np.diff(energies) < 0) and energies[-1] < 0.1 * energies[0]

    rng = np.random.default_rng(0)
    speeds = []
    for episode in range(10):
        env.reset(seed=episode)
        for _ in range(200):
            speeds.append(np.abs(env.step(rng.uniform(-1, 1, 2).astype(np.float32))[4]["qvel"]))
    mean_speed = np.mean(speeds, axis=0)
    assert abs(mean_speed[0] - 1.1) < 0.25 and abs(mean_speed[1] - 2.1) < 0.4


def test_env_cube_success_threshold():
    """Cube succeeds within 4 cm (3-D) of the target and not beyond."""
    state = _cube_state(ee=(0.45, 0.1, 0.3))
    for dist, expected in ((0.039, True), (0.041, False)):
        goal = np.array([*(state[:3] + dist * _CUBE_DIRECTION), 0.0])
        assert envs.cube_success(state, goal) == expected


def test_env_cube_grasp_carry_release():
    """Closing on the cube grasps it, the cube follows the gripper, opening drops it back onto the table."""
    env = envs.CubeEnv(img_size=32)
    env.reset(seed=0, options={"state": _cube_state(ee_yaw=0.3, cube_yaw=0.3 + np.pi / 2)})
    info = env.step(_cube_act(dgrip=1.0))[4]
    assert info["proprio_gripper_contact"][0] == 0.0 and abs(info["proprio_gripper_opening"][0] - 0.35) < 1e-12
    info = env.step(_cube_act(dgrip=1.0))[4]  # finite closing speed: the fingers meet the cube on the 2nd step
    assert info["proprio_gripper_contact"][0] == 1.0
    assert abs(info["proprio_gripper_opening"][0] - envs.CUBE_GRIP_CONTACT) < 1e-12  # held open by the cube
    for _ in range(4):
        info = env.step(_cube_act(dx=0.5, dz=1.0, dyaw=0.5, dgrip=1.0))[4]
    state = info["state"]
    assert state[9] == 1.0 and state[2] > 0.15
    np.testing.assert_allclose(state[0:3], state[4:7], atol=1e-12)  # carried at the pinch point
    held_xy = state[0:2].copy()
    info = env.step(_cube_act(dgrip=-1.0))[4]
    assert info["state"][9] == 0.0 and info["proprio_gripper_contact"][0] == 0.0
    for _ in range(6):
        info = env.step(_cube_act())[4]
    np.testing.assert_allclose(info["state"][0:3], [*held_xy, envs.CUBE_HALF])  # fell straight down, at rest
    assert info["state"][10] == 0.0


def test_env_cube_no_grasp_when_misplaced():
    """No grasp when the pinch point is 3 cm off, the yaw is 45 deg off, or an already closed gripper comes down."""
    env = envs.CubeEnv(img_size=32)
    cases = [
        (_cube_state(ee=(0.48, 0.1, 0.02)), _cube_act(dgrip=1.0)),
        (_cube_state(ee_yaw=np.pi / 4), _cube_act(dgrip=1.0)),
        (_cube_state(ee=(0.45, 0.1, 0.06), closure=1.0), _cube_act(dz=-1.0, dgrip=1.0)),
    ]
    for state, action in cases:
        env.reset(seed=0, options={"state": state})
        for _ in range(3):
            info = env.step(action)[4]
        assert info["state"][9] == 0.0
        np.testing.assert_allclose(info["state"][0:3], state[0:3])


def test_env_cube_options_reproduce_state():
    """reset(options) puts state and goal exactly, and continuing from a restored mid-episode state is identical."""
    env = envs.CubeEnv(img_size=32)
    obs, info = env.reset(seed=3)
    policy = envs.CubeOraclePolicy(env, rng=np.random.default_rng(3))
    policy.reset(info)
    for _ in range(30):  # the cube is in the air by now
        obs, _, _, _, info = env.step(policy(info))
    assert info["state"][9] == 1.0
    saved_state, saved_goal = info["state"].copy(), info["goal_state"].copy()
    actions = [policy(info) for _ in range(10)]
    other = envs.CubeEnv(img_size=32)
    obs2, info2 = other.reset(seed=123, options={"state": saved_state, "goal_state": saved_goal})
    assert np.array_equal(info2["state"], saved_state) and np.array_equal(info2["goal_state"], saved_goal)
    assert np.array_equal(obs2, obs)
    for a in actions:
        obs, _, _, _, info = env.step(a)
        obs2, _, _, _, info2 = other.step(a)
    assert np.array_equal(info["state"], info2["state"]) and np.array_equal(obs, obs2)
    _, info = other.reset(options={"goal_state": saved_state})  # a full state as goal: its cube pose is used
    assert np.array_equal(info["goal_state"], saved_state[:4])


def test_env_cube_oracle_places_cube():
    """The plan oracle brings the cube within 4 cm of the target (terminated) from a fixed seed."""
    env = envs.make_env("cube", img_size=32)
    _, info = env.reset(seed=0)
    start = np.linalg.norm(info["state"][:3] - info["goal_state"][:3])
    policy = envs.make_policy("cube", env, rng=np.random.default_rng(0))
    policy.reset(info)
    for step in range(120):
        _, _, terminated, _, info = env.step(policy(info))
        if terminated:
            break
    assert start > 0.1 and terminated and np.linalg.norm(info["state"][:3] - info["goal_state"][:3]) <= 0.04


def test_env_cube_static_pair_fraction():
    """Oracle rollouts keep the cube still over ~38 % of (t, t+25) pairs, as the LeWM data (docs/envs.md §5)."""
    env = envs.CubeEnv(img_size=32, terminate_at_goal=False)
    still = []
    for episode in range(6):
        _, info = env.reset(seed=episode)
        policy = envs.CubeOraclePolicy(env, rng=np.random.default_rng(episode))
        policy.reset(info)
        cube = [info["state"][:3]]
        for _ in range(200):
            _, _, terminated, _, info = env.step(policy(info))
            cube.append(info["state"][:3])
            assert not terminated
        cube = np.array(cube)
        still.append(np.linalg.norm(cube[25:] - cube[:-25], axis=1) <= 0.04)
    assert 0.30 < np.mean(still) < 0.46


def test_env_cube_camera_projection():
    """The front camera (docs/envs.md §5) maps known world points to their pixels, scaled with img_size."""
    points = np.array([[0.425, 0, 0.02], [0.3, 0.3, 0.02], [0.3, -0.3, 0.02], [0.55, 0.3, 0.02], [0.55, -0.3, 0.02]])
    expected = np.array([[116, 139], [199, 114], [33, 114], [221, 169], [13, 169]])
    for size in (224, 64):
        uv, _ = envs.cube_project(np.vstack([points, [0.0, 0.0, 0.0]]), size)
        np.testing.assert_allclose(uv[:-1] * 224 / size, expected, atol=1.0)
        np.testing.assert_allclose(uv[-1] * 224 / size, [115, 76], atol=1.0)  # robot base


def test_env_cube_render():
    """Frames are uint8 (S, S, 3) at any size >= 32, with the red cube where the camera projects it."""
    state = _cube_state(cube=(0.5, -0.15, 0.02), ee=(0.4, 0.2, 0.25))
    for size in (32, 64, 100, 224):
        env = envs.CubeEnv(img_size=size)
        obs, _ = env.reset(seed=0, options={"state": state})
        assert obs.shape == (size, size, 3) and obs.dtype == np.uint8
        assert np.array_equal(env.render(), obs)
        (u, v), _ = envs.cube_project(np.array([0.5, -0.15, 0.04]), size)  # centre of the top face
        r, g, b = obs[int(v), int(u)].astype(int)
        assert r > 150 and g < 120 and b < 120


# --- planner


def _quadratic(target):
    """Cost (B, S) = squared distance of each candidate (B, S, N, A) to a per-problem target (B, N, A)."""
    return lambda a: ((a - target[:, None]) ** 2).sum(dim=(-2, -1))


def test_plan_cem_finds_quadratic_minimiser():
    """CEM with the reference settings returns the minimiser of a quadratic cost."""
    target = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plan = cem(_quadratic(target), 2, 5, 4, generator=torch.Generator().manual_seed(42))
    assert plan.shape == (2, 5, 4)
    torch.testing.assert_close(plan, target, atol=1e-3, rtol=0)


def test_plan_cem_batched_equals_one_at_a_time():
    """Batched CEM with one generator per problem gives the same plans as solving each problem alone."""
    target = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))
    cost = _quadratic(target)
    gens = [torch.Generator().manual_seed(100 + b) for b in range(4)]
    batched = cem(cost, 4, 5, 6, num_samples=64, iterations=8, topk=8, generator=gens)
    for b in range(4):
        gen = [torch.Generator().manual_seed(100 + b)]
        alone = cem(_quadratic(target[b : b + 1]), 1, 5, 6, num_samples=64, iterations=8, topk=8, generator=gen)
        torch.testing.assert_close(batched[b : b + 1], alone, atol=0, rtol=0)


def test_plan_cem_candidate_zero_is_mean():
    """At every iteration candidate 0 is the current mean: the warm start first, then the previous elite mean."""
    target = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
    init = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(3))
    calls = []
    cost = _quadratic(target)

    def cost_fn(a):
        calls.append((a.clone(), cost(a)))
        return calls[-1][1]

    gen = torch.Generator().manual_seed(4)
    plan = cem(cost_fn, 2, 4, 3, num_samples=50, iterations=5, topk=5, init_mean=init, generator=gen)
    mean = init
    for a, c in calls:
        torch.testing.assert_close(a[:, 0], mean)
        idx = c.topk(5, dim=1, largest=False).indices  # (B, K)
        mean = torch.stack([a[b, idx[b]].mean(dim=0) for b in range(2)])  # (B, N, A)
    assert len(calls) == 5
    torch.testing.assert_close(plan, mean)


def test_plan_warm_start_shifts_tail():
    """warm_start moves the unexecuted blocks to the front and zero-pads the rest."""
    prev = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    init = warm_start(prev, 2)
    torch.testing.assert_close(init[:, :3], prev[:, 2:])
    assert bool((init[:, 3:] == 0).all())
    torch.testing.assert_close(warm_start(prev, 0), prev)
    assert bool((warm_start(prev, 5) == 0).all())


def test_plan_gradient_finds_minimiser_and_returns_best():
    """The gradient planner reaches a quadratic's minimiser, even under no_grad, and returns its lowest-cost sample."""
    target = torch.rand(2, 5, 4, generator=torch.Generator().manual_seed(5)) - 0.5
    calls = []
    cost = _quadratic(target)

    def cost_fn(a):
        calls.append((a.detach().clone(), cost(a).detach()))
        return cost(a)

    with torch.no_grad():
        gen = torch.Generator().manual_seed(6)
        plan = gradient_plan(cost_fn, 2, 5, 4, steps=60, generator=gen)
    assert len(calls) == 61  # 60 steps + one re-evaluation after the final update
    torch.testing.assert_close(plan, target, atol=0.02, rtol=0)
    last_plans, last_costs = calls[-1]
    best = last_costs.argmin(dim=1)  # (B,)
    torch.testing.assert_close(plan, last_plans[torch.arange(2), best])
    torch.testing.assert_close(cost(plan[:, None])[:, 0], last_costs.min(dim=1).values)  # the lowest cost
    torch.testing.assert_close(calls[0][0][:, 0], torch.zeros(2, 5, 4))  # sample 0 starts at the zero plan
    assert (cost(plan[:, None]) < 0.01 * cost(torch.zeros(2, 1, 5, 4))).all()  # far below where it started


# --- data


def _all_batches(loader):
    pixels, actions = zip(*loader)
    return torch.cat(pixels), torch.cat(actions)


def test_data_clips_match_hand_computed_rows(tmp_path):
    """Clips hold frames s, s+5, s+10, s+15 and the 20 z-scored actions from s as (4, 10) row-major blocks."""
    path = _data_file(tmp_path / "d.h5")
    with data.Trajectories(path) as traj:
        stats = data.action_stats(traj, [0, 1, 2])
        a = traj.rows("action", 0, traj.num_rows).astype(np.float64)
        a = a[np.isfinite(a).all(1)]
        np.testing.assert_allclose(stats["mean"], a.mean(0))
        np.testing.assert_allclose(stats["std"], torch.tensor(a).std(0).numpy())  # ddof=1 as torch.std
        for cache in (True, False):
            loader = data.ClipLoader(
                traj, [0, 1, 2], stats, batch_size=7, shuffle=False, drop_last=False, cache=cache, **CLIP
            )
            pixels, actions = _all_batches(loader)
            starts = np.r_[0:6, 25:36, 55:58]  # len - 20 + 1 starts per episode: 6, 11, 3
            assert pixels.shape == (20, 4, 4, 4, 3) and pixels.dtype == torch.uint8
            assert actions.shape == (20, 4, 10) and actions.dtype == torch.float32
            row = pixels[..., 0, 0, 0].long() + 256 * pixels[..., 0, 0, 1].long()  # (clips, 4)
            assert (row.numpy() == starts[:, None] + 5 * np.arange(4)).all()
            raw = traj.rows("action", 0, traj.num_rows)
            for i, s in enumerate(starts):
                want = (raw[s : s + 20].astype(np.float64) - stats["mean"]) / stats["std"]  # (20, 2)
                want = np.nan_to_num(want, nan=0.0).reshape(4, 10)
                np.testing.assert_allclose(actions[i].numpy(), want, rtol=1e-6, atol=1e-6)
        finite = raw[np.isfinite(raw).all(1)]
        round_trip = data.denormalize_actions(data.normalize_actions(finite, stats), stats)
        np.testing.assert_allclose(round_trip, finite, rtol=1e-5, atol=1e-5)


def test_data_official_layout_loads(tmp_path):
    """A file in the official layout (episode_idx, 100-row pixel chunks, extra columns) opens and serves clips."""
    path = tmp_path / "official.h5"
    _data_file(path, lens=(120, 90), index="episode_idx")
    with h5py.File(path, "a") as f:  # rewrite pixels the way the official recorder chunks them (gzip here)
        pixels = f["pixels"][()]
        del f["pixels"]
        f.create_dataset("pixels", data=pixels, chunks=(100, 4, 4, 3), compression="gzip")
    with data.Trajectories(path) as traj:
        assert traj.index_column == "episode_idx" and traj.num_episodes == 2 and "state" in traj.columns
        ep = traj.episode(1, ["state", "pixels"])
        assert ep["state"].shape == (90, 2) and ep["state"][0, 0] == 120 and ep["pixels"].shape == (90, 4, 4, 3)
        np.testing.assert_array_equal(traj.read("state", [130, 5, 130])[:, 0], [130, 5, 130])
        loader = data.ClipLoader(traj, [0, 1], data.action_stats(traj, [0]), batch_size=16, cache=False, **CLIP)
        pixels, actions = next(iter(loader))
        assert pixels.shape == (16, 4, 4, 4, 3) and actions.shape == (16, 4, 10)


def test_collect_blosc_zstd_stores_the_same_frames(tmp_path, pusht_file, monkeypatch):
    """--compression blosc-zstd writes the Blosc filter (id 32001) and exactly the frames the gzip default writes;
    an unknown format, or Blosc without hdf5plugin, is refused in one line before any episode is collected."""
    pytest.importorskip("hdf5plugin")
    path = _collect(tmp_path / "zstd.h5", workers=1, pixel_format="blosc-zstd")
    with h5py.File(path) as f, h5py.File(pusht_file) as ref:
        plist = f["pixels"].id.get_create_plist()
        assert 32001 in [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
        np.testing.assert_array_equal(f["pixels"][()], ref["pixels"][()])
    monkeypatch.setattr(data, "_import_hdf5plugin", lambda: False)
    for fmt, message in (("lz4", "unknown pixel format"), ("blosc-zstd", "pip install hdf5plugin")):
        with pytest.raises(cli.UsageError, match=message) as e:
            _collect(tmp_path / f"{fmt}.h5", workers=1, pixel_format=fmt)
        assert "\n" not in str(e.value) and str(e.value).startswith(f"--compression {fmt}")
        assert not os.path.exists(tmp_path / f"{fmt}.h5.parts")


def test_data_official_blosc_file_reads_like_gzip(tmp_path):
    """An official-layout file with Blosc/lz4 + byte-shuffle pixels (hdf5plugin) reads clip for clip equal to the
    same data gzip-compressed."""
    hdf5plugin = pytest.importorskip("hdf5plugin")
    pixels = np.random.default_rng(0).integers(0, 256, (210, 8, 8, 3), dtype=np.uint8)  # incompressible noise
    compressions = {
        "gzip": {"compression": "gzip"},
        "blosc": hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE),
    }
    paths = {}
    for name, comp in compressions.items():
        paths[name] = _data_file(tmp_path / f"{name}.h5", lens=(120, 90), index="episode_idx", pixels=None)
        with h5py.File(paths[name], "a") as f:  # pixels chunked 100 rows at a time, as the official recorder does
            ds = f.create_dataset("pixels", data=pixels, chunks=(100, 8, 8, 3), **comp)
            codes = [ds.id.get_create_plist().get_filter(i)[0] for i in range(ds.id.get_create_plist().get_nfilters())]
            assert (32001 in codes) == (name == "blosc")  # the Blosc filter id of the official files
    with data.Trajectories(paths["gzip"]) as gz, data.Trajectories(paths["blosc"]) as bl:
        assert bl.index_column == "episode_idx" and bl.num_episodes == 2
        np.testing.assert_array_equal(bl.read("pixels", np.arange(210)), pixels)
        np.testing.assert_array_equal(bl.episode(1, ["pixels"])["pixels"], pixels[120:])
        stats = data.action_stats(gz, [0])
        loaders = [data.ClipLoader(t, [0, 1], stats, batch_size=8, seed=5, cache=False, **CLIP) for t in (gz, bl)]
        batches = 0
        for (p_gz, a_gz), (p_bl, a_bl) in zip(*loaders, strict=True):
            assert torch.equal(p_gz, p_bl) and torch.equal(a_gz, a_bl)
            batches += 1
        assert batches == len(loaders[0]) > 0


@pytest.mark.parametrize(
    "layout, direct",
    [
        ({"compression": "gzip", "compression_opts": 1}, True),  # what collect.py writes
        ({"compression": "gzip", "shuffle": True}, True),  # byte shuffle of uint8: the identity
        ({}, True),  # chunked, no filter
        ({"compression": "lzf"}, False),
        ({"compression": "gzip", "fletcher32": True}, False),
        ({"contiguous": True}, False),
    ],
)
def test_data_read_decodes_gzip_chunks_itself_and_h5py_the_rest(tmp_path, monkeypatch, layout, direct):
    """Trajectories.read decodes gzip (or unfiltered) chunks without h5py's selection, and returns exactly what
    h5py returns for any rows (unsorted, repeated, in the partly filled last chunk, in a chunk stored with gzip
    skipped, in a chunk never written); other layouts go through h5py."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (75, 6, 5, 3), dtype=np.uint8)
    pixels[:40] //= 64  # compressible rows as well as noise
    path = _data_file(tmp_path / "f.h5", lens=(25, 30, 20), pixels=None)
    with h5py.File(path, "a") as f:
        opts = dict(layout)
        chunks = None if opts.pop("contiguous", False) else (7, 6, 5, 3)  # 75 rows: the last chunk holds 5
        ds = f.create_dataset("pixels", shape=pixels.shape, dtype=np.uint8, chunks=chunks, **opts)
        ds[:63] = pixels[:63]  # rows 63..69 (chunk 9) are never written: read back as the fill value 0
        ds[70:] = pixels[70:]
        if chunks is not None and not opts:
            ds.id.write_direct_chunk((14, 0, 0, 0), pixels[14:21].tobytes())
        elif "compression_opts" in opts:  # chunk 2 stored raw, its gzip filter marked skipped in the mask
            ds.id.write_direct_chunk((14, 0, 0, 0), pixels[14:21].tobytes(), filter_mask=1)
    expected = pixels.copy()
    expected[63:70] = 0
    rows = np.concatenate([rng.integers(0, 75, 60), [74, 74, 0, 15, 63, 69, 70]])
    with data.Trajectories(path, chunk_cache_bytes=0) as traj:
        assert np.array_equal(traj.file["pixels"][()], expected)  # h5py's own reading of the file
        got = traj.read("pixels", rows)
        assert (traj._decoders["pixels"] is not None) == direct
        np.testing.assert_array_equal(got, expected[rows])
        out = np.full((len(rows), 6, 5, 3), 255, np.uint8)
        assert traj.read("pixels", rows, out=out) is out  # decoded into the caller's array (the loader's batch)
        np.testing.assert_array_equal(out, expected[rows])
        if direct:  # written chunks never touch h5py's selection

            def h5py_selection(*args, **kwargs):
                raise AssertionError("read through h5py's selection")

            monkeypatch.setattr(h5py.Dataset, "read_direct", h5py_selection)
            monkeypatch.setattr(h5py.Dataset, "__getitem__", h5py_selection)
            written = rows[(rows < 63) | (rows >= 70)]
            np.testing.assert_array_equal(traj.read("pixels", written[::-1]), expected[written[::-1]])
        monkeypatch.undo()
        traj.cache("pixels")
        out[:] = 255
        np.testing.assert_array_equal(traj.read("pixels", rows, out=out), expected[rows])
        with pytest.raises(IndexError):
            traj.read("pixels", np.array([3, 75]), out=out[:2])


def test_data_gzip_inflater_is_isal_when_installed_and_every_one_reads_the_same(tmp_path, monkeypatch):
    """data.inflater() picks ISA-L's inflate in the main thread when isal imports, zlib's when it does not, and
    zlib's (which releases the GIL) in any other thread; the direct chunk reads go through the chosen one, and zlib's
    and ISA-L's (when installed) return what h5py returns."""
    import threading
    import zlib

    monkeypatch.setattr(data, "INFLATE", None)
    monkeypatch.setitem(sys.modules, "isal", None)  # import isal now raises ImportError
    assert data.inflater() is zlib.decompress
    candidates = {"zlib": zlib.decompress}
    monkeypatch.undo()
    try:
        from isal import isal_zlib
    except ImportError:
        pass
    else:
        monkeypatch.setattr(data, "INFLATE", None)
        assert data.inflater() is isal_zlib.decompress
        candidates["isal"] = isal_zlib.decompress
    in_thread = []
    worker = threading.Thread(target=lambda: in_thread.append(data.inflater()))
    worker.start()
    worker.join()
    assert in_thread == [zlib.decompress]
    rng = np.random.default_rng(1)
    pixels = (rng.integers(0, 256, (60, 8, 8, 3)) // rng.integers(1, 128, (60, 1, 1, 1))).astype(np.uint8)
    path = _data_file(tmp_path / "f.h5", lens=(30, 30), pixels=None)
    with h5py.File(path, "a") as f:
        f.create_dataset("pixels", data=pixels, chunks=(9, 8, 8, 3), compression="gzip", compression_opts=1)
    rows = rng.integers(0, 60, 40)
    for name, fn in candidates.items():
        calls = []

        def counted(raw, bufsize=0, fn=fn, calls=calls):
            calls.append(bufsize)
            return fn(raw, bufsize=bufsize)

        monkeypatch.setattr(data, "INFLATE", counted)
        with data.Trajectories(path, chunk_cache_bytes=0) as traj:
            np.testing.assert_array_equal(traj.read("pixels", rows), pixels[rows], err_msg=name)
        assert len(calls) == len(np.unique(rows // 9)) and set(calls) == {9 * 8 * 8 * 3}, name


def test_data_split_is_disjoint_and_deterministic():
    """split_episodes covers every episode exactly once, is seeded, and leaves both sets non-empty."""
    for num, frac, seed in [(2, 0.1, 0), (10, 0.1, 1), (101, 0.2, 3072), (1000, 0.1, 5)]:
        train, val = data.split_episodes(num, frac, seed)
        assert len(np.intersect1d(train, val)) == 0 and len(train) > 0 and len(val) > 0
        assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(num))
        assert all(np.array_equal(x, y) for x, y in zip((train, val), data.split_episodes(num, frac, seed)))
    assert not np.array_equal(data.split_episodes(1000, 0.1, 0)[1], data.split_episodes(1000, 0.1, 1)[1])


def test_data_loader_is_deterministic_and_resumable(tmp_path):
    """Same seed gives the same batches, epochs differ, drop_last gives full batches, steps() resumes by step."""
    path = _data_file(tmp_path / "d.h5", lens=(40, 50, 33))
    with data.Trajectories(path) as traj:
        stats = data.action_stats(traj, [0, 1, 2])
        loader = data.ClipLoader(traj, [0, 1, 2], stats, batch_size=8, seed=3, **CLIP)
        assert len(loader) == (21 + 31 + 14) // 8
        epoch0 = [p for p, _ in loader.epoch(0)]
        assert all(p.shape[0] == 8 for p in epoch0) and len(epoch0) == len(loader)
        assert all(
            torch.equal(p, q) for p, (q, _) in zip(epoch0, data.ClipLoader(traj, [0, 1, 2], stats, 8, seed=3, **CLIP))
        )
        assert not all(torch.equal(p, q) for p, (q, _) in zip(epoch0, loader.epoch(1)))
        stream = loader.steps()
        first = [next(stream)[0] for _ in range(3 * len(loader))]
        stream.close()
        resumed = loader.steps(start_step=len(loader) + 2)
        assert all(torch.equal(first[len(loader) + 2 + i], next(resumed)[0]) for i in range(5))
        resumed.close()
        halves = [data.ClipLoader(traj, [0, 1, 2], stats, 4, seed=3, rank=r, world_size=2, **CLIP) for r in (0, 1)]
        rows = [torch.cat([p for p, _ in h.epoch(0)])[:, 0, 0, 0, 0] for h in halves]
        assert len(np.intersect1d(rows[0].numpy(), rows[1].numpy())) == 0


def test_data_short_episodes_are_skipped_with_warning(tmp_path):
    """Episodes shorter than one clip (20 rows) are skipped with a warning giving their count."""
    path = _data_file(tmp_path / "d.h5", lens=(25, 19, 12))
    with data.Trajectories(path) as traj, pytest.warns(UserWarning, match="skipping 2 of 3 episodes"):
        loader = data.ClipLoader(traj, [0, 1, 2], data.action_stats(traj, [0, 1, 2]), 2, drop_last=False, **CLIP)
    assert len(loader.starts) == 6


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _nan_action(path):
    with h5py.File(path, "a") as f:
        f["action"][25 + 3] = [0.5, np.nan]


def _blosc_pixels(path):
    with h5py.File(path, "a") as f:  # raw chunks tagged with the Blosc filter id (32001) of the official files
        del f["pixels"]
        ds = f.create_dataset(
            "pixels", (77, 4, 4, 3), "u1", chunks=(77, 4, 4, 3), compression=32001, allow_unknown_filter=True
        )
        ds.id.write_direct_chunk((0, 0, 0, 0), b"\0" * 64)


BAD_INPUTS = {
    "missing file": (lambda p: os.remove(p), FileNotFoundError, "not found"),
    "not hdf5": (lambda p: p.write_text("ep_len,ep_offset\n3,0\n"), ValueError, "not an HDF5"),
    "truncated": (_truncate, ValueError, "truncated"),
    "missing action": ({"action": None}, ValueError, r"missing columns \['action'\]"),
    "missing ep_idx": ({"ep_idx": None}, ValueError, "missing columns.*ep_idx"),
    "offsets not cumsum": ({"ep_offset": np.array([0, 25, 56])}, ValueError, "cumulative sum"),
    "lengths vs rows": (
        {"ep_len": np.array([25, 30, 21], np.int32), "ep_offset": np.array([0, 25, 55])},
        ValueError,
        "ep_len sums to 76",
    ),
    "ep_idx mismatch": (
        {"ep_idx": np.repeat([0, 2, 1], [25, 30, 22]).astype(np.int32)},
        ValueError,
        "ep_idx does not match",
    ),
    "pixels dtype": ({"pixels": np.zeros((77, 4, 4, 3), np.float32)}, ValueError, "pixels must be uint8"),
    "pixels shape": ({"pixels": np.zeros((77, 4, 4), np.uint8)}, ValueError, "pixels must be uint8"),
    "nan mid-episode": (_nan_action, ValueError, "non-finite action inside episode 1 at step 3"),
    "all too short": (
        {
            "ep_len": np.array([19, 19], np.int32),
            "ep_offset": np.array([0, 19]),
            "ep_idx": np.repeat([0, 1], 19).astype(np.int32),
            "step_idx": np.r_[0:19, 0:19],
            "pixels": np.zeros((38, 4, 4, 3), np.uint8),
            "action": np.zeros((38, 2), np.float32),
            "state": None,
        },
        ValueError,
        "all 2 episodes are shorter than one clip",
    ),
    "blosc without plugin": (_blosc_pixels, ValueError, "pip install hdf5plugin"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_data_bad_input_gives_clear_error(tmp_path, case):
    """Each malformed dataset raises an error whose message names the problem."""
    edit, error, message = BAD_INPUTS[case]
    if case == "blosc without plugin" and data._import_hdf5plugin():
        pytest.skip("hdf5plugin is installed")
    path = tmp_path / "bad.h5"
    if isinstance(edit, dict):
        _data_file(path, **edit)
    else:
        _data_file(path)
        edit(path)
    with pytest.raises(error, match=message), data.Trajectories(path) as traj:
        data.ClipLoader(traj, range(traj.num_episodes), {"mean": [0, 0], "std": [1, 1]}, **CLIP)


def test_data_collected_file_satisfies_layout(pusht_file):
    """A collected file has consistent offsets and indices, NaN only on last actions, the layout dtypes, info columns."""
    assert not os.path.exists(pusht_file + ".tmp")
    with h5py.File(pusht_file) as f:
        ep_len, ep_offset = f["ep_len"][()], f["ep_offset"][()]
        assert ep_len.dtype == np.int32 and ep_offset.dtype == np.int64 and len(ep_len) == 3
        assert (ep_len >= 2).all() and (ep_len <= 26).all()
        assert np.array_equal(ep_offset, np.concatenate([[0], np.cumsum(ep_len)[:-1]]))
        n = int(ep_len.sum())
        assert f["ep_idx"].dtype == np.int32 and np.array_equal(f["ep_idx"][()], np.repeat(np.arange(3), ep_len))
        assert f["step_idx"].dtype == np.int64
        assert np.array_equal(f["step_idx"][()], np.concatenate([np.arange(k) for k in ep_len]))
        assert f["pixels"].dtype == np.uint8 and f["pixels"].shape == (n, 32, 32, 3)
        assert f["pixels"].compression is not None and f["pixels"].chunks[1:] == (32, 32, 3)
        action = f["action"][()]
        assert action.dtype == np.float32 and action.shape == (n, 2)
        last = np.zeros(n, bool)
        last[ep_offset + ep_len - 1] = True
        assert np.isnan(action[last]).all() and np.isfinite(action[~last]).all()
        for c in ("state", "goal_state", "proprio", "is_success"):
            assert f[c].shape[0] == n
        assert len(np.unique(f["pixels"][:, :, :, 0].reshape(n, -1), axis=0)) > 1
    with data.Trajectories(pusht_file) as traj:
        assert traj.num_episodes == 3 and traj.img_shape == (32, 32, 3) and traj.action_dim == 2


def test_data_interrupted_collection_resumes_identically(tmp_path, monkeypatch, pusht_file, capsys):
    """An interrupted collection leaves its finished episodes as part files; rerunning resumes to the uninterrupted
    run's content, rebuilding a torn partial file and re-collecting an unreadable part with a message."""
    import envs

    out, calls, step = tmp_path / "d.h5", [0], envs.PushTEnv.step

    def failing_step(self, action):
        calls[0] += 1
        if calls[0] == 40:  # in the middle of the second episode
            raise KeyboardInterrupt
        return step(self, action)

    monkeypatch.setattr(envs.PushTEnv, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        _collect(out)
    monkeypatch.undo()
    assert "run the same command again" in capsys.readouterr().out
    parts = sorted(os.listdir(f"{out}.parts"))
    assert not out.exists() and parts == ["episode_0000000.h5", "progress.json"]
    with open(f"{out}.tmp", "wb") as f:  # a merge torn by a crash: unreadable HDF5
        f.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with open(f"{out}.parts/episode_0000001.h5", "wb") as f:  # a damaged part (a disk error, say)
        f.write(b"garbage")
    with open(f"{out}.parts/episode_0000002.h5.tmp123", "wb") as f:  # a part being written at the kill
        f.write(b"half")
    _collect(out)
    printed = capsys.readouterr().out
    assert "rebuilding" in printed and "collecting them again" in printed
    assert not os.path.exists(f"{out}.tmp") and not os.path.exists(f"{out}.parts")
    _assert_same_file(out, pusht_file)


def test_data_append_matches_single_run(tmp_path, pusht_file):
    """--append adds episodes with the continuing seed stream: 2 + 1 episodes equal one 3-episode run."""
    out = _collect(tmp_path / "d.h5", episodes=2)
    with pytest.raises(cli.UsageError, match="--append"):
        _collect(out, episodes=1)
    _collect(out, episodes=1, append=True)
    _assert_same_file(out, pusht_file)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in "ZX"  # a zombie has exited
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_fail_collection_killed_at_any_moment_resumes_identically(tmp_path):
    """Case 2: SIGTERM, then kill -9 at several moments (start, mid-run, at the merge) of a 2-worker collection: each
    signal ends the process (exit 143, or -9) with its part files left behind, the workers die with their parent,
    and resuming writes the same file as an uninterrupted run."""
    import signal
    import time

    kw = {"img_size": 32, "episode_steps": 40, "seed": 3}
    ref = collect.collect("tworoom", 8, str(tmp_path / "ref.h5"), workers=1, **kw)
    out = tmp_path / "d.h5"
    cmd = [
        sys.executable,
        os.path.join(REPO, "data.py"),
        "--env",
        "tworoom",
        "--episodes",
        "8",
        "--out",
        str(out),
        "--img_size",
        "32",
        "--episode_steps",
        "40",
        "--seed",
        "3",
        "--workers",
        "2",
    ]
    parts = f"{out}.parts"

    def n_parts() -> int:
        return len([n for n in os.listdir(parts) if n.endswith(".h5")]) if os.path.isdir(parts) else -1

    for sig, when in (
        (signal.SIGTERM, lambda: n_parts() >= 1),
        (signal.SIGKILL, lambda: n_parts() >= 0),
        (signal.SIGKILL, lambda: n_parts() >= 4),
        (signal.SIGKILL, lambda: os.path.exists(f"{out}.tmp")),  # during the merge
    ):
        for _ in range(5):  # a run that finished before the signal landed was not killed: run it again
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.time() + 240
            while not when() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.002)
            workers = _children(proc.pid) if proc.poll() is None else []
            proc.send_signal(sig)
            log = proc.communicate(timeout=120)[0]
            if proc.returncode != 0:
                break
            os.remove(out)
        # The signal ended it (SIGTERM's handler exits 143 saying how to resume; SIGKILL leaves returncode -9),
        # and the interrupted collection's part files are there for the next run.
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and "run the same command again" in log, log[-500:]
        else:
            assert proc.returncode == -signal.SIGKILL, (proc.returncode, log[-500:])
        assert os.path.isdir(parts), "no partial state left to resume from"
        for _ in range(100):  # the watchdog polls every 0.2 s
            if all(map(_gone, workers)):
                break
            time.sleep(0.1)
        assert all(map(_gone, workers)), "workers outlived their parent"
    collect.collect("tworoom", 8, str(out), workers=1, **kw)
    assert not os.path.exists(parts) and not os.path.exists(f"{out}.tmp")
    _assert_same_file(out, ref)


def test_data_open_data_reads_extra_episodes_after_the_dataset(tmp_path):
    """cli.open_data reads --data and --extra_data as one file, the extra episodes numbered after the dataset's,
    notes a file without an env and frames of another size, and refuses extra episodes of another frame size."""
    a, b = _data_file(tmp_path / "a.h5"), _data_file(tmp_path / "b.h5", lens=(21, 23))
    notes = []
    traj = cli.open_data({"--data": a, "--extra_data": b}, "pusht", 32, notes.append)
    assert isinstance(traj, data.TrajectoryUnion) and traj.num_episodes == 5 and list(traj.ep_len[3:]) == [21, 23]
    assert any("does not record its environment" in n for n in notes) and any("4 px frames" in n for n in notes)
    assert isinstance(cli.open_data({"--data": a, "--extra_data": ""}, "pusht", 4), data.Trajectories)
    c = _data_file(tmp_path / "c.h5", img=8)
    with pytest.raises(cli.UsageError, match="--extra_data .*c.h5: .*not the same env and frame size"):
        cli.open_data({"--data": a, "--extra_data": c}, "pusht", 32)


def test_fail_collection_bad_arguments_before_any_file(tmp_path):
    """Case 7: bad collection arguments (img_size 7, unknown env or policy, 0 episodes, a folder as --out) raise
    UsageError naming the flag, and no file or folder is created."""
    out = str(tmp_path / "d.h5")
    for kw, flag in (
        ({"img_size": 7}, "--img_size 7"),
        ({"env": "foo"}, "--env foo"),
        ({"policy": "x"}, "--policy"),
        ({"episodes": 0}, "--episodes 0"),
        ({"out": str(tmp_path)}, "is a folder"),
    ):
        args = {"env": "tworoom", "episodes": 2, "out": out, **kw}
        with pytest.raises(cli.UsageError, match=flag):
            collect.collect(args.pop("env"), args.pop("episodes"), args.pop("out"), **args)
    assert os.listdir(tmp_path) == []


def test_fail_action_outlier_is_refused(tmp_path):
    """Case 8: one action of 3e38 (which would make its dimension constant after z-scoring) is refused."""
    path = _data_file(tmp_path / "d.h5")
    with h5py.File(path, "a") as f:
        f["action"][5, 1] = 3e38
    with data.Trajectories(path) as traj, pytest.raises(cli.UsageError, match="dimension 1.*outlier"):
        data.action_stats(traj, range(traj.num_episodes))
    with data.Trajectories(_data_file(tmp_path / "ok.h5")) as traj:
        data.action_stats(traj, range(traj.num_episodes))  # normal data passes


# --- pinned numbers: the exact floats of tiny training runs and a tiny CEM plan

# fmt: off
# (loss, val_loss or None) per step; then the plan's B * N * A actions, row-major
PINNED_TRAIN_FP32 = [
    [0.673148512840271, None], [0.6793810129165649, None],
    [0.6451278924942017, 0.6509763896465302], [0.6156538724899292, None],
    [0.6031929850578308, None], [0.5934149026870728, 0.6283067762851715],
]
PINNED_TRAIN_BF16 = [
    [0.6730997562408447, None], [0.6806374788284302, None],
    [0.6462568044662476, 0.6529784798622131],
]
PINNED_PLAN = [
    0.4153521656990051, 0.7013136148452759, -0.761385440826416, 0.14434783160686493, 0.24291127920150757,
    -0.3548234701156616, -0.11566430330276489, 0.644732654094696, -0.657204270362854, 1.2052533626556396,
    0.5742393136024475, -1.1604094505310059, -0.06472209095954895, -0.31185293197631836, 0.5786150693893433,
    -0.2513214349746704, 0.3979030251502991, 1.5113946199417114, -0.7977088093757629, 0.13031664490699768,
    1.4663933515548706, 0.7079306244850159, -0.8787223696708679, -0.8683499097824097, 1.7096630334854126,
    0.20670638978481293, -1.1662049293518066, -0.8479779958724976, 1.1580764055252075, 0.060540974140167236,
    -0.4327377378940582, 0.2197452187538147, 0.2549203634262085, -0.300096333026886, 0.6643190383911133,
    -0.5838571786880493, 0.021024152636528015, -1.0974676609039307, -0.3987659215927124, -0.6660587787628174,
    -0.09164343774318695, -0.19059303402900696, -1.6107051372528076, -0.18334591388702393, -0.23786205053329468,
    -0.05478385090827942, 0.3105655908584595, -0.4062778949737549, -0.17049585282802582, 0.15170329809188843,
    -0.6081942319869995, -0.2723514437675476, -1.658145785331726, -0.8310341238975525, -0.1198727935552597,
    -0.4809665083885193, -0.1335868090391159, -0.8245492577552795, 1.0726383924484253, 1.8334529399871826,
]
# fmt: on


def _pinned_numbers(tmp_path, data_path) -> dict:
    """Per-step losses (and validation losses) of fixed-seed tiny training runs in fp32 and in bf16 (the bf16 one
    runs the attention kernels chosen for bf16 on a CPU), and the actions of a tiny CEM plan, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for name, bf16, steps in (("fp32", False, 6), ("bf16", True, 3)):
            cfg = tiny_cfg(tmp_path / name, data_path, max_steps=steps, eval_every=3, ckpt_every=3, bf16=bf16)
            train.main(cfg)
            rows = read_metrics(cfg.out_dir)
            out[name] = [[rows[s]["loss"], rows[s].get("val_loss")] for s in sorted(rows)]
        model = randomise(tiny_model(), seed=7).eval()
        g = torch.Generator().manual_seed(11)
        z0, z_goal = torch.randn(2, 1, 32, generator=g), torch.randn(2, 32, generator=g)  # (B, 1, D), (B, D)
        gens = [torch.Generator().manual_seed(20 + b) for b in range(2)]
        plan = cem(make_cost(model, z0, z_goal, False), 2, 3, 10, num_samples=24, iterations=3, topk=4, generator=gens)
        out["plan"] = plan.flatten().tolist()  # (B * N * A,) float32 values, exact as Python floats
    finally:
        torch.set_num_threads(threads)
    return out


def test_pinned_numbers_unchanged(tmp_path, tiny_pusht):
    """A fixed-seed tiny training run (fp32 and bf16) and a tiny CEM plan give exactly the recorded floats, bit for
    bit (recorded with torch 2.13.0 on an AVX2 CPU, one thread): moving code between files changed no number."""
    got = _pinned_numbers(tmp_path, tiny_pusht)
    assert got["fp32"] == PINNED_TRAIN_FP32
    assert got["bf16"] == PINNED_TRAIN_BF16
    assert torch.equal(torch.tensor(got["plan"]), torch.tensor(PINNED_PLAN))


# --- train


def test_train_main_lowers_loss_on_fixed_batch(tmp_path, tiny_pusht):
    """main() trains in-process: 25 steps bring the loss of a fixed batch of training clips below 0.7x its value at
    initialisation (0.48x measured)."""
    cfg = tiny_cfg(tmp_path, tiny_pusht, max_steps=25, lr=3e-3)
    traj = data.Trajectories(tiny_pusht)
    train_eps, _ = data.split_episodes(traj.num_episodes, cfg.val_fraction, seed=data.SPLIT_SEED)
    stats = data.action_stats(traj, train_eps)
    # A random draw of training clips: consecutive clips of one slow PushT episode are near-identical frames, on
    # which SIGReg (a test of the batch's spread) says little about the model.
    pixels, actions = next(iter(data.ClipLoader(traj, train_eps, stats, 16, seed=1, **CLIP)))
    torch.manual_seed(cfg.seed)
    initial = LeWM(dataclasses.replace(PRESETS["tiny"], action_dim=actions.shape[-1])).eval()
    summary = train.main(cfg)
    trained = model_from_checkpoint(load_checkpoint(summary["checkpoint"]))
    sig = SIGReg(num_proj=128)
    with torch.no_grad():
        losses = []
        for model in (initial, trained):
            torch.manual_seed(0)
            losses.append(lewm_loss(model, model.preprocess(pixels), actions, sig)[0].item())
    assert losses[1] < 0.7 * losses[0], losses


def test_train_summary_json_records_wall_times(tmp_path, monkeypatch):
    """summary.json (written atomically at the end) holds the steps, final validation losses and positive wall times:
    collection when the dataset was missing (0 when it exists), and the optimisation loop summed over resumed runs,
    carried by the checkpoint."""
    monkeypatch.chdir(tmp_path)  # the default dataset path data/tworoom_32px_6ep.h5 is relative
    cfg = tiny_cfg(tmp_path, "", env="tworoom", max_steps=3, eval_every=3, ckpt_every=3, num_proj=32)
    first = train.main(cfg)
    assert os.path.exists(tmp_path / "data" / "tworoom_32px_6ep.h5")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(first)) and summary["steps"] == 3
    assert summary["collect_seconds"] > 0 and summary["train_seconds"] > 0
    assert np.isfinite(summary["val_pred_loss"]) and np.isfinite(summary["val_sigreg_loss"])
    assert not [n for n in os.listdir(tmp_path / "run") if ".tmp" in n]  # no temporary file left behind
    ckpt_seconds = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["train_seconds"]
    assert 0 < ckpt_seconds <= summary["train_seconds"]
    resumed = train.main(dataclasses.replace(cfg, max_steps=5, eval_every=5, ckpt_every=5, resume=True))
    again = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert again["steps"] == resumed["steps"] == 5 and again["collect_seconds"] == 0
    assert again["train_seconds"] > ckpt_seconds  # the first run's loop, then this one's


def test_train_refresh_bn_stats_matches_train_mode(tmp_path, tiny_pusht):
    """After refresh_bn_stats on a batch, eval-mode embeddings of that batch equal the train-mode (batch-statistics)
    ones up to the unbiased/biased variance factor; stale running statistics are far off."""
    traj = data.Trajectories(tiny_pusht)
    stats = data.action_stats(traj, range(traj.num_episodes))
    loader = data.ClipLoader(traj, range(traj.num_episodes), stats, 16, shuffle=False, **CLIP)
    pixels, actions = next(iter(loader))
    model = randomise(LeWM(dataclasses.replace(PRESETS["tiny"], action_dim=actions.shape[-1])))
    for m in model.modules():  # features with a large mean and a small spread, like a trained projector's
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.add_(0.5)
    x = model.preprocess(pixels)

    def gap() -> float:
        with torch.no_grad():
            z_train = model.train()(x, actions)[0]
            z_eval = model.eval()(x, actions)[0]
        return ((z_train - z_eval).norm() / z_train.norm()).item()

    with torch.no_grad():
        stale = gap()
        cfg = tiny_cfg(tmp_path, tiny_pusht, bf16=False)
        train.refresh_bn_stats(model, loader, cfg, torch.device("cpu"), max_batches=1)
    assert stale > 0.2 and gap() < 0.02
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d))


def test_train_resume_equals_uninterrupted(tmp_path, tiny_pusht, monkeypatch):
    """A run killed after its step-4 checkpoint and resumed reaches the same losses as an uninterrupted run."""
    full = train.main(tiny_cfg(tmp_path / "a", tiny_pusht))
    calls = {"n": 0}
    real_loss = train.lewm_loss

    def killed_at_step_7(model, *args, **kw):
        calls["n"] += model.training
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_loss(model, *args, **kw)

    monkeypatch.setattr(train, "lewm_loss", killed_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_cfg(tmp_path / "b", tiny_pusht))
    monkeypatch.setattr(train, "lewm_loss", real_loss)
    assert load_checkpoint(str(tmp_path / "b" / "run" / "ckpt.pt"))["step"] == 4
    resumed = train.main(tiny_cfg(tmp_path / "b", tiny_pusht, resume=True))
    a, b = read_metrics(os.path.dirname(full["checkpoint"])), read_metrics(os.path.dirname(resumed["checkpoint"]))
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(5, 9):
        assert abs(a[step]["loss"] - b[step]["loss"]) < 1e-6, step


def test_train_logged_step_time_leaves_out_validation(tmp_path, tiny_pusht, monkeypatch):
    """ms_per_step times the training steps alone: a validation that takes 1 s (here, at steps 4 and 8) does not
    show in the log interval after it."""
    real_validate = train.validate

    def slow_validate(*args, **kw):
        time.sleep(1.0)
        return real_validate(*args, **kw)

    monkeypatch.setattr(train, "validate", slow_validate)
    out = train.main(tiny_cfg(tmp_path, tiny_pusht, log_every=2, bn_batches=0))
    rows = read_metrics(os.path.dirname(out["checkpoint"]))
    assert [s for s in rows if "ms_per_step" in rows[s]] == [2, 4, 6, 8]
    assert all(rows[s]["ms_per_step"] < 400 for s in (2, 4, 6, 8)), {s: rows[s]["ms_per_step"] for s in rows}


def test_train_nan_loss_keeps_last_checkpoint(tmp_path, tiny_pusht, monkeypatch):
    """A NaN loss stops training with a clear error and leaves the last good checkpoint byte-for-byte intact."""
    train.main(tiny_cfg(tmp_path, tiny_pusht, max_steps=4))
    ckpt = tmp_path / "run" / "ckpt.pt"
    before = ckpt.read_bytes()
    real_loss = train.lewm_loss

    def nan_loss(*args, **kw):
        loss, parts = real_loss(*args, **kw)
        return loss * float("nan"), parts

    monkeypatch.setattr(train, "lewm_loss", nan_loss)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train.main(tiny_cfg(tmp_path, tiny_pusht, max_steps=8, resume=True))
    assert ckpt.read_bytes() == before


def test_train_bf16_default_follows_native_support(tmp_path):
    """--bf16 not given: on where the CPU lists AVX-512 BF16 or AMX, off otherwise (emulated bf16 is far slower);
    an explicit --bf16 or --no-bf16 wins either way."""
    cpu = torch.device("cpu")
    info = tmp_path / "cpuinfo"
    for flags, want in (("avx2 avx512f avx512_bf16", True), ("avx2 amx_tile amx_bf16", True), ("avx2 avx512f", False)):
        info.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        assert native_bf16(cpu, str(info)) is want, flags
    assert native_bf16(cpu, str(tmp_path / "absent")) is False

    def resolved(flags: list[str], native: bool) -> bool:
        cfg = train.parse_args(["--env", "pusht", "--preset", "tiny", *flags])
        return train.resolve_config(cfg, cuda=False, steps_per_epoch=lambda c: 1, bf16=native).bf16

    assert train.parse_args([]).bf16 is None
    assert resolved([], True) is True and resolved([], False) is False
    assert resolved(["--bf16"], False) is True and resolved(["--no-bf16"], True) is False


@pytest.mark.slow
def test_train_cli_end_to_end_collects_data(tmp_path):
    """The real CLI with the tiny preset collects its own dataset, trains, and writes checkpoint and metrics."""
    repo = os.path.dirname(os.path.abspath(__file__))
    cmd = [
        sys.executable,
        os.path.join(repo, "train.py"),
        "--env",
        "tworoom",
        "--preset",
        "tiny",
        "--max_steps",
        "3",
        "--log_every",
        "1",
        "--num_proj",
        "64",
        "--val_batches",
        "1",
    ]
    out = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.exists(tmp_path / "data" / "tworoom_32px_6ep.h5")
    assert load_checkpoint(str(tmp_path / "runs" / "tworoom_tiny" / "ckpt.pt"))["step"] == 3
    assert "done: 3 steps" in out.stdout


@pytest.mark.slow
def test_train_torchrun_matches_single_process(tmp_path, tiny_pusht):
    """A 2-process torchrun (gloo) run logs the same losses as one process with the same global batch."""
    repo = os.path.dirname(os.path.abspath(__file__))
    args = [
        "--env",
        "pusht",
        "--preset",
        "tiny",
        "--data",
        tiny_pusht,
        "--max_steps",
        "3",
        "--log_every",
        "1",
        "--eval_every",
        "100",
        "--num_proj",
        "64",
        "--dropout",
        "0",
        "--no-bf16",
        "--device",
        "cpu",
    ]
    single = train.main(train.parse_args(args + ["--out_dir", str(tmp_path / "one")]))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(repo, "train.py"),
        *args,
        "--out_dir",
        str(tmp_path / "two"),
    ]
    out = subprocess.run(
        cmd, check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        # Step 1 (no update yet) agrees to fp32 round-off (4e-5 relative measured); each Adam update then amplifies
        # the round-off of near-zero gradient entries (1e-4 relative measured at step 3).
        tol = 1e-4 if step == 1 else 5e-4
        assert abs(one[step]["loss"] - two[step]["loss"]) < tol * abs(one[step]["loss"]), (one[step], two[step])
    assert single["steps"] == 3


BAD_TRAIN = {  # case 7 and 8: field -> (value, text the one-line error contains)
    "max_steps": (-5, "--max_steps -5"),
    "log_every": (0, "--log_every 0"),
    "ckpt_every": (0, "--ckpt_every 0"),
    "batch_size": (-4, "--batch_size -4"),
    "warmup": (float("nan"), "--warmup nan"),
    "grad_clip": (-1.0, "--grad_clip -1"),
    "lr": (float("inf"), "--lr inf"),
    "env": ("foo", "--env 'foo'"),
    "preset": ("huge", "--preset 'huge'"),
    "device": ("cuda" if not torch.cuda.is_available() else "tpu", "--device"),
    "data": ("missing.h5", "--data missing.h5"),
}


@pytest.mark.parametrize("field", list(BAD_TRAIN))
def test_fail_train_bad_argument_is_refused(tmp_path, field):
    """Cases 3, 7, 8: train.main refuses an out-of-range or unknown argument before any work, naming it."""
    value, text = BAD_TRAIN[field]
    with pytest.raises(cli.UsageError, match=re.escape(text)):
        train.main(tiny_cfg(tmp_path, "", **{field: value}))
    assert not os.path.exists(tmp_path / "run")


def test_fail_nan_gradient_stops_before_update_and_checkpoint(tmp_path, tiny_pusht, monkeypatch):
    """Case 1: a NaN planted in the gradients (the loss stays finite) stops the run before the update: the last
    good checkpoint is untouched and holds finite weights."""
    real_loss, calls = train.lewm_loss, {"n": 0}

    def nan_gradients_at_step_3(model, *args, **kw):
        loss, parts = real_loss(model, *args, **kw)
        calls["n"] += model.training
        if model.training and calls["n"] == 3:
            loss.register_hook(lambda g: g * float("nan"))
        return loss, parts

    monkeypatch.setattr(train, "lewm_loss", nan_gradients_at_step_3)
    with pytest.raises(FloatingPointError, match="non-finite gradient norm nan at step 2"):
        train.main(tiny_cfg(tmp_path, tiny_pusht, max_steps=5, ckpt_every=2, eval_every=100))
    ckpt = load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.slow
def test_fail_train_sigint_checkpoints_and_resumes(tmp_path, tiny_pusht):
    """Case 4: SIGINT to a real training process finishes the step, writes a checkpoint at that step and exits 130
    with the resume command; --resume continues from it to the end."""
    import signal

    out_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        "--env",
        "pusht",
        "--preset",
        "tiny",
        "--data",
        tiny_pusht,
        "--out_dir",
        str(out_dir),
        "--max_steps",
        "400",
        "--log_every",
        "1",
        "--eval_every",
        "1000",
        "--ckpt_every",
        "1000",
        "--num_proj",
        "32",
        "--val_batches",
        "1",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("step      3"):
            proc.send_signal(signal.SIGINT)
            break
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, log[-800:]
    step = load_checkpoint(str(out_dir / "ckpt.pt"))["step"]
    assert 3 <= step < 400 and f"interrupted at step {step}" in log and "--resume" in log
    assert "--loader_workers" not in log.split("resume with:")[1]  # resolved from this machine's cores, not given
    assert cli.read_metrics(str(out_dir / "metrics.jsonl"))[-1]["step"] == step
    summary = train.main(
        tiny_cfg(tmp_path, tiny_pusht, max_steps=step + 2, num_proj=32, eval_every=1000, ckpt_every=1000, resume=True)
    )
    assert summary["steps"] == step + 2
    assert [r["step"] for r in cli.read_metrics(str(out_dir / "metrics.jsonl"))][-3:] == [step, step + 1, step + 2]


# --- evaluate


class _CentroidModel(torch.nn.Module):
    """Hand-built TwoRoom world model: z = the agent's (x, y) in 224-px units (colour-blind chroma centroid) and
    z_pred = z + 5 px x the block's five clipped raw actions, the env's own motion away from walls."""

    def __init__(self, stats: dict, img_size: int):
        super().__init__()
        self.cfg = dataclasses.replace(PRESETS["tiny"], action_dim=10)
        self.mean, self.std = torch.tensor(stats["mean"]), torch.tensor(stats["std"])
        self.centres = (torch.arange(img_size) + 0.5) * (224 / img_size) - 0.5  # pixel centres, as the renderer

    def preprocess(self, frames):
        return torch.as_tensor(frames).float()  # (..., H, W, 3)

    def encode(self, pixels):
        chroma = pixels.amax(-1) - pixels.amin(-1)  # (B, T, H, W): the blob, red or blue; walls and floor are grey
        w = chroma / chroma.sum((-2, -1), keepdim=True)
        return torch.stack([(w * self.centres).sum((-2, -1)), (w * self.centres[:, None]).sum((-2, -1))], -1)

    def predict(self, z, actions):
        raw = actions.view(*actions.shape[:2], 5, 2).double() * self.std + self.mean  # (B, T, 5, 2) raw actions
        return z + 5 * raw.clamp(-1, 1).sum(2).float()  # (B, T, 2)

    def rollout(self, z0, actions):
        b, s, n, a = actions.shape  # z0 (B, 1, 2) -> (B, S, 1 + N, 2): start, then one prediction per block
        z = z0.expand(b, s, 2).reshape(b * s, 1, 2)
        zs = [z]
        for k in range(n):
            zs.append(self.predict(zs[-1], actions[:, :, k].reshape(b * s, 1, a)))
        return torch.cat(zs, 1).view(b, s, n + 1, 2)


class _BlindModel(_CentroidModel):
    """The same encoder with a predictor that ignores the actions: the next embedding is the current one."""

    def predict(self, z, actions):
        return z.clone()


def _centroid_world(path, model_cls=_CentroidModel) -> "evaluate.World":
    traj = data.Trajectories(path)
    eps = np.arange(traj.num_episodes)
    stats = data.action_stats(traj, eps)
    return evaluate.World(
        model=model_cls(stats, 32),
        stats=stats,
        traj=traj,
        train_eps=eps,
        val_eps=eps,
        env="tworoom",
        frameskip=5,
        action_dim=2,
        img_size=32,
        device=torch.device("cpu"),
        source="hand-built",
    )


def test_eval_line_chart_png_size_colours_and_direction(tmp_path):
    """line_chart writes a PNG of the requested size, draws every series in its colour, and a rising line rises."""
    xs = list(range(11))  # the x axis then spans exactly 0..10
    series = {"up": (xs, [x * x for x in xs]), "down": (xs, [100.0 - 8 * x for x in xs[:-1]] + [float("nan")])}
    series["one"] = ([5.0], [60.0])
    out = tmp_path / "charts" / "chart.png"
    img = charts.line_chart(series, title="T", xlabel="x", ylabel="y", out_png=str(out), width=500, height=300)
    raw = out.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR" and img.shape == (300, 500, 3)
    assert int.from_bytes(raw[16:20], "big") == 500 and int.from_bytes(raw[20:24], "big") == 300
    for i, name in enumerate(series):
        assert (img == charts.PALETTE[i]).all(-1).sum() > (20 if name == "one" else 200), name
    for i, sign in ((0, 1), (1, -1)):  # the median row (robust to the legend swatch) of each third of the plot
        rows, cols = np.nonzero((img == charts.PALETTE[i]).all(-1))
        left, right = np.median(rows[cols < 64 + 140]), np.median(rows[cols > 500 - 16 - 140])
        assert sign * (left - right) > 50  # row indices grow downwards: rising means a smaller row on the right
    log = charts.line_chart(
        {"a": ([1, 2, 3], [0.01, 0.1, 1.0])}, title="", xlabel="", ylabel="", out_png="", log_y=True
    )
    assert log.shape == (400, 640, 3) and (log == charts.PALETTE[0]).all(-1).any()


def test_eval_draw_text_distinct_glyphs_and_unknown_chars():
    """draw_text gives different characters different pixels, scales them, and draws unknown ones as a box."""

    def render(text, scale=1):
        return charts.draw_text(np.zeros((20, 60, 3), np.uint8), 1, 1, text, 255, scale)

    assert not np.array_equal(render("0"), render("8")) and not np.array_equal(render("a"), render("A"))
    assert render("0").any() and not render(" ").any()
    assert (render("8", 2) > 0).sum() == 4 * (render("8") > 0).sum()
    assert np.array_equal(render("\u2603"), render("\u00e9")) and render("\u2603").any()
    charts.draw_text(np.zeros((5, 5, 3), np.uint8), -3, 2, "clipped ×", (1, 2, 3))  # off the canvas: no error


def test_eval_episode_strip_layout_and_labels():
    """episode_strip upscales to >= 128 px, puts each picked observation beside the goal, labels every pair, and
    stack_sheets keeps each sheet's pixels."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(12)]  # steps 0..11
    goal = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    sheet = charts.episode_strip(frames, goal, "title", every=5, per_row=2)  # steps 0, 5, 10, 11
    w, gap, pad, label_h, title_h = 128, 4, 16, 11, 22
    assert sheet.shape == (title_h + 2 * (label_h + w) + pad, 2 * (2 * w + gap) + pad, 3)
    for k, t in enumerate([0, 5, 10, 11]):
        r, c = divmod(k, 2)
        y, x = title_h + r * (label_h + w + pad) + label_h, c * (2 * w + gap + pad)
        assert np.array_equal(sheet[y : y + w, x : x + w], frames[t].repeat(4, 0).repeat(4, 1))
        assert np.array_equal(sheet[y : y + w, x + w + gap : x + 2 * w + gap], goal.repeat(4, 0).repeat(4, 1))
        assert (sheet[y - label_h : y, x : x + w] < 255).any()  # the "step t" label
    assert (sheet[:title_h] < 255).any()
    other = np.zeros((10, 5, 3), np.uint8)
    both = charts.stack_sheets([sheet, other], gap=3)
    assert both.shape == (sheet.shape[0] + 13, sheet.shape[1], 3)
    assert np.array_equal(both[: sheet.shape[0]], sheet) and not both[sheet.shape[0] + 3 :, :5].any()


def test_eval_plot_metrics_png_skips_torn_lines(tmp_path):
    """plot_metrics_png writes a PNG of both loss charts side by side from a metrics.jsonl with a torn last line."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "pred_loss": 1.0 / s, "sigreg_loss": 5.0 / s, "lr": 1e-3} for s in range(1, 30)]
    rows[-1].update(val_pred_loss=0.05, val_sigreg_loss=0.2)
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n\n{"step": 30, "pred_lo')
    img = charts.plot_metrics_png(str(path), str(tmp_path / "out" / "metrics.png"))
    raw = (tmp_path / "out" / "metrics.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and img.shape == (400, 1280, 3)
    assert all((half == charts.PALETTE[0]).all(-1).sum() > 100 for half in (img[:, :640], img[:, 640:]))


def test_eval_success_curve_minutes_from_logged_step_times(tmp_path):
    """success_curve reads the step from ckpt_<step>.pt (the final ckpt.pt is the last logged step), sums the logged
    step times up to it, sorts the points by minutes, takes one log per run for several runs, and refuses a step
    past the log."""
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "ms_per_step": 600.0 if s <= 100 else 300.0} for s in range(50, 301, 50)]
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    plans = []
    for name, rate in (("ckpt.pt", 0.6), ("ckpt_100.pt", 0.2), ("ckpt_200.pt", 0.4)):
        res = {"env": "tworoom", "checkpoint": f"runs/x/{name}", "success_rate": rate, "successes": int(50 * rate)}
        res.update(episodes=50, ci95=[rate - 0.1, rate + 0.1], success_rate_unsolved_at_start=rate)
        plans.append(tmp_path / f"{name}.json")
        plans[-1].write_text(json.dumps(res))
    rand = tmp_path / "random.json"
    rand.write_text(json.dumps({"success_rate": 0.1}))
    out = analyses.success_curve([str(p) for p in plans], str(metrics), str(tmp_path / "c.png"), random_json=str(rand))
    assert [p["step"] for p in out["points"]] == [100, 200, 300]
    # 100 steps at 0.6 s = 1 min, then 100 more at 0.3 s = 0.5 min each
    assert [p["train_minutes"] for p in out["points"]] == [1.0, 1.5, 2.0]
    assert [p["success_rate"] for p in out["points"]] == [0.2, 0.4, 0.6] and out["random_success_rate"] == 0.1
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    short = tmp_path / "short.jsonl"  # a second, shorter run: one metrics file per plan file
    short.write_text(json.dumps({"step": 100, "ms_per_step": 300.0}) + "\n")
    two = analyses.success_curve([str(plans[0]), str(plans[0])], [str(metrics), str(short)], str(tmp_path / "e.png"))
    assert [(p["step"], p["train_minutes"]) for p in two["points"]] == [(100, 0.5), (300, 2.0)]
    with pytest.raises(cli.UsageError, match="2 plan files but 1 metrics"):
        analyses.success_curve([str(plans[0])] * 2, [str(metrics)], str(tmp_path / "f.png"))
    late = json.loads(plans[1].read_text()) | {"checkpoint": "runs/x/ckpt_400.pt"}
    plans[1].write_text(json.dumps(late))
    with pytest.raises(cli.UsageError, match="past the last step"):
        analyses.success_curve([str(plans[1])], str(metrics), str(tmp_path / "d.png"))


def test_eval_surprise_teleport_spikes_on_position_tracking_model(tiny_tworoom):
    """A model tracking the agent exactly: surprise ~0 on real steps, huge at teleports, blind to recolouring."""
    world = _centroid_world(tiny_tworoom)
    out = analyses.measure_surprise(world, episodes=6, steps=4, seed=0)
    res = out["results"]
    assert out["episodes"] == 6 and out["perturbed_steps"] == 24
    # Frames, action blocks and targets aligned as in training: the exact dynamics predict real steps to < 1 px.
    assert np.median(out["example"]["surprise"]) < 1.0
    assert res["teleport"]["perturbed"] > 100 * res["teleport"]["unperturbed"]
    assert res["teleport"]["p_value"] == 1 / 64  # exact sign-flip test: all 6 episode differences positive
    # A colour-blind position model cannot see a colour change; a re-render of the recorded state is the recording.
    assert abs(res["colour"]["perturbed"] - res["colour"]["original_same_steps"]) < 1.0
    assert res["colour"]["pixel_change"] > 0 and res["rerender"]["pixel_change"] == 0
    assert res["rerender"]["perturbed"] == pytest.approx(res["rerender"]["original_same_steps"], rel=1e-6)


def test_eval_diagnose_ranks_true_actions_first_for_exact_model(tiny_tworoom, tmp_path):
    """diagnose: an exact model ranks the recorded actions first (median rank 0) and moves with them; with each
    pair's recorded actions swapped for others from the dataset it ranks them near chance; a blind model is at
    chance exactly."""
    world = _centroid_world(tiny_tworoom)
    rows = evaluate.start_rows(world.traj, world.val_eps, 24, 25, seed=0)
    exact = analyses.action_ranking(world, rows, horizon=5, samples=64, seed=0)
    assert exact["median_rank"] == 0 and exact["top10"] >= 0.8, exact
    assert exact["sensitivity_1"] > 0.5 and exact["rollout_error_1"] < 0.3, exact
    shuffled = str(tmp_path / "shuffled.h5")  # the same frames, the finite action rows permuted
    shutil.copy(tiny_tworoom, shuffled)
    with h5py.File(shuffled, "a") as f:
        action = f["action"][()]
        finite = np.flatnonzero(np.isfinite(action).all(1))
        action[finite] = action[np.random.default_rng(0).permutation(finite)]
        f["action"][...] = action
    wrong = analyses.action_ranking(_centroid_world(shuffled), rows, horizon=5, samples=64, seed=0)
    assert wrong["median_rank"] > 0.3 and wrong["top10"] < 0.3, wrong
    blind = analyses.action_ranking(_centroid_world(tiny_tworoom, _BlindModel), rows, horizon=5, samples=64, seed=0)
    assert blind["median_rank"] == 0.5 and blind["top10"] == 0.0 and blind["sensitivity_1"] == 0.0, blind


def test_eval_diagnose_never_uses_evaluation_episodes(tiny_tworoom):
    """diagnose draws from held-out episodes minus those holding an evaluation start row (the plan command's draw)."""
    world = _centroid_world(tiny_tworoom)
    kept = analyses.diagnose_episodes(world, eval_pairs=2, goal_offset=25)
    eval_rows = evaluate.start_rows(world.traj, world.val_eps, 2, 25, evaluate.EvalConfig.seed)
    eval_eps = np.searchsorted(world.traj.ep_offset, eval_rows, side="right") - 1
    assert len(kept) > 0 and not set(kept) & set(eval_eps) and set(kept) | set(eval_eps) == set(world.val_eps)
    with pytest.raises(ValueError, match="evaluation pairs"):
        analyses.diagnose_episodes(world, eval_pairs=50, goal_offset=25)
    one = dataclasses.replace(world, val_eps=world.val_eps[:1])  # the probes need 2 episodes: one line, no traceback
    with pytest.raises(cli.UsageError, match="needs 2"):
        analyses.diagnose_episodes(one, eval_pairs=0, goal_offset=25)


def test_eval_diagnose_cli_writes_json(tmp_path, tiny_pusht):
    """`evaluate.py diagnose` on a tiny checkpoint writes per-pair ranks with their median and top-10 share, finite
    ratios, a probe r per quantity, the plan anatomy and the capacity check."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    argv = [
        "diagnose",
        "--ckpt",
        ckpt,
        "--pairs",
        "6",
        "--samples",
        "16",
        "--frames",
        "400",
        "--eval_pairs",
        "0",
        "--anatomy_pairs",
        "2",
        "--capacity_steps",
        "3",
        "--iterations",
        "2",
        "--topk",
        "4",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "d.json"),
    ]
    res = evaluate.main(evaluate.parse_args(argv))
    with open(tmp_path / "d.json") as f:
        saved = json.load(f)
    assert saved["pairs"] == len(saved["ranks"]) == 6 and saved["samples"] == 16
    ranks = np.array(saved["ranks"])  # the summary figures are those of the per-pair ranks saved beside them
    assert saved["ranking"]["median_rank"] == np.median(ranks) and saved["ranking"]["top10"] == np.mean(ranks < 0.1)
    assert all(np.isfinite(v) for v in saved["ranking"].values())
    assert set(saved["probe_linear_r"]) == {"agent_pos", "block_pos", "block_angle"}
    assert set(saved["probe_linear_median_error"]) == set(saved["probe_linear_r"]) == set(saved["capacity"]["r"])
    assert saved["anatomy"]["pairs"] == 2 and set(saved["anatomy"]["cem"]["final_errors_median"]) == {
        "agent_px",
        "block_px",
        "joint_px",
        "angle_deg",
    }
    assert saved["capacity"]["steps"] == 3 and saved["capacity"]["units"]["block_angle"] == "deg"
    assert res["ranking"] == saved["ranking"]


@pytest.mark.parametrize("name", list(envs.REGISTRY))
def test_env_error_parts_decide_the_success_test(name):
    """Each env's error parts, against their thresholds, reproduce its success test on random state pairs."""
    spec = envs.REGISTRY[name]
    env = envs.make_env(name, img_size=32)
    rng = np.random.default_rng(0)
    agree = []
    for i in range(40):
        _, a = env.reset(seed=2 * i)
        _, b = env.reset(seed=2 * i + 1)
        s, g = a["state"], spec.goal_from_state(b["state"])
        if i % 2:  # half the pairs near the goal, so both outcomes occur
            g = spec.goal_from_state(np.asarray(s) + rng.normal(0, 1e-2, np.shape(s)) * (i % 4 == 1))
        e = spec.errors(s, g)
        by_parts = {
            "pusht": lambda e: e["joint_px"] < 20 and e["angle_deg"] < 20,
            "tworoom": lambda e: e["distance_px"] < 16,
            "reacher": lambda e: e["shoulder_rad"] < 0.05 and e["wrist_rad"] < 0.05,
            "cube": lambda e: e["distance_m"] <= 0.04,
        }[name](e)
        agree.append(by_parts == spec.success(s, g))
        tested = {"pusht": e.get("joint_px"), "reacher": math.hypot(*e.values())}.get(name, next(iter(e.values())))
        assert np.isclose(spec.goal_distance(s, g), tested)
    assert all(agree)
    env.close()


def test_eval_plan_json_splits_errors_and_records_closest_approach(tmp_path, tiny_tworoom):
    """The plan JSON holds each episode's final error parts and its closest approach, consistent with the distances."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_tworoom, "tworoom")
    res = evaluate.main(_eval_cfg(ckpt, tmp_path, episodes=2, policy="random"))
    for r in res["per_episode"]:
        assert set(r["final_errors"]) == {"distance_px"} == set(r["closest_errors"]) == set(r["start_errors"])
        assert np.isclose(r["final_errors"]["distance_px"], r["final_distance"])
        assert np.isclose(r["start_errors"]["distance_px"], r["start_distance"])
        assert np.isclose(r["closest_errors"]["distance_px"], r["closest_distance"])
        assert r["closest_distance"] <= min(r["start_distance"], r["final_distance"])
        assert 0 <= r["closest_step"] <= 50


def test_eval_anatomy_exact_model_is_not_exploited(tiny_tworoom):
    """Plan anatomy: replayed true actions reach the goal; for an exact model the predicted cost of CEM's plans and
    of zero actions equals the realised cost, while a blind model's CEM plan is predicted far better than it does."""
    world = _centroid_world(tiny_tworoom)
    cfg = evaluate.EvalConfig(samples=64, iterations=6, topk=8, device="cpu")
    rows = evaluate.start_rows(world.traj, world.val_eps, 6, 25, seed=1)
    exact = analyses.plan_anatomy(world, cfg, rows)
    assert exact["true"]["success"] == 1.0 and exact["true"]["final_errors_median"]["distance_px"] < 2
    zero = exact["zero"]
    assert np.isclose(zero["predicted_cost_median"], zero["realised_cost_median"], rtol=0.05)
    gap = [abs(p["predicted_cost"] - p["realised_cost"]) for p in exact["cem"]["per_pair"]]
    assert np.median(gap) < 0.1 * zero["realised_cost_median"], exact["cem"]
    blind = analyses.plan_anatomy(_centroid_world(tiny_tworoom, _BlindModel), cfg, rows)
    assert blind["cem"]["predicted_cost_median"] == blind["zero"]["predicted_cost_median"]  # actions do nothing
    assert exact["data_abs_action_p99"] == blind["data_abs_action_p99"] and len(exact["cem"]["abs_action_p99"]) == 2


def test_eval_encoder_capacity_learns_and_is_seeded(tiny_tworoom):
    """The capacity check's fresh encoder learns TwoRoom's agent position from the frames it is trained on (an
    untrained one scores r ~ 0), and a seed fixes its result."""
    world = _centroid_world(tiny_tworoom)
    eps = world.val_eps[:4]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fast for a model this small
    try:
        fit = analyses.encoder_capacity(world, eps, eps, steps=300, seed=0)
        a = analyses.encoder_capacity(world, eps, world.val_eps[4:], steps=10, seed=3)
        b = analyses.encoder_capacity(world, eps, world.val_eps[4:], steps=10, seed=3)
    finally:
        torch.set_num_threads(threads)
    assert fit["r"]["agent_pos"] > 0.3 and fit["units"] == {"agent_pos": "px"} and fit["tokens"] == 16, fit
    assert a["r"] == b["r"] and a["median_error"] == b["median_error"]


def test_capacity_command_before_training(tiny_tworoom, tmp_path):
    """`python analyses.py capacity` trains the chosen encoder shape on a dataset without any checkpoint, writes
    its figures, and refuses frames smaller than the image size in one line, before any work."""
    out = tmp_path / "cap.json"
    cfg = analyses.parse_capacity_args(
        [
            "capacity",
            "--env",
            "tworoom",
            "--data",
            tiny_tworoom,
            "--preset",
            "tiny",
            "--patch_size",
            "4",
            "--enc_depth",
            "1",
        ]
        + ["--steps", "3", "--val_fraction", "0.34", "--device", "cpu", "--out", str(out)]
    )
    analyses.run_capacity(cfg)
    saved = json.loads(out.read_text())
    assert (saved["img_size"], saved["patch_size"], saved["tokens"], saved["steps"]) == (32, 4, 64, 3)
    assert saved["enc_depth"] == 1 and saved["config"]["enc_depth"] == 1
    assert set(saved["r"]) == {"agent_pos"} and saved["units"] == {"agent_pos": "px"}
    res = subprocess.run(
        [sys.executable, "analyses.py", "capacity", "--env", "tworoom", "--data", tiny_tworoom, "--img_size", "64"],
        check=False,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    assert res.returncode == 2 and "32 px frames, smaller than --img_size 64" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_eval_probe_errors_in_success_units():
    """probe_errors: distances for positions, wrapped angles for (sin, cos) targets in the env's unit."""
    ang = np.array([[0.1], [3.1]])
    y = {
        "agent_pos": np.array([[0.0, 0.0], [10.0, 10.0]]),
        "block_pos": np.zeros((2, 2)),
        "block_angle": np.concatenate([np.sin(ang), np.cos(ang)], 1),
    }
    pred_ang = ang + np.array([[0.2], [-0.2]])  # 0.2 rad off each, one wrapping past pi
    pred = np.concatenate([y["agent_pos"] + [3.0, 4.0], np.zeros((2, 2)), np.sin(pred_ang), np.cos(pred_ang)], 1)
    err = analyses.probe_errors(pred, y, "pusht")
    assert np.isclose(err["agent_pos"], 5.0) and err["block_pos"] == 0.0
    assert np.isclose(err["block_angle"], np.degrees(0.2))


def test_eval_surprise_cli_reports_finite_numbers(tmp_path, tiny_pusht):
    """`evaluate.py surprise` runs on a tiny checkpoint and writes finite surprise, ratio and p for every kind."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    argv = ["surprise", "--ckpt", ckpt, "--perturb_steps", "2", "--device", "cpu", "--out", str(tmp_path / "s.json")]
    res = evaluate.main(evaluate.parse_args(argv))
    with open(tmp_path / "s.json") as f:
        saved = json.load(f)
    assert set(saved["results"]) == {"teleport", "colour", "rerender"} and saved["episodes"] == res["episodes"] > 0
    for r in saved["results"].values():
        for key in ("perturbed", "original_same_steps", "unperturbed", "ratio", "p_value", "pixel_change"):
            assert np.isfinite(r[key]), key
        assert 0 < r["p_value"] <= 1
    # Re-renders of recorded PushT states match the recordings up to contact-solver nudges of a few grey levels.
    changes = {k: r["pixel_change"] for k, r in saved["results"].items()}
    assert changes["teleport"] > changes["colour"] > 10 * changes["rerender"]


def test_eval_probe_cli_reports_finite_scores(tmp_path, tiny_pusht):
    """`evaluate.py probe` writes finite linear and MLP probe scores of every PushT quantity for the trained model
    and its fresh-init floor (what r a probe reaches is test_eval_probe_reaches_known_r_on_synthetic_relations')."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    argv = ["probe", "--ckpt", ckpt, "--frames", "200", "--probe_epochs", "2", "--device", "cpu"]
    res = evaluate.main(evaluate.parse_args(argv + ["--out", str(tmp_path / "p.json")]))
    with open(tmp_path / "p.json") as f:
        saved = json.load(f)
    assert saved["frames"] == {"train": 200, "val": 50} and saved["quantities"]["block_angle"] == "sin, cos"
    for label in ("trained", "untrained"):
        assert set(saved["results"][label]) == {"agent_pos", "block_pos", "block_angle"}
        for scores in saved["results"][label].values():
            for probe in ("linear", "mlp"):
                assert np.isfinite(scores[probe]["mse"]) and np.isfinite(scores[probe]["r"])
    assert res["results"] == saved["results"]


def test_eval_probe_reaches_known_r_on_synthetic_relations():
    """On held-out rows of synthetic embeddings the probes reach the r the data allow: ~1 for an exact linear
    relation, 1/sqrt(1 + 0.5^2) = 0.894 for a unit-variance linear signal plus noise of sd 0.5, ~0 for pure noise."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3000, 24)) * rng.uniform(0.1, 10, 24) + rng.normal(size=24)  # (N, D), uneven scales
    y = z @ rng.normal(size=(24, 3)) + rng.normal(size=3)  # (N, 3)
    exact = analyses.probe_model(z[:2000], z[2000:], {"q": y[:2000]}, {"q": y[2000:]}, epochs=1, seed=0)["q"]
    assert exact["linear"]["mse"] < 1e-6 and exact["linear"]["r"] > 1 - 1e-6
    y = (y - y.mean(0)) / y.std(0) + 0.5 * rng.normal(size=y.shape)  # r = 1 / sqrt(1 + 0.25) for a perfect fit
    noisy = analyses.probe_model(z[:2000], z[2000:], {"q": y[:2000]}, {"q": y[2000:]}, epochs=5, seed=0)["q"]
    assert abs(noisy["linear"]["r"] - 1 / math.sqrt(1.25)) < 0.02 and noisy["mlp"]["r"] > 0.7, noisy
    y = rng.normal(size=(3000, 2))
    noise = analyses.probe_model(z[:2000], z[2000:], {"q": y[:2000]}, {"q": y[2000:]}, epochs=5, seed=0)["q"]
    for probe in ("linear", "mlp"):
        assert abs(noise[probe]["r"]) < 0.05 and noise[probe]["mse"] > 0.95, noise


def test_eval_plan_end_to_end_writes_json(tmp_path, tiny_pusht, capsys):
    """The default CLI subcommand runs batched CEM MPC from held-out starts and writes every required JSON field."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    argv = [
        "--ckpt",
        ckpt,
        "--episodes",
        "3",
        "--samples",
        "16",
        "--iterations",
        "2",
        "--topk",
        "4",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "r.json"),
        "--video",
        str(tmp_path / "gifs"),
    ]
    cfg = evaluate.parse_args(argv)
    assert cfg.command == "plan" and evaluate.parse_args(["plan", *argv]) == cfg
    res = evaluate.main(cfg)
    with open(tmp_path / "r.json") as f:
        saved = json.load(f)
    for key in (
        "success_rate",
        "ci95",
        "episodes",
        "successes",
        "mean_plan_seconds",
        "seconds_per_call",
        "planner",
        "policy",
        "split",
        "env",
        "checkpoint",
        "per_episode",
        "solved_at_start",
    ):
        assert key in saved, key
    assert saved["episodes"] == 3 and saved["policy"] == "planner" and saved["split"] == "val"
    assert saved["planner"]["solver"] == "cem" and saved["planner"]["samples"] == 16
    assert 0 <= saved["ci95"][0] <= saved["success_rate"] <= saved["ci95"][1] <= 1
    assert saved["mean_plan_seconds"] > 0
    # Budget 50, plans of 25 raw steps: a first call for all episodes at step 0, a second at step 25 for the rest.
    assert saved["plan_calls"][0] == {**saved["plan_calls"][0], "step": 0, "episodes": 3}
    assert all(c["step"] in (0, 25) for c in saved["plan_calls"]) and len(saved["plan_calls"]) <= 2
    traj = data.Trajectories(tiny_pusht)
    val = set(load_checkpoint(ckpt)["val_episodes"])
    for r in saved["per_episode"]:
        assert r["episode"] in val and r["start_step"] + 25 <= traj.ep_len[r["episode"]] - 1
        assert r["success"] == (r["first_success_step"] > 0) and np.isfinite(r["final_distance"])
    assert res["successes"] == sum(r["success"] for r in saved["per_episode"])
    # One filmstrip per episode, named by outcome, and summary.png: every 5th frame, 32 px upscaled to 128.
    strips = sorted(f for f in os.listdir(tmp_path / "gifs") if f.startswith("episode_") and f.endswith(".png"))
    assert len(strips) == 3 and os.path.exists(tmp_path / "gifs" / "summary.png")
    for r, name in zip(saved["per_episode"], strips):
        assert name.endswith("_ok.png" if r["success"] else "_fail.png")
    with open(tmp_path / "gifs" / strips[0], "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if not saved["per_episode"][0]["success"]:  # a full 50-step episode: 11 pairs, 4 per row, in 3 rows
        assert (width, height) == (4 * (2 * 128 + 4) + 3 * 16, 22 + 3 * (11 + 128) + 2 * 16)
    gifs = [f for f in os.listdir(tmp_path / "gifs") if f.endswith(".gif")]
    assert len(gifs) == 3 or "need Pillow or imageio" in capsys.readouterr().out


def test_eval_summary_shows_a_planned_success_and_the_first_failure():
    """summary.png's success is the first one that was not already solved at the start; with none such, the first
    success; the failure is the first failure, whatever the order of the two."""

    def eps(*outcomes):  # "s": solved at start, "p": success by planning, "f": failure
        return [{"success": o != "f", "solved_at_start": o == "s"} for o in outcomes]

    assert charts.summary_picks(eps("f", "s", "s", "p", "f")) == [3, 0]
    assert charts.summary_picks(eps("s", "f", "s")) == [0, 1]
    assert charts.summary_picks(eps("p", "f")) == [0, 1]
    assert charts.summary_picks(eps("f", "f")) == [0]
    assert charts.summary_picks(eps("s", "p")) == [1]


def test_eval_start_rows_held_out_and_seeded(tiny_pusht):
    """Start rows come only from the given episodes, leave room for the goal 25 steps later, and follow rng(42)."""
    traj = data.Trajectories(tiny_pusht)
    eps = np.array([1, 4])
    rows = evaluate.start_rows(traj, eps, 20, 25, seed=42)
    valid = np.concatenate([traj.ep_offset[e] + np.arange(traj.ep_len[e] - 25) for e in eps])
    assert np.array_equal(rows, np.sort(valid[np.random.default_rng(42).choice(len(valid), 20, replace=False)]))
    ep = np.searchsorted(traj.ep_offset, rows, side="right") - 1
    assert set(ep) <= set(eps) and (rows + 25 < traj.ep_offset[ep] + traj.ep_len[ep]).all()
    with pytest.raises(ValueError, match="valid start rows"):
        evaluate.start_rows(traj, eps, len(valid) + 1, 25, seed=42)


def test_eval_random_policy_matches_independent_replay(tmp_path, tiny_tworoom):
    """Random-policy outcomes equal a hand replay of the protocol (dataset start, goal state 25 rows later, freeze);
    another planner seed keeps the pairs and draws from seed + 1000 * planner_seed + episode."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_tworoom, "tworoom")
    traj = data.Trajectories(tiny_tworoom)
    state = traj.cache("state")
    runs = {}
    for planner_seed in (0, 1):
        res = evaluate.main(
            _eval_cfg(ckpt, tmp_path, policy="random", episodes=8, split="train", budget=30, planner_seed=planner_seed)
        )
        for r in res["per_episode"]:
            row = traj.ep_offset[r["episode"]] + r["start_step"]
            env = envs.make_env("tworoom", img_size=32)
            _, info = env.reset(seed=42 + r["index"], options={"state": state[row], "goal_state": state[row + 25]})
            assert r["solved_at_start"] == envs.success("tworoom", state[row], state[row + 25]) == info["is_success"]
            rng, first = np.random.default_rng(42 + 1000 * planner_seed + r["index"]), -1
            for t in range(30):
                if env.step(rng.uniform(-1, 1, 2).astype(np.float32))[2]:
                    first = t + 1
                    break
            assert (r["success"], r["first_success_step"]) == (first > 0, first)
        assert res["solved_at_start"] == np.mean([r["solved_at_start"] for r in res["per_episode"]])
        others = [r["success"] for r in res["per_episode"] if not r["solved_at_start"]]
        assert res["success_rate_unsolved_at_start"] == (np.mean(others) if others else None)
        runs[planner_seed] = [(r["episode"], r["start_step"]) for r in res["per_episode"]]
    assert runs[0] == runs[1]
    # A zero budget would never step an env, so every episode would fail: it is refused before any work.
    with pytest.raises(cli.UsageError, match="--budget 0"):
        evaluate.main(_eval_cfg(ckpt, tmp_path, policy="random", episodes=8, split="train", budget=0))


def test_eval_plan_chunk_does_not_change_the_plans(tmp_path, tiny_tworoom):
    """Planning the episodes in calls of 1, 3 or all of them gives the same outcome for every episode, to the
    last bit of its final distance: each episode draws from its own generator."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_tworoom, "tworoom")
    runs = {}
    for chunk in (0, 1, 3):
        res = evaluate.main(_eval_cfg(ckpt, tmp_path, episodes=5, split="train", budget=12, plan_chunk=chunk))
        assert res["planner"]["plan_chunk"] == chunk
        runs[chunk] = [(r["success"], r["first_success_step"], r["final_distance"]) for r in res["per_episode"]]
    assert runs[1] == runs[0] == runs[3]
    assert evaluate.chunk_size(_eval_cfg(ckpt, tmp_path), torch.device("cpu")) == evaluate.CPU_PLAN_CHUNK
    assert evaluate.chunk_size(_eval_cfg(ckpt, tmp_path), torch.device("cuda")) == 0


def test_eval_bf16_warns_only_where_emulated(tmp_path, tiny_tworoom, monkeypatch, capsys):
    """--bf16 planning says in one line that the rollout is emulated where the device lacks native bf16, and
    says nothing where it has it."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_tworoom, "tworoom")
    for native in (False, True):
        monkeypatch.setattr(evaluate, "native_bf16", lambda device, native=native: native)
        evaluate.main(_eval_cfg(ckpt, tmp_path, bf16=True, episodes=2, split="train", budget=5))
        assert ("rollout is emulated" in capsys.readouterr().out) is not native


def test_eval_load_world_errors(tmp_path, tiny_pusht):
    """load_world names the problem: missing checkpoint, env mismatch, action dim mismatch, no model source."""
    with pytest.raises(cli.UsageError, match="not found"):
        evaluate.load_world(_eval_cfg(str(tmp_path / "nope.pt"), tmp_path))
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    with pytest.raises(ValueError, match="does not match"):
        evaluate.load_world(_eval_cfg(ckpt, tmp_path, env="cube"))
    bad = _eval_ckpt(tmp_path / "bad.pt", tiny_pusht, "pusht", block_dims=25)
    with pytest.raises(ValueError, match="action blocks"):
        evaluate.load_world(_eval_cfg(bad, tmp_path))
    with pytest.raises(ValueError, match="exactly one"):
        evaluate.load_world(_eval_cfg("", tmp_path))
    world = evaluate.load_world(_eval_cfg(ckpt, tmp_path))
    assert not world.model.training and world.action_dim == 2 and world.frameskip == 5 and world.img_size == 32
    assert set(world.train_eps).isdisjoint(world.val_eps) and len(world.train_eps) + len(world.val_eps) == 6


def test_eval_released_model_on_own_simulator_data(tmp_path, monkeypatch, capsys):
    """--official hf:owner/name (or a folder) with --env and no --data collects our simulator's data at the model's
    image size into data/<env>_<img>px_<N>ep.h5 once, evaluates on it and records the data source."""
    model = randomise(tiny_model(), seed=4).eval()  # 32 px: the image size comes from the model, never 224
    offline_hub_cache(tmp_path, monkeypatch, model)
    monkeypatch.chdir(tmp_path)
    cfg = evaluate.EvalConfig(
        official=("hf:someone/lewm-tiny",),
        env="tworoom",
        collect_episodes=10,
        episodes=2,
        budget=5,
        samples=8,
        iterations=1,
        topk=2,
        device="cpu",
        out=str(tmp_path / "r.json"),
    )
    res = evaluate.main(cfg)
    path = os.path.join("data", "tworoom_32px_10ep.h5")
    assert "collecting 10 episodes of our tworoom simulator at 32 px" in capsys.readouterr().out
    with data.Trajectories(path) as traj:
        assert traj.num_episodes == 10 and traj.img_shape == (32, 32, 3)
        assert str(traj.file.attrs["policy"]) == envs.REGISTRY["tworoom"].policy
        val = set(data.split_episodes(10)[1])
    with open(tmp_path / "r.json") as f:
        saved = json.load(f)
    assert saved["data"] == path and saved["data_source"].startswith("own simulator, collected by collect.collect")
    assert saved["checkpoint"] == "hf:someone/lewm-tiny" and res["episodes"] == 2
    assert all(r["episode"] in val for r in saved["per_episode"])
    # A folder of released files gives the same model; the data already on disk is reused, not collected again.
    folder = tmp_path / "released"
    export_official(model, str(folder))
    again = evaluate.main(dataclasses.replace(cfg, official=(str(folder),)))
    assert "collecting" not in capsys.readouterr().out and again["data"] == path
    assert [r["final_distance"] for r in again["per_episode"]] == [r["final_distance"] for r in res["per_episode"]]


def test_eval_released_model_source_errors_are_one_line(tmp_path, monkeypatch):
    """A bad --official, a missing huggingface_hub, or an uncached name offline is one UsageError line."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "released"
    export_official(randomise(tiny_model()), str(folder))
    os.remove(folder / "config.json")
    base = evaluate.EvalConfig(env="pusht", device="cpu", out=str(tmp_path / "r.json"))
    cases = [
        ((str(folder),), "the folder lacks config.json"),
        ((str(folder / "weights.pt"),), "give hf:owner/name"),
        (("a", "b", "c"), "give hf:owner/name"),
    ]
    for official, text in cases:
        with pytest.raises(cli.UsageError, match=re.escape(text)):
            evaluate.main(dataclasses.replace(base, official=official))
    with pytest.raises(cli.UsageError, match="--official needs --env"):
        evaluate.main(
            dataclasses.replace(base, official=(str(folder / "weights.pt"), str(folder / "weights.pt")), env="")
        )
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "huggingface_hub", None)  # import fails as if it were not installed
        with pytest.raises(cli.UsageError, match="needs huggingface_hub: pip install huggingface_hub") as e:
            evaluate.main(dataclasses.replace(base, official=("hf:someone/lewm-tiny",)))
        assert "\n" not in str(e.value)
    offline_hub_cache(tmp_path, monkeypatch, randomise(tiny_model()))
    with pytest.raises(cli.UsageError, match="cannot get 'someone/other' from the hub") as e:
        evaluate.main(dataclasses.replace(base, official=("hf:someone/other",)))
    assert "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "data")  # nothing collected for a model that did not load


def test_eval_adam_solver_and_wilson(tmp_path, tiny_pusht, tiny_tworoom):
    """The gradient solver runs under the same protocol, and on the exact TwoRoom model, whose planning cost is a
    quadratic of the actions (squared distance of the predicted position to the goal's), its plans cost under 1 %
    of the zero plan it starts from; the Wilson interval matches known values."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    res = evaluate.main(_eval_cfg(ckpt, tmp_path, solver="adam", episodes=2, samples=4, iterations=2, budget=10))
    assert res["planner"]["solver"] == "adam" and len(res["plan_calls"]) == 1 and res["episodes"] == 2
    world = _centroid_world(tiny_tworoom)
    pairs = evaluate.pairs_at(world, evaluate.start_rows(world.traj, world.val_eps, 4, 25, seed=0), 25)
    z0 = evaluate.encode_frames(world.model, pairs.start_frames, world.device)  # (B, 1, 2)
    z_goal = evaluate.encode_frames(world.model, pairs.goal_frames, world.device)[:, 0]  # (B, 2)
    cfg = evaluate.EvalConfig(solver="adam", samples=16, iterations=30, device="cpu")
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    plans = evaluate.plan_batch(world, cfg, pairs.start_frames, z_goal, gens, None)  # (B, N, A)
    cost = make_cost(world.model, z0, z_goal, False)
    with torch.no_grad():
        start, end = cost(torch.zeros_like(plans)[:, None])[:, 0], cost(plans[:, None])[:, 0]  # (B,) each
    assert (start > 100).all() and (end < 0.01 * start).all(), (start, end)
    lo, hi = evaluate.wilson(0, 50)
    assert lo == 0 and abs(hi - 0.0713) < 1e-3
    lo, hi = evaluate.wilson(25, 50)
    assert abs(lo - 0.3664) < 1e-3 and abs(hi - 0.6336) < 1e-3


@pytest.mark.slow
def test_fail_cli_errors_are_one_line_exit_2(tmp_path):
    """Case 7: a user error at the real command line is one line on stderr, exit code 2, no traceback."""
    for script, args, text in (
        ("evaluate.py", [], "exactly one of --ckpt"),
        ("train.py", ["--max_steps", "-5"], "--max_steps -5"),
        ("evaluate.py", ["--solver", "ADAM"], "--solver"),
        ("evaluate.py", ["--official", "a", "b", "c", "--env", "pusht"], "--official a b c"),
    ):
        res = subprocess.run(
            [sys.executable, os.path.join(REPO, script), *args],
            check=False,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 2 and text in res.stderr and "Traceback" not in res.stderr, res.stderr[-800:]
    assert os.listdir(tmp_path) == []


def test_fail_eval_bad_arguments_before_loading(tmp_path, tiny_pusht):
    """Cases 7, 8: evaluation refuses bad flags before loading anything; each subcommand takes only its own
    flags."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    for kw, text in (
        ({"episodes": 0}, "--episodes 0"),
        ({"iterations": 0}, "--iterations 0"),
        ({"budget": 0}, "--budget 0"),
        ({"out": str(tmp_path)}, "is a folder"),
        ({"solver": "ADAM"}, "--solver 'ADAM'"),
        ({"ckpt": ""}, "exactly one"),
        ({"ckpt": str(tmp_path / "x.pt")}, "no such file"),
        ({"official": (ckpt, ckpt)}, "exactly one"),
    ):
        with pytest.raises(cli.UsageError, match=re.escape(text)):
            evaluate.main(dataclasses.replace(_eval_cfg(ckpt, tmp_path), **kw))
    with pytest.raises(SystemExit):
        evaluate.parse_args(["probe", "--ckpt", ckpt, "--budget", "3"])  # a plan flag
    assert evaluate.parse_args(["surprise", "--ckpt", ckpt]).perturb_steps == 5


@pytest.mark.slow
def test_fail_eval_help_shows_each_subcommands_flags_and_defaults():
    """Case 9: `evaluate.py probe --help` run for real lists the probe's flags with their defaults, not plan's."""
    helps = subprocess.run(
        [sys.executable, os.path.join(REPO, "evaluate.py"), "probe", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    assert "--frames" in helps and "--budget" not in helps and "(default: 20000)" in helps


def test_fail_nonfinite_weights_refused_on_load(tmp_path, tiny_pusht):
    """Case 1: a checkpoint or a released file holding a NaN is refused on load; so are malformed released files."""
    model = randomise(tiny_model(action_dim=10))
    ckpt = load_checkpoint(_eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht"))
    ckpt["model"]["predictor.norm.weight"][0] = float("nan")
    save_checkpoint(str(tmp_path / "nan.pt"), ckpt)
    with pytest.raises(ValueError, match="non-finite"):
        model_from_checkpoint(load_checkpoint(str(tmp_path / "nan.pt")))
    with pytest.raises(cli.UsageError, match="non-finite"):
        evaluate.main(_eval_cfg(str(tmp_path / "nan.pt"), tmp_path))
    weights, config = export_official(model, tmp_path)
    good = Path(weights).read_bytes()
    state = torch.load(weights, weights_only=True)
    state["projector.net.0.weight"][0, 0] = float("inf")
    torch.save(state, weights)
    with pytest.raises(ValueError, match="non-finite"):
        load_official(weights, config)
    for content, text in ((good[: len(good) // 2], "not a readable weights file"), (None, "not a state dict")):
        if content is None:
            torch.save(torch.zeros(3), weights)
        else:
            Path(weights).write_bytes(content)
        with pytest.raises(ValueError, match=text):
            load_official(weights, config)
    Path(config).write_text("not json {")
    with pytest.raises(ValueError, match="not a JSON"):
        load_official(weights, config)


def test_fail_dataset_env_and_resume_mismatch(tmp_path, tiny_pusht, tiny_tworoom):
    """Case 3: a dataset of another env is refused by training and evaluation; a resumed run must keep its env,
    dataset and model config; case 5: a torn last metrics line is dropped on resume; case 6: an existing run folder
    is refused without --resume, a locked one always."""
    import fcntl

    with pytest.raises(cli.UsageError, match="holds pusht episodes"):
        train.main(tiny_cfg(tmp_path, tiny_pusht, env="tworoom"))
    with pytest.raises(cli.UsageError, match="holds tworoom episodes"):
        evaluate.load_world(_eval_cfg(_eval_ckpt(tmp_path / "c.pt", tiny_pusht, "pusht"), tmp_path, data=tiny_tworoom))
    train.main(tiny_cfg(tmp_path, tiny_pusht, max_steps=2, eval_every=100))
    with pytest.raises(cli.UsageError, match="already holds a run"):
        train.main(tiny_cfg(tmp_path, tiny_pusht, max_steps=2))
    for kw, text in (
        ({"env": "tworoom", "data": tiny_tworoom}, "is a pusht run"),
        ({"data": shutil.copy(tiny_pusht, tmp_path / "copy.h5")}, "was trained on"),
        ({"dropout": 0.3}, "another model config"),
    ):
        with pytest.raises(cli.UsageError, match=text):
            train.main(tiny_cfg(tmp_path, tiny_pusht, max_steps=4, resume=True, **kw))
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a kill in the middle of writing a row
    with open(tmp_path / "run" / ".lock") as f:  # another run holds the folder
        fcntl.flock(f, fcntl.LOCK_EX)
        with pytest.raises(cli.UsageError, match="in use by another run"):
            train.main(tiny_cfg(tmp_path, tiny_pusht, max_steps=4, resume=True))
    train.main(tiny_cfg(tmp_path, tiny_pusht, max_steps=4, eval_every=100, resume=True))
    assert [r["step"] for r in cli.read_metrics(str(tmp_path / "run" / "metrics.jsonl"))] == [1, 2, 3, 4]
    train.main(tiny_cfg(tmp_path, tiny_pusht, max_steps=1, eval_every=100, overwrite=True))
    assert load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 1


def test_fail_eval_finds_dataset_from_another_directory(tmp_path, tiny_pusht, monkeypatch):
    """Evaluation of a run trained with a relative --data works from another working directory (the checkpoint
    records the absolute path); a dataset that is gone gives a message saying to pass --data."""
    (tmp_path / "a" / "data").mkdir(parents=True)
    shutil.copy(tiny_pusht, tmp_path / "a" / "data" / "p.h5")
    monkeypatch.chdir(tmp_path / "a")
    train.main(tiny_cfg(tmp_path, "data/p.h5", max_steps=1, eval_every=100))
    monkeypatch.chdir(tmp_path)
    ckpt = str(tmp_path / "run" / "ckpt.pt")
    assert evaluate.load_world(_eval_cfg(ckpt, tmp_path)).traj.num_episodes == 6
    os.remove(tmp_path / "a" / "data" / "p.h5")
    with pytest.raises(cli.UsageError, match="pass --data"):
        evaluate.load_world(_eval_cfg(ckpt, tmp_path))


# --- bench


def _png_bytes(image: np.ndarray, filters: list[int]) -> bytes:
    """An RGB PNG whose row y is written with PNG filter filters[y] (0 none, 1 sub, 2 up, 3 average, 4 Paeth)."""
    import zlib

    h, w, _ = image.shape
    rows, prev = [], np.zeros(w * 3, np.int32)
    for y in range(h):
        cur, out = image[y].reshape(-1).astype(np.int32), []
        for x in range(w * 3):
            left, up, ul = (cur[x - 3] if x >= 3 else 0), prev[x], (prev[x - 3] if x >= 3 else 0)
            p = left + up - ul
            paeth = min((abs(p - left), 0, left), (abs(p - up), 1, up), (abs(p - ul), 2, ul))[2]
            pred = [0, left, up, (left + up) // 2, paeth][filters[y]]
            out.append((cur[x] - pred) & 255)
        rows.append(bytes([filters[y], *out]))
        prev = cur

    def chunk(kind, body):
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b"")
    )


def test_charts_load_png_undoes_every_filter(tmp_path):
    """load_png reads back envs.save_png output and rows written with each of the five PNG filters, exactly."""
    image = np.random.default_rng(0).integers(0, 256, (10, 7, 3), dtype=np.uint8)
    envs.save_png(str(tmp_path / "a.png"), image)
    np.testing.assert_array_equal(charts.load_png(str(tmp_path / "a.png")), image)
    (tmp_path / "b.png").write_bytes(_png_bytes(image, [0, 1, 2, 3, 4, 4, 3, 2, 1, 0]))
    np.testing.assert_array_equal(charts.load_png(str(tmp_path / "b.png")), image)
    (tmp_path / "c.png").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not a PNG"):
        charts.load_png(str(tmp_path / "c.png"))


def test_charts_compare_stacks_one_pairs_filmstrips_under_labels(tmp_path):
    """compare_episodes puts each folder's filmstrip of the pair, pixel for pixel, under a label band, one above
    another; a folder without that pair is named in one line, and the CLI writes the PNG."""
    rng = np.random.default_rng(0)
    strips = {}
    for name, success in (("cem", False), ("idm", True)):
        frames = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(11)]
        record = {"index": 3, "success": success, "first_success_step": 7 if success else None}
        charts.save_episode_pictures(str(tmp_path / name), "cube", [frames], [frames[-1]], [record])
        strips[name] = charts.load_png(str(tmp_path / name / f"episode_003_{'ok' if success else 'fail'}.png"))
    sheet = charts.compare_episodes([str(tmp_path / "cem"), str(tmp_path / "idm")], ["CEM", "policy"], 3)
    h = strips["cem"].shape[0]
    np.testing.assert_array_equal(sheet[22 : 22 + h, : strips["cem"].shape[1]], strips["cem"])
    np.testing.assert_array_equal(sheet[-strips["idm"].shape[0] :, : strips["idm"].shape[1]], strips["idm"])
    assert (sheet[:22] != 255).any()  # the label is drawn
    with pytest.raises(ValueError, match="no filmstrip of pair 4") as e:
        charts.compare_episodes([str(tmp_path / "cem")], ["CEM"], 4)
    assert "\n" not in str(e.value)
    charts.main(["compare", "--pair", "3", "--out", str(tmp_path / "c.png"), f"{tmp_path / 'cem'}:CEM"])
    assert charts.load_png(str(tmp_path / "c.png")).shape[0] == 22 + h


def test_bench_ssim_known_properties():
    """SSIM is 1 for identical images, symmetric, below 1 for shifted or noised copies, lower for more noise, and
    negative for an inverted image."""
    import bench

    frame = envs.make_env("pusht", img_size=64).reset(seed=3)[0]
    assert bench.ssim(frame, frame) == pytest.approx(1.0, abs=1e-12)
    rng = np.random.default_rng(0)
    noisy = [np.clip(frame + rng.normal(0, sd, frame.shape), 0, 255).astype(np.uint8) for sd in (5, 40)]
    shifted = np.roll(frame, 2, axis=1)
    for other in (*noisy, shifted):
        assert bench.ssim(frame, other) == pytest.approx(bench.ssim(other, frame), abs=1e-12)
        assert bench.ssim(frame, other) < 0.99
    assert bench.ssim(frame, noisy[0]) > bench.ssim(frame, noisy[1])
    assert bench.ssim(frame, 255 - frame) < 0
    with pytest.raises(ValueError, match="same"):
        bench.ssim(frame, frame[:32])


def test_bench_render_match_recovers_known_states(tmp_path):
    """render-match on our own frames at known states recovers the state and reports SSIM 1, |diff| 0."""
    import bench

    for name, state, tol in (("tworoom", [61.3, 150.7], 0.5), ("pusht", [300.0, 120.0, 210.0, 280.0, 0.7, 0, 0], 2)):
        env = envs.make_env(name, img_size=64)
        envs.save_png(str(tmp_path / f"{name}.png"), bench.render_at(env, np.array(state, float)))
        res = bench.render_match(name, str(tmp_path / f"{name}.png"))
        assert res["img_size"] == 64 and res["ssim"] > 0.999 and res["mean_abs_diff"] < 0.05
        np.testing.assert_allclose(res["state"][:2], state[:2], atol=tol)
        if name == "pusht":  # block position and angle (mod 2 pi)
            np.testing.assert_allclose(res["state"][2:4], state[2:4], atol=tol)
            assert abs((res["state"][4] - state[4] + np.pi) % (2 * np.pi) - np.pi) < 0.05


def test_bench_decode_reports_every_storage_format():
    """bench_decode on 2 tiny episodes gives a row per storage format (gzip ones per inflater) with positive sizes
    and times (each read back bit-identical), the uncompressed pixels at H*W*3 bytes per frame, and every gzip level
    smaller."""
    import importlib.util

    import bench

    rows = {r["option"]: r for r in bench.bench_decode(episodes=2, img_size=64, clips=10)}
    names = ["gzip-1", "gzip-4", "gzip-9", "lzf", "none", "gzip-1 1 frame/chunk", "npy (raw, mmap)"]
    if importlib.util.find_spec("hdf5plugin"):
        names += ["blosc-lz4", "blosc-zstd"]
    if importlib.util.find_spec("isal"):  # each gzip file read again with ISA-L's inflate
        names += [f"{name}, isal" for name in names if name.startswith("gzip")]
    assert sorted(rows) == sorted(names)
    for r in rows.values():
        assert r["kb_per_frame"] > 0 and r["ms_per_clip"] > 0 and r["clips_per_s"] > 0
    assert rows["none"]["kb_per_frame"] * 1e3 == pytest.approx(64 * 64 * 3, rel=0.1)
    assert all(rows[f"gzip-{level}"]["kb_per_frame"] < rows["none"]["kb_per_frame"] for level in (1, 4, 9))


# --- docs and project: the README runs, the project stands alone


def test_readme_use_a_trained_model_snippet_runs(tmp_path):
    """The README's "Use a trained model" code runs as written on a tiny checkpoint: embeddings, rollout and a CEM
    plan of the documented shapes, the plan cheaper than the zero plan."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Use a trained model") :]
    code = section[section.index("```python\n") + 10 : section.index("\n```", section.index("```python"))]
    model = randomise(tiny_model()).eval()
    ckpt = _train_ckpt(tmp_path, model)
    assert '"runs/pusht_cpu/ckpt.pt"' in code
    rng = np.random.default_rng(0)
    scope = {
        "frames": rng.integers(0, 256, (4, 48, 48, 3), dtype=np.uint8),
        "goal": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
        "blocks": torch.randn(5, 10),
    }
    torch.manual_seed(0)
    exec(code.replace('"runs/pusht_cpu/ckpt.pt"', repr(ckpt)), scope)  # noqa: S102 (the README's own code)
    z, z_pred, plan, cost = scope["z"], scope["z_pred"], scope["plan"], scope["cost"]
    assert (
        z.shape == (4, 32) and scope["z_goal"].shape == (32,) and z_pred.shape == (6, 32) and plan.shape == (1, 5, 10)
    )
    torch.testing.assert_close(z_pred[0], z[-1], rtol=0, atol=0)  # the context comes first
    with torch.no_grad():
        torch.testing.assert_close(scope["model"].embed(scope["frames"]), model.embed(scope["frames"]))
        assert cost(plan[:, None]) < cost(torch.zeros(1, 1, 5, 10))


def _project_texts() -> dict[str, str]:
    names = [n for n in os.listdir(REPO) if n.endswith((".py", ".md"))]
    names += [os.path.join("docs", n) for n in os.listdir(os.path.join(REPO, "docs")) if n.endswith(".md")]
    return {n: open(os.path.join(REPO, n), encoding="utf-8").read() for n in names}


def test_docs_every_cited_document_and_section_exists():
    """Every docs/*.md cited in code, README or docs exists and holds the cited '§N' section; relative Markdown
    links resolve; no file cites a document outside the repository."""
    texts = _project_texts()
    cited = 0
    for name, text in texts.items():
        for doc, sections in re.findall(r"(docs/[\w-]+\.md)((?:\s*§\s*\d+(?:\s*,\s*§?\s*\d+)*)?)", text):
            assert os.path.isfile(os.path.join(REPO, doc)), f"{name} cites {doc}, which does not exist"
            heads = set(re.findall(r"^## (\d+)\.", texts[doc], flags=re.MULTILINE))
            for n in re.findall(r"\d+", sections):
                assert n in heads, f"{name} cites {doc} §{n}; its sections are {sorted(heads, key=int)}"
            cited += 1
        if name.endswith(".md"):
            base = os.path.dirname(os.path.join(REPO, name))
            for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
                if not re.match(r"[a-z]+://", link):
                    assert os.path.exists(os.path.join(base, link)), f"{name} links to missing {link}"
        outside = "|".join(["MET" + "HOD", "EN" + "VS", "PA" + "PER"])
        assert not re.search(rf"\b({outside})\.md", text), f"{name} cites a document not in the repository"
    assert cited >= 10  # the code does cite its docs: the check above ran on real citations


# --- policy (policy.py): goal-conditioned inverse dynamics on the frozen latents


@contextmanager
def one_thread():
    """Tiny MLP steps run fastest on one thread (and do not fight a busy machine for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny-preset world model trained for 2 steps by train.main on 6 TwoRoom episodes at 32 px."""
    root = tmp_path_factory.mktemp("policy")
    path = collect.collect("tworoom", 6, str(root / "tworoom_tiny.h5"), img_size=32, workers=1)
    cfg = train.TrainConfig(
        env="tworoom",
        preset="tiny",
        data=path,
        out_dir=str(root / "run"),
        max_steps=2,
        log_every=1,
        eval_every=2,
        ckpt_every=2,
        val_batches=1,
        bn_batches=1,
        num_proj=128,
        device="cpu",
    )
    return train.main(cfg)["checkpoint"], path


def test_policy_inverts_linear_dynamics():
    """On z_goal = z_now + W a (W of full column rank) the trained policy recovers a: fresh-sample MSE < 1e-3,
    1000x below predicting the mean action."""
    dim, action_dim = 16, 10  # a 10-d action block embedded linearly in 16 dims, as a point mass's displacement
    w = torch.randn(dim, action_dim, generator=torch.Generator().manual_seed(0)) / action_dim**0.5  # (D, A)

    def pairs(n: int, g: torch.Generator) -> tuple:
        z_now, a = torch.randn(n, dim, generator=g), torch.randn(n, action_dim, generator=g)  # (n, D), (n, A)
        return z_now, z_now + a @ w.T, a

    steps, peak = 1500, 3e-3
    torch.manual_seed(0)
    pol = policy.GoalPolicy(dim=dim, action_dim=action_dim, hidden=64, depth=2)
    opt = torch.optim.AdamW(pol.parameters(), lr=peak, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    with one_thread():
        for step in range(steps):
            policy.train_step(pol, opt, *pairs(256, g), policy.lr_at(step, peak, steps))
        z_now, z_goal, a = pairs(4096, torch.Generator().manual_seed(2))
        mse = policy.val_mse(pol, z_now, z_goal, a)
    assert mse < 1e-3 and mse < a.pow(2).mean().item() / 1000


def test_policy_sample_pairs_stay_in_episode():
    """Sampled goals lie exactly frameskip * k rows ahead (1 <= k <= max_goal_blocks) in the frame's own episode,
    with the whole action block before the episode's last row; every k occurs; too-short episodes never do."""
    ep_len = np.array([3, 5, 6, 12, 30, 51, 80])
    ep_offset = np.concatenate([[0], np.cumsum(ep_len)[:-1]])
    f, k_max = 5, 4
    rows, room = policy.pair_candidates(ep_offset, ep_len, range(len(ep_len)), f)
    t, goal = policy.sample_pairs(np.random.default_rng(0), rows, room, f, k_max, 20000)
    ep_t = np.searchsorted(ep_offset, t, side="right") - 1
    ep_goal = np.searchsorted(ep_offset, goal, side="right") - 1
    last = ep_offset[ep_t] + ep_len[ep_t] - 1  # (n,) last row of each frame's episode
    k = (goal - t) // f
    assert (ep_t == ep_goal).all() and (goal <= last).all() and (t + f - 1 < last).all()
    assert ((goal - t) % f == 0).all() and set(np.unique(k)) == set(range(1, k_max + 1))
    assert not np.isin(ep_t, [0, 1]).any()  # episodes of 3 and 5 rows hold no frame with a goal
    assert set(np.unique(ep_t)) == set(range(2, len(ep_len)))


def test_policy_action_blocks_match_clip_layout():
    """The block at row t is the raw rows t..t+frameskip-1 concatenated, as the clip loader builds it."""
    action = np.arange(40, dtype=np.float32).reshape(20, 2)  # (R, a)
    blocks = policy.action_blocks(action, 5)  # (R, 10)
    assert blocks.shape == (20, 10)
    np.testing.assert_array_equal(blocks[3], action[3:8].reshape(-1))
    np.testing.assert_array_equal(blocks[17], np.concatenate([action[17:].reshape(-1), np.zeros(4)]))


def test_policy_propose_rolls_policy_through_model():
    """propose gives (B, horizon, A); block 0 is act at z0 and block 1 is act at the model's prediction after it."""
    torch.manual_seed(0)
    model = LeWM(PRESETS["tiny"]).eval()
    pol = policy.GoalPolicy(dim=model.cfg.embed_dim, action_dim=model.cfg.action_dim, hidden=32, depth=2)
    torch.nn.init.normal_(pol.head.weight)  # the zero-initialised head would make every block 0
    z0, z_goal = torch.randn(3, 1, model.cfg.embed_dim), torch.randn(3, model.cfg.embed_dim)  # (B, 1, D), (B, D)
    plan = policy.propose(pol, model, z0, z_goal, horizon=4)  # (B, N, A)
    assert plan.shape == (3, 4, model.cfg.action_dim)
    torch.testing.assert_close(plan[:, 0], policy.act(pol, z0[:, 0], z_goal))
    with torch.no_grad():
        z1 = model.rollout(z0, plan[:, None, :1])[:, 0, -1]  # (B, D)
    torch.testing.assert_close(plan[:, 1], policy.act(pol, z1, z_goal))


def test_policy_main_trains_saves_and_checks_world_model(tmp_path, tiny_run):
    """main() on a tiny trained run writes a policy that loads against its own checkpoint and is refused, in one
    line, against a checkpoint with other weights and as a non-policy file."""
    ckpt_path = tiny_run[0]
    cfg = policy.PolicyConfig(
        ckpt=ckpt_path, out=str(tmp_path / "policy.pt"), steps=20, val_every=10, batch_size=64, hidden=32, device="cpu"
    )
    summary = policy.main(cfg)
    assert summary["out"] == cfg.out and np.isfinite(summary["val_mse"]) and summary["val_mse_mean_action"] > 0
    ckpt = load_checkpoint(ckpt_path)
    pol = policy.load_policy(cfg.out, ckpt)
    z = torch.randn(2, ckpt["model_config"]["embed_dim"])  # (B, D)
    assert policy.act(pol, z, z).shape == (2, ckpt["model_config"]["action_dim"])

    other = {**ckpt, "model": {k: v.clone() for k, v in ckpt["model"].items()}}
    key = next(k for k, v in other["model"].items() if v.is_floating_point())
    other["model"][key] += 1e-3
    save_checkpoint(str(tmp_path / "other.pt"), other)
    with pytest.raises(cli.UsageError, match="trained on another world model") as e:
        policy.load_policy(cfg.out, load_checkpoint(str(tmp_path / "other.pt")), ckpt_path="other.pt")
    assert "\n" not in str(e.value) and "python policy.py --ckpt other.pt" in str(e.value)
    with pytest.raises(cli.UsageError, match="not a policy file") as e:
        policy.load_policy(ckpt_path, ckpt)
    assert "\n" not in str(e.value)


def test_policy_embedding_cache_is_reused_only_for_its_world_model(tmp_path, tiny_run, monkeypatch):
    """A second run reads the embeddings the first one cached (the encoder is not called) and trains the very same
    policy; a cache made for other weights is not used but replaced; 'none' writes no cache."""
    ckpt_path = tiny_run[0]
    kw = {"ckpt": ckpt_path, "steps": 10, "val_every": 10, "batch_size": 32, "hidden": 16, "device": "cpu"}
    first = policy.main(policy.PolicyConfig(out=str(tmp_path / "a.pt"), **kw))
    cache = tmp_path / "embeddings.pt"
    assert cache.is_file()
    embedded = policy.embed_rows

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran although the cache holds every row")

    monkeypatch.setattr(policy, "embed_rows", no_encoder)
    second = policy.main(policy.PolicyConfig(out=str(tmp_path / "b.pt"), **kw))
    assert second["val_mse"] == first["val_mse"]
    a, b = load_checkpoint(str(tmp_path / "a.pt"))["policy"], load_checkpoint(str(tmp_path / "b.pt"))["policy"]
    assert all(torch.equal(a[k], b[k]) for k in a)

    saved = load_checkpoint(str(cache))
    saved["key"] = {**saved["key"], "sha256": "0" * 64}  # as if another world model had written it
    saved["z"] = torch.randn_like(saved["z"])
    save_checkpoint(str(cache), saved)
    calls = []
    monkeypatch.setattr(policy, "embed_rows", lambda *a, **k: calls.append(1) or embedded(*a, **k))
    third = policy.main(policy.PolicyConfig(out=str(tmp_path / "c.pt"), **kw))
    assert calls and third["val_mse"] == first["val_mse"]
    assert load_checkpoint(str(cache))["key"]["sha256"] != "0" * 64

    policy.main(policy.PolicyConfig(out=str(tmp_path / "off" / "d.pt"), embed_cache="none", **kw))
    assert not (tmp_path / "off" / "embeddings.pt").exists()


def test_policy_main_refuses_bad_arguments(tmp_path, tiny_run):
    """main() refuses, before any work, a missing checkpoint, an out-of-range field and --out onto the world-model
    checkpoint or the dataset."""
    ckpt_path, data_path = tiny_run
    cases = [
        ({"ckpt": str(tmp_path / "missing.pt")}, "--ckpt"),
        ({"ckpt": ckpt_path, "steps": 0}, "--steps"),
        ({"ckpt": ckpt_path, "goal_input": "sum"}, "--goal_input"),
        ({"ckpt": ckpt_path, "out": ckpt_path}, "is the --ckpt input"),
        ({"ckpt": ckpt_path, "out": data_path}, "is the --data input"),
    ]
    for kw, message in cases:
        with pytest.raises(cli.UsageError, match=message):
            policy.main(policy.PolicyConfig(device="cpu", **kw))
    assert dataclasses.asdict(policy.parse_args(["--ckpt", ckpt_path, "--steps", "7"])) == dataclasses.asdict(
        policy.PolicyConfig(ckpt=ckpt_path, steps=7)
    )


@pytest.mark.parametrize("kind", ["idm", "idm+cem"])
def test_policy_evaluate_plans_with_it_end_to_end(tmp_path, tiny_run, kind):
    """`evaluate.py --policy idm` / `idm+cem` plan with the trained policy under the protocol and write the JSON;
    idm acts every block (a call per 5 steps), idm+cem replans every 25 steps as CEM does."""
    ckpt, _ = tiny_run
    policy.main(policy.PolicyConfig(ckpt=ckpt, out=str(tmp_path / "p.pt"), steps=5, val_every=5, device="cpu"))
    argv = ["--ckpt", ckpt, "--policy", kind, "--policy_file", str(tmp_path / "p.pt"), "--episodes", "2"]
    argv += [
        "--samples",
        "16",
        "--iterations",
        "2",
        "--topk",
        "4",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "r.json"),
    ]
    res = evaluate.main(evaluate.parse_args(argv))
    with open(tmp_path / "r.json") as f:
        saved = json.load(f)
    assert saved["policy"] == kind and saved["policy_file"] == str(tmp_path / "p.pt") and saved["episodes"] == 2
    assert res["successes"] == sum(r["success"] for r in saved["per_episode"])
    steps = {c["step"] for c in saved["plan_calls"]}
    assert steps <= (set(range(0, 50, 5)) if kind == "idm" else {0, 25}) and 0 in steps
    assert ("planner" in saved) == (kind == "idm+cem")


def test_policy_act_steps_sets_how_often_the_policy_acts(tmp_path, tiny_run):
    """`--act_steps 2`: the policy acts again after the first 2 raw actions of each block (calls at steps 0, 2, 4,
    ...; the default acts every 5), and the JSON records it; more than a block's actions is refused before work."""
    ckpt, _ = tiny_run
    policy.main(policy.PolicyConfig(ckpt=ckpt, out=str(tmp_path / "p.pt"), steps=5, val_every=5, device="cpu"))
    argv = ["--ckpt", ckpt, "--policy", "idm", "--policy_file", str(tmp_path / "p.pt"), "--episodes", "2"]
    argv += ["--budget", "12", "--device", "cpu", "--out", str(tmp_path / "r.json")]
    evaluate.main(evaluate.parse_args([*argv, "--act_steps", "2"]))
    saved = json.loads((tmp_path / "r.json").read_text())
    steps = [c["step"] for c in saved["plan_calls"]]
    assert saved["act_steps"] == 2 and steps[:2] == [0, 2] and set(steps) <= set(range(0, 12, 2))
    with pytest.raises(cli.UsageError, match="--act_steps 6: must be in \\[0, 5\\]"):
        evaluate.main(evaluate.parse_args([*argv, "--act_steps", "6"]))


# --- loader workers


def _stream(loader, start_step: int, steps: int = 6) -> list:
    """The first `steps` batches of loader.steps(start_step), the stream closed after."""
    stream = loader.steps(start_step)
    batches = [next(stream) for _ in range(steps)]
    stream.close()
    return batches


def _assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for (pixels_a, actions_a), (pixels_b, actions_b) in zip(a, b):
        assert torch.equal(pixels_a, pixels_b) and torch.equal(actions_a, actions_b)


@pytest.mark.parametrize("cache", [False, True])
def test_loader_workers_give_the_thread_batches(tmp_path, cache):
    """Batches from 0 (the thread), 1 and 2 worker processes are identical from step 0 and from a later step across
    an epoch's end, streamed (processes used) or cached (the thread used), and torch's RNG is left untouched."""
    path = _data_file(tmp_path / "d.h5", lens=(40, 50, 33))
    with data.Trajectories(path) as traj:
        stats = data.action_stats(traj, [0, 1, 2])
        for start in (0, 6):  # 8 batches per epoch: from step 6 the stream runs into epoch 1
            streams = {}
            for workers in (0, 1, 2):
                loader = data.ClipLoader(traj, [0, 1, 2], stats, 8, seed=3, cache=cache, workers=workers, **CLIP)
                assert len(loader) == 8 and loader.processes == (0 if cache else workers)
                rng = torch.get_rng_state()
                streams[workers] = _stream(loader, start)
                assert torch.equal(rng, torch.get_rng_state())
            _assert_same_batches(streams[0], streams[1])
            _assert_same_batches(streams[0], streams[2])


def test_loader_workers_keep_the_ddp_slices(tmp_path):
    """Each DDP rank's batches (rank, world_size) with 2 worker processes equal its batches from the thread."""
    path = _data_file(tmp_path / "d.h5", lens=(40, 50, 33))
    with data.Trajectories(path) as traj:
        stats = data.action_stats(traj, [0, 1, 2])
        for rank in (0, 1):
            kw = {"seed": 3, "cache": False, "rank": rank, "world_size": 2, **CLIP}
            thread, procs = (data.ClipLoader(traj, [0, 1, 2], stats, 4, workers=w, **kw) for w in (0, 2))
            assert procs.processes == 2
            for start in (0, 5):
                _assert_same_batches(_stream(thread, start), _stream(procs, start))


def test_loader_workers_read_a_trajectory_union(tmp_path):
    """With a TrajectoryUnion (a dataset plus --extra_data), 2 worker processes give the thread's batches."""
    paths = [_data_file(tmp_path / "a.h5", lens=(40, 50)), _data_file(tmp_path / "b.h5", lens=(33, 27))]
    traj = data.TrajectoryUnion([data.Trajectories(p) for p in paths])
    try:
        stats = data.action_stats(traj, range(4))
        kw = {"seed": 3, "cache": False, **CLIP}
        thread, procs = (data.ClipLoader(traj, range(4), stats, 8, workers=w, **kw) for w in (0, 2))
        assert procs.processes == 2
        _assert_same_batches(_stream(thread, 0, steps=len(thread)), _stream(procs, 0, steps=len(procs)))
    finally:
        traj.close()


def test_loader_worker_death_is_an_error_not_a_hang(tmp_path):
    """A loader worker killed mid-stream ends the stream with a RuntimeError in the main process, not a hang."""
    path = _data_file(tmp_path / "d.h5", lens=(40, 50, 33))
    with data.Trajectories(path) as traj:
        stats = data.action_stats(traj, [0, 1, 2])
        loader = data.ClipLoader(traj, [0, 1, 2], stats, 8, seed=3, cache=False, workers=2, **CLIP)
        before = {p.pid for p in mp.active_children()}
        stream = loader.steps(0)
        next(stream)
        workers = [p for p in mp.active_children() if p.pid not in before]
        assert len(workers) == 2
        with pytest.raises(RuntimeError, match="killed|ended unexpectedly"):
            workers[0].kill()
            for _ in range(100):  # torch notices a dead worker within 5 s even without SIGCHLD
                next(stream)
        stream.close()
        for w in workers:
            w.join(timeout=10)
            assert not w.is_alive()


def test_loader_worker_exception_reaches_the_main_process(tmp_path):
    """An exception inside a worker (the file replaced by garbage: a worker opens the path itself) is raised in the
    main process; the thread reads on through the handle opened before."""
    path = _data_file(tmp_path / "d.h5", lens=(40, 50, 33))
    with data.Trajectories(path) as traj:
        stats = data.action_stats(traj, [0, 1, 2])
        kw = {"seed": 3, "cache": False, **CLIP}
        thread, procs = (data.ClipLoader(traj, [0, 1, 2], stats, 8, workers=w, **kw) for w in (0, 2))
        (tmp_path / "garbage").write_bytes(b"not an HDF5 file" * 64)
        os.replace(tmp_path / "garbage", path)
        with pytest.raises(OSError, match="worker process"):
            _stream(procs, 0)
        assert len(_stream(thread, 0)) == 6


def test_loader_workers_flag_saved_and_same_losses(tmp_path, tiny_pusht, monkeypatch, capsys):
    """--loader_workers is resolved (None -> cores - 1, at most 8) and saved; a tiny run with 2 worker processes on
    streamed frames logs the same losses as with the thread (0), and resumes with another value."""
    assert train.parse_args(["--loader_workers", "3"]).loader_workers == 3
    resolved = train.resolve_config(tiny_cfg(tmp_path, tiny_pusht), cuda=False, steps_per_epoch=lambda c: 1)
    assert resolved.loader_workers == data.default_loader_workers() == min(8, max(0, len(os.sched_getaffinity(0)) - 1))
    monkeypatch.setattr(data, "cache_limit_bytes", lambda: 0)  # frames streamed, so the processes are used
    runs = {}
    for workers, says in ((0, "a background thread"), (2, "2 worker processes")):
        summary = train.main(tiny_cfg(tmp_path / str(workers), tiny_pusht, max_steps=4, loader_workers=workers))
        assert f"training batches: {says} (--loader_workers {workers})" in capsys.readouterr().out
        with open(tmp_path / str(workers) / "run" / "config.json") as f:
            assert json.load(f)["train"]["loader_workers"] == workers
        assert load_checkpoint(summary["checkpoint"])["train_config"]["loader_workers"] == workers
        runs[workers] = read_metrics(tmp_path / str(workers) / "run")
    keys = ("loss", "pred_loss", "sigreg_loss", "grad_norm", "val_loss")
    assert sorted(runs[0]) == sorted(runs[2]) == [1, 2, 3, 4]
    assert all(runs[0][s].get(k) == runs[2][s].get(k) for s in runs[0] for k in keys)
    train.main(tiny_cfg(tmp_path / "2", tiny_pusht, max_steps=5, loader_workers=1, resume=True))
    assert sorted(read_metrics(tmp_path / "2" / "run")) == [1, 2, 3, 4, 5]


def test_loader_workers_default_shares_the_cores_among_local_ranks(monkeypatch):
    """The default is cores - 1, at most 8, divided by torchrun's ranks on this machine (LOCAL_WORLD_SIZE), so that
    DDP does not start more processes than cores; never below 0."""
    for cores, local, expected in ((16, None, 8), (16, "2", 4), (16, "3", 2), (16, "16", 0), (4, "2", 1), (2, "2", 0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert data.default_loader_workers() == expected, (cores, local)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert data.default_loader_workers() == 0


def test_loader_workers_in_the_resume_command_only_when_given(tmp_path, tiny_pusht):
    """A resume command names --loader_workers when it was given, not when it was resolved from the machine (the
    resumed run resolves it again); the other resolved fields are named as before."""
    for given, named in ((None, False), (0, True), (3, True)):
        parsed = tiny_cfg(tmp_path, tiny_pusht, loader_workers=given)
        cfg = train.resolve_config(parsed, cuda=False, steps_per_epoch=lambda c: 1)
        command = cli.resume_command(cfg, "train.py", parsed)
        assert ("--loader_workers" in command) == named and "--preset tiny" in command
        assert command.endswith("--resume") and (not named or f"--loader_workers {given} " in command)
        assert f"--loader_workers {cfg.loader_workers} " in cli.resume_command(cfg, "train.py")  # parsed not passed


def test_loader_note_says_what_makes_the_batches(tmp_path):
    """The run's line on the training batches: the worker processes, or the thread and why (the frames in RAM)."""
    path = _data_file(tmp_path / "d.h5", lens=(40, 50, 33))
    with data.Trajectories(path) as traj:
        stats = data.action_stats(traj, [0, 1, 2])
        for cache, workers, says in (
            (False, 1, "1 worker process (--loader_workers 1)"),
            (True, 2, "a background thread (--loader_workers 2, as the frames are in RAM)"),
            (False, 0, "a background thread (--loader_workers 0)"),
        ):
            loader = data.ClipLoader(traj, [0, 1, 2], stats, 8, cache=cache, workers=workers, **CLIP)
            assert cli.loader_note(loader, workers) == f"training batches: {says}"


def test_paper_preset_224px_pipeline_smoke(tmp_path, monkeypatch):
    """The paper preset end to end at its own sizes (224 px, patch 14, full widths; about 15 s on 2 CPU cores):
    collect 4 short PushT episodes at 224 px, train 2 steps (batch 4) on frames streamed by 2 loader workers,
    validate, checkpoint, and plan one episode with evaluate on a tiny CEM budget."""
    path = collect.collect("pusht", 4, str(tmp_path / "pusht_224.h5"), img_size=224, episode_steps=30, workers=1)
    monkeypatch.setattr(data, "cache_limit_bytes", lambda: 0)  # streamed, as the frames of a real 224 px dataset
    cfg = train.TrainConfig(
        env="pusht",
        preset="paper",
        data=path,
        out_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=4,
        log_every=1,
        eval_every=2,
        ckpt_every=2,
        val_batches=1,
        bn_batches=1,
        num_proj=64,
        device="cpu",
        loader_workers=2,
    )
    summary = train.main(cfg)
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt["step"] == 2 and ckpt["model_config"] == dataclasses.asdict(PRESETS["paper"])
    assert math.isfinite(summary["loss"]) and math.isfinite(summary["val_pred_loss"])
    argv = ["--ckpt", summary["checkpoint"], "--episodes", "1", "--samples", "8", "--iterations", "1", "--topk", "2"]
    argv += ["--budget", "5", "--device", "cpu", "--out", str(tmp_path / "r.json")]
    res = evaluate.main(evaluate.parse_args(argv))
    with open(tmp_path / "r.json") as f:
        saved = json.load(f)
    assert saved["episodes"] == 1 and len(saved["plan_calls"]) == 1 and res["successes"] in (0, 1)
    assert np.isfinite(saved["per_episode"][0]["final_distance"])


# --- hardening


def _cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run a project script (`args[0]`, e.g. "train.py") at the real command line, one thread, from `cwd`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(REPO, args[0]), *map(str, args[1:])]
    return subprocess.run(cmd, cwd=cwd or REPO, capture_output=True, text=True, timeout=300, env=env, check=False)


def _one_line_error(res: subprocess.CompletedProcess, text: str, code: int = 2) -> None:
    """The run failed with `code` and one stderr line holding `text`: no traceback, no torch advice."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert res.returncode == code and len(lines) == 1 and text in lines[0], res.stderr[-1500:]
    assert "Traceback" not in res.stderr and "weights_only" not in res.stderr


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_hardening_output_is_never_an_input(tmp_path, tiny_pusht):
    """Cause 1: an --out naming an input (checkpoint, dataset) is refused in one line and the input survives."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    before = {p: Path(p).read_bytes() for p in (ckpt, tiny_pusht)}
    res = _cli("evaluate.py", "--ckpt", ckpt, "--out", ckpt, "--device", "cpu")
    _one_line_error(res, "is the --ckpt input")
    res = _cli("evaluate.py", "--ckpt", ckpt, "--data", tiny_pusht, "--out", tiny_pusht, "--device", "cpu")
    _one_line_error(res, "is the --data input")
    with pytest.raises(cli.UsageError, match="is the --data input"):
        analyses.run_capacity(analyses.CapacityConfig(env="pusht", data=tiny_pusht, out=tiny_pusht, steps=1))
    with pytest.raises(cli.UsageError, match="is the --ckpt input"):
        policy.prepare(policy.PolicyConfig(ckpt=ckpt, data=tiny_pusht, out=ckpt, device="cpu"))
    assert all(Path(p).read_bytes() == b for p, b in before.items())


@pytest.mark.slow
def test_hardening_export_never_overwrites_a_run(tmp_path):
    """Cause 1: `model.py export --out` the checkpoint's run folder (or another run) is refused; config.json
    survives."""
    run = tmp_path / "run"
    run.mkdir()
    ckpt = _train_ckpt(run, randomise(tiny_model()).eval())
    (run / "config.json").write_text('{"train": {}}')
    (run / "metrics.jsonl").write_text("")
    _one_line_error(_cli("model.py", "export", "--ckpt", ckpt, "--out", run), "--ckpt")
    other = tmp_path / "other_run"
    shutil.copytree(run, other)
    _one_line_error(_cli("model.py", "export", "--ckpt", ckpt, "--out", other), "holds a training run")
    assert (run / "config.json").read_text() == '{"train": {}}' == (other / "config.json").read_text()


def test_hardening_export_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """Cause 1: an export that fails midway leaves the earlier export intact and no temporary folder; a
    finished one replaces it whole and removes what a killed export left."""
    import official

    ckpt = _train_ckpt(tmp_path, randomise(tiny_model()).eval())
    out = tmp_path / "export"
    official.export(ckpt, str(out))
    old = {n: (out / n).read_bytes() for n in os.listdir(out)}

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(official, "export_weights_only", fail)
        with pytest.raises(OSError):
            official.export(ckpt, str(out))
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == old
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "export"]
    (tmp_path / f"export.tmp{_dead_pid()}").mkdir()  # what a kill -9 mid-export leaves
    official.export(ckpt, str(out))
    assert sorted(os.listdir(out)) == sorted(old) and sorted(os.listdir(tmp_path)) == ["ckpt.pt", "export"]


@pytest.mark.slow
def test_hardening_output_checked_by_creating_it(tmp_path, tiny_pusht):
    """Cause 2: an --out where no file can be created (/proc, even for root) is refused before any work."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    _one_line_error(_cli("evaluate.py", "--ckpt", ckpt, "--out", "/proc/x.json", "--device", "cpu"), "/proc")
    with pytest.raises(cli.UsageError, match="cannot create a file"):
        cli.check_writable_file("/proc/y/x.json", "--video")
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_hardening_failed_final_write_keeps_the_results(tmp_path, monkeypatch):
    """Cause 2: a results write that fails (full disk) leaves no temporary file and says where a copy went."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    real_replace = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("r.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(cli.UsageError, match=r"the results are saved in (\S+)") as e:
        cli.save_json({"success_rate": 0.5}, str(tmp_path / "out" / "r.json"))
    copy = re.search(r"saved in (\S+)", str(e.value))[1]
    assert json.loads(Path(copy).read_text()) == {"success_rate": 0.5}
    with pytest.raises(cli.UsageError, match=r"the result is saved in (\S+)") as e:
        cli.save_checkpoint_or_copy(str(tmp_path / "out" / "r.json"), {"policy": {"w": torch.ones(2)}})
    assert torch.equal(load_checkpoint(re.search(r"saved in (\S+)", str(e.value))[1])["policy"]["w"], torch.ones(2))
    assert os.listdir(tmp_path / "out") == []


def test_hardening_checkpoint_write_failure_and_orphans(tmp_path, monkeypatch, capsys):
    """Cause 2: a failed checkpoint write removes its temporary file; a run folder drops the temporary files of
    dead processes (only those) when a run starts in it."""
    real_save = torch.save

    def half_then_full(obj, path):
        real_save({"x": 1}, path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(OSError):
        save_checkpoint(str(tmp_path / "ckpt.pt"), {"step": 1})
    assert os.listdir(tmp_path) == []
    dead, alive = f"ckpt.pt.tmp{_dead_pid()}", f"ckpt.pt.tmp{os.getppid()}"
    for name in (dead, alive):
        (tmp_path / name).write_bytes(b"partial")
    with ExitStack() as cleanup:
        cli.prepare_run_folder(str(tmp_path), resume=True, overwrite=False, cleanup=cleanup)
    assert sorted(os.listdir(tmp_path)) == sorted([".lock", alive])
    assert f"removed {dead}" in capsys.readouterr().out


@pytest.mark.slow
def test_hardening_data_errors_are_one_line_before_the_run_folder(tmp_path, tiny_pusht):
    """Cause 3: --val_fraction 0, --batch_size above the clips, episodes shorter than a clip and too many
    --episodes are one line and exit 2; no run folder is left to block the corrected command."""
    short = _data_file(tmp_path / "short.h5", lens=(4, 4, 4, 4), img=32)
    common = ("--env", "pusht", "--preset", "tiny", "--device", "cpu", "--max_steps", "2", "--out_dir")
    for args, text in (
        (("--val_fraction", "0", "--data", tiny_pusht), "--val_fraction 0.0: must be in (0, 1)"),
        (("--batch_size", "5000", "--data", tiny_pusht), "--batch_size 5000: above the"),
        (("--data", short), "shorter than one clip"),
    ):
        _one_line_error(_cli("train.py", *common, tmp_path / "run", *args), text)
        assert not os.path.exists(tmp_path / "run")  # no config.json, no folder: the corrected command runs
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    res = _cli("evaluate.py", "--ckpt", ckpt, "--episodes", "100000", "--device", "cpu", "--out", tmp_path / "r.json")
    _one_line_error(res, "valid start rows")


@pytest.mark.slow
def test_hardening_loading_trusts_nothing(tmp_path, tiny_pusht):
    """Cause 4: a bare tensor, a foreign dict, an exported model.pt or random bytes given as a checkpoint (to
    --resume, evaluate and export) is one line naming the file, never torch's weights_only advice."""
    model = randomise(tiny_model()).eval()
    ckpt = _train_ckpt(tmp_path, model)
    import official

    official.export(ckpt, str(tmp_path / "export"))
    bad = {"tensor": torch.zeros(3), "foreign": {"state_dict": {"w": torch.zeros(2)}}}
    for name, obj in bad.items():
        torch.save(obj, tmp_path / f"{name}.pt")
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    shutil.copy(tmp_path / "export" / "model.pt", tmp_path / "exported.pt")
    for name in ("tensor", "foreign", "random", "exported"):
        run = tmp_path / f"run_{name}"
        run.mkdir()
        shutil.copy(tmp_path / f"{name}.pt", run / "ckpt.pt")
        res = _cli("train.py", "--env", "pusht", "--preset", "tiny", "--data", tiny_pusht, "--out_dir", run, "--resume")
        _one_line_error(res, str(run / "ckpt.pt"))
    _one_line_error(_cli("evaluate.py", "--ckpt", tmp_path / "random.pt", "--device", "cpu"), "random.pt")
    res = _cli("model.py", "export", "--ckpt", tmp_path / "tensor.pt", "--out", tmp_path / "e2")
    _one_line_error(res, "tensor.pt holds a Tensor")
    assert not os.path.exists(tmp_path / "e2")


def test_hardening_resume_keeps_the_experiment(tmp_path, tiny_pusht, capsys):
    """Cause 5: resume keeps the checkpoint's held-out episodes under another --val_fraction; a finished run
    exits 0 changing nothing; a --max_steps below the checkpoint's step is refused."""
    cfg = tiny_cfg(tmp_path, tiny_pusht, max_steps=4, val_batches=1, bn_batches=1)
    train.main(cfg)
    ckpt_path = tmp_path / "run" / "ckpt.pt"
    saved = load_checkpoint(str(ckpt_path))
    train.main(dataclasses.replace(cfg, max_steps=6, val_fraction=0.5, resume=True))
    assert "keeping the checkpoint's" in capsys.readouterr().out
    resumed = load_checkpoint(str(ckpt_path))
    assert resumed["val_episodes"] == saved["val_episodes"] and resumed["action_stats"] == saved["action_stats"]
    config = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(SystemExit) as e:
        train.main(dataclasses.replace(cfg, max_steps=6, resume=True))
    out = capsys.readouterr().out
    assert e.value.code == 0 and "finished" in out and "nan" not in out
    with pytest.raises(cli.UsageError, match="--max_steps 2: .* already at step 6"):
        train.main(dataclasses.replace(cfg, max_steps=2, resume=True))
    assert (tmp_path / "run" / "config.json").read_text() == config


@pytest.mark.slow
def test_hardening_negative_seed_refused_everywhere(tmp_path, tiny_pusht):
    """Cause 6: a negative --seed is one line and exit 2 in every script, and no folder is left behind."""
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    work = tmp_path / "work"
    work.mkdir()
    for args in (
        ("train.py", "--env", "pusht", "--preset", "tiny", "--data", tiny_pusht),
        ("data.py", "--env", "pusht", "--episodes", "2", "--out", work / "d.h5"),
        ("evaluate.py", "--ckpt", ckpt, "--device", "cpu"),
        ("policy.py", "--ckpt", ckpt, "--device", "cpu"),
        ("analyses.py", "capacity", "--env", "pusht", "--data", tiny_pusht),
    ):
        _one_line_error(_cli(*args, "--seed", "-1", cwd=work), "--seed -1")
    assert os.listdir(work) == []


def test_hardening_second_collection_to_one_out_refused(tmp_path):
    """Cause 6: a collection to an --out another collection holds is refused in one UsageError line."""
    out = str(tmp_path / "d.h5")
    with ExitStack() as cleanup:
        cli.lock_file(out + ".lock", f"--out {out}", "collection", cleanup)  # as a running collection holds it
        with pytest.raises(cli.UsageError, match="in use by another collection"):
            _collect(out, episodes=1)
    assert not os.path.exists(out) and not os.path.exists(out + ".parts")


def test_hardening_non_square_frames_refused(tmp_path, tiny_pusht):
    """Cause 6: non-square frames are refused in one line at training and evaluation start, not squashed."""
    n = 77
    wide = _data_file(tmp_path / "wide.h5", pixels=np.zeros((n, 32, 48, 3), np.uint8))
    with pytest.raises(cli.UsageError, match="32x48 px, not square"):
        train.main(tiny_cfg(tmp_path, wide))
    ckpt = _eval_ckpt(tmp_path / "ckpt.pt", tiny_pusht, "pusht")
    with pytest.raises(cli.UsageError, match="32x48 px, not square"):
        evaluate.main(_eval_cfg(ckpt, tmp_path, data=wide))
    assert not os.path.exists(tmp_path / "run" / "config.json")


@pytest.mark.slow
def test_hardening_two_collections_at_once(tmp_path):
    """Cause 6: `data.py` to an --out that a running collection writes is refused in one line; the first goes on."""
    out = tmp_path / "d.h5"
    cmd = [sys.executable, os.path.join(REPO, "data.py"), "--env", "tworoom", "--episodes", "500", "--img_size", "32"]
    cmd += ["--workers", "1", "--out", str(out)]
    first = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        for _ in range(600):
            if os.path.exists(str(out) + ".parts"):
                break
            time.sleep(0.1)
        res = _cli("data.py", "--env", "tworoom", "--episodes", "500", "--img_size", "32", "--out", out)
        _one_line_error(res, "in use by another collection")
        assert first.poll() is None  # the first collection is untouched
    finally:
        first.terminate()
        first.wait(timeout=60)
