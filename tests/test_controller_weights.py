"""Controller weights: seeded initialisation, save -> load -> the same images, clear shape errors."""
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from twig_batch.cli import app
from twig_batch.controller import ControllerConfig, LatentController, build_controller_net, save_weights
from twig_batch.controller.trigger_log import same_records
from twig_batch.reference.batched import draw_image_tokens_batch
from twig_batch.errors import ModelLoadError
from twig_batch.pipeline import ImageRequest, generate_images
from twig_batch.prompts import t2i_prompt_ids
from twig_batch.settings import GenerationSettings


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_seeded_initialisation_is_deterministic_and_follows_the_settings():
    config = ControllerConfig(init_seed=3)
    a, b = _state(build_controller_net(64, config)), _state(build_controller_net(64, config))
    other = _state(build_controller_net(64, ControllerConfig(init_seed=4)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a if not k.endswith("bias"))
    assert all(not v.any() for k, v in a.items() if k.endswith("bias"))
    # The settings shape it: memory tokens condensed, control tokens given to the model at its width.
    shaped = build_controller_net(48, ControllerConfig(memory_tokens=5, control_tokens=3))
    assert shaped.condenser.latents.shape == (5, 48)
    assert shaped.shaper(torch.zeros(2, 48)).shape == (2, 3, 48)
    # init_std scales the same draws: twice the spread is twice every weight, biases still 0.
    wide = _state(build_controller_net(64, ControllerConfig(init_seed=3, init_std=2 * config.init_std)))
    assert all(torch.allclose(wide[k], 2 * a[k]) for k in a)
    net64 = build_controller_net(64, config, dtype=torch.float64)
    assert all(p.dtype == torch.float64 and not p.requires_grad for p in net64.parameters())
    assert torch.equal(net64.condenser.latents, a["condenser.latents"].double())


@pytest.mark.slow
def test_save_then_load_gives_identical_images(tiny_hf_dir, tmp_path):
    from twig_batch.model import load_janus

    small = load_janus(str(tiny_hf_dir), "cpu", torch.float64)
    small.model.config.vq_config.num_patches = 8  # 64 image tokens keep the two full runs short
    trained = ControllerConfig(init_seed=7, min_history=4, min_gap=16)
    path = save_weights(build_controller_net(64, trained, dtype=torch.float64), tmp_path / "ctl.safetensors")
    loaded = ControllerConfig(init_seed=0, min_history=4, min_gap=16, weights=str(path))  # the file wins
    requests = [ImageRequest("p", "a red cube", 0, 41)]
    [first] = generate_images(small, requests, GenerationSettings(bands=1, controller=trained))
    [second] = generate_images(small, requests, GenerationSettings(bands=1, controller=loaded))
    assert first.record()["n_injections"] >= 2
    assert torch.equal(first.codes, second.codes)
    assert first.image.tobytes() == second.image.tobytes()
    assert same_records(first.trigger_log, second.trigger_log)

    # ... and the weights do matter: other weights condense, and steer, differently.
    rows = [t2i_prompt_ids(small, "a red cube")]
    ours, seed0 = (LatentController(small, ["a red cube"], c)
                   for c in (loaded, ControllerConfig(min_history=4, min_gap=16)))
    for controller in (ours, seed0):
        draw_image_tokens_batch(small, rows, [41], GenerationSettings(), 20, observer=controller)
    assert [r["s_t"] for r in ours.trigger_log(0)] == [r["s_t"] for r in first.trigger_log[:17]]
    assert all(a["s_t"] != b["s_t"] for a, b in zip(ours.trigger_log(0), seed0.trigger_log(0)))


def test_a_file_that_does_not_fit_is_a_clear_error(tmp_path):
    config = ControllerConfig()
    small = save_weights(build_controller_net(32, config), tmp_path / "hidden32.safetensors")
    with pytest.raises(ModelLoadError, match=r"hidden size 64.*tensor condenser\.key\.weight has shape "
                                             r"\[32, 32\], needs \[64, 64\]"):
        build_controller_net(64, config, weights=small)
    fewer = save_weights(build_controller_net(64, ControllerConfig(memory_tokens=4)), tmp_path / "m4.safetensors")
    with pytest.raises(ModelLoadError, match=r"tensor condenser\.latents has shape \[4, 64\], needs \[8, 64\]$"):
        build_controller_net(64, config, weights=fewer)
    state = load_file(str(small))
    del state["shaper.mlp.2.bias"]
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing shaper\.mlp\.2\.bias; unexpected extra\.weight"):
        build_controller_net(32, config, weights=tmp_path / "partial.safetensors")
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_controller_net(64, config, weights=tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        build_controller_net(64, config, weights=tmp_path / "junk.safetensors")


def test_cli_reports_a_misfit_weights_file_without_a_traceback(tiny_hf_dir, tmp_path):
    small = save_weights(build_controller_net(32, ControllerConfig()), tmp_path / "hidden32.safetensors")
    result = CliRunner().invoke(app, ["generate", "a red cube", "--model", str(tiny_hf_dir), "--out",
                                      str(tmp_path / "out"), "--controller-weights", str(small)])
    assert result.exit_code == 2
    assert "condenser.key.weight" in result.output and "Traceback" not in result.output
