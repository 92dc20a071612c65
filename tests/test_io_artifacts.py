import io
import json
import math

import pyarrow.parquet as pq
import torch
from PIL import Image

from twig_batch.io import layout
from twig_batch.io.artifacts import encode_result, write_result
from twig_batch.io.manifest import rows_to_table
from twig_batch.io.storage import LocalStorage
from twig_batch.pipeline import ImageRequest, ImageResult


def _image(colour):
    return Image.new("RGB", (8, 8), colour)


def staged_result(prompt_id="../x/y"):
    trigger_log = [{"band": 0, "attempt": 0, "step": 40, "s_t": torch.tensor(0.3), "delta_s": -0.1, "var_s": 0.01,
                    "u_t": 3.9, "fired": True, "forced": False, "injected": True},
                   {"band": 0, "attempt": 0, "step": 41, "s_t": 0.31, "delta_s": 0.01, "var_s": float("nan"),
                    "u_t": 2.0, "fired": False, "forced": False, "injected": False}]
    return ImageResult(request=ImageRequest(prompt_id, "a cube", 1, 99), codes=torch.zeros(4, dtype=torch.long),
                       image=_image("red"), mode="twig",
                       band_images=[("band-1", _image("blue")), ("band-1 redrawn/..", _image("green"))],
                       thoughts=["top: sky", "bottom: grass"],
                       reflections=[{"score": 42.0, "improved": "more sky", "accepted": False},
                                    {"score": None, "improved": None, "accepted": True}],
                       redrawn_bands=[0], trigger_log=trigger_log, timings={"image_tokens_s": 0.5})


def test_staged_result_writes_every_object_and_row(tmp_path):
    store = LocalStorage(tmp_path)
    row = write_result(store, staged_result(), "tiny", generation_s=0.5)
    assert row["status"] == "ok" and row["id"] == "../x/y" and row["sample_index"] == 1 and row["seed"] == 99
    assert row["image_uri"] == str(tmp_path / layout.image_key("../x/y", 1))
    with Image.open(row["image_uri"]) as image:
        assert image.getpixel((0, 0)) == (255, 0, 0)
    assert row["stage_labels"] == ["band-1", "band-1 redrawn/.."] and len(row["stage_image_uris"]) == 2
    for uri in row["stage_image_uris"]:
        assert Image.open(uri).size == (8, 8) and uri.startswith(str(tmp_path / layout.item_folder("../x/y")))
    assert row["thoughts"] == ["top: sky", "bottom: grass"]
    assert row["reflection_scores"] == [42.0, None] and json.loads(row["reflections_json"])[0]["improved"] == "more sky"
    assert row["redrawn_bands"] == [0] and row["n_triggers"] == 1 and row["n_injections"] == 1
    log = pq.read_table(row["trigger_log_uri"]).to_pylist()
    assert row["trigger_log_uri"].endswith("sample-0001.triggers.parquet")
    assert [r["step"] for r in log] == [40, 41] and abs(log[0]["s_t"] - 0.3) < 1e-6 and math.isnan(log[1]["var_s"])
    assert row["duration_s"] >= 0.5
    assert rows_to_table([row]).num_rows == 1  # fits the manifest schema


def test_controller_run_gets_a_trigger_log_even_when_empty(tmp_path):
    result = staged_result("quiet")
    result.trigger_log = []
    row = write_result(LocalStorage(tmp_path), result, "tiny", 0.1, controller_ran=True)
    log = pq.read_table(row["trigger_log_uri"])
    assert log.num_rows == 0 and {"step", "s_t", "fired", "injected"} <= set(log.column_names)


def test_plain_result_has_no_stage_objects(tmp_path):
    store = LocalStorage(tmp_path)
    result = ImageResult(request=ImageRequest("p", "x", 0, 1), codes=torch.zeros(1), image=_image("white"),
                         mode="plain")
    row = write_result(store, result, "tiny", 0.1)
    assert row["stage_image_uris"] == [] and row["trigger_log_uri"] is None and row["reflections_json"] is None
    assert sorted(p.name for p in (tmp_path / layout.item_folder("p")).iterdir()) == ["sample-0000.png"]


def test_encoded_result_carries_png_bytes():
    row = encode_result(staged_result("q"), "tiny", 0.2)
    assert Image.open(io.BytesIO(row["image_png"])).getpixel((0, 0)) == (255, 0, 0)
    assert len(row["stage_pngs"]) == 2 and row["image_uri"] is None
    assert json.loads(row["trigger_log_json"])[0]["step"] == 40
