import copy
import json
import os

import pytest
import torch

from unifusion.encoders.hf import HFEncoder
from unifusion.encoders.tiny import FAMILIES, build_tiny_vlm, ensure_tiny_vlm
from unifusion.features import DEFAULT_ROLES, TokenRole

VLMS = ("llava", "qwen2_vl", "qwen2_5_vl", "internvl", "gemma3")
R = TokenRole


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads; one thread avoids contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {fam: build_tiny_vlm(str(root / fam), fam) for fam in FAMILIES}


def _ids_with_role(enc, prep, b, role):
    ids = prep.inputs["input_ids"][b][prep.roles[b] == int(role)]
    return enc.tokenizer.decode(ids)


def test_tiny_model_round_trips_from_pretrained(tiny):
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

    path = tiny["llava"]
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "llava" and cfg.text_config.hidden_size == 64 and cfg.text_config.num_hidden_layers == 6
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template and tok.image_token == "<image>"
    for word in ("circle", "triangle", "magenta"):
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    model = LlavaForConditionalGeneration.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    LlavaProcessor.from_pretrained(path)
    # ensure_tiny_vlm does not rebuild an existing model
    mtime = os.path.getmtime(os.path.join(path, "model.safetensors"))
    ensure_tiny_vlm(path, "llava")
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == mtime


def test_tiny_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = load_file(os.path.join(build_tiny_vlm(str(tmp_path / "a"), "llama", num_layers=2), "model.safetensors"))
    b = load_file(os.path.join(build_tiny_vlm(str(tmp_path / "b"), "llama", num_layers=2), "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="Unknown tiny family"):
        build_tiny_vlm(str(tmp_path / "c"), "nope")


def test_spec_without_loading_weights(tiny):
    enc = HFEncoder(tiny["llava"], layers="every:3")
    assert enc.spec.layer_ids == (3, 6) and enc.spec.depth == 6 and enc.spec.hidden_size == 64
    assert enc.spec.num_heads == 4 and enc.spec.head_dim == 16
    assert not enc.loaded
    assert enc.family == "llava"
    assert HFEncoder(tiny["t5"], layers="last").spec.layer_ids == (6,)


def test_hf_model_outside_state_dict_and_optimizer(tiny):
    enc = HFEncoder(tiny["llava"], layers="all").load()
    assert enc.loaded
    assert list(enc.parameters()) == [] and enc.state_dict() == {}
    assert all(not p.requires_grad for p in enc.hf_model.parameters())
    assert not enc.hf_model.training
    enc.train()
    assert not enc.training and not enc.hf_model.training
    enc2 = copy.deepcopy(enc)
    assert enc2.hf_model is enc.hf_model  # frozen model shared, not copied
    enc.to("cpu")
    assert enc.target_device == torch.device("cpu")
    import pickle

    blob = pickle.dumps(enc)
    assert len(blob) < 100_000  # the HF model is not pickled (reloaded lazily)
    enc3 = pickle.loads(blob)
    assert not enc3.loaded
    torch.testing.assert_close(enc3.encode(["a red circle"]).hidden, enc.encode(["a red circle"]).hidden)


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_shapes_masks_roles(tiny, family):
    enc = HFEncoder(tiny[family], layers=[0, 2, -1], roles="all")
    prompts = ["a red circle on the left", "two blue squares"]
    is_vlm = family in VLMS
    images = [[torch.rand(3, 16, 24)], []] if is_vlm else None
    feats = enc.encode(prompts, images, task="edit" if is_vlm else "t2i")
    b, s, n, h = feats.hidden.shape
    assert (b, n, h) == (2, 3, 64) and feats.layer_ids == (0, 2, 6)
    # left-aligned right padding
    lengths = feats.mask.sum(1)
    for i in range(2):
        assert feats.mask[i, : lengths[i]].all() and not feats.mask[i, lengths[i] :].any()
        assert (feats.roles[i, lengths[i] :] == R.PAD).all() and (feats.roles[i, : lengths[i]] != R.PAD).all()
        assert (feats.hidden[i, lengths[i] :] == 0).all()
    assert lengths.max() == s
    prep = enc.prepare(prompts, images, task="edit" if is_vlm else "t2i")
    assert torch.equal(prep.roles, feats.roles)
    for i, p in enumerate(prompts):
        assert _ids_with_role(enc, prep, i, R.USER_TEXT).strip() == p
    if family != "t5":
        assert (feats.roles == R.SYSTEM).any()
    if is_vlm:
        n_img = int((feats.roles[0] == R.THUMBNAIL).sum())
        assert n_img > 0 and not (feats.roles[1] == R.THUMBNAIL).any()
        img_ids = prep.inputs["input_ids"][0][feats.roles[0] == R.THUMBNAIL]
        assert len(set(img_ids.tolist())) == 1  # all image placeholder tokens
    sel = feats.select_roles(DEFAULT_ROLES)
    assert sel.mask.sum(1).tolist() == [
        int(torch.isin(feats.roles[i], torch.tensor([int(r) for r in DEFAULT_ROLES])).sum()) for i in range(2)
    ]
    # the default encoder returns exactly those tokens: the roles are chosen in encode()
    # (truncate=False: the same forward as roles="all"; the default also drops the template's
    # tail in causal text batches, equal up to float rounding: test_dropping_the_template_tail_*)
    task = "edit" if is_vlm else "t2i"
    default = HFEncoder(tiny[family], layers=[0, 2, -1], truncate=False).encode(prompts, images, task=task)
    assert torch.equal(default.mask, sel.mask) and torch.equal(default.roles, sel.roles)
    torch.testing.assert_close(default.hidden, sel.hidden, rtol=0, atol=0)
    assert not (default.roles == R.SYSTEM).any()


def _forward_lengths(enc):
    """Record the sequence length the language model's first block runs on."""
    seen = []
    hook = enc.blocks()[0].register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]),
        with_kwargs=True,
    )
    return seen, hook


@pytest.mark.parametrize("family", FAMILIES)
def test_dropping_the_template_tail_keeps_the_kept_features(tiny, family):
    """A causal LM's kept tokens never attend to the template after them: the truncated
    encode runs fewer tokens and returns the same features as the full forward."""
    prompts = ["a red circle on the left of a big blue square", "two squares", "a green triangle"]
    full = HFEncoder(tiny[family], layers=[0, 2, -1], truncate=False).load()
    cut = HFEncoder(tiny[family], layers=[0, 2, -1]).load()
    ref = full.encode(prompts)
    seen, hook = _forward_lengths(cut)
    try:
        got = cut.encode(prompts)
    finally:
        hook.remove()
    assert torch.equal(got.mask, ref.mask) and torch.equal(got.roles, ref.roles)
    # fp32 rounding of a shorter forward (Gemma 3's states reach ~10: tolerance scales with them)
    torch.testing.assert_close(got.hidden, ref.hidden, rtol=1e-5, atol=1e-6 * float(ref.hidden.abs().max()))
    prep = cut.prepare(prompts)
    if family == "t5":  # a bidirectional encoder: every token matters
        assert seen == [prep.mask.shape[1]]
    else:
        # the longest sample ends at its last user token: the template's tail is gone
        user_end = max(int(torch.nonzero(r == R.USER_TEXT).max()) + 1 for r in prep.roles)
        assert seen == [user_end] and user_end < prep.mask.shape[1]
    # roles "all" keeps the tail; the VLMs keep every token when the batch has images
    seen_all, hook = _forward_lengths(everything := HFEncoder(tiny[family], layers=[0], roles="all").load())
    try:
        everything.encode(prompts)
    finally:
        hook.remove()
    assert seen_all == [prep.mask.shape[1]]
    if family in VLMS:
        images = [[torch.rand(3, 16, 16)], [], []]
        seen_img, hook = _forward_lengths(cut)
        try:
            got = cut.encode(prompts, images, task="edit")
        finally:
            hook.remove()
        assert seen_img == [cut.prepare(prompts, images, task="edit").mask.shape[1]]
        ref = full.encode(prompts, images, task="edit")
        torch.testing.assert_close(got.hidden, ref.hidden, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_forward_equals_full_forward(tiny, family):
    enc = HFEncoder(tiny[family], layers=[0, 1, 3])
    images = [[torch.rand(3, 20, 20)]] if family in VLMS else None
    prep = enc.prepare(["a small green diamond"], images, task="edit" if images else "t2i")
    calls = []
    handle = enc.blocks()[5].register_forward_hook(lambda *a: calls.append(1))
    try:
        trunc = enc.tapped_forward(prep.inputs, truncate=True)
        assert calls == []  # blocks after the deepest tap never ran
        full_taps = enc.tapped_forward(prep.inputs, truncate=False)
        assert len(calls) == 1
    finally:
        handle.remove()
    inputs = enc._model_inputs(prep.inputs)
    with torch.no_grad():
        out = enc.hf_model(**inputs, output_hidden_states=True)
    hs = out.hidden_states if family != "t5" else out.hidden_states
    ref = torch.stack([hs[i] for i in (0, 1, 3)], dim=2)
    torch.testing.assert_close(trunc, ref, rtol=0, atol=0)
    torch.testing.assert_close(full_taps, ref, rtol=0, atol=0)


def test_last_layer_is_before_final_norm(tiny):
    enc = HFEncoder(tiny["llama"], layers="last")
    prep = enc.prepare(["a red circle"])
    taps = enc.tapped_forward(prep.inputs)[:, :, 0]
    inputs = enc._model_inputs(prep.inputs)
    with torch.no_grad():
        hs = enc.hf_model(**inputs, output_hidden_states=True).hidden_states
    norm = enc.hf_model.get_decoder().norm
    assert not torch.allclose(taps, hs[-1])  # hs[L] is after the final norm
    torch.testing.assert_close(norm(taps), hs[-1])


def test_recon_has_only_image_and_system_prompt(tiny):
    enc = HFEncoder(tiny["qwen2_vl"], layers="last", system_prompt="Describe the image.")
    prep = enc.prepare(["ignored caption"], [[torch.rand(3, 16, 16)]], task="recon")
    roles = prep.roles[0][prep.mask[0]]
    assert not (roles == R.USER_TEXT).any() and (roles == R.THUMBNAIL).any()
    assert "Describe the image." in _ids_with_role(enc, prep, 0, R.SYSTEM)
    # call-time override of the system prompt
    prep2 = enc.prepare(["x"], [[torch.rand(3, 16, 16)]], task="recon", system_prompt="Draw it.")
    assert "Draw it." in _ids_with_role(enc, prep2, 0, R.SYSTEM)


def test_several_reference_images_and_tiles(tiny):
    for family in ("llava", "gemma3", "qwen2_vl"):
        enc = HFEncoder(tiny[family], layers="last", max_tiles=4)
        imgs = [[torch.rand(3, 16, 32), torch.rand(3, 16, 16)]]  # 2x1 tiles + thumb, then 1 thumb
        feats = enc.encode(["make it blue"], imgs, task="edit")
        roles = feats.roles[0]
        tile_tok = int((roles == R.IMAGE_TILE).sum())
        thumb_tok = int((roles == R.THUMBNAIL).sum())
        assert tile_tok > 0 and thumb_tok > 0, family
        if family in ("llava", "gemma3"):  # fixed tokens per image
            assert tile_tok == thumb_tok, family  # 2 tiles vs 2 thumbnails
        assert (roles == R.USER_TEXT).sum() > 0


@pytest.mark.parametrize("max_tiles,w,h", [(1, 48, 16), (5, 48, 16), (10, 48, 16), (5, 32, 64), (10, 64, 64)])
def test_internvl_processor_tiles_match_plan_tiles(tiny, max_tiles, w, h):
    from unifusion.encoders.tiling import num_tiles

    enc = HFEncoder(tiny["internvl"], layers="last", max_tiles=max_tiles)
    feats = enc.encode([""], [[torch.rand(3, h, w)]], task="recon")
    seq = enc.processor.image_seq_length
    n_tile = int((feats.roles[0] == R.IMAGE_TILE).sum())
    n_thumb = int((feats.roles[0] == R.THUMBNAIL).sum())
    assert n_thumb == seq
    # the processor's own tiling agrees with our planner (tile size 32 px)
    assert n_tile + n_thumb == num_tiles(w, h, max_tiles, tile_size=32) * seq
    if max_tiles > 1 and w != h:
        assert n_tile > 0


def test_max_length_cuts_user_text(tiny):
    enc = HFEncoder(tiny["llama"], layers="last", max_length=16, roles="all")
    feats = enc.encode(["a red circle " * 20, "a"])
    assert feats.seq_len == 16 and feats.mask[0].all()
    assert (feats.roles[0] == R.USER_TEXT).sum() > 0
    enc2 = HFEncoder(tiny["llava"], layers="last", max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        enc2.encode(["x"], [[torch.rand(3, 16, 16)]], task="edit")


def test_clear_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFEncoder(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json.*build_tiny_if_missing"):
        HFEncoder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="depth 6"):
        HFEncoder(tiny["llama"], layers=[9])
    enc = HFEncoder(tiny["llama"], layers="last")
    with pytest.raises(ValueError, match="text-only"):
        enc.encode(["a"], [[torch.rand(3, 8, 8)]], task="edit")
    ignoring = HFEncoder(tiny["llama"], layers="last", on_images="ignore")
    assert torch.equal(
        ignoring.encode(["a"], [[torch.rand(3, 8, 8)]], task="edit").hidden, ignoring.encode(["a"], task="edit").hidden
    )
    with pytest.raises(ValueError, match="VERIFI"):
        HFEncoder(tiny["t5"], verifi=True)


def test_missing_chat_template(tmp_path):
    path = build_tiny_vlm(str(tmp_path / "llama"), "llama", num_layers=2)
    os.remove(os.path.join(path, "chat_template.jinja")) if os.path.exists(
        os.path.join(path, "chat_template.jinja")
    ) else None
    cfg_file = os.path.join(path, "tokenizer_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    cfg.pop("chat_template", None)
    with open(cfg_file, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="no chat template.*use_chat_template"):
        HFEncoder(path, layers="last").encode(["a"])
    feats = HFEncoder(path, layers="last", use_chat_template=False).encode(["a red circle"])
    assert (feats.roles == R.USER_TEXT).sum() == 3


def test_build_tiny_if_missing(tmp_path):
    path = str(tmp_path / "auto" / "t5")
    enc = HFEncoder(path, layers="all", build_tiny_if_missing="t5")
    assert os.path.isfile(os.path.join(path, "config.json")) and enc.spec.depth == 6
    assert enc.cache_metadata()["family"] == "t5"


@pytest.mark.parametrize("family", FAMILIES)
def test_experiment_overlays_instantiate(family, tmp_path, monkeypatch):
    """experiments/encoders/<family>.yaml builds its tiny model and encodes (outside the CLI)."""
    import yaml
    from jsonargparse import ArgumentParser

    from unifusion.encoders.base import Encoder

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "experiments", "encoders", f"{family}.yaml")) as f:
        cfg = yaml.safe_load(f)
    assert list(cfg) == ["model"] and list(cfg["model"]) == ["encoder"]
    monkeypatch.chdir(tmp_path)  # artifacts/tiny/<family> is relative to the working directory
    parser = ArgumentParser()
    parser.add_subclass_arguments(Encoder, "encoder")
    enc = parser.instantiate(parser.parse_object({"encoder": cfg["model"]["encoder"]})).encoder
    assert isinstance(enc, HFEncoder) and enc.family == family
    assert os.path.isfile(tmp_path / "artifacts" / "tiny" / family / "config.json")
    feats = enc.encode(["a red circle"])
    assert feats.layer_ids == enc.spec.layer_ids and feats.hidden_size == enc.spec.hidden_size


@pytest.mark.parametrize("max_tiles", [1, 5, 10])
@pytest.mark.parametrize("w,h", [(48, 16), (16, 32), (32, 32)])
def test_self_tiling_token_counts(tiny, max_tiles, w, h):
    from unifusion.encoders.tiling import num_tiles

    enc = HFEncoder(tiny["llava"], layers="last", max_tiles=max_tiles)
    feats = enc.encode([""], [[torch.rand(3, h, w)]], task="recon")
    per_image = 16  # (32 px / patch 8)^2 CLIP patches
    n_img = num_tiles(w, h, max_tiles, tile_size=enc.tile_size)
    assert int((feats.roles[0] == R.THUMBNAIL).sum()) == per_image
    assert int((feats.roles[0] == R.IMAGE_TILE).sum()) == (n_img - 1) * per_image


def test_ensure_tiny_refuses_other_family(tiny):
    with pytest.raises(ValueError, match="already holds a tiny 'llama' model"):
        ensure_tiny_vlm(tiny["llama"], "t5")


def test_hf_style_typed_content_template(tmp_path):
    """A llava-hf-style template that reads only typed content parts (plain strings render as nothing)."""
    from transformers import AutoTokenizer

    path = build_tiny_vlm(str(tmp_path / "llava"), "llava", num_layers=2)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
        "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    tok.save_pretrained(path)
    for f in ("chat_template.jinja",):
        if os.path.exists(os.path.join(path, f)) and "selectattr" not in open(os.path.join(path, f)).read():
            os.remove(os.path.join(path, f))
    enc = HFEncoder(path, layers="last", system_prompt="Be brief.")
    assert "selectattr" in enc.tokenizer.chat_template
    prep = enc.prepare(
        ["a red circle", "two squares"], [[torch.rand(3, 16, 16), torch.rand(3, 16, 16)], []], task="edit"
    )
    assert _ids_with_role(enc, prep, 0, R.USER_TEXT).strip() == "a red circle"
    assert _ids_with_role(enc, prep, 1, R.USER_TEXT).strip() == "two squares"
    assert "Be brief." in _ids_with_role(enc, prep, 0, R.SYSTEM)
    assert int((prep.roles[0] == R.THUMBNAIL).sum()) == 32  # two images x 16 tokens


def _same_prepared(a, b) -> bool:
    return (
        a.inputs.keys() == b.inputs.keys()
        and all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
        and torch.equal(a.mask, b.mask)
        and torch.equal(a.roles, b.roles)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_processor_call_equals_per_sample_calls(tiny, family):
    """One processor call per batch gives the ids, masks, roles (and image inputs) of one call per sample."""
    enc = HFEncoder(tiny[family], layers="last", max_tiles=4)
    prompts = ["a red circle on the left", "two blue squares", "", "make it a large magenta triangle"]
    cases = [("t2i", None)]
    if family in VLMS:
        g = torch.Generator().manual_seed(0)
        cases += [
            ("edit", [[torch.rand(3, 16, 24, generator=g)], [torch.rand(3, 16, 16, generator=g)] * 2, [], []]),
            ("recon", [[torch.rand(3, 32, 16, generator=g)]] * 4),
        ]
    for task, images in cases:
        batched = enc.prepare(prompts, images, task=task)
        per_sample = enc.prepare(prompts, images, task=task, per_sample=True)
        assert _same_prepared(batched, per_sample), (family, task)
    # a sample that must be cut to max_length falls back to the per-sample path, same result
    short = HFEncoder(tiny[family], layers="last", max_length=24)
    long_prompts = ["a red circle " * 12, "a"]
    assert _same_prepared(short.prepare(long_prompts), short.prepare(long_prompts, per_sample=True))
    assert short.prepare(long_prompts).mask.sum(1).max() <= 24


PLACEHOLDERS = {
    "llava": ["<image>"],
    "qwen2_vl": ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"],
    "qwen2_5_vl": ["<|image_pad|>", "<|vision_start|>"],
    "internvl": ["<IMG_CONTEXT>", "<img>", "</img>"],
    "gemma3": ["<start_of_image>", "<image_soft_token>", "<end_of_image>"],
    "llama": ["<|eot_id|>", "<|start_header_id|>"],
    "t5": ["</s>"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_captions_holding_placeholder_text_stay_text(tiny, family):
    """A caption with the VLM's image placeholder (scraped alt-text) used to kill encoding:
    'Found 1 <image> tokens in the text but no images were passed'."""
    enc = HFEncoder(tiny[family], layers="last", roles="all")
    marks = PLACEHOLDERS[family] + ["<|im_end|>", "<start_of_turn>"]
    caption = "a photo " + " and ".join(marks) + " of a red circle"
    special = {int(i) for i in enc.tokenizer.all_special_ids} | {int(i) for i in enc._image_token_ids()}
    images = [[torch.rand(3, 16, 16)], []] if family in VLMS else None
    task = "edit" if family in VLMS else "t2i"
    for per_sample in (False, True):
        prep = enc.prepare([caption, caption], images, task=task, per_sample=per_sample)
        for i in range(2):
            user_ids = prep.inputs["input_ids"][i][prep.roles[i] == int(R.USER_TEXT)].tolist()
            assert not special & set(user_ids), (family, enc.tokenizer.convert_ids_to_tokens(user_ids))
            text = enc.tokenizer.decode(user_ids)
            assert "photo" in text and "red circle" in text
            # the words of the placeholder are still there, as text
            assert all(m.strip("<>|/").split("_")[0] in text for m in marks)
        if family in VLMS:  # image tokens: only those of the one real image
            n_img = [int(((prep.roles[i] == R.THUMBNAIL) | (prep.roles[i] == R.IMAGE_TILE)).sum()) for i in range(2)]
            assert n_img[0] > 0 and n_img[1] == 0
    feats = enc.encode([caption], [[torch.rand(3, 16, 16)]] if family in VLMS else None, task=task)
    assert torch.isfinite(feats.hidden).all()
    assert enc.neutralise("no markup here") == "no markup here"


def test_roles_option_is_validated_and_recorded(tiny):
    enc = HFEncoder(tiny["llava"], layers="last", roles=["user_text", "thumbnail"])
    feats = enc.encode(["a red circle"], [[torch.rand(3, 16, 16)]], task="edit")
    assert set(feats.roles[feats.mask].tolist()) == {int(R.USER_TEXT), int(R.THUMBNAIL)}
    assert enc.cache_metadata()["roles"] == ["user_text", "thumbnail"]
    assert HFEncoder(tiny["llava"], layers="last").cache_metadata()["roles"] == ["user_text", "image_tile", "thumbnail"]
    assert HFEncoder(tiny["llava"], layers="last", roles="all").cache_metadata()["roles"] == "all"
    assert HFEncoder(tiny["llava"], layers="last", roles="system").kept_roles() == (R.SYSTEM,)
    with pytest.raises(ValueError, match="roles=\\['users'\\].*valid roles"):
        HFEncoder(tiny["llava"], roles=["users"])
    with pytest.raises(ValueError, match="pad"):
        HFEncoder(tiny["llava"], roles=["pad"])
