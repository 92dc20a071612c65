"""The trigger rule, its per-image history, and the controller's settings (no model needed)."""
import json
import math

import pytest
import torch

from twig_batch.controller import ControllerConfig
from twig_batch.controller.trigger import TriggerHistory, trigger_fires
from twig_batch.errors import InputError
from twig_batch.settings import GenerationSettings

NAN = math.nan
EPS = 1e-9
CFG = ControllerConfig()  # tau_drop 0.05, tau_var 0.002, tau_entropy 3.5, tau_sim 0.25

# (s_t, delta_s, var_s, u_t, fires): the drift branch, the lost branch, each boundary value on
# both sides, and NaN history.
TRUTH_TABLE = [
    # drift branch: delta < -0.05 and var > 0.002 (u low, s high so the lost branch is off)
    (0.9, -0.05 - EPS, 0.002 + EPS, 1.0, True),
    (0.9, -0.05, 0.002 + EPS, 1.0, False),  # delta exactly -tau_drop
    (0.9, -0.05 - EPS, 0.002, 1.0, False),  # var exactly tau_var
    (0.9, -0.5, 0.0, 1.0, False),  # big drop, steady history
    (0.9, 0.3, 0.5, 1.0, False),  # a rise never fires
    (0.9, NAN, 0.5, 1.0, False),  # first evaluation: no previous similarity
    # lost branch: u > 3.5 and s < 0.25 (delta 0 so the drift branch is off)
    (0.25 - EPS, 0.0, 0.0, 3.5 + EPS, True),
    (0.25, 0.0, 0.0, 3.5 + EPS, False),  # s exactly tau_sim
    (0.25 - EPS, 0.0, 0.0, 3.5, False),  # u exactly tau_entropy
    (-1.0, 0.0, 0.0, 3.0, False),  # off-prompt but certain
    (0.9, 0.0, 0.0, 9.0, False),  # unsure but on-prompt
    (-0.2, NAN, NAN, 6.0, True),  # the lost branch needs no history
    # both, and neither
    (0.0, -0.2, 0.01, 5.0, True),
    (0.5, 0.0, 0.0, 1.0, False),
]


@pytest.mark.parametrize("s,delta,var,u,fires", TRUTH_TABLE)
def test_trigger_truth_table(s, delta, var, u, fires):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    assert trigger_fires(t(s), t(delta), t(var), t(u), CFG).tolist() == [fires]


def test_trigger_is_elementwise_over_a_batch():
    rows = torch.tensor(TRUTH_TABLE, dtype=torch.float64)
    got = trigger_fires(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3], CFG)
    assert got.tolist() == [bool(r[4]) for r in TRUTH_TABLE]


def test_thresholds_are_parameters():
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    unsure = (t(0.2), t(0.0), t(0.0), t(4.0))  # u = 4, s = 0.2
    assert trigger_fires(*unsure, CFG).item()
    assert not trigger_fires(*unsure, ControllerConfig(tau_entropy=4.0)).item()
    assert not trigger_fires(*unsure, ControllerConfig(tau_sim=0.2)).item()
    dropping = (t(0.9), t(-0.02), t(0.01), t(0.0))  # delta = -0.02, var = 0.01
    assert not trigger_fires(*dropping, CFG).item()
    assert trigger_fires(*dropping, ControllerConfig(tau_drop=0.01)).item()
    assert not trigger_fires(*dropping, ControllerConfig(tau_drop=0.01, tau_var=0.01)).item()


def test_trigger_history_delta_and_windowed_population_variance_per_image():
    history = TriggerHistory(images=2, var_window=3)
    both, first = torch.tensor([True, True]), torch.tensor([True, False])
    delta, var = history.update(torch.tensor([0.5, 0.9], dtype=torch.float64), both)
    assert torch.isnan(delta).all() and var.tolist() == [0.0, 0.0]
    delta, var = history.update(torch.tensor([0.3, 0.1], dtype=torch.float64), first)  # image 1 is not evaluated this time
    assert delta[0].item() == pytest.approx(-0.2) and var[0].item() == pytest.approx(0.01)  # values 0.5, 0.3
    assert math.isnan(delta[1].item()) and math.isnan(var[1].item())
    history.update(torch.tensor([0.3, 0.0], dtype=torch.float64), first)
    delta, var = history.update(torch.tensor([0.3, 0.7], dtype=torch.float64), both)  # image 0's window: 0.3, 0.3, 0.3
    assert delta[0].item() == pytest.approx(0.0) and var[0].item() == pytest.approx(0.0, abs=1e-15)
    assert delta[1].item() == pytest.approx(-0.2) and var[1].item() == pytest.approx(0.01)  # 0.9, 0.7


@pytest.mark.parametrize("field,value", [
    ("memory_tokens", 0), ("window", -1), ("control_tokens", 0), ("eval_every", 0), ("max_injections_per_band", 0),
    ("min_gap", -1), ("tau_drop", float("nan")), ("tau_var", -0.1), ("max_scale", -1.0), ("think_tokens", 1.5),
    ("min_history", 33), ("force_every", -2), ("attention_heads", True), ("force_images", (-1,)),
])
def test_config_rejects_bad_numbers(field, value):
    with pytest.raises(InputError, match=field.split("_")[0]):
        ControllerConfig(**{field: value})


def test_config_travels_inside_generation_settings_as_json():
    settings = GenerationSettings(mode="seed", controller=ControllerConfig(tau_sim=0.1, force_images=(2, 5)))
    as_json = json.loads(json.dumps(settings.to_dict()))
    assert as_json["controller"]["tau_sim"] == 0.1 and as_json["controller"]["memory_tokens"] == 8
    again = GenerationSettings(**as_json)
    assert again.controller == settings.controller and again.controller.force_images == (2, 5)
    assert GenerationSettings().to_dict()["controller"] is None
    with pytest.raises(InputError, match="unknown controller setting"):
        GenerationSettings(controller={"tau": 1})
    with pytest.raises(InputError, match="controller must be"):
        GenerationSettings(controller=3)


def test_config_overrides_from_name_value_strings():
    config = ControllerConfig().with_overrides(["min_gap=16", "tau-drop=0.1", "weights=w.safetensors",
                                                "force_images=1,3"])
    assert (config.min_gap, config.tau_drop, config.weights, config.force_images) == (16, 0.1, "w.safetensors", (1, 3))
    with pytest.raises(InputError, match="not name=value"):
        ControllerConfig().with_overrides(["min_gap"])
    with pytest.raises(InputError, match=r"unknown controller setting 'tau_dorp' \(did you mean tau_drop\?\); "
                                         r"the controller settings are: .*min_gap"):
        ControllerConfig().with_overrides(["tau_dorp=0.1"])
    with pytest.raises(InputError, match="min_gap cannot be"):
        ControllerConfig().with_overrides(["min_gap=soon"])
