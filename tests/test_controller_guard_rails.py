"""Guard rails, band bookkeeping and the trigger log, driving the observer directly (no sampling loop)."""
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from twig_batch.cli import app
from twig_batch.controller import ControllerConfig, LatentController, read_trigger_log, write_trigger_log
from twig_batch.controller.trigger_log import COLUMNS, summarize
from twig_batch.io import layout

PROMPTS = ["a red cube", "tree", "night sky with a moon"]
ALWAYS = dict(tau_sim=2.0)  # uniform logits are maximally unsure and every s < 2: the trigger fires at every evaluation


def _feed(controller, steps, rows=2, width=512, seed=0):
    """Random hidden states, flat logits; returns {step: injected rows}."""
    generator = torch.Generator().manual_seed(seed)
    injected = {}
    for step in steps:
        hidden = torch.randn(rows, 64, generator=generator, dtype=torch.float64)
        injection = controller.observe(step, hidden, torch.zeros(rows, width, dtype=torch.float64),
                                       torch.zeros(rows, dtype=torch.long))
        if injection is not None:
            assert injection.embeds.shape == (rows, controller.config.control_tokens, 64)
            assert not injection.embeds[~injection.rows].any()
            injected[step] = injection.rows.nonzero().flatten().tolist()
    return injected


def test_guard_rails_evaluation_cadence_budget_and_gap(tiny64):
    config = ControllerConfig(**ALWAYS, min_history=8, eval_every=4, max_injections_per_band=3, min_gap=10)
    controller = LatentController(tiny64, PROMPTS[:2], config)
    controller.begin_band([0, 1], 0)
    injected = _feed(controller, range(100))
    log = controller.trigger_log(0)
    assert [r["step"] for r in log] == list(range(8, 100, 4))  # first full history at step 7, then every 4th step
    assert all(r["fired"] for r in log)
    assert [r["step"] for r in log if r["injected"]] == [8, 20, 32]  # gap >= 10, then the band's budget is spent
    assert injected == {8: [0, 1], 20: [0, 1], 32: [0, 1]}
    assert controller.summary(0) == {"evaluations": 23, "fires": 23, "injections": 3}

    controller.begin_band([0, 1], 1)  # a new band: fresh history, fresh budget
    _feed(controller, range(192, 260))
    band1 = [r for r in controller.trigger_log(0) if r["band"] == 1]
    assert band1[0]["step"] == 200 and math.isnan(band1[0]["delta_s"])
    assert [r["step"] for r in band1 if r["injected"]] == [200, 212, 224]


def test_redrawn_band_and_subsets_of_images_are_logged_against_the_right_request(tiny64):
    config = ControllerConfig(**ALWAYS, min_history=1, max_injections_per_band=1)
    controller = LatentController(tiny64, PROMPTS, config)
    controller.begin_band([0, 1, 2], 0)
    _feed(controller, range(0, 4), rows=3)
    controller.begin_band([2], 0)  # image 2 alone redraws band 0
    _feed(controller, range(0, 4), rows=1)
    assert [(r["attempt"], r["step"], r["injected"]) for r in controller.trigger_log(2)] == \
        [(0, 0, True), (0, 1, False), (0, 2, False), (0, 3, False), (1, 0, True), (1, 1, False), (1, 2, False),
         (1, 3, False)]
    assert len(controller.trigger_log(1)) == 4 and {r["attempt"] for r in controller.trigger_log(1)} == {0}
    with pytest.raises(ValueError, match="2 rows for a band of 1"):
        _feed(controller, [5], rows=2)
    with pytest.raises(IndexError, match="not one of this controller's 3 requests"):
        controller.begin_band([3], 0)


def test_forced_fires_hit_only_the_chosen_images_and_still_obey_the_guard_rails(tiny64):
    config = ControllerConfig(force_every=16, force_images=(1,), tau_drop=1e9, tau_entropy=1e9, min_gap=20)
    controller = LatentController(tiny64, PROMPTS[:2], config)
    injected = _feed(controller, range(64))  # no begin_band: rows are requests 0..B-1 in band 0
    assert injected == {15: [1], 47: [1]}  # step 31 fired but came too soon after 15
    forced = [(r["step"], r["fired"], r["injected"]) for r in controller.trigger_log(1) if r["forced"]]
    assert forced == [(15, True, True), (31, True, False), (47, True, False) if False else (47, True, True),
                      (63, True, False)]
    assert not any(r["fired"] for r in controller.trigger_log(0))


def test_trigger_log_schema_and_parquet_round_trip(tiny64, tmp_path):
    controller = LatentController(tiny64, PROMPTS[:2], ControllerConfig(**ALWAYS, min_history=2))
    _feed(controller, range(40))
    records = controller.trigger_log(0)
    assert all(list(r) == list(COLUMNS) for r in records)
    path = write_trigger_log(records, tmp_path / "log.parquet")
    table = pq.read_table(path)
    assert table.schema.names == ["band", "attempt", "step", "s_t", "delta_s", "var_s", "u_t", "fired", "forced",
                                  "injected"]
    assert [table.schema.field(c).type for c in ("band", "step", "s_t", "fired")] == \
        [pa.int32(), pa.int32(), pa.float64(), pa.bool_()]
    back = read_trigger_log(path)
    assert len(back) == 39 and math.isnan(back[0]["delta_s"]) and back[5]["s_t"] == records[5]["s_t"]
    assert back[0]["u_t"] == pytest.approx(math.log(512))
    assert summarize(back) == controller.summary(0)
    empty = pq.read_table(write_trigger_log([], tmp_path / "empty.parquet"))
    assert empty.num_rows == 0 and empty.schema.names == list(COLUMNS)


def test_cli_saves_each_images_trigger_log_next_to_it(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "a red cube", "--model", str(tiny_hf_dir), "--out", str(out),
                                      "--bands", "1", "--controller", "--tau-sim", "0.5",
                                      "--max-injections", "2", "--controller-set", "min_gap=100"])
    assert result.exit_code == 0, result.output
    (row,) = pq.read_table(out / layout.MANIFEST).to_pylist()
    assert row["trigger_log_uri"] == str(out / layout.trigger_log_key("cli", 0))  # beside its image
    log = read_trigger_log(row["trigger_log_uri"])
    controller = json.loads((out / layout.RUN_INFO).read_text())["settings"]["controller"]
    assert controller["tau_sim"] == 0.5 and controller["min_gap"] == 100
    assert len(log) == 576 - 7
    assert row["n_injections"] == sum(r["injected"] for r in log) == 2
    assert row["n_triggers"] == sum(r["fired"] for r in log)


def test_cli_controller_switches():
    from twig_batch.cli import _controller_config

    assert _controller_config(None, None, [], {}) is None
    assert _controller_config(False, "w.safetensors", [], {}) is None
    assert _controller_config(None, "w.safetensors", [], {}).weights == "w.safetensors"  # weights imply the switch
    config = _controller_config(True, None, ["eval_every=2"], {"tau_var": 0.01, "tau_sim": None})
    assert (config.weights, config.eval_every, config.tau_var, config.tau_sim) == (None, 2, 0.01, 0.25)
