import os

import pytest

from batch_support import s3_client, s3_server, strict_s3_server
from twig_batch.errors import OutputError
from twig_batch.io.storage import LocalStorage, S3Storage, open_storage


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        s3_client().create_bucket(Bucket="storage-tests")
        yield endpoint


def test_local_put_is_atomic_and_leaves_no_temp_files(tmp_path):
    store = LocalStorage(tmp_path / "dest")
    store.put("images/aa/x/sample-0000.png", b"first")
    store.put("images/aa/x/sample-0000.png", b"second")
    assert store.get("images/aa/x/sample-0000.png") == b"second"
    assert [p.name for p in (tmp_path / "dest/images/aa/x").iterdir()] == ["sample-0000.png"]
    assert store.list("images") == ["images/aa/x/sample-0000.png"]


def test_local_put_that_fails_keeps_the_old_object(tmp_path, monkeypatch):
    store = LocalStorage(tmp_path)
    store.put("run.json", b"old")

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put("run.json", b"new and half written")
    assert store.get("run.json") == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_local_unwritable_destination_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for dest in (blocker, blocker / "below"):
        with pytest.raises(OutputError, match="(cannot write|not a folder)"):
            LocalStorage(dest).check_writable()


def test_open_storage_refuses_other_schemes():
    with pytest.raises(OutputError, match="unsupported"):
        open_storage("gs://bucket/x")
    with pytest.raises(OutputError, match="credentials"):
        open_storage("s3://key:secret@bucket/x")


def test_s3_round_trip(s3):
    store = open_storage("s3://storage-tests/runs/one")
    assert isinstance(store, S3Storage)
    store.check_writable()
    uri = store.put("images/ab/p-1/sample-0000.png", b"png")
    assert uri == "s3://storage-tests/runs/one/images/ab/p-1/sample-0000.png"
    assert store.exists("images/ab/p-1/sample-0000.png") and not store.exists("images/none.png")
    assert store.get("images/ab/p-1/sample-0000.png") == b"png"
    assert store.list("images") == ["images/ab/p-1/sample-0000.png"]
    listed = s3_client().list_objects_v2(Bucket="storage-tests")["Contents"]
    assert [o["Key"] for o in listed] == ["runs/one/images/ab/p-1/sample-0000.png"]  # the probe is gone
    store.delete("images/ab/p-1/sample-0000.png")
    with pytest.raises(FileNotFoundError):
        store.get("images/ab/p-1/sample-0000.png")


def test_s3_storage_pickles_without_a_client(s3):
    import pickle

    store = open_storage("s3://storage-tests/p")
    store.put("x.txt", b"1")
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get("x.txt") == b"1" and clone.endpoint.url == s3


def test_s3_missing_bucket(s3):
    with pytest.raises(OutputError, match="bucket does not exist"):
        open_storage("s3://no-such-bucket/prefix").check_writable()


def test_s3_missing_credentials(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(OutputError, match="no usable AWS credentials"):
        open_storage("s3://storage-tests/p").check_writable()


def test_s3_refused_credentials(monkeypatch):
    """A server that checks signatures refuses an unknown key: one message about credentials."""
    with strict_s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        with pytest.raises(OutputError, match="credentials were refused"):
            open_storage("s3://any-bucket/p").check_writable()


def test_staging_leftovers_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    storage = LocalStorage(tmp_path / "dest")
    storage.put("images/ab/x/sample-0000.png", b"png")
    leftover = tmp_path / "dest" / "images" / "ab" / "x" / ".sample-0001.png.0123abcd.tmp"
    leftover.write_bytes(b"half")
    assert storage.remove_staging_leftovers() == 1
    assert not leftover.exists() and storage.get("images/ab/x/sample-0000.png") == b"png"


def test_a_symbolic_link_planted_in_dest_cannot_lead_a_write_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "images").symlink_to(outside, target_is_directory=True)
    storage = LocalStorage(dest)
    with pytest.raises(OutputError, match="symbolic link"):
        storage.put("images/ab/x/sample-0000.png", b"png")
    assert list(outside.iterdir()) == []  # not even a folder was made there
    assert storage.put("run.json", b"{}") == str(dest / "run.json")  # the rest of DEST still works


def test_the_reserve_for_the_records_is_held_and_given_back_and_not_held_on_a_full_disk(tmp_path, monkeypatch):
    from twig_batch.io import storage as storage_module

    local = storage_module.LocalStorage(str(tmp_path / "out"))
    local.root.mkdir(parents=True)
    assert local.hold_reserve() and (local.root / storage_module.RESERVE_FILE).stat().st_size > 0
    assert local.release_reserve() and not (local.root / storage_module.RESERVE_FILE).exists()

    def no_space(*args, **kwargs):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "fsync", no_space)  # the disk is full: the reserve cannot be written
    assert not local.hold_reserve() and not (local.root / storage_module.RESERVE_FILE).exists()
    assert not local.release_reserve()
