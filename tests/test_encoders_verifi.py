import pytest
import torch

from unifusion.encoders.hf import DEFAULT_VERIFI_PROMPT, HFEncoder
from unifusion.encoders.tiny import build_tiny_vlm
from unifusion.features import VERIFI_ROLES, TokenRole

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
    root = tmp_path_factory.mktemp("tiny_verifi")
    return {fam: build_tiny_vlm(str(root / fam), fam, num_layers=3) for fam in ("qwen2_vl", "llava", "llama")}


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llama"])
def test_verifi_keeps_generated_and_image_tokens(tiny, family):
    enc = HFEncoder(tiny[family], layers=[1, -1], verifi=True, verifi_max_new_tokens=5)
    images = [[torch.rand(3, 16, 16)], []] if family != "llama" else None
    prompts = ["make it blue", "a red circle"]
    prep = enc.prepare(prompts, images, task="edit")
    feats = enc.encode(prompts, images, task="edit")
    assert feats.texts is not None and len(feats.texts) == 2
    assert prep.texts == feats.texts  # greedy: deterministic
    tok = enc.tokenizer
    for i in range(2):
        gen_ids = prep.inputs["input_ids"][i][prep.roles[i] == int(R.GENERATED)]
        assert 0 < len(gen_ids) <= 5
        assert tok.decode(gen_ids, skip_special_tokens=True) == feats.texts[i]
        # generated tokens come last among the real tokens
        n = int(prep.mask[i].sum())
        assert (prep.roles[i, n - len(gen_ids) : n] == int(R.GENERATED)).all()
        # the system prompt (VERIFI instruction) is scaffolding
        assert "prompt rewriter" in tok.decode(prep.inputs["input_ids"][i][prep.roles[i] == int(R.SYSTEM)])
    # the encoder's default roles with VERIFI: only generated + image tokens come out
    kept_roles = set(feats.roles[feats.mask].tolist())
    assert int(R.GENERATED) in kept_roles
    assert kept_roles <= {int(R.GENERATED), int(R.IMAGE_TILE), int(R.THUMBNAIL)}
    if images is not None:
        assert int(R.THUMBNAIL) in set(feats.roles[0][feats.mask[0]].tolist())
        assert int(R.THUMBNAIL) not in set(feats.roles[1][feats.mask[1]].tolist())
    every = HFEncoder(tiny[family], layers=[1, -1], verifi=True, verifi_max_new_tokens=5, roles="all")
    sel = every.encode(prompts, images, task="edit").select_roles(VERIFI_ROLES)
    assert torch.equal(sel.mask, feats.mask) and torch.equal(sel.roles, feats.roles)
    torch.testing.assert_close(sel.hidden, feats.hidden)
    assert enc.cache_metadata()["verifi"] is True
    assert enc.cache_metadata()["system_prompt"] == DEFAULT_VERIFI_PROMPT
    assert enc.cache_metadata()["roles"] == ["generated", "image_tile", "thumbnail"]


def test_verifi_features_equal_single_forward_over_prompt_and_rewrite(tiny):
    enc = HFEncoder(tiny["llama"], layers=[2, 3], verifi=True, verifi_max_new_tokens=4, roles="all")
    prep = enc.prepare(["a red circle"])
    feats = enc.encode(["a red circle"])
    ids = prep.inputs["input_ids"][:, : int(prep.mask[0].sum())]
    with torch.no_grad():
        hs = enc.hf_model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats.hidden[0, : ids.shape[1], 0], hs[2][0])


def test_verifi_system_prompt_override_and_sampling_seed(tiny):
    enc = HFEncoder(
        tiny["llama"], layers="last", verifi=True, verifi_max_new_tokens=6, verifi_do_sample=True, verifi_seed=3
    )
    prep = enc.prepare(["a red circle"], system_prompt="Make it detailed.")
    sys_text = enc.tokenizer.decode(prep.inputs["input_ids"][0][prep.roles[0] == int(R.SYSTEM)])
    assert "Make it detailed." in sys_text and "prompt rewriter" not in sys_text
    again = enc.prepare(["a red circle"], system_prompt="Make it detailed.")
    assert prep.texts == again.texts  # seeded sampling is reproducible


def test_batched_generation_matches_per_sample(tiny):
    imgs = [[torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))], []]
    prompts = ["make it blue", "a red circle on the left of a large square"]
    texts = {}
    for vb in (True, False):
        enc = HFEncoder(tiny["qwen2_vl"], layers="last", verifi=True, verifi_max_new_tokens=4, verifi_batch=vb)
        texts[vb] = enc.encode(prompts, imgs, task="edit").texts
    assert texts[True] == texts[False]


def test_verifi_call_time_toggle(tiny):
    enc = HFEncoder(tiny["llama"], layers="last", verifi_max_new_tokens=3)
    plain = enc.encode(["a red circle"])
    assert plain.texts is None and not (plain.roles == R.GENERATED).any()
    on = enc.encode(["a red circle"], verifi=True)
    assert on.texts is not None and (on.roles == R.GENERATED).any()
    # the default roles follow the call: VERIFI on keeps the rewrite, not the user's words
    assert set(on.roles[on.mask].tolist()) == {int(R.GENERATED)}
    assert set(plain.roles[plain.mask].tolist()) == {int(R.USER_TEXT)}
    enc_v = HFEncoder(tiny["llama"], layers="last", verifi=True, verifi_max_new_tokens=3)
    off = enc_v.encode(["a red circle"], verifi=False)
    assert off.texts is None and torch.equal(off.hidden, plain.hidden)
