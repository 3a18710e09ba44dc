"""The training step's optimizer and EMA: the fast paths are the ones actually used, and they
compute what the plain paths compute."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from unifusion.ema import EMA
from unifusion.models import _fused_if_supported, keep_fused


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*shape, generator=g)) for shape in [(64, 32), (32,), (7, 5, 3), (1,)]]


def _steps(opt: torch.optim.Optimizer, params: list[nn.Parameter], n: int = 5) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_adam_left_open_becomes_fused_and_steps_like_the_for_loop(cls, weight_decay):
    # AdamW's defaults carry `decoupled_weight_decay`, which AdamW.__init__ does not take: the
    # rebuild once failed on it and silently kept the ~5x slower for-loop step
    fast_params, plain_params = _params(), _params()
    fast = _fused_if_supported(cls(fast_params, lr=2e-3, weight_decay=weight_decay), fast_params)
    plain = cls(plain_params, lr=2e-3, weight_decay=weight_decay, foreach=False)
    assert type(fast) is cls and fast.defaults["fused"] is True
    assert fast.defaults["lr"] == 2e-3 and fast.defaults["weight_decay"] == weight_decay
    _steps(fast, fast_params)
    _steps(plain, plain_params)
    for a, b in zip(fast_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_explicit_choices_and_other_optimizers_are_kept():
    params = _params()
    for opt in (
        torch.optim.AdamW(params, lr=1e-3, foreach=True),
        torch.optim.AdamW(params, lr=1e-3, fused=False),
        torch.optim.SGD(params, lr=1e-3),
    ):
        assert _fused_if_supported(opt, params) is opt


def test_param_group_options_survive_the_rebuild():
    params = _params()
    groups = [{"params": params[:2], "lr": 1e-4, "name": "dit"}, {"params": params[2:], "weight_decay": 0.1}]
    fused = _fused_if_supported(torch.optim.AdamW(groups, lr=1e-3), params)
    assert fused.defaults["fused"] is True
    assert [g["lr"] for g in fused.param_groups] == [1e-4, 1e-3]
    assert fused.param_groups[0]["name"] == "dit" and fused.param_groups[1]["weight_decay"] == 0.1
    assert [len(g["params"]) for g in fused.param_groups] == [2, 2]


def test_the_quickstart_config_trains_with_fused_adamw(tmp_path):
    """Through the real CLI: the config's optimizer (``torch.optim.AdamW``, lr 2e-3) as the
    LightningModule hands it to Lightning."""
    from unifusion.lightning_cli import lightning_main

    cli = lightning_main(
        [
            *("-c", "experiments/quickstart.yaml"),
            f"--model.encoder.init_args.path={tmp_path / 'llava'}",
            f"--data.init_args.sources=[{{path: {tmp_path / 'shapes'}, task: t2i}}]",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    configured = cli.model.configure_optimizers()
    opt = configured["optimizer"] if isinstance(configured, dict) else configured
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert opt.defaults["lr"] == 2e-3 and opt.defaults["weight_decay"] == 0.0
    trainable = {id(p) for p in cli.model.trainable.parameters() if p.requires_grad}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable


def test_resuming_a_checkpoint_saved_before_the_fused_step_keeps_it_fused():
    # load_state_dict copies the saved groups, `fused: None` included; on_train_start (after
    # Lightning restored the optimizer) switches such groups back to the fused step
    params = _params()
    old = torch.optim.AdamW(params, lr=1e-3, foreach=None)
    _steps(old, params, 1)
    saved = old.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    new = _fused_if_supported(torch.optim.AdamW(params, lr=1e-3), params)
    new.load_state_dict(saved)
    assert new.param_groups[0]["fused"] is None  # torch's behaviour that made this necessary
    keep_fused(new)
    assert new.param_groups[0]["fused"] is True
    _steps(new, params, 1)  # and it steps
    explicit = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    keep_fused(explicit)  # a configured choice is left alone
    assert explicit.param_groups[0]["fused"] is None and explicit.param_groups[0]["foreach"] is True


def test_on_train_start_keeps_the_restored_optimizer_fused():
    import types

    from unifusion.models import UniFusionModel

    params = _params()
    opt = _fused_if_supported(torch.optim.AdamW(params, lr=1e-3), params)
    for group in opt.param_groups:
        group["fused"] = None  # as restored from an older checkpoint
    model = types.SimpleNamespace(trainer=types.SimpleNamespace(optimizers=[opt]))
    UniFusionModel.on_train_start(model)
    assert all(group["fused"] is True for group in opt.param_groups)


def test_multi_tensor_ema_update_equals_one_lerp_per_parameter():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 3))
    model[1].weight.requires_grad_(False)  # frozen parameters have no shadow
    ema, reference = EMA(model, 0.99), EMA(model, 0.99)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        ema.update(model)
        reference.num_updates += 1
        decay = min(reference.decay, (1 + reference.num_updates) / (10 + reference.num_updates))
        for name, p in model.named_parameters():
            if name in reference.shadow:
                reference.shadow[name].lerp_(p.detach().float(), 1 - decay)
    assert "1.weight" not in ema.shadow
    assert ema.shadow.keys() == reference.shadow.keys()
    for name in ema.shadow:
        torch.testing.assert_close(ema.shadow[name], reference.shadow[name], rtol=0, atol=1e-7)
    snapshot = copy.deepcopy(ema.shadow)
    with ema.swapped(model):
        for name, p in model.named_parameters():
            if name in snapshot:
                assert torch.equal(p, snapshot[name])
