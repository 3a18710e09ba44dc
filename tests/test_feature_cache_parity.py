"""Live and cached conditioning see the same tokens (issue 11 §1).

- the real `unifusion cache -c CONFIG --out DIR` command (a subprocess) writes a cache of a
  quickstart-like config; read back through the data module's cached path, every sample's
  tokens, mask, roles and features equal a live encode of the same sample (fp16 tolerance);
- the conditioner input for "a red circle" on the quickstart encoder holds no SYSTEM /
  template tokens, in training and in sampling;
- a data module reading the cache resumes exactly (epoch / position) like the live one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from unifusion.data.datamodule import DataSource, UniFusionDataModule
from unifusion.data.shards import write_shapes_shards
from unifusion.encoders.cache import META_FILE, check_cache_compatible, read_cache_meta
from unifusion.encoders.hf import HFEncoder
from unifusion.encoders.tiny import build_tiny_vlm
from unifusion.features import TokenRole

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "experiments", "quickstart.yaml")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quickstart_config(root: str, sources: list[dict], **data_overrides) -> str:
    """experiments/quickstart.yaml with a small data set under ``root`` (same encoder, sizes, conditioner)."""
    with open(QUICKSTART) as f:
        cfg = yaml.safe_load(f)
    cfg["trainer"]["logger"] = False
    cfg["trainer"]["callbacks"] = []
    cfg["trainer"]["default_root_dir"] = os.path.join(root, "runs")
    cfg["data"]["init_args"].update(
        sources=sources, generate_shapes=None, shuffle_buffer=1, batch_size=8, **data_overrides
    )
    path = os.path.join(root, "config.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A shapes set (t2i + edit + recon shards) and the quickstart's tiny LLaVA, built in a temp dir."""
    root = tmp_path_factory.mktemp("parity")
    write_shapes_shards(str(root / "shapes"), num=40, seed=3, size=16, edit_fraction=0.25, recon_fraction=0.15)
    build_tiny_vlm(str(root / "artifacts" / "tiny" / "llava"), "llava")
    return root


def _run_cache_command(root, config: str, out: str) -> subprocess.CompletedProcess:
    exe = shutil.which("unifusion")
    cmd = [exe] if exe else [sys.executable, "-m", "unifusion.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        cmd + ["cache", "-c", config, "--out", out, "--batch_size", "5"],
        cwd=str(root),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _by_key(dm: UniFusionDataModule) -> dict[str, dict]:
    """Every sample of the data module's validation stream (each sample once, in order), by key."""
    out = {}
    for batch in dm.val_dataloader():
        for i, key in enumerate(batch["key"]):
            item = {"target": batch["target"][i]}
            if "features" in batch:
                f = batch["features"]
                n = int(f.mask[i].sum())
                item["hidden"], item["roles"] = f.hidden[i, :n], f.roles[i, :n]
            else:
                item["prompt"], item["images"] = batch["prompt"][i], batch["images"][i]
            out[key] = item
    return out


def test_unifusion_cache_equals_live_encode(world):
    root = world
    sources = [
        {"path": str(root / "shapes"), "task": "t2i"},
        {"path": str(root / "shapes"), "task": "edit"},
        {"path": str(root / "shapes"), "task": "recon"},
    ]
    config = _quickstart_config(str(root), sources)
    out = str(root / "cache")
    proc = _run_cache_command(root, config, out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    subdirs = [os.path.join(out, f"source{i}_{s['task']}") for i, s in enumerate(sources)]
    assert all(os.path.isfile(os.path.join(d, META_FILE)) for d in subdirs), proc.stdout + proc.stderr

    # the encoder the config builds (the quickstart's: tiny LLaVA, every layer, default roles)
    with open(config) as f:
        enc_args = yaml.safe_load(f)["model"]["encoder"]["init_args"]
    enc = HFEncoder(**{**enc_args, "path": os.path.join(root, enc_args["path"])})
    for d in subdirs:
        meta = read_cache_meta(d)
        assert meta["roles"] == ["user_text", "image_tile", "thumbnail"]
        check_cache_compatible(d, enc)

    for src, d in zip(sources, subdirs):
        live_dm = UniFusionDataModule(
            sources=[DataSource(src["path"], src["task"])],
            val_sources=[DataSource(src["path"], src["task"])],
            batch_size=6,
            image_size=16,
        )
        cached_dm = UniFusionDataModule(
            sources=[DataSource(d, src["task"], cached=True)],
            val_sources=[DataSource(d, src["task"], cached=True)],
            batch_size=6,
            image_size=16,
        )
        live, cached = _by_key(live_dm), _by_key(cached_dm)
        assert set(live) == set(cached) and len(live) > 0, src["task"]
        keys = sorted(live)
        prompts = [live[k]["prompt"] for k in keys]
        images = [live[k]["images"] for k in keys]
        feats = enc.encode(prompts, images, task=src["task"])
        for i, k in enumerate(keys):
            hidden, roles = cached[k]["hidden"], cached[k]["roles"]
            n = int(feats.mask[i].sum())
            assert hidden.shape[0] == n, (src["task"], k)
            assert torch.equal(roles, feats.roles[i, :n])
            assert hidden.dtype == torch.float16
            torch.testing.assert_close(hidden.float(), feats.hidden[i, :n], rtol=2e-3, atol=2e-3)
            assert torch.equal(cached[k]["target"], live[k]["target"])
            assert not (roles == int(TokenRole.SYSTEM)).any()
            if src["task"] == "t2i":
                assert set(roles.tolist()) == {int(TokenRole.USER_TEXT)}
            elif src["task"] == "recon":
                assert set(roles.tolist()) == {int(TokenRole.THUMBNAIL)}
            else:
                assert {int(TokenRole.USER_TEXT), int(TokenRole.THUMBNAIL)} <= set(roles.tolist())


def test_quickstart_conditioner_sees_no_template_tokens(world, monkeypatch):
    """'a red circle' on the quickstart encoder: the conditioner gets its 3 user tokens, no SYSTEM/template token."""
    from unifusion.cli import lightning_main

    root = world
    config = _quickstart_config(str(root), [{"path": str(root / "shapes"), "task": "t2i"}])
    monkeypatch.chdir(root)  # artifacts/tiny/llava is relative, as in the quickstart
    model = lightning_main(["-c", config], run=False).model
    seen = []
    model.conditioner.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    batch = {"task": "t2i", "prompt": ["a red circle"], "images": [[]], "target": torch.zeros(1, 3, 16, 16)}
    model.condition(model.features(batch))  # the training path (live)
    model.generate(["a red circle"])  # the sampling path (sample grids, `unifusion generate`)
    assert len(seen) >= 2
    for feats in seen[:2]:
        real = feats.roles[feats.mask]
        assert len(real) == 3, feats.roles
        assert set(real.tolist()) == {int(TokenRole.USER_TEXT)}
    tokens = model.encoder.prepare(["a red circle"])
    assert int(tokens.mask.sum()) > 3  # the template is there in the forward, just not in the output


def test_cached_data_resumes_exactly(world, tmp_path):
    """Epoch + position in the epoch (the data module's state) continue the cached stream exactly."""
    from unifusion.encoders.cache import write_feature_cache

    root = world
    enc = HFEncoder(str(root / "artifacts" / "tiny" / "llava"), layers="all")
    write_feature_cache(enc, str(root / "shapes"), str(tmp_path / "c"), task="t2i", batch_size=8, shard_size=7)

    def loader(state=None, **kw):
        dm = UniFusionDataModule(
            sources=[DataSource(str(tmp_path / "c"), "t2i", cached=True)],
            batch_size=3,
            shuffle_buffer=8,
            epoch_length=6,
            seed=5,
            **kw,
        )
        dm.setup("fit")
        if state is not None:
            dm.load_state_dict(state)
        return dm.train_dataloader()

    def keys(batches):
        return [tuple(b["key"]) for b in batches]

    full = loader()
    epoch0, epoch1 = list(full), list(full)
    assert len(epoch0) == len(epoch1) == 6 and keys(epoch0) != keys(epoch1)
    resumed = loader({"epoch": 1, "batches_in_epoch": 4})
    rest = list(resumed)
    assert keys(rest) == keys(epoch1[4:])
    for a, b in zip(rest, epoch1[4:]):
        assert torch.equal(a["features"].hidden, b["features"].hidden) and torch.equal(a["target"], b["target"])
    # in-memory reading gives the very same stream
    mem = loader(cache_in_memory=True)
    assert keys(list(mem)) == keys(epoch0)
    mem_rest = list(loader({"epoch": 1, "batches_in_epoch": 4}, cache_in_memory=True))
    assert keys(mem_rest) == keys(rest)
    assert all(torch.equal(a["features"].hidden, b["features"].hidden) for a, b in zip(mem_rest, rest))
