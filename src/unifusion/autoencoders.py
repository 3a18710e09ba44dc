"""Autoencoders that map images to the space the DiT denoises.

``IdentityAutoencoder`` keeps pixel space (the quickstart); ``DiffusersAutoencoder``
wraps a frozen diffusers ``AutoencoderKL`` loaded with ``from_pretrained``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LatentSpec:
    """What the backbone may rely on about the space it denoises (known without weights)."""

    channels: int
    compression: int = 1  # image side / latent side


class Autoencoder(nn.Module):
    """Frozen image <-> latent map. Images are (B, 3, H, W) in [-1, 1]."""

    #: latent channels and spatial compression; the DiT is built to match (``backbone(autoencoder.spec)``)
    latent_channels: int = 3
    compression: int = 1

    @property
    def spec(self) -> LatentSpec:
        return LatentSpec(channels=int(self.latent_channels), compression=int(self.compression))

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def train(self, mode: bool = True) -> Autoencoder:
        return super().train(False)


class IdentityAutoencoder(Autoencoder):
    """Pixel space: the DiT denoises images directly (latent = image)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.latent_channels = channels

    def encode(self, images: Tensor) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1, 1)


class DiffusersAutoencoder(Autoencoder):
    """A frozen diffusers ``AutoencoderKL`` (e.g. a 16x-compression VAE as in the paper).

    Latents are normalised as ``(z - shift_factor) * scaling_factor`` using the values from
    the VAE's config unless given. The weights are not part of this module's state dict,
    so model checkpoints stay small and the optimizer never sees them.

    ``build_tiny_if_missing``: write a tiny random VAE (:func:`build_tiny_vae`) to ``path``
    first when it holds none (offline, like the encoder's ``build_tiny_if_missing``).
    """

    def __init__(
        self,
        path: str,
        subfolder: str | None = None,
        dtype: str = "float32",
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        sample_posterior: bool = False,
        build_tiny_if_missing: bool = False,
    ) -> None:
        super().__init__()
        from diffusers import AutoencoderKL

        local = os.path.join(path, subfolder) if subfolder else path
        if build_tiny_if_missing:
            # like the tiny VLM: a random offline VAE for tests and the latent-space quickstart
            ensure_tiny_vae(local)
        if os.path.sep in path and not os.path.isdir(local):
            raise FileNotFoundError(
                f"DiffusersAutoencoder: no such directory {local!r}; pass a local VAE folder or a hub id"
            )
        import importlib.util

        # low_cpu_mem_usage needs `accelerate`; without it diffusers warns on every load
        vae = AutoencoderKL.from_pretrained(
            path,
            subfolder=subfolder,
            torch_dtype=getattr(torch, dtype),
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
        vae.eval().requires_grad_(False)
        self._vae = [vae]  # list: keeps it out of the module tree
        cfg = vae.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        self.shift_factor = float(
            shift_factor if shift_factor is not None else (getattr(cfg, "shift_factor", None) or 0.0)
        )
        self.latent_channels = int(cfg.latent_channels)
        self.compression = 2 ** (len(cfg.block_out_channels) - 1)
        self.sample_posterior = sample_posterior

    @property
    def vae(self):
        return self._vae[0]

    def _apply(self, fn, recurse: bool = True):
        self._vae[0] = self._vae[0]._apply(fn)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        z = dist.sample() if self.sample_posterior else dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


# ------------------------------------------------------------------------ tiny offline VAE
TINY_VAE_MARKER = "unifusion_tiny_vae.json"


def build_tiny_vae(
    out_dir: str,
    seed: int = 0,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (16, 32),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
) -> str:
    """Build a tiny random-initialised diffusers ``AutoencoderKL`` and ``save_pretrained`` it to ``out_dir``.

    Nothing is downloaded. Defaults: 4 latent channels, spatial compression
    ``2 ** (len(block_out_channels) - 1)`` = 2 (16 px images -> 8x8 latents), about 170k
    parameters. The result loads with ``AutoencoderKL.from_pretrained(out_dir)`` like a real
    VAE; it reconstructs nothing useful (random weights) but exercises the latent-space path.
    Written into a temporary sibling folder and moved into place, so a concurrent reader
    never sees half a model.
    """
    import json
    import shutil
    import tempfile

    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=32,
            scaling_factor=1.0,
        )
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tiny-vae-", dir=parent)
    try:
        vae.save_pretrained(tmp)
        with open(os.path.join(tmp, TINY_VAE_MARKER), "w") as f:
            json.dump(
                {"seed": seed, "latent_channels": latent_channels, "block_out_channels": list(block_out_channels)}, f
            )
        os.makedirs(out_dir, exist_ok=True)
        # config.json last: its presence is what marks the folder as complete
        names = sorted(os.listdir(tmp), key=lambda name: name == "config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_tiny_vae(path: str, seed: int = 0) -> str:
    """Build the tiny VAE at ``path`` unless ``path/config.json`` already exists."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_tiny_vae(path, seed=seed)
    return path
