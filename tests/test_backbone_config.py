"""The DiT follows the autoencoder's latents and takes named presets from YAML."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from unifusion.autoencoders import Autoencoder, LatentSpec
from unifusion.backbones import DiT
from unifusion.conditioners.base import Conditioning


class _Latent4x(Autoencoder):
    """A stand-in 4-channel autoencoder with 4x compression (average pooling)."""

    latent_channels = 4
    compression = 4

    def encode(self, images: Tensor) -> Tensor:
        x = torch.nn.functional.avg_pool2d(images, 4)
        return torch.cat([x, x.mean(1, keepdim=True)], 1)

    def decode(self, latents: Tensor) -> Tensor:
        return torch.nn.functional.interpolate(latents[:, :3], scale_factor=4)


def test_dit_takes_channels_and_size_from_the_latent_spec():
    dit = DiT(_Latent4x().spec, image_size=32, width=32, depth=1, num_heads=2)
    assert (dit.in_channels, dit.input_size) == (4, 8)
    x = torch.randn(2, 4, 8, 8)
    cond = Conditioning(tokens=torch.randn(2, 3, 32), mask=torch.ones(2, 3, dtype=torch.bool))
    assert dit(x, torch.rand(2), cond).shape == x.shape
    # pixel space: the identity autoencoder's spec, sizes as given
    assert DiT(LatentSpec(3, 1), image_size=16, width=32, depth=1, num_heads=2).input_size == 16


def test_hand_set_sizes_that_disagree_with_the_autoencoder_name_both_sides():
    with pytest.raises(ValueError, match="in_channels=3 but the autoencoder's latents have 4 channels"):
        DiT(_Latent4x().spec, in_channels=3, image_size=32, width=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="not divisible by the autoencoder's compression 4"):
        DiT(_Latent4x().spec, image_size=30, width=32, depth=1, num_heads=2)


def test_presets_from_config_with_overrides():
    small = DiT(preset="small", image_size=16)
    assert (small.width, small.depth, small.num_heads) == (384, 12, 6)
    assert DiT(preset="tiny", depth=2).depth == 2
    with pytest.raises(ValueError, match="unknown DiT preset 'huge'"):
        DiT(preset="huge")
    # a YAML backbone block with only `preset:` builds through the pipeline's typed parser
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--backbone", type=Callable[[LatentSpec], torch.nn.Module])
    cfg = parser.parse_object({"backbone": {"class_path": "unifusion.backbones.DiT", "init_args": {"preset": "base"}}})
    built = parser.instantiate(cfg).backbone(LatentSpec(3, 1))
    assert (built.width, built.depth, built.num_heads) == (768, 12, 12)


def test_ffn_multiple_of_rounds_the_swiglu_width_up():
    # the default keeps round(D * mlp_ratio): existing checkpoints load unchanged
    assert DiT(image_size=16, in_channels=3).blocks[0].ff.hidden_dim == 341
    aligned = DiT(image_size=16, in_channels=3, ffn_multiple_of=8)
    assert {b.ff.hidden_dim for b in aligned.blocks} == {344}
    assert aligned.blocks[0].ff.down.in_features == 344
    assert DiT(image_size=16, in_channels=3, mlp_ratio=2.0, ffn_multiple_of=8).blocks[0].ff.hidden_dim == 256
    x = torch.randn(2, 3, 16, 16)
    cond = Conditioning(tokens=torch.randn(2, 3, 128), mask=torch.ones(2, 3, dtype=torch.bool))
    assert aligned(x, torch.rand(2), cond).shape == x.shape
    with pytest.raises(ValueError, match="ffn_multiple_of must be >= 1"):
        DiT(image_size=16, in_channels=3, ffn_multiple_of=0)
