"""The driver's work feed: the input read in slices, expanded to work items, cut into calls of one size."""
import pyarrow as pa
import pyarrow.parquet as pq

from twig_batch.distributed import work_feed
from twig_batch.distributed.input_scan import scan_input
from twig_batch.io.dataset import resolve_input
from twig_batch.io.manifest import item_key
from twig_batch.seeds import derive_seed


def calls_of(folder, per_call, *, samples=2, skip=frozenset(), id_column="id"):
    files = resolve_input(str(folder))
    repeats = scan_input(files, "prompt", id_column, None)
    return list(work_feed.work_calls(files, prompt_column="prompt", id_column=id_column, seed_column=None,
                                     samples=samples, base_seed=7, skip=skip, per_call=per_call, repeats=repeats))


def test_calls_have_one_size_whatever_the_files_and_row_groups_behind_them(tmp_path, monkeypatch):
    monkeypatch.setattr(work_feed, "ROWS_PER_SLICE", 3)  # slices smaller than a row group, too
    # Ids are integers in one file and text in the other: the run reads both as text.
    pq.write_table(pa.table({"id": [1, 2, 3, 4, 5], "prompt": [f"a{i}" for i in range(5)]}), tmp_path / "a.parquet",
                   row_group_size=2)
    pq.write_table(pa.table({"id": [f"b{i}" for i in range(7)], "prompt": [f"b{i}" for i in range(7)]}),
                   tmp_path / "b.parquet", row_group_size=4)
    calls = calls_of(tmp_path, per_call=5)
    assert [c.num_rows for c in calls] == [5, 5, 5, 5, 4]  # 12 rows x 2 samples
    items = pa.concat_tables(calls)
    assert items.column("id").to_pylist() == [i for i in ["1", "2", "3", "4", "5"] + [f"b{n}" for n in range(7)]
                                              for _ in range(2)]
    assert items.column("sample_index").to_pylist() == [0, 1] * 12
    assert items.column("seed").to_pylist()[:2] == [derive_seed(7, "1", 0), derive_seed(7, "1", 1)]


def test_done_items_are_left_out_and_an_input_all_done_gives_no_call(tmp_path):
    pq.write_table(pa.table({"id": ["x", "y"], "prompt": ["p", "q"]}), tmp_path / "in.parquet")
    calls = calls_of(tmp_path, per_call=8, skip=frozenset({item_key("x", 1), item_key("y", 0)}))
    (call,) = calls
    assert list(zip(call.column("id").to_pylist(), call.column("sample_index").to_pylist())) == [("x", 0), ("y", 1)]
    every = frozenset(item_key(i, s) for i in ("x", "y") for s in (0, 1))
    assert calls_of(tmp_path, per_call=8, skip=every) == []


def test_a_repeated_prompt_without_an_id_is_one_item_drawn_once(tmp_path):
    pq.write_table(pa.table({"prompt": ["same", "other", "same"]}), tmp_path / "one.parquet")
    pq.write_table(pa.table({"prompt": ["same", "last"]}), tmp_path / "two.parquet")
    items = pa.concat_tables(calls_of(tmp_path, per_call=2, samples=1, id_column=None))
    prompts = items.column("prompt").to_pylist()
    assert sorted(prompts) == ["last", "other", "same"]
    assert len(set(items.column("id").to_pylist())) == 3
