"""The private huggingface_hub helpers behind hf_weightstream/hub/_hf_compat.py still exist and still do what we
rely on. When one of these fails, huggingface_hub changed: adapt ``_hf_compat.py`` (and only it)."""

from __future__ import annotations

import inspect
import os
import stat
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import _local_folder, constants, file_download, set_client_factory
from huggingface_hub.utils import _http, _shared_blobs

from hf_weightstream.hub import _hf_compat as compat
from hf_weightstream.hub import remote

XET_HASH = "ab" + "0" * 62
SIGNATURES = {
    (file_download, "_cache_commit_hash_for_specific_revision"): ["storage_folder", "revision", "commit_hash"],
    (file_download, "_check_disk_space"): ["expected_size", "target_dir"],
    (file_download, "_chmod_and_move"): ["src", "dst"],
    (file_download, "_create_symlink"): ["src", "dst", "new_blob"],
    (file_download, "repo_folder_name"): ["repo_id", "repo_type"],
    (file_download, "are_symlinks_supported"): ["cache_dir"],
    (_local_folder, "_create_cachedir_tag"): ["cache_dir"],
    (_shared_blobs, "shared_blobs_enabled"): [],
    (_shared_blobs, "shared_blob_path"): ["cache_dir", "xet_hash"],
    (_shared_blobs, "try_link_from_shared_store"): ["blob_path", "xet_hash", "cache_dir", "expected_size"],
    (_shared_blobs, "publish_blob_to_shared_store"): [
        "blob_path",
        "xet_hash",
        "cache_dir",
        "expected_size",
        "replace_existing",
    ],
}


@pytest.mark.parametrize(("where", "name"), list(SIGNATURES), ids=[name for _, name in SIGNATURES])
def test_private_helpers_keep_their_names_and_parameters(where, name) -> None:
    helper = getattr(where, name, None)
    assert helper is not None, f"huggingface_hub.{where.__name__}.{name} is gone: update hub/_hf_compat.py"
    params = list(inspect.signature(helper).parameters)
    assert params == SIGNATURES[(where, name)], f"{where.__name__}.{name} now takes {params}: update _hf_compat.py"


def test_commit_hashes_refs_and_folder_names(tmp_path: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert compat.is_commit_hash(commit) and not compat.is_commit_hash("main")
    assert compat.repo_folder("org/name") == "models--org--name"
    compat.record_ref(tmp_path, "main", commit)
    compat.record_ref(tmp_path, commit, commit)  # a commit needs no ref
    assert (tmp_path / "refs" / "main").read_text() == commit and len(list((tmp_path / "refs").iterdir())) == 1


def test_blobs_are_moved_and_linked_like_hf_hub_download_does(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(b"weights")
    part.chmod(0o600)
    blob = tmp_path / "blobs" / ("e" * 64)
    blob.parent.mkdir()
    compat.check_disk_space(7, tmp_path)
    compat.move_into_cache(part, blob)
    umask = os.umask(0)
    os.umask(umask)
    assert not part.exists() and blob.read_bytes() == b"weights"
    assert stat.S_IMODE(blob.stat().st_mode) == 0o666 & ~umask, "hf_hub_download's blob permissions"
    pointer = tmp_path / "snapshots" / "c" / "model.safetensors"
    pointer.parent.mkdir(parents=True)
    compat.link_pointer(blob, pointer, new_blob=True)
    assert pointer.is_symlink() and not os.readlink(pointer).startswith("/"), "a relative symlink"
    compat.tag_cache_dir(tmp_path)
    assert (tmp_path / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")


def test_shared_blob_store_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tmp_path / "models--org--a" / "blobs" / ("1" * 64)
    second = tmp_path / "models--org--b" / "blobs" / ("1" * 64)
    for blob in (first, second):
        blob.parent.mkdir(parents=True)
    first.write_bytes(b"content")
    assert compat.shared_store_usable(tmp_path)

    assert not compat.link_from_shared_store(second, XET_HASH, tmp_path, 7), "nothing in the store yet"
    assert compat.publish_to_shared_store(first, XET_HASH, tmp_path, 7, replace=False)
    store = compat.shared_store_path(tmp_path, XET_HASH)
    assert store == tmp_path / "blobs" / "ab" / XET_HASH
    assert first.is_symlink() and first.resolve() == store and store.read_bytes() == b"content"
    assert not compat.link_from_shared_store(second, XET_HASH, tmp_path, 8), "a size mismatch is not used"
    assert compat.link_from_shared_store(second, XET_HASH, tmp_path, 7)
    assert second.is_symlink() and second.read_bytes() == b"content"

    for switch in ("HF_HUB_DISABLE_SHARED_BLOBS", "HF_HUB_DISABLE_XET"):
        with monkeypatch.context() as off:
            off.setattr(constants, switch, True)
            assert not compat.shared_store_usable(tmp_path), switch


def test_our_http_client_comes_from_the_factory_users_configure() -> None:
    made: list[httpx2.Client] = []

    def factory() -> httpx2.Client:
        made.append(httpx2.Client(follow_redirects=True))
        return made[-1]

    default = _http._GLOBAL_CLIENT_FACTORY
    assert compat.default_http_client_factory(), "nobody set a factory: huggingface_hub's own default"
    set_client_factory(factory)
    try:
        client = compat.http_client_factory()()
        assert made == [client]
        assert not compat.default_http_client_factory(), "the user's factory is seen (direct_http stands aside)"
    finally:
        set_client_factory(default)
        for c in made:
            c.close()
    assert compat.default_http_client_factory()
    own = compat.http_client_factory()()
    try:
        assert isinstance(own, httpx2.Client) and own is not _http.get_session(), "not the shared client"
    finally:
        own.close()


def _spares_made() -> None:
    for thread in threading.enumerate():
        if thread.name == "hf_ws-clients":
            thread.join(10)


def test_clients_made_ahead_are_handed_out_only_while_their_factory_is_huggingface_hubs() -> None:
    made: list[httpx2.Client] = []

    def factory() -> httpx2.Client:
        made.append(httpx2.Client())
        return made[-1]

    default = _http._GLOBAL_CLIENT_FACTORY
    spares: list[httpx2.Client] = []
    set_client_factory(factory)
    try:
        remote.prepare_clients()
        _spares_made()
        assert len(made) == remote.SPARE_CLIENTS
        assert remote.take_client() is made[0], "made ahead, handed out"
        set_client_factory(default)  # the user changed the factory (a proxy, certificates) after they were made
        own = remote.take_client()
        assert own not in made
        own.close()
        remote.prepare_clients()  # closes the spare the old factory made, makes spares with the current one
        _spares_made()
        assert made[1].is_closed and len(made) == remote.SPARE_CLIENTS
        spares += [remote.take_client() for _ in range(remote.SPARE_CLIENTS)]
        assert not set(spares) & set(made) and not any(c.is_closed for c in spares)
    finally:
        set_client_factory(default)
        for c in made + spares:
            c.close()
