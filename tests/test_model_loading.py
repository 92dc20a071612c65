import json
import shutil

import pytest
import torch

from twig_batch.errors import ModelLoadError
from twig_batch.model import load_janus
from twig_batch.model.deepseek_layout import deepseek_state_to_hf, hf_state_to_deepseek


def _logits(bundle, text="a red cube on a table"):
    ids = torch.tensor([[bundle.tokens.bos, *bundle.encode(text)]])
    with torch.no_grad():
        out = bundle.model(input_ids=ids)
        image_logits = bundle.image_logits(out.logits.new_zeros(1, bundle.model.config.text_config.hidden_size))
    return out.logits, image_logits


def test_both_layouts_load_the_same_weights_to_identical_logits(tiny_hf_dir, tiny_deepseek_dir):
    hf = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    ds = load_janus(str(tiny_deepseek_dir), "cpu", torch.float64)
    assert (hf.layout, ds.layout) == ("hf", "deepseek")
    for a, b in zip(_logits(hf), _logits(ds)):
        assert torch.equal(a, b)
    hf_state, ds_state = hf.model.state_dict(), ds.model.state_dict()
    assert hf_state.keys() == ds_state.keys()
    assert all(torch.equal(hf_state[k], ds_state[k]) for k in hf_state)


def test_every_layout_carries_the_generation_config_of_a_converted_checkpoint(tiny_hf_dir, tiny_deepseek_dir):
    """What transformers' Janus conversion script sets, and its own image `generate` reads."""
    from transformers import GenerationConfig

    saved = GenerationConfig.from_pretrained(str(tiny_hf_dir))  # as transformers' own loader reads the folder
    for bundle in (load_janus(str(tiny_hf_dir)), load_janus(str(tiny_deepseek_dir))):
        tokens = bundle.tokens
        for config in (bundle.model.generation_config, saved):
            assert config.generation_kwargs == {"boi_token_id": tokens.boi}
            assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (tokens.bos, tokens.eos,
                                                                                       tokens.pad)
            assert (config.guidance_scale, config.temperature) == (5, 1)
            assert config._from_model_config is False


def test_loaded_weights_are_the_saved_ones(tiny_hf_dir):
    from safetensors.torch import load_file

    saved = load_file(str(tiny_hf_dir / "model.safetensors"))
    loaded = load_janus(str(tiny_hf_dir)).model.state_dict()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_deepseek_mapping_round_trips_and_splits_fused_qkv(tiny_hf_dir):
    from safetensors.torch import load_file

    hf_state = load_file(str(tiny_hf_dir / "model.safetensors"))
    ds_state = hf_state_to_deepseek(hf_state)
    assert any(k.endswith("attn.qkv.weight") for k in ds_state)
    assert ds_state["vision_model.vision_tower.pos_embed"].dim() == 3
    assert "gen_vision_model.decoder.conv_blocks.0.res.0.conv1.weight" in ds_state
    assert "gen_vision_model.decoder.mid.1.q.weight" in ds_state
    back = deepseek_state_to_hf(ds_state | {"gen_vision_model.quantize.codebook_used": torch.zeros(3),
                                            "vision_model.vision_tower.attn_pool.latent": torch.zeros(1)})
    assert back.keys() == hf_state.keys()
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


def test_missing_folder_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_janus(str(tmp_path / "nowhere"))


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_janus(str(tmp_path / "weights.bin"))


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="neither a local folder nor reachable"):
        load_janus("nobody-here/no-such-model")


@pytest.mark.parametrize("layout_dir", ["tiny_hf_dir", "tiny_deepseek_dir"])
def test_missing_weights(layout_dir, request, tmp_path):
    src = request.getfixturevalue(layout_dir)
    dst = shutil.copytree(src, tmp_path / "ckpt")
    for f in list(dst.glob("*.safetensors")) + list(dst.glob("*.bin")):
        f.unlink()
    with pytest.raises(ModelLoadError, match="has no weights"):
        load_janus(str(dst))


def test_missing_config_and_unknown_layout(tiny_hf_dir, tmp_path):
    dst = shutil.copytree(tiny_hf_dir, tmp_path / "ckpt")
    (dst / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_janus(str(dst))
    (dst / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="unknown checkpoint layout"):
        load_janus(str(dst))


def test_missing_tokenizer(tiny_hf_dir, tmp_path):
    dst = shutil.copytree(tiny_hf_dir, tmp_path / "ckpt")
    (dst / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_janus(str(dst))


def test_missing_shard_named(tiny_hf_dir, tmp_path):
    dst = shutil.copytree(tiny_hf_dir, tmp_path / "ckpt")
    (dst / "model.safetensors").rename(dst / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load_janus(str(dst))


def test_shape_mismatch_names_offending_keys(tiny_hf_dir, tmp_path):
    dst = shutil.copytree(tiny_hf_dir, tmp_path / "ckpt")
    config = json.loads((dst / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"shape mismatches, e\.g\. model\.language_model\.layers\.0\.mlp"):
        load_janus(str(dst))


def test_deepseek_checkpoint_missing_a_weight(tiny_deepseek_dir, tmp_path):
    dst = shutil.copytree(tiny_deepseek_dir, tmp_path / "ckpt")
    state = torch.load(dst / "pytorch_model.bin", weights_only=True)
    del state["gen_head.vision_head.weight"]
    torch.save(state, dst / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="missing weights, e.g. model.generation_head.vision_head.weight"):
        load_janus(str(dst))


def test_tiny_reference_builds_and_caches():
    first = load_janus("tiny")
    second = load_janus("tiny")
    assert first.grid == 24 and first.image_px == 96
    assert torch.equal(first.model.lm_head.weight, second.model.lm_head.weight)


def _without_tie_setting(tiny_hf_dir, folder):
    """A copy of the tiny checkpoint whose config leaves tie_word_embeddings out (JanusConfig then says True)."""
    shutil.copytree(tiny_hf_dir, folder)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("tie_word_embeddings", None)
    raw["text_config"].pop("tie_word_embeddings", None)
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize("tied_when_built", [False, True])
def test_a_checkpoint_with_its_own_lm_head_loads_untied(tiny_hf_dir, tmp_path, monkeypatch, tied_when_built):
    """Whichever the release does with a config that leaves the tie out, both tensors arrive intact."""
    from safetensors.torch import load_file
    from transformers import JanusForConditionalGeneration

    folder = _without_tie_setting(tiny_hf_dir, tmp_path / "untied")
    if tied_when_built:  # a release that ties lm_head to embed_tokens when the model is built
        post_init = JanusForConditionalGeneration.post_init

        def post_init_and_tie(self):
            post_init(self)
            self.tie_weights()

        monkeypatch.setattr(JanusForConditionalGeneration, "post_init", post_init_and_tie)
    saved = load_file(str(folder / "model.safetensors"))
    head, embed = saved["lm_head.weight"], saved["model.language_model.embed_tokens.weight"]
    assert not torch.equal(head, embed)
    model = load_janus(str(folder)).model
    assert torch.equal(model.lm_head.weight, head)
    assert torch.equal(model.model.language_model.embed_tokens.weight, embed)


def test_a_checkpoint_without_lm_head_uses_its_input_embedding_when_the_config_ties_them(tiny_hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _without_tie_setting(tiny_hf_dir, tmp_path / "tied")
    saved = load_file(str(folder / "model.safetensors"))
    embed = saved["model.language_model.embed_tokens.weight"]
    save_file({k: v for k, v in saved.items() if k != "lm_head.weight"}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    assert torch.equal(load_janus(str(folder)).model.lm_head.weight, embed)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
    with pytest.raises(ModelLoadError, match="missing weights, e.g. lm_head.weight"):
        load_janus(str(folder))
