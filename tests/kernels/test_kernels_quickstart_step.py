"""A quickstart training step with impl=triton (interpreter on CPU) equals impl=torch."""

from __future__ import annotations

import os

import torch

from unifusion.layers import KernelImplMixin, set_kernel_impl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.yaml")


def test_quickstart_step_same_loss_and_grads_with_triton(tmp_path, monkeypatch):
    from unifusion.cli import lightning_main

    monkeypatch.chdir(tmp_path)
    cli = lightning_main(
        [
            "-c",
            QUICKSTART,
            "--data.init_args.batch_size=2",
            "--data.init_args.generate_shapes.num=16",
            "--data.init_args.generate_shapes.val_num=4",
            "--model.cond_dropout=0.0",
        ],
        run=False,
    )
    dm, model = cli.datamodule, cli.model
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    results = {}
    for impl in ("torch", "triton"):
        set_kernel_impl(model, impl)  # every kernel-calling module of this model, not a process global
        assert {m.kernel_impl for m in model.modules() if isinstance(m, KernelImplMixin)} == {impl}
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss = model.training_step(batch, 0)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[impl] = (loss.detach(), grads)
    (l_t, g_t), (l_x, g_x) = results["torch"], results["triton"]
    torch.testing.assert_close(l_x, l_t, rtol=1e-4, atol=1e-5)
    assert g_t.keys() == g_x.keys() and any(k.startswith("conditioner.") for k in g_t)
    for name in g_t:
        torch.testing.assert_close(g_x[name], g_t[name], rtol=2e-3, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
