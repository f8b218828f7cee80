"""LeWM: a JEPA world model that learns from pixels, end to end, with two loss terms (LeWM paper, arXiv 2603.19312).

    frames --ViT-Tiny--> CLS --BN-MLP projector--> z_t (192-d)            docs/method.md §2
    5 raw actions --Conv1d(1x1) + MLP--> a_emb_t                           §1.3
    z_{t-2..t}, a_emb_{t-2..t} --causal AdaLN-zero transformer--> BN-MLP pred_proj --> z_pred_{t+1}   §1.4-1.5
    loss = MSE(z_pred, z_next) + lambd * SIGReg(z)                         §2.2, sigreg.py

Deliberately absent: no EMA target, no stop-gradient, no pretrained encoder, no pixel decoder. The targets are the
encoder's own outputs and the gradient flows through both branches; SIGReg alone prevents collapse.

Dimension letters: B batch, T frames, C/H/W image, P patches (+1 CLS), D embedding, A action block (frameskip x raw
action dim), S planner samples, N planning horizon in blocks.

Plain PyTorch: every block here copies out needing only torch (the loss also needs sigreg.py). Attention is
F.scaled_dot_product_attention; `kernels.use_fast_attention(model)` swaps in a faster CPU bf16 kernel with the same
maths, which the scripts do. The parameter and state-dict layout follow the official model closely; official.py
maps the released checkpoints (Hugging Face ViT names, transformers 4.x or 5.x) onto this module and exports ours in
their format. With PRESETS["paper"] and a 10-d action block the model has exactly 18,034,478 parameters.

Run (the export command lives in official.py, beside the format it writes):
    python model.py export --ckpt runs/pusht_cpu/ckpt.pt --out export/   # weights.pt + config.json + model.pt
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sigreg import SIGReg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --- configuration


@dataclass
class ModelConfig:
    img_size: int = 224  # input frames are resized to img_size x img_size
    patch_size: int = 14  # ViT patch size; (img_size / patch_size)^2 patch tokens + 1 CLS
    embed_dim: int = 192  # D: ViT width and embedding size
    enc_depth: int = 12  # ViT layers
    enc_heads: int = 3  # ViT attention heads
    enc_mlp: int = 768  # ViT MLP hidden size
    pred_depth: int = 6  # predictor blocks
    pred_heads: int = 16  # predictor attention heads
    pred_dim_head: int = 64  # predictor head dim (inner attention width = heads * dim_head)
    pred_mlp: int = 2048  # predictor MLP hidden size
    pred_dropout: float = 0.1  # predictor dropout (attention and MLP), training only
    proj_hidden: int = 2048  # hidden size of the BN-MLP projector and pred_proj
    action_dim: int = 10  # A: one action block = frameskip x raw action dim
    action_smoothed_dim: int = 10  # Conv1d output of the action encoder (official default, also for Cube)
    action_mlp_scale: int = 4  # action encoder MLP hidden = mlp_scale * embed_dim
    history: int = 3  # context frames of the predictor (its position table length)
    num_preds: int = 1  # frames predicted ahead per clip (clip length = history + num_preds)
    frameskip: int = 5  # raw environment steps between frames (= raw actions per block)


PRESETS = {
    # The official sizes (docs/method.md §2): ViT-Tiny/14 at 224 px, predictor 6 x 16 heads x 64, projectors 2048.
    "paper": ModelConfig(),
    # DEVIATION: reduced model for 2-core CPUs (docs/method.md §2: 64 px, patch 16, 6 encoder layers,
    # predictor depth 3 x 8 heads x 32, MLP 768, projectors 512). The method is unchanged: same components,
    # losses, SIGReg, history and frameskip. Chosen by measured throughput and validation loss (docs/results.md).
    "cpu": ModelConfig(
        img_size=64,
        patch_size=16,
        enc_depth=6,
        pred_depth=3,
        pred_heads=8,
        pred_dim_head=32,
        pred_mlp=768,
        proj_hidden=512,
    ),
    # Tests only: every component present, sizes tiny.
    "tiny": ModelConfig(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        enc_depth=2,
        enc_heads=2,
        enc_mlp=64,
        pred_depth=2,
        pred_heads=2,
        pred_dim_head=16,
        pred_mlp=64,
        proj_hidden=64,
    ),
}

# --- image preprocessing (the one place frames are normalised)


def preprocess(frames: torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 frames (..., H, W, 3) or (..., 3, H, W) -> float (..., 3, img_size, img_size), ImageNet-normalised.

    Official order (docs/method.md §3): scale to [0, 1], normalise, then bilinear antialiased resize if needed.
    """
    x = torch.as_tensor(frames)
    if x.dtype != torch.uint8:
        raise TypeError(f"preprocess expects uint8 frames, got {x.dtype}")
    if x.dim() < 3 or 3 not in (x.shape[-1], x.shape[-3]):
        raise ValueError(f"preprocess expects (..., H, W, 3) or (..., 3, H, W) frames, got {tuple(x.shape)}")
    if x.shape[-1] == 3:
        x = x.movedim(-1, -3)  # (..., 3, H, W)
    lead, (c, h, w) = x.shape[:-3], x.shape[-3:]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (x.float().div(255.0) - mean.to(x.device)) / std.to(x.device)  # (..., 3, H, W), a new tensor
    if (h, w) != (img_size, img_size):
        x = F.interpolate(x.reshape(-1, c, h, w), size=(img_size, img_size), mode="bilinear", antialias=True)
        x = x.reshape(*lead, c, img_size, img_size)
    return x


# --- building blocks


class MLPProjector(nn.Module):
    """Linear -> BatchNorm1d -> GELU -> Linear (docs/method.md §2); BN statistics over all rows of the batch."""

    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (rows, out_dim)


class ViTBlock(nn.Module):
    """Pre-LN ViT layer, Hugging Face ViT maths: LN eps 1e-12, qkv with bias, exact GELU, no dropout."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float = 1e-12):
        super().__init__()
        self.heads = heads
        self.sdpa = F.scaled_dot_product_attention  # the attention kernel; kernels.py can swap in a faster one
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)  # fused query/key/value (HF keeps three Linears; same maths)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p, d = x.shape  # (B, P, D)
        q, k, v = self.qkv(self.norm1(x)).view(b, p, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = self.sdpa(q, k, v)  # (B, heads, P, D/heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, p, d))  # (B, P, D)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))  # (B, P, D)


class ViT(nn.Module):
    """ViT encoder returning the CLS token after the final LayerNorm (no pooler), docs/method.md §2."""

    def __init__(self, img_size: int, patch_size: int, dim: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([ViTBlock(dim, heads, mlp_dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        # transformers 4.x ViT init: weights and the two tables ~ N(0, 0.02) truncated at +-2, biases 0, LN (1, 0).
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"encoder expects {self.img_size}x{self.img_size} pixels, got {tuple(x.shape[-2:])}")
        b, c, h, w = x.shape
        p = self.patch_embed.kernel_size[0]
        # Patch embedding as one matmul over flattened patches: the same maths as the stride-p Conv2d (whose
        # weights it uses), several times faster to train on CPUs, where the conv backward is slow.
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        x = F.linear(x, self.patch_embed.weight.flatten(1), self.patch_embed.bias)  # (B, P-1, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, P, D)
        for block in self.blocks:
            x = block(x)  # (B, P, D)
        return self.norm(x)[:, 0]  # (B, D) CLS token


class ActionEncoder(nn.Module):
    """Official `Embedder`: per-step 1x1 Conv1d to 10 dims (no temporal mixing), then Linear-SiLU-Linear (§1.3)."""

    def __init__(self, action_dim: int, dim: int, smoothed_dim: int = 10, mlp_scale: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(action_dim, smoothed_dim, kernel_size=1)
        self.fc1 = nn.Linear(smoothed_dim, mlp_scale * dim)
        self.fc2 = nn.Linear(mlp_scale * dim, dim)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        # contiguous: on the transposed view, fc1 would run as a batched matmul over a copied weight per row
        a = self.conv(a.float().transpose(1, 2)).transpose(1, 2).contiguous()  # (B, T, smoothed_dim)
        return self.fc2(F.silu(self.fc1(a)))  # (B, T, D)


class CausalAttention(nn.Module):
    """Predictor attention: its own affine pre-LN (eps 1e-5), bias-free qkv, causal SDPA, dropout (§1.4)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        self.heads, self.dim_head, self.dropout = heads, dim_head, dropout
        self.sdpa = F.scaled_dot_product_attention  # the attention kernel; kernels.py can swap in a faster one
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.proj = nn.Linear(heads * dim_head, dim)

    def forward(self, x: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With `cache` (a list, [] or [keys, values] of earlier tokens), x holds the
        newest tokens only (all of them when the cache is empty, else one): they attend to the cached ones too,
        and the cache is extended in place. Used by the planning rollout while its window still grows."""
        b, t, _ = x.shape  # (B, T, D)
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        if cache:
            if t != 1:
                raise ValueError(f"a cached attention step takes one new token, got {t}")
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, h, P+1, dh)
        if cache is not None:
            cache[:] = [k, v]
        p = self.dropout if self.training else 0.0
        # The one new token after cached ones is the last in time and attends to all of them: no mask needed.
        a = self.sdpa(q, k, v, is_causal=k.shape[2] == t, dropout_p=p)  # (B, h, T, dh)
        a = self.proj(a.transpose(1, 2).reshape(b, t, -1))  # (B, T, D)
        return F.dropout(a, p, self.training)


class FeedForward(nn.Module):
    """Predictor MLP: its own affine pre-LN (eps 1e-5), Linear-GELU-Dropout-Linear-Dropout (§1.4)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(self.fc1(self.norm(x))), self.dropout, self.training)  # (B, T, hidden)
        return F.dropout(self.fc2(h), self.dropout, self.training)  # (B, T, D)


class ConditionalBlock(nn.Module):
    """Transformer block with per-token AdaLN-zero action conditioning (DiT-style), §1.4.

    The modulated input is normalised twice: a non-affine LN (eps 1e-6) before the modulation, then the attention's
    and MLP's own affine LN, exactly as the official block.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = CausalAttention(dim, heads, dim_head, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mlp_dim, dropout)
        self.adaln = nn.Linear(dim, 6 * dim)
        # AdaLN-zero: the gates start at 0, so every block starts as the identity and ignores the actions.
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """Action embeddings (B, T, D) -> this block's AdaLN parameters (B, T, 6D); per token, position-free."""
        return self.adaln(F.silu(c))

    def forward(self, x: torch.Tensor, mod: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        """x (B, T, D) and `modulation(c)` (B, T, 6D) -> (B, T, D)."""
        # Chunk order of the official code: shift, scale, gate for attention, then for the MLP.
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 x (B, T, D)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1, cache)  # (B, T, D)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)  # (B, T, D)


class Predictor(nn.Module):
    """Causal transformer over at most `num_frames` embeddings, conditioned per token on action embeddings."""

    def __init__(self, dim: int, num_frames: int, depth: int, heads: int, dim_head: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, num_frames, dim))  # official init: std 1, not 0.02
        self.blocks = nn.ModuleList([ConditionalBlock(dim, heads, dim_head, mlp_dim, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def modulations(self, a_emb: torch.Tensor) -> list[torch.Tensor]:
        """Action embeddings (B, T, D) -> every block's AdaLN parameters, [(B, T, 6D)] * depth."""
        return [block.modulation(a_emb) for block in self.blocks]

    def forward(
        self, z: torch.Tensor, a_emb: torch.Tensor | None, caches: list | None = None, start: int = 0, mods=None
    ):
        """z, a_emb (B, T, D) -> (B, T, D). `caches` (one list per block) and `start` (the position of z's first
        token) let the rollout feed only the newest token while earlier ones keep their positions. `mods`, the
        tokens' slice of `modulations(a_emb)`, replaces a_emb: the rollout computes them once per action block."""
        mods = self.modulations(a_emb) if mods is None else mods
        t = z.shape[1]
        if start + t > self.pos_embed.shape[1]:
            raise ValueError(f"predictor window holds at most {self.pos_embed.shape[1]} frames, got {start + t}")
        x = z + self.pos_embed[:, start : start + t]  # (B, T, D); positions relative to the window
        for i, block in enumerate(self.blocks):
            x = block(x, mods[i], None if caches is None else caches[i])  # (B, T, D)
        return self.norm(x)  # (B, T, D)


# --- the world model


class LeWM(nn.Module):
    """Encoder + projector, action encoder, predictor + pred_proj. Tensors in, tensors out; inputs never mutated."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.encoder = ViT(cfg.img_size, cfg.patch_size, d, cfg.enc_depth, cfg.enc_heads, cfg.enc_mlp)
        self.projector = MLPProjector(d, cfg.proj_hidden, d)
        self.action_encoder = ActionEncoder(cfg.action_dim, d, cfg.action_smoothed_dim, cfg.action_mlp_scale)
        self.predictor = Predictor(
            d, cfg.history, cfg.pred_depth, cfg.pred_heads, cfg.pred_dim_head, cfg.pred_mlp, cfg.pred_dropout
        )
        self.pred_proj = MLPProjector(d, cfg.proj_hidden, d)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (..., H, W, 3) or (..., 3, H, W) -> normalised float (..., 3, img_size, img_size)."""
        return preprocess(frames, self.cfg.img_size)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, T, 3, H, W) -> z (B, T, D)."""
        if pixels.dim() != 5 or pixels.shape[2] != 3:
            raise ValueError(
                f"encode expects normalised pixels (B, T, 3, H, W), got {tuple(pixels.shape)}; "
                "for raw uint8 frames use model.embed(frames)"
            )
        b, t = pixels.shape[:2]
        h = self.encoder(pixels.flatten(0, 1))  # (B*T, D) CLS
        return self.projector(h).view(b, t, -1)  # (B, T, D); BN statistics over all B*T rows

    @torch.no_grad()
    def embed(self, frames) -> torch.Tensor:
        """uint8 frames (H, W, 3), (T, H, W, 3) or (B, T, H, W, 3) -> z (D,), (T, D) or (B, T, D), no gradient."""
        x = torch.as_tensor(frames)
        if x.dtype != torch.uint8 or x.dim() not in (3, 4, 5) or x.shape[-1] != 3:
            raise ValueError(
                f"embed expects uint8 frames (H, W, 3), (T, H, W, 3) or (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}"
            )
        lead = x.shape[:-3]
        x = x.reshape(1, -1, *x.shape[-3:]).to(next(self.parameters()).device)  # (1, B*T, H, W, 3)
        z = self.encode(self.preprocess(x))  # (1, B*T, D); eval-mode BN is per frame
        return z.reshape(*lead, -1)  # (..., D)

    def predict(self, z: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """z (B, T, D) and normalised action blocks (B, T, A) -> z_pred (B, T, D), position t predicting t+1."""
        self._check_actions(actions)
        a_emb = self.action_encoder(actions)  # (B, T, D)
        h = self.predictor(z, a_emb)  # (B, T, D)
        return self.pred_proj(h.flatten(0, 1)).view_as(z)  # (B, T, D)

    def forward(self, pixels: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward: pixels (B, T, 3, H, W), blocks (B, T, A) -> z (B, T, D), z_pred (B, history, D)."""
        z = self.encode(pixels)  # (B, T, D)
        h = self.cfg.history
        return z, self.predict(z[:, :h], actions[:, :h])  # (B, T, D), (B, h, D)

    def rollout(self, z0: torch.Tensor, actions: torch.Tensor, action_history: torch.Tensor | None = None):
        """Autoregressive planning rollout (docs/method.md §9), batched over S candidate action sequences.

        z0 (B, T0, D) observed context embeddings (T0 >= 1); actions (B, S, N, A) candidate blocks, the first one
        leaving the last context frame; action_history (B, T0-1, A) the blocks between context frames.
        Returns (B, S, T0+N, D): the context followed by N predictions. Each step feeds only the last `history`
        embeddings and their action blocks, with positions re-indexed from 0, and keeps the last output.
        Differentiable (the gradient planner needs it); CEM calls it under torch.inference_mode.
        """
        b, s, n, _ = actions.shape
        t0, d = z0.shape[1], z0.shape[2]
        self._check_actions(actions)
        acts = actions.reshape(b * s, n, -1)  # (B*S, N, A)
        if t0 > 1:
            if action_history is None or action_history.shape[1] != t0 - 1:
                raise ValueError(f"a context of {t0} frames needs action_history of shape (B, {t0 - 1}, A)")
            hist = action_history[:, None].expand(b, s, t0 - 1, -1).reshape(b * s, t0 - 1, -1)
            acts = torch.cat([hist, acts], dim=1)  # (B*S, T0-1+N, A)
        # Per token, so computed once: the action embeddings and every block's AdaLN parameters (a token fed in
        # up to `history` windows would otherwise be modulated once per window).
        mods = self.predictor.modulations(self.action_encoder(acts))  # [(B*S, T0-1+N, 6D)] * depth
        z = z0[:, None].expand(b, s, t0, d).reshape(b * s, t0, d)  # (B*S, T0, D), no copy of the context
        zs = [z[:, i] for i in range(t0)]
        w = self.cfg.history
        caches = [[] for _ in self.predictor.blocks]  # per block: keys/values of the tokens fed so far
        for k in range(t0, t0 + n):
            lo = max(0, k - w)
            if lo == 0:
                # The window still starts at position 0, so the earlier tokens' keys and values are those of the
                # previous step (causal attention): feed only the newest token (the whole context the first time).
                # This saves 3 of the 12 token passes of the official 5-step rollout, with the same result.
                first = 0 if k == t0 else k - 1
                window = [m[:, first:k] for m in mods]
                h = self.predictor(torch.stack(zs[first:k], dim=1), None, caches, start=first, mods=window)
            else:  # the window slides: positions are re-indexed from 0, so every token is recomputed
                window = [m[:, lo:k] for m in mods]
                h = self.predictor(torch.stack(zs[lo:k], dim=1), None, mods=window)  # (B*S, history, D)
            h = h[:, -1]  # (B*S, D) last position only
            zs.append(self.pred_proj(h))  # (B*S, D); eval-mode BN is per row, so one row at a time is exact
        return torch.stack(zs, dim=1).view(b, s, t0 + n, d)  # (B, S, T0+N, D)

    def _check_actions(self, actions: torch.Tensor):
        if actions.shape[-1] != self.cfg.action_dim:
            raise ValueError(f"action blocks must have {self.cfg.action_dim} dims, got {actions.shape[-1]}")


# --- the loss (docs/method.md §6)


def lewm_loss(model: nn.Module, pixels: torch.Tensor, actions: torch.Tensor, sigreg: SIGReg, lambd: float = 0.09):
    """Normalised clip pixels (B, T, 3, H, W) and action blocks (B, T, A) -> (loss, {"pred_loss", "sigreg_loss"}).

    `model` is a LeWM or a DDP wrapper of one (it is called, so DDP can synchronise gradients).
    Teacher forcing: with the causal mask, output position i sees z_0..z_i and a_0..a_i and predicts z_{i+1}.
    No stop-gradient on the targets. SIGReg sees all T frames, one test per time step, batch on axis 1.
    """
    z, z_pred = model(pixels, actions)  # (B, T, D), (B, history, D)
    target = z[:, z.shape[1] - z_pred.shape[1] :]  # (B, history, D): frames num_preds.. (official emb[:, num_preds:])
    pred_loss = (z_pred - target).pow(2).mean()
    sigreg_loss = sigreg(z.transpose(0, 1))  # (T, B, D) -> scalar
    loss = pred_loss + lambd * sigreg_loss
    return loss, {"pred_loss": pred_loss.detach(), "sigreg_loss": sigreg_loss.detach()}


# --- checkpoints of this project's runs


def check_state_dict(model: nn.Module, state: dict, source: str):
    """Raise ValueError naming missing, unexpected, mis-shaped and non-finite keys instead of loading a wrong model."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a state dict (a dict of tensors), but a {type(state).__name__}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match this model configuration:"]
        for name, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", shapes)):
            if items:
                lines.append(f"  {name} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise ValueError("\n".join(lines))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"{source} holds non-finite weights (NaN or inf) in {len(bad)} tensors: "
            + ", ".join(bad[:4])
            + (" ..." if len(bad) > 4 else "")
        )


def save_checkpoint(path: str, ckpt: dict):
    """Write plain data (tensors, numbers, strings, dicts) atomically: a crash never leaves a corrupt file, and a
    failed write (a full disk) removes its temporary file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """Load a file written by save_checkpoint; plain data only (weights_only=True). A file that is not one raises
    one ValueError line naming it (never torch's advice to load untrusted files with weights_only off)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, foreign or random files end here
        why = "it holds Python objects, not plain data" if "weights_only" in str(e) else "not a file torch.save wrote"
        raise ValueError(f"{path} is not a readable checkpoint ({why}, or a truncated one)") from e


def check_checkpoint(ckpt, source: str, keys: tuple = ()) -> ModelConfig:
    """Raise one ValueError line naming `source` unless `ckpt` has the structure planning needs (a dict holding a
    state dict `model`, a `model_config`, and `action_stats`, where present, with a finite mean and positive std per
    raw action dim) and the extra `keys`; returns its model config. check_state_dict checks the weights against it."""
    kind = "an empty dict" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
    if not isinstance(ckpt, dict) or not ckpt:
        raise ValueError(f"{source} holds {kind}, not a checkpoint written by train.py")
    missing = [k for k in ("model", "model_config", *keys) if k not in ckpt]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: not a training checkpoint written by train.py")
    try:
        cfg = ModelConfig(**ckpt["model_config"])
        raw = cfg.action_dim // cfg.frameskip
        given = ckpt.get("action_stats", {"mean": [0.0] * raw, "std": [1.0] * raw})
        stats = [torch.as_tensor(given[k], dtype=torch.float64) for k in ("mean", "std")]
    except (TypeError, KeyError, ValueError, RuntimeError) as e:
        raise ValueError(f"{source}: malformed model_config or action_stats ({type(e).__name__}: {e})") from None
    held = ckpt.get("val_episodes", [])
    if not isinstance(held, list | tuple) or not all(isinstance(e, int) and e >= 0 for e in held):
        raise ValueError(f"{source}: val_episodes must be a list of episode indices")
    if any(s.shape != (raw,) for s in stats) or not all(s.isfinite().all() for s in stats) or (stats[1] <= 0).any():
        raise ValueError(
            f"{source}: action_stats must hold a finite mean and positive std for each of the {raw} raw actions of "
            f"the model's action blocks ({cfg.action_dim} = {cfg.frameskip} x {raw})"
        )
    return cfg


def model_from_checkpoint(ckpt: dict, cfg: ModelConfig | None = None, source: str = "checkpoint") -> LeWM:
    """Build the model a checkpoint describes (or check it against `cfg`) and load its weights, in eval mode; a
    malformed checkpoint raises ValueError naming `source`."""
    saved = check_checkpoint(ckpt, source)
    if cfg is not None and cfg != saved:
        diff = {f.name: (getattr(saved, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        raise ValueError(f"checkpoint was trained with another architecture; (checkpoint, requested): {diff}")
    model = LeWM(saved)
    check_state_dict(model, ckpt["model"], source)
    model.load_state_dict(ckpt["model"])
    return model.eval()


# --- command line

if __name__ == "__main__":
    import official  # imported here: official.py builds on this file, never the reverse

    official.main()
