"""UniAlignment-style auxiliary losses (issue 7, item 5)."""

from __future__ import annotations

import os

import pytest
import torch

from unifusion.alignment import info_nce, masked_mean
from unifusion.cli import lightning_main, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "experiments", "quickstart.yaml")
SMALL = [
    "--data.init_args.batch_size=4",
    "--data.init_args.generate_shapes.num=32",
    "--data.init_args.generate_shapes.val_num=8",
    "--model.sampling.steps=2",
]
#: the paper's λ2, λ3 (UniAlignment Eq. 5), built with the specs like a conditioner
AUX = [
    "--model.aux_losses=unifusion.alignment.AlignmentLosses",
    "--model.aux_losses.init_args.contrastive=0.05",
    "--model.aux_losses.init_args.repa=0.1",
]


def test_info_nce_prefers_matched_pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 16, generator=g)
    matched = info_nce(a, a + 0.01 * torch.randn(8, 16, generator=g), 0.07)
    shuffled = info_nce(a, a[torch.randperm(8, generator=g)], 0.07)
    assert matched < 0.05 < shuffled
    assert torch.equal(masked_mean(torch.ones(1, 3, 2), torch.tensor([[True, False, False]])), torch.ones(1, 2))


def test_aux_losses_add_to_the_loss_and_train_their_heads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = lightning_main(
        ["-c", QUICKSTART, *SMALL, "--model.cond_dropout=0.0", *AUX],
        run=False,
    )
    dm, model = cli.datamodule, cli.model
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    total = model.training_step(batch, 0)
    torch.manual_seed(0)
    with model.alignment.capture(model.backbone):
        flow_only = model.flow.loss(
            lambda x, t: model.backbone(x, t, model.condition(model.features(batch))), batch["target"]
        )
    assert total > flow_only
    total.backward()
    for head in (model.alignment.image_head, model.alignment.text_head, model.alignment.repa_head[0]):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    params = {id(p) for g in model.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert id(model.alignment.repa_head[0].weight) in params
    with pytest.raises(ValueError, match="contrastive=0 and repa=0"):
        lightning_main(["-c", QUICKSTART, *SMALL, "--model.aux_losses=unifusion.alignment.AlignmentLosses"], run=False)


def test_aux_losses_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "-c",
            QUICKSTART,
            *SMALL,
            "--trainer.fast_dev_run=true",
            *AUX,
        ]
    )
