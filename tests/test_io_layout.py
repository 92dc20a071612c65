import pytest

from batch_support import HOSTILE_IDS as RUN_IDS
from twig_batch.io import layout
from twig_batch.io.storage import LocalStorage, check_key

# A run gives a blank id's row an id made from its prompt; the layout copes with blank ones all the same.
HOSTILE_IDS = RUN_IDS + ["", " "]


@pytest.mark.parametrize("prompt_id", HOSTILE_IDS)
def test_keys_are_safe_relative_paths(prompt_id, tmp_path):
    keys = [layout.image_key(prompt_id, 3), layout.trigger_log_key(prompt_id, 3),
            layout.stage_image_key(prompt_id, 3, 1, "../band-2/after")]
    for key in keys:
        assert check_key(key) == key
        parts = key.split("/")
        assert parts[0] == "images" and len(parts) == 4
        assert all(part not in ("", ".", "..") and not part.startswith(".") for part in parts)
        assert all(len(part.encode()) <= 120 for part in parts)  # well inside every filesystem's name limit
        assert key.isascii() and "\\" not in key and "\n" not in key and "\x00" not in key
        written = LocalStorage(tmp_path / "dest").put(key, b"x")
        assert (tmp_path / "dest").resolve() in type(tmp_path)(written).resolve().parents


def test_keys_are_deterministic_and_distinct():
    assert layout.image_key("a/b", 0) == layout.image_key("a/b", 0)
    keys = {layout.image_key(i, 0) for i in HOSTILE_IDS}
    assert len(keys) == len(HOSTILE_IDS)  # "a/b" and "a\\b" and "a_b" must not collide
    assert layout.image_key("a/b", 0) != layout.image_key("a_b", 0)
    assert layout.image_key("p", 0) != layout.image_key("p", 1)


def test_slug_keeps_ids_readable():
    assert layout.id_slug("../../etc/passwd") == "etc_passwd"
    assert layout.id_slug("Ünïcödé") == "Unicode"
    assert layout.id_slug("🐱") == "id"
    assert layout.item_folder("prompt-7").split("/")[-1].startswith("prompt-7-")


def test_check_key_rejects_escapes():
    for bad in ("../x", "/etc/passwd", "a/../../b", "", "a//b", "./a"):
        with pytest.raises(ValueError):
            check_key(bad)
