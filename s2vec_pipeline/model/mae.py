"""S2Vec masked autoencoder: a small ViT MAE over C×S×S rasters of S2 cell feature counts.

Follows the MAE reference implementation (He et al., 2022, "Masked Autoencoders Are Scalable
Vision Learners", CVPR; facebookresearch/mae ``models_mae.py``) with the choices of S2Vec
(Kreidieh et al., 2025, arXiv 2504.16942): one token per pixel by default (``patch_size=1``),
so each pixel's encoder token is that S2 cell's embedding; fixed 2-D sin-cos position
embeddings; per-sample random masking (ratio 0.75); a light decoder; MSE on masked tokens
only. Differences from the reference: no class token (embeddings are the
pixel tokens; the image embedding is their mean), the input is normalized per channel with
statistics from the training split (stored as buffers in the checkpoint) instead of per-patch
target normalization, and attention runs through ``F.scaled_dot_product_attention`` (flash /
memory-efficient kernels on GPU).

Training options beyond the reference (all off by default, see docs/quality.md for what they
did on the bundled extracts): ``augment`` applies a random element of the dihedral group D4
(the 8 rotations and reflections of the square) to each training image, because images on
different S2 cube faces are rotated relative to each other; ``empty_pixel_weight`` weighs the
loss of masked pixels whose channels are all zero; ``held_out_channels`` zeroes channels
(after normalization) at training and at embedding time, so a probe can use them as labels
the model never saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_pos_embed_2d(dim: int, grid: int) -> Tensor:
    """(grid*grid, dim) fixed sin-cos embedding, row-major (index = row*grid + col), as MAE."""
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2-D sin-cos")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64),
        torch.arange(grid, dtype=torch.float64),
        indexing="ij",
    )
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):  # first half encodes the row, second col
        angles = pos[:, None] * omega[None, :]
        parts += [torch.sin(angles), torch.cos(angles)]
    return torch.cat(parts, dim=1).float()


def dihedral_transform(x: Tensor, element: int) -> Tensor:
    """Element ``element`` (0..7) of D4 acting on the last two (square) axes of ``x``:
    ``element % 4`` quarter turns, preceded by a left-right flip when ``element >= 4``."""
    if not 0 <= element < 8:
        raise ValueError(f"a D4 element is 0..7, not {element}")
    if element >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k=element % 4, dims=(-2, -1))


def random_dihedral(x: Tensor, elements: Tensor) -> Tensor:
    """Each sample ``x[b]`` (B, C, S, S) transformed by D4 element ``elements[b]``."""
    out = torch.empty_like(x)
    for e in range(8):
        rows = torch.nonzero(elements == e).flatten()
        if len(rows):
            out[rows] = dihedral_transform(x[rows], e)
    return out


class Block(nn.Module):
    """Pre-norm transformer block: SDPA multi-head self-attention + GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, heads, n, head_dim)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class S2VecMAE(L.LightningModule):
    """Masked autoencoder over (B, C, S, S) rasters; ``encode`` gives one token per pixel.

    Defaults follow the S2Vec paper (Kreidieh et al., 2025) and are ``TrainConfig``'s: encoder
    256-d, 6 blocks, 8 heads; decoder 128-d, 2 blocks, 4 heads; MLP ratio 4; mask ratio 0.75.
    Optimizer: AdamW (betas 0.9/0.95, weight decay 0.05 on weights, none on biases and norms,
    as MAE), learning rate with linear warm-up over ``warmup_fraction`` of the steps and
    cosine decay to 0 (constant after warm-up when the number of steps is unknown).
    """

    def __init__(
        self,
        in_chans: int,
        img_size: int = 16,
        patch_size: int = 1,
        embed_dim: int = 256,
        depth: int = 6,
        num_heads: int = 8,
        decoder_embed_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        mask_seed: int | None = None,
        channels: Sequence[str] | None = None,
        augment: bool = False,
        empty_pixel_weight: float = 1.0,
        held_out_channels: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the image side {img_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), not {mask_ratio}")
        if not 0.0 <= empty_pixel_weight <= 1.0:
            raise ValueError(f"empty_pixel_weight must be in [0, 1], not {empty_pixel_weight}")
        if any(not 0 <= c < in_chans for c in held_out_channels):
            raise ValueError(f"held-out channel indices must be in 0..{in_chans - 1}")
        self.save_hyperparameters()
        self.in_chans, self.img_size, self.patch_size = in_chans, img_size, patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        patch_dim = patch_size * patch_size * in_chans

        # Per-channel normalization of log1p inputs, from the training split (set_normalization).
        self.register_buffer("channel_mean", torch.zeros(in_chans))
        self.register_buffer("channel_std", torch.ones(in_chans))
        # 1 for the channels the model sees, 0 for held-out ones (a constant, not saved).
        seen = torch.ones(in_chans)
        seen[list(held_out_channels)] = 0.0
        self.register_buffer("seen_channels", seen, persistent=False)

        self.patch_embed = nn.Linear(patch_dim, embed_dim)  # = conv with kernel = stride = p
        self.register_buffer(
            "pos_embed", sincos_pos_embed_2d(embed_dim, self.grid)[None], persistent=False
        )
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer(
            "decoder_pos_embed",
            sincos_pos_embed_2d(decoder_embed_dim, self.grid)[None],
            persistent=False,
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """As MAE: xavier-uniform linears (the patch embedding too), zero biases."""
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # --- normalization, patches ----------------------------------------------------------

    def set_normalization(self, mean: Sequence[float] | np.ndarray, std: Sequence[float]) -> None:
        """Store per-channel mean/std (std 0 → 1, so constant channels stay finite)."""
        mean_t = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        std_t = torch.as_tensor(np.asarray(std), dtype=torch.float32)
        if mean_t.shape != (self.in_chans,) or std_t.shape != (self.in_chans,):
            raise ValueError(f"normalization stats must have shape ({self.in_chans},)")
        std_t = torch.where(std_t > 1e-6, std_t, torch.ones_like(std_t))
        self.channel_mean.copy_(mean_t)
        self.channel_std.copy_(std_t)

    def normalize(self, x: Tensor) -> Tensor:
        """Per-channel standardized input; held-out channels are 0 (their training mean)."""
        z = (x - self.channel_mean[:, None, None]) / self.channel_std[:, None, None]
        return z * self.seen_channels[:, None, None]

    def token_weights(self, x: Tensor) -> Tensor:
        """(B, L) loss weight per token: ``empty_pixel_weight`` where every pixel of the
        token has all (seen) channels zero in the raw input, 1 elsewhere."""
        b, p, g = x.shape[0], self.patch_size, self.grid
        has_data = ((x != 0) & (self.seen_channels[:, None, None] > 0)).any(dim=1)  # (B, S, S)
        token_has_data = has_data.reshape(b, g, p, g, p).any(dim=4).any(dim=2).reshape(b, g * g)
        w = torch.full(
            token_has_data.shape, float(self.hparams.empty_pixel_weight), device=x.device
        )
        return torch.where(token_has_data, torch.ones_like(w), w)

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, S, S) → (B, L, p*p*C), patches row-major."""
        b, c, p, g = x.shape[0], self.in_chans, self.patch_size, self.grid
        x = x.reshape(b, c, g, p, g, p)
        return torch.einsum("bchpwq->bhwpqc", x).reshape(b, g * g, p * p * c)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, L, p*p*C) → (B, C, S, S)."""
        b, c, p, g = x.shape[0], self.in_chans, self.patch_size, self.grid
        x = x.reshape(b, g, g, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(b, c, g * p, g * p)

    # --- MAE -----------------------------------------------------------------------------

    def random_masking(
        self, x: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a random (1 - mask_ratio) of each sample's tokens (per-sample shuffle, as MAE).

        Returns the kept tokens, the mask (B, L; 1 = masked) and the indices that restore the
        original order.
        """
        b, n, d = x.shape
        keep = int(n * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(b, n, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x_kept = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return x_kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(
        self, patches: Tensor, mask_ratio: float, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        x = self.patch_embed(patches) + self.pos_embed
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        x = self.decoder_embed(latent)
        b, kept, d = x.shape
        x = torch.cat([x, self.mask_token.expand(b, ids_restore.shape[1] - kept, d)], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, d)) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    @staticmethod
    def forward_loss(
        target: Tensor, pred: Tensor, mask: Tensor, weight: Tensor | None = None
    ) -> Tensor:
        """Mean squared error over the masked tokens only, each token weighted by ``weight``
        (B, L) when given: sum(w · mask · mse) / sum(w · mask)."""
        per_token = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        w = mask if weight is None else mask * weight
        return (per_token * w).sum() / w.sum().clamp_min(1e-8)

    def forward(
        self, x: Tensor, mask_ratio: float | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, pred (B, L, p*p*C) in normalized units, mask (B, L)) for raw inputs x."""
        target = self.patchify(self.normalize(x))
        ratio = self.hparams.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(target, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        weight = None if self.hparams.empty_pixel_weight == 1.0 else self.token_weights(x)
        return self.forward_loss(target, pred, mask, weight), pred, mask

    def encode(self, x: Tensor) -> Tensor:
        """(B, S*S, D) pixel embeddings without masking; index = row*S + col.

        With ``patch_size`` > 1 every pixel gets its patch's token.
        """
        z = self.patch_embed(self.patchify(self.normalize(x))) + self.pos_embed
        for blk in self.blocks:
            z = blk(z)
        z = self.norm(z)
        p = self.patch_size
        if p > 1:
            b, g, d = z.shape[0], self.grid, z.shape[-1]
            z = z.view(b, g, 1, g, 1, d).expand(b, g, p, g, p, d).reshape(b, g * p * g * p, d)
        return z

    # --- Lightning -----------------------------------------------------------------------

    def _noise(self, batch: Tensor, step: int, salt: int) -> Tensor | None:
        """Masking noise from (mask_seed, step, rank): reproducible, also across resumes."""
        if self.hparams.mask_seed is None:
            return None
        g = torch.Generator(device=batch.device)
        rank = self.global_rank if self._trainer is not None else 0
        g.manual_seed(hash((self.hparams.mask_seed, salt, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        n = batch.shape[0]
        return torch.rand(n, self.num_patches, device=batch.device, generator=g)

    def augment_batch(self, batch: Tensor, step: int) -> Tensor:
        """A random D4 element per image (reproducible from mask_seed and step like the
        masks); training only, never at embedding time."""
        rank = self.global_rank if self._trainer is not None else 0
        g = torch.Generator(device="cpu")
        if self.hparams.mask_seed is None:
            g.seed()
        else:
            g.manual_seed(hash((self.hparams.mask_seed, 2, step, rank)) & 0x7FFF_FFFF_FFFF_FFFF)
        elements = torch.randint(0, 8, (batch.shape[0],), generator=g).to(batch.device)
        return random_dihedral(batch, elements)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        if self.hparams.augment:
            batch = self.augment_batch(batch, self.global_step)
        loss, _, _ = self(batch, noise=self._noise(batch, self.global_step, 0))
        self.log(
            "train_loss",
            loss,
            on_step=True,
            on_epoch=False,
            prog_bar=True,
            batch_size=batch.shape[0],
        )
        # The epoch's mean over every step, accumulated on the device (one sync per epoch).
        self.log(
            "epoch_train_loss",
            loss.detach(),
            on_step=False,
            on_epoch=True,
            batch_size=batch.shape[0],
        )
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        # The same masks every epoch, so validation losses are comparable across epochs.
        loss, _, _ = self(batch, noise=self._noise(batch, batch_idx, 1))
        self.log(
            "val_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=batch.shape[0],
            sync_dist=True,
        )
        return loss

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's optimizer config
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
            fused=self.device.type == "cuda",
        )
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        warmup = max(1, int(self.hparams.warmup_fraction * total)) if math.isfinite(total) else 1

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not math.isfinite(total):
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
