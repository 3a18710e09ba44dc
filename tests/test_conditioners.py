"""Conditioners: shapes, padding invariance, gradients, build-time compatibility errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import pytest
import torch
from jsonargparse import ArgumentParser

from unifusion.backbones import DiT
from unifusion.conditioners import (
    BackboneSpec,
    Conditioner,
    Conditioning,
    HiddenStateInjection,
    Krea2LayerwisePooling,
    KVFusion,
    LastLayer,
    LayerwiseAttentionPooling,
    ParaUniFusion,
    ScalarMix,
)
from unifusion.features import EncoderFeatures, EncoderSpec, TokenRole
from unifusion.layers import LayerwiseAttentionBlock, PerLayerRMSNorm, TransformerBlock, gather_tokens, scatter_tokens
from unifusion.refiners import Refiner

H, D, DEPTH, HEADS = 32, 48, 4, 4
LAYER_IDS = (0, 1, 2, 3, 4)  # "all" taps of a 4-block encoder
ENC = EncoderSpec(hidden_size=H, layer_ids=LAYER_IDS, depth=4, num_heads=4, head_dim=8, name="tiny-enc")
BB = BackboneSpec(width=D, depth=DEPTH, num_heads=HEADS)

FACTORIES: dict[str, Callable[[EncoderSpec, BackboneSpec], Conditioner]] = {
    "last_layer": lambda e, b: LastLayer(e, b),
    "penultimate": lambda e, b: LastLayer(e, b, layer="penultimate", norm=False),
    "kv_fusion": lambda e, b: KVFusion(e, b, project=True, layers=[0, 1, 2, 3]),
    "hsi": lambda e, b: HiddenStateInjection(e, b, layers=[0, 1, 2, 3], gate=True),
    "lap": lambda e, b: LayerwiseAttentionPooling(e, b, num_heads=4),
    "lap_per_layer": lambda e, b: LayerwiseAttentionPooling(e, b, num_heads=4, per_layer=True, num_blocks=1),
    "parauni": lambda e, b: ParaUniFusion(e, b, num_heads=4),
    "parauni_unshared": lambda e, b: ParaUniFusion(e, b, num_heads=4, shared=False, layers=[1, 3]),
    "scalar_mix": lambda e, b: ScalarMix(e, b),
    "krea2": lambda e, b: Krea2LayerwisePooling(e, b, num_heads=4, num_kv_heads=2, intermediate_size=40),
}


def make_features(
    lengths: list[int], seq_len: int | None = None, seed: int = 0, pad_value: float = 0.0
) -> EncoderFeatures:
    """Per-sample real lengths; padding filled with ``pad_value`` (garbage must not matter)."""
    g = torch.Generator().manual_seed(seed)
    s = seq_len or max(lengths)
    hidden = torch.randn(len(lengths), s, len(LAYER_IDS), H, generator=g)
    # taps of very different scales, like a random VLM
    hidden = hidden * torch.tensor([1.0, 3.0, 10.0, 30.0, 100.0])[None, None, :, None]
    mask = torch.arange(s)[None] < torch.tensor(lengths)[:, None]
    hidden = torch.where(mask[:, :, None, None], hidden, torch.full_like(hidden, pad_value))
    roles = torch.where(mask, int(TokenRole.USER_TEXT), int(TokenRole.PAD)).to(torch.int8)
    return EncoderFeatures(hidden=hidden, mask=mask, roles=roles, layer_ids=LAYER_IDS)


def outputs(cond: Conditioning) -> list[torch.Tensor]:
    """Every tensor a conditioning carries (tokens, each K, V, each residual)."""
    out = [cond.tokens] if cond.tokens is not None else []
    for kv in cond.kv or []:
        if kv is not None:
            out += [kv[0].transpose(1, 2), kv[1].transpose(1, 2)]  # -> (B, S, heads, hd)
    out += [r for r in cond.residuals or [] if r is not None]
    return out


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_shapes(name: str) -> None:
    cond = FACTORIES[name](ENC, BB)(make_features([3, 6]))
    assert cond.mask.shape == (2, 6) and cond.mask.dtype == torch.bool
    if cond.tokens is not None:
        assert cond.tokens.shape == (2, 6, D)
    if cond.kv is not None:
        assert len(cond.kv) == DEPTH
        for k, v in cond.kv:
            assert k.shape == v.shape == (2, HEADS, 6, D // HEADS)
    if cond.residuals is not None:
        assert len(cond.residuals) == DEPTH and cond.residuals[-1] is None
        assert all(r.shape == (2, 6, D) for r in cond.residuals[:-1])
    assert outputs(cond), "a conditioner must produce something"
    for t in outputs(cond):
        assert torch.isfinite(t).all()
        # padding positions carry nothing
        assert t[0, 3:].abs().max() == 0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_padding_invariance(name: str) -> None:
    """Real-token outputs equal the unpadded run, whatever the padding length and content."""
    cond_mod = FACTORIES[name](ENC, BB).eval()
    padded = make_features([3, 5], seq_len=9, pad_value=7.0)
    alone = EncoderFeatures(
        hidden=padded.hidden[:1, :3], mask=padded.mask[:1, :3], roles=padded.roles[:1, :3], layer_ids=LAYER_IDS
    )
    with torch.no_grad():
        a, b = outputs(cond_mod(padded)), outputs(cond_mod(alone))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x[:1, :3], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradients_reach_every_parameter(name: str) -> None:
    module = FACTORIES[name](ENC, BB).train()
    feats = make_features([3, 6])
    assert not feats.hidden.requires_grad  # frozen encoder output: an input, not a leaf to train
    loss = sum((t.float() ** 2).mean() for t in outputs(module(feats)))
    loss.backward()
    for pname, p in module.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {pname}"


@pytest.mark.parametrize("lengths", [[0, 4], [0, 0]])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_empty_samples_are_finite(name: str, lengths: list[int]) -> None:
    """No real token in a sample (or the whole batch, as in an unconditional CFG pass) stays finite and zero."""
    out = outputs(FACTORIES[name](ENC, BB)(make_features(lengths, seq_len=4)))
    for t in out:
        assert torch.isfinite(t).all() and t[0].abs().max() == 0


def test_conditioners_take_every_token_they_are_given() -> None:
    """Token roles are chosen once, by the encoder: a conditioner neither drops tokens nor takes `roles`."""
    feats = make_features([4, 4])
    feats.roles[:, 0] = int(TokenRole.SYSTEM)
    cond = LastLayer(ENC, BB)(feats)
    assert cond.tokens.shape[1] == 4 and cond.mask.all()
    with pytest.raises(TypeError, match="roles"):
        LastLayer(ENC, BB, roles=["user_text"])  # type: ignore[call-arg]


def test_last_layer_picks_taps() -> None:
    feats = make_features([2, 2])
    last = LastLayer(ENC, BB, norm=False)
    pen = LastLayer(ENC, BB, layer="penultimate", norm=False)
    three = LastLayer(ENC, BB, layer=3, norm=False)
    assert (last.layer_id, pen.layer_id, three.layer_id) == (4, 3, 3)
    pen.adapter.load_state_dict(three.adapter.state_dict())
    torch.testing.assert_close(pen(feats).tokens, three(feats).tokens)
    same = BackboneSpec(width=H, depth=2, num_heads=4)
    raw = LastLayer(ENC, same, norm=False, adapter=False)(feats).tokens
    torch.testing.assert_close(raw, feats.hidden[:, :, 4])


def test_lap_pooling_weights_and_layer_dropout() -> None:
    lap = LayerwiseAttentionPooling(ENC, BB, num_heads=4).eval()
    assert lap.pooling_weights().shape == (5,)
    torch.testing.assert_close(lap.pooling_weights(), torch.full((5,), 0.2))
    per = LayerwiseAttentionPooling(ENC, BB, num_heads=4, per_layer=True)
    assert per.pooling_weights().shape == (DEPTH, 5)

    feats = make_features([4, 4])
    with torch.no_grad():
        base = lap(feats).tokens
        lap.layer_dropout = [0, 4]
        dropped = lap(feats).tokens
        # dropping a layer equals zeroing its pooling weight by hand
        lap.layer_dropout = []
        w = lap.pools[0].pool.weight
        saved = w.clone()
        w[0, 0] = 0
        w[0, 4] = 0
        manual = lap(feats).tokens
        w.copy_(saved)
    assert not torch.allclose(base, dropped)
    torch.testing.assert_close(dropped, manual)
    torch.testing.assert_close(lap(feats).tokens, base)
    with pytest.raises(ValueError, match=r"layer_dropout names layers \[7\]"):
        lap.set_layer_dropout([7])


def test_scalar_mix_weights() -> None:
    mix = ScalarMix(ENC, BB)
    torch.testing.assert_close(mix.pooling_weights(), torch.full((5,), 0.2))
    assert ScalarMix(ENC, BB, output_norm=True).gamma is None


def test_parauni_perturbation_only_in_training() -> None:
    m = ParaUniFusion(ENC, BB, num_heads=4, perturb_layers=[2], perturb_gamma=0.5)
    feats = make_features([3, 4])
    m.eval()
    with torch.no_grad():
        a, b = m(feats).tokens, m(feats).tokens
    torch.testing.assert_close(a, b)
    m.train()
    with torch.no_grad():
        c = m(feats).tokens
    assert not torch.allclose(a, c)


def test_lap_only_computes_real_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    orig = LayerwiseAttentionBlock.forward

    def spy(self: LayerwiseAttentionBlock, x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return orig(self, x)

    monkeypatch.setattr(LayerwiseAttentionBlock, "forward", spy)
    LayerwiseAttentionPooling(ENC, BB, num_heads=4, num_blocks=2)(make_features([2, 3], seq_len=10))
    assert seen == [5, 5]


# --- build-time compatibility errors name both sides -------------------------------------


def test_kv_fusion_depth_mismatch_message() -> None:
    enc12 = EncoderSpec(hidden_size=H, layer_ids=tuple(range(12)), depth=12, name="big-enc")
    with pytest.raises(
        ValueError, match="KV-fusion needs one encoder layer per DiT layer: encoder taps 12 layers, DiT has 8"
    ):
        KVFusion(enc12, BackboneSpec(width=H, depth=8, num_heads=4))


def test_kv_fusion_without_projection_needs_matching_sizes() -> None:
    with pytest.raises(ValueError, match=r"hidden size 32, DiT width 48; set project: true"):
        KVFusion(ENC, BB, layers=[0, 1, 2, 3])
    bb_heads = BackboneSpec(width=H, depth=4, num_heads=8)
    with pytest.raises(ValueError, match=r"encoder 'tiny-enc' has 4 heads x 8, DiT has 8 heads x 4"):
        KVFusion(ENC, bb_heads, layers=[0, 1, 2, 3])
    ok = KVFusion(ENC, BackboneSpec(width=H, depth=4, num_heads=4), layers=[1, 2, 3, 4])
    cond = ok(make_features([2, 3]))
    # naive variant: V is the hidden state itself, split into the DiT's heads
    v = cond.kv[0][1].transpose(1, 2).flatten(2)
    torch.testing.assert_close(v, make_features([2, 3]).hidden[:, :, 1])


def test_hsi_depth_mismatch_message() -> None:
    with pytest.raises(ValueError, match="HSI needs one encoder layer per DiT layer: encoder taps 5 layers, DiT has 4"):
        HiddenStateInjection(ENC, BB)
    with pytest.raises(ValueError, match="hidden size 32, DiT width 48"):
        HiddenStateInjection(ENC, BB, layers=[0, 1, 2, 3], project=False)


def test_unknown_layers_message() -> None:
    with pytest.raises(ValueError, match=r"does not tap; encoder taps layer ids \[0, 1, 2, 3, 4\]"):
        LayerwiseAttentionPooling(ENC, BB, num_heads=4, layers=[0, 9])
    with pytest.raises(ValueError, match=r"encoder layer 9.*tapped layer ids: \[0, 1, 2, 3, 4\]"):
        LastLayer(ENC, BB, layer=9)


def test_lap_heads_must_divide_hidden() -> None:
    with pytest.raises(
        ValueError, match=r"num_heads=32 must divide the encoder hidden size 48.*\[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]"
    ):
        LayerwiseAttentionPooling(EncoderSpec(hidden_size=48, layer_ids=(0, 1), depth=1, name="e"), BB)
    with pytest.raises(ValueError, match="encoder 'tiny-enc' has 32, DiT has 48"):
        LayerwiseAttentionPooling(ENC, BB, num_heads=4, project=False)


def test_last_layer_adapter_required() -> None:
    with pytest.raises(ValueError, match="hidden size 32 and the DiT width is 48"):
        LastLayer(ENC, BB, adapter=False)


def test_wrong_hidden_size_at_forward() -> None:
    lap = LayerwiseAttentionPooling(EncoderSpec(hidden_size=16, layer_ids=LAYER_IDS, depth=4), BB, num_heads=4)
    with pytest.raises(ValueError, match="built for encoder hidden size 16"):
        lap(make_features([2]))


# --- shared blocks -------------------------------------------------------------------------


def test_gather_scatter_roundtrip() -> None:
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    y = scatter_tokens(gather_tokens(x, mask), mask)
    torch.testing.assert_close(y, x * mask[..., None])


def test_transformer_block_padding_and_per_layer_norm() -> None:
    block = TransformerBlock(16, 4, num_kv_heads=2, gated_attn=True)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2, dtype=torch.bool)
    x2 = x.clone()
    x2[:, 3:] = 100.0
    torch.testing.assert_close(block(x, mask)[:, :3], block(x2, mask)[:, :3])
    norm = PerLayerRMSNorm(3, 16)
    y = norm(torch.randn(4, 3, 16) * torch.tensor([1.0, 10.0, 100.0])[None, :, None])
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4, 3), rtol=1e-4, atol=1e-4)


# --- the experiment overlays build and run with the quickstart sizes ----------------------

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "conditioners"
OVERLAYS = ("last_layer", "kv_fusion", "hsi", "lap", "lap_per_layer", "parauni", "scalar_mix", "krea2")


@pytest.mark.parametrize("name", OVERLAYS)
def test_experiment_overlay_builds_for_quickstart_sizes(name: str, tmp_path: Path) -> None:
    """Overlay on a quickstart-like base (tiny VLM: width 64, taps 0..4; tiny DiT: depth 4)."""
    base = tmp_path / "base.yaml"
    base.write_text(
        "model:\n  conditioner:\n    class_path: unifusion.conditioners.LayerwiseAttentionPooling\n"
        "    init_args: {num_blocks: 2, num_heads: 4}\n"
    )
    parser = ArgumentParser()
    parser.add_argument("-c", "--config", action="config")
    parser.add_argument("--model.conditioner", type=Callable[[EncoderSpec, BackboneSpec], Conditioner])
    parser.add_argument("--model.refiner", type=Optional[Callable[[int], Refiner]], default=Refiner)
    cfg = parser.parse_args(["-c", str(base), "-c", str(EXPERIMENTS / f"{name}.yaml")])
    init = parser.instantiate(cfg).model
    build = init.conditioner
    # Krea-2 carries its own refiner at the encoder width, so its overlay turns the model's off
    assert (init.refiner is None) == (name == "krea2")
    enc = EncoderSpec(hidden_size=64, layer_ids=(0, 1, 2, 3, 4), depth=4, num_heads=4, head_dim=16, name="tiny-vlm")
    dit = DiT.from_preset("tiny")
    conditioner = build(enc, dit.spec)
    feats = EncoderFeatures(
        hidden=torch.randn(2, 6, 5, 64),
        mask=torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool),
        roles=torch.full((2, 6), int(TokenRole.USER_TEXT), dtype=torch.int8),
        layer_ids=(0, 1, 2, 3, 4),
    )
    out = dit(torch.randn(2, 3, 16, 16), torch.rand(2), conditioner(feats))
    assert out.shape == (2, 3, 16, 16)
