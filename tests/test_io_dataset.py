import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch_support import write_prompts
from twig_batch.errors import InputError
from twig_batch.io.dataset import check_input, resolve_input


def test_file_folder_and_glob(tmp_path):
    write_prompts(tmp_path / "data/part-1.parquet", 3)
    write_prompts(tmp_path / "data/sub/part-2.parquet", 2)
    (tmp_path / "data/notes.txt").write_text("ignored")
    assert len(resolve_input(str(tmp_path / "data/part-1.parquet")).paths) == 1
    folder = resolve_input(str(tmp_path / "data"))
    assert [p.rsplit("/", 1)[-1] for p in folder.paths] == ["part-1.parquet", "part-2.parquet"]
    assert check_input(folder, "prompt", "id", False).rows == 5
    assert len(resolve_input(str(tmp_path / "data/*.parquet")).paths) == 1


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        resolve_input(str(tmp_path / "nope.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="matches no Parquet"):
        resolve_input(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="matches no Parquet"):
        resolve_input(str(tmp_path / "*.parquet"))


def test_columns_are_checked_from_footers(tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "a.parquet")
    with pytest.raises(InputError, match="no column 'prompt'.*columns: text"):
        check_input(resolve_input(str(tmp_path / "a.parquet")), "prompt", "id", False)
    assert check_input(resolve_input(str(tmp_path / "a.parquet")), "text", "id", False).has_id_column is False
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "b.parquet")
    with pytest.raises(InputError, match="holds int64, not text"):
        check_input(resolve_input(str(tmp_path / "b.parquet")), "prompt", "id", False)
    pq.write_table(pa.table({"prompt": ["a"], "id": [1.5]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match="ids must be text or integers"):
        check_input(resolve_input(str(tmp_path / "c.parquet")), "prompt", "id", False)
    with pytest.raises(InputError, match="no id column 'key'"):
        check_input(resolve_input(str(tmp_path / "a.parquet")), "text", "key", True)


def test_unreadable_file_names_the_file(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(InputError, match="cannot read .*broken.parquet as Parquet"):
        check_input(resolve_input(str(tmp_path / "broken.parquet")), "prompt", "id", False)


def test_fingerprint_follows_the_content(tmp_path):
    path = write_prompts(tmp_path / "p.parquet", 4)
    first = check_input(resolve_input(str(path)), "prompt", "id", False).fingerprint
    assert first["rows"] == 4 and first["files"] == 1 and len(first["sha256"]) == 64
    assert check_input(resolve_input(str(path)), "prompt", "id", False).fingerprint == first
    write_prompts(path, 5)
    assert check_input(resolve_input(str(path)), "prompt", "id", False).fingerprint["sha256"] != first["sha256"]
