"""The local Hub (hf_weightstream.testing.hub_server) driven by the real huggingface_hub 2.4 client, no mocks.

Pointing huggingface_hub at the server from inside one process (checked by the tests below):

- ``HF_ENDPOINT``/``HF_HUB_CACHE`` are read when huggingface_hub is *imported*, and importing
  ``hf_weightstream`` (even for ``hub_server``) already imports transformers and huggingface_hub;
  pytest has imported them long before a server picks its free port, so setting the variables in a
  test does nothing. Setting ``HF_ENDPOINT`` works only for a fixed port chosen before any of those
  imports (``HubServer(port=...)``) or for a client started in another process.
- Works with ``endpoint=server.url``: ``hf_hub_download``, ``snapshot_download``, ``hf_hub_url``
  and ``HfApi(endpoint=server.url)`` (``model_info``, ``list_repo_files``, ``list_repo_tree``,
  ``get_paths_info``, ``file_exists``, ``get_safetensors_metadata``). ``get_hf_file_metadata``
  goes wherever its URL says, so build the URL with ``hf_hub_url(..., endpoint=server.url)``.
- Does not work that way: the module-level functions (``huggingface_hub.model_info``,
  ``huggingface_hub.get_safetensors_metadata``, ...) are methods of one ``HfApi`` built at import
  time with the import-time endpoint; transformers caches its own ``HfApi`` on first use
  (``transformers.utils.hub._hf_api``). And ``HfApi.get_safetensors_metadata`` downloads the index
  with no ``cache_dir``, i.e. into ``constants.HF_HUB_CACHE`` (the user's home cache).
- ``tests/hubtools.hf_hub_endpoint(url, cache_dir)`` covers all of that: it patches
  ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``, ``constants.HF_HUB_CACHE``
  (all read at call time), ``hf_api.api.endpoint`` and resets transformers' cached ``HfApi``; then
  ``from_pretrained("org/tiny")`` and the module-level functions reach the server.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
from hubtools import hf_hub_endpoint, hub_server, make_tiny_llama
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from hf_weightstream.testing.hub_repo import xet_hash_stand_in
from hf_weightstream.testing.hub_server import Fault, HubServer

REPO = "org/tiny"
SHARD = "model-00001-of-00003.safetensors"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def server(tiny_llama: Path) -> Iterator[HubServer]:
    with hub_server({REPO: tiny_llama}) as srv:
        yield srv


@pytest.fixture
def blob_folder(tmp_path: Path) -> Path:
    """A 1 MB LFS file (by suffix) and a nested non-LFS file, for ranges, bandwidth and trees."""
    folder = tmp_path / "blobs"
    (folder / "sub" / "dir").mkdir(parents=True)
    (folder / "blob.bin").write_bytes((bytes(range(256)) * 3907)[:1_000_000])
    (folder / "sub" / "dir" / "notes.txt").write_text("hello\n")
    return folder


def _resolve_url(server: HubServer, filename: str, repo: str = REPO) -> str:
    return hf_hub_url(repo, filename, endpoint=server.url)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# -- downloads -------------------------------------------------------------------------------------


def test_snapshot_download_is_byte_identical(server: HubServer, tiny_llama: Path, tmp_path: Path) -> None:
    sha = HubServer().add_repo(REPO, tiny_llama)  # deterministic: same sha from another server
    assert len(sha) == 40 and int(sha, 16) >= 0

    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path, endpoint=server.url))

    assert snapshot.name == sha
    assert (tmp_path / "models--org--tiny" / "refs" / "main").read_text() == sha
    local = sorted(p.name for p in tiny_llama.iterdir())
    assert sorted(p.name for p in snapshot.iterdir()) == local
    assert len([name for name in local if name.endswith(".safetensors")]) == 3
    for name in local:
        data = (tiny_llama / name).read_bytes()
        assert (snapshot / name).read_bytes() == data
        # The cache names blobs by etag: sha256 for LFS files, git blob sha1 for the others.
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else _git_blob_sha1(data)
        assert (snapshot / name).resolve().name == etag


def test_hf_hub_download_one_shard(server: HubServer, tiny_llama: Path, tmp_path: Path) -> None:
    path = hf_hub_download(REPO, SHARD, cache_dir=tmp_path, endpoint=server.url)

    assert Path(path).read_bytes() == (tiny_llama / SHARD).read_bytes()
    assert [(r.method, r.status) for r in server.log] == [("HEAD", 200), ("GET", 200)]
    assert server.bytes_sent(".safetensors") == (tiny_llama / SHARD).stat().st_size
    assert server.bytes_sent("config.json") == 0


def test_download_of_nested_file_and_tree_listing(blob_folder: Path, tmp_path: Path) -> None:
    with hub_server({"org/blobs": blob_folder}) as srv:
        api = HfApi(endpoint=srv.url)
        path = hf_hub_download("org/blobs", "sub/dir/notes.txt", cache_dir=tmp_path, endpoint=srv.url)
        top = {(type(e).__name__, e.path) for e in api.list_repo_tree("org/blobs")}
        sub = {(type(e).__name__, e.path) for e in api.list_repo_tree("org/blobs", "sub")}
        deep = {e.path for e in api.list_repo_tree("org/blobs", recursive=True)}
        info = api.get_paths_info("org/blobs", ["sub", "blob.bin", "missing"])
        with pytest.raises(RemoteEntryNotFoundError):
            list(api.list_repo_tree("org/blobs", "nope"))

    assert Path(path).read_text() == "hello\n"
    assert top == {("RepoFile", "blob.bin"), ("RepoFolder", "sub")}
    assert sub == {("RepoFolder", "sub/dir")}
    assert deep == {"blob.bin", "sub", "sub/dir", "sub/dir/notes.txt"}
    assert [type(e) for e in info] == [RepoFolder, RepoFile]
    assert info[1].lfs is not None and info[1].lfs.size == 1_000_000


# -- metadata --------------------------------------------------------------------------------------


def test_file_metadata_lfs_and_plain(server: HubServer, tiny_llama: Path) -> None:
    sha = HubServer().add_repo(REPO, tiny_llama)
    shard = (tiny_llama / SHARD).read_bytes()
    config = (tiny_llama / "config.json").read_bytes()

    meta = get_hf_file_metadata(_resolve_url(server, SHARD))
    plain = get_hf_file_metadata(_resolve_url(server, "config.json"))

    assert (meta.etag, meta.size, meta.commit_hash) == (hashlib.sha256(shard).hexdigest(), len(shard), sha)
    assert meta.location == _resolve_url(server, SHARD)
    assert meta.xet_file_data is None
    assert (plain.etag, plain.size) == (_git_blob_sha1(config), len(config))


def test_xet_mode_redirects_to_a_signed_bridge_url_with_the_metadata_on_the_302(tiny_llama: Path) -> None:
    with hub_server({REPO: tiny_llama}, mode="xet") as srv:
        meta = get_hf_file_metadata(_resolve_url(srv, SHARD), endpoint=srv.url)
        plain = get_hf_file_metadata(_resolve_url(srv, "config.json"), endpoint=srv.url)
        hub_url, bridge_url, log = srv.url, srv.bridge_url, srv.log
        token = httpx2.get(meta.xet_file_data.refresh_route) if meta.xet_file_data else None

    sha256 = hashlib.sha256((tiny_llama / SHARD).read_bytes()).hexdigest()
    commit = HubServer().add_repo(REPO, tiny_llama)
    assert bridge_url is not None and urlsplit(bridge_url).hostname != urlsplit(hub_url).hostname
    # The HEAD does not follow a redirect to another host: metadata comes from the 302 itself.
    assert meta.location.startswith(f"{bridge_url}/xet-bridge-us/") and "Expires=" in meta.location
    assert (meta.etag, meta.size, meta.commit_hash) == (sha256, (tiny_llama / SHARD).stat().st_size, commit)
    assert meta.xet_file_data is not None and meta.xet_file_data.file_hash == xet_hash_stand_in(sha256)
    assert meta.xet_file_data.refresh_route == f"{hub_url}/api/models/{REPO}/xet-read-token/{commit}"
    assert token is not None and token.status_code == 200
    # The xet-auth route answers what huggingface_hub's refresh_xet_connection_info reads.
    assert int(token.headers["X-Xet-Token-Expiration"]) > time.time() and token.headers["X-Xet-Access-Token"]
    assert token.headers["X-Xet-Cas-Url"].startswith(hub_url)
    assert plain.location == hf_hub_url(REPO, "config.json", endpoint=hub_url)  # non-LFS: served directly
    assert plain.xet_file_data is None
    assert [(r.origin, r.status) for r in log] == [("hub", 302), ("hub", 200)]


def test_xet_mode_paths_info_reports_sizes_sha256_and_xet_hashes_in_one_call(tiny_llama: Path) -> None:
    shards = sorted(p.name for p in tiny_llama.glob("*.safetensors"))
    with hub_server({REPO: tiny_llama}, mode="xet") as srv:
        infos = HfApi(endpoint=srv.url).get_paths_info(REPO, [*shards, "config.json"])
        log = srv.log
    assert len(log) == 1 and log[0].path == f"/api/models/{REPO}/paths-info/main"
    for info, name in zip(infos, shards, strict=False):
        sha256 = hashlib.sha256((tiny_llama / name).read_bytes()).hexdigest()
        assert isinstance(info, RepoFile) and info.path == name and info.lfs is not None
        assert (info.size, info.lfs.sha256, info.xet_hash) == (
            (tiny_llama / name).stat().st_size,
            sha256,
            xet_hash_stand_in(sha256),
        )
    assert infos[-1].path == "config.json" and infos[-1].lfs is None and infos[-1].xet_hash is None


def test_signed_bridge_urls_expire_and_a_new_resolve_gives_a_fresh_one(tiny_llama: Path) -> None:
    data = (tiny_llama / SHARD).read_bytes()
    with hub_server({REPO: tiny_llama}, mode="xet", url_ttl=1.0) as srv:
        first = get_hf_file_metadata(_resolve_url(srv, SHARD)).location
        ranged = httpx2.get(first, headers={"Range": "bytes=0-99"})
        tampered = httpx2.get(first.replace("Expires=", "Expires=1"), headers={"Range": "bytes=0-99"})
        time.sleep(2.05)
        expired = httpx2.get(first, headers={"Range": "bytes=0-99"})
        fresh = get_hf_file_metadata(_resolve_url(srv, SHARD)).location
        again = httpx2.get(fresh, headers={"Range": "bytes=100-199"})
        calls = srv.resolve_calls(SHARD)

    assert (ranged.status_code, ranged.content) == (206, data[:100])
    assert ranged.headers["Content-Range"] == f"bytes 0-99/{len(data)}"
    assert tampered.status_code == 403 and b"Invalid signature" in tampered.content
    assert expired.status_code == 403 and b"Request has expired" in expired.content
    for refused in (tampered, expired):  # the storage's error documents: XML, chunked as S3 sends them
        assert refused.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in refused.headers
        assert refused.headers["Content-Type"] == "application/xml" and b"<Code>AccessDenied</Code>" in refused.content
    assert fresh != first and (again.status_code, again.content) == (206, data[100:200])
    assert calls == 2, "two HEADs; the bridge requests are not resolve calls"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the TLS bridge's certificate is made with openssl")
def test_the_bridge_can_serve_https_to_clients_that_trust_its_certificate(tiny_llama: Path) -> None:
    data = (tiny_llama / SHARD).read_bytes()
    with hub_server({REPO: tiny_llama}, mode="xet", tls=True) as srv:
        location = get_hf_file_metadata(_resolve_url(srv, SHARD)).location
        trusting = ssl.create_default_context(cafile=srv.ca_file)
        ranged = httpx2.get(location, headers={"Range": "bytes=0-99"}, verify=trusting)
        with pytest.raises(httpx2.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx2.get(location, headers={"Range": "bytes=0-99"}, verify=ssl.create_default_context())
        again = httpx2.get(location, headers={"Range": "bytes=100-199"}, verify=trusting)  # still serving
        hub_scheme = urlsplit(srv.url).scheme
    assert location.startswith("https://localhost:") and hub_scheme == "http"
    assert (ranged.status_code, ranged.content) == (206, data[:100])
    assert (again.status_code, again.content) == (206, data[100:200])
    with pytest.raises(ValueError, match="mode='xet'"):
        HubServer(tls=True)


def test_xet_mode_plain_download_over_http_sends_no_token_to_the_bridge(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # this server has no Xet CAS (see its docstring)
    with hub_server({REPO: tiny_llama}, mode="xet") as srv:
        path = hf_hub_download(REPO, SHARD, cache_dir=tmp_path, endpoint=srv.url, token="hf_test")
        HfApi(endpoint=srv.url, token="hf_test").parse_safetensors_file_metadata(REPO, SHARD)
        log = srv.log

    assert Path(path).read_bytes() == (tiny_llama / SHARD).read_bytes()
    assert [(r.method, r.origin, r.status, r.authorization) for r in log] == [
        ("HEAD", "hub", 302, True),
        ("GET", "hub", 302, True),  # without hf_xet, huggingface_hub downloads through /resolve/ again
        ("GET", "bridge", 200, False),  # httpx dropped the token when following the redirect to another host
        ("GET", "hub", 302, True),
        ("GET", "bridge", 206, False),
    ]


def test_model_info_list_files_and_paths_info(server: HubServer, tiny_llama: Path) -> None:
    api = HfApi(endpoint=server.url)
    local = sorted(p.name for p in tiny_llama.iterdir())

    info = api.model_info(REPO, files_metadata=True)
    by_sha = api.model_info(REPO, revision=info.sha)
    paths = api.get_paths_info(REPO, ["config.json", SHARD, "missing.bin"])

    assert info.id == REPO and by_sha.sha == info.sha
    assert sorted(s.rfilename for s in info.siblings or []) == local
    shard = next(s for s in info.siblings or [] if s.rfilename == SHARD)
    shard_bytes = (tiny_llama / SHARD).read_bytes()
    assert shard.size == len(shard_bytes)
    assert shard.lfs is not None and shard.lfs.sha256 == hashlib.sha256(shard_bytes).hexdigest()
    assert sorted(api.list_repo_files(REPO)) == local
    assert [p.path for p in paths] == ["config.json", SHARD]
    assert isinstance(paths[1], RepoFile) and paths[1].lfs is not None and paths[0].lfs is None
    assert paths[1].xet_hash is None
    assert api.file_exists(REPO, "config.json") and not api.file_exists(REPO, "nope.json")


def test_get_safetensors_metadata_reads_headers_with_ranges(
    server: HubServer, tiny_llama: Path, tmp_path: Path
) -> None:
    from huggingface_hub import get_safetensors_metadata  # module-level: needs hf_hub_endpoint
    from safetensors import safe_open

    with hf_hub_endpoint(server.url, cache_dir=tmp_path):
        meta = get_safetensors_metadata(REPO)

    index = json.loads((tiny_llama / "model.safetensors.index.json").read_text())
    assert meta.sharded and meta.weight_map == index["weight_map"]
    for shard, file_meta in meta.files_metadata.items():
        with safe_open(tiny_llama / shard, "pt") as f:
            assert sorted(file_meta.tensors) == sorted(f.keys())
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert file_meta.tensors[name].shape == list(f.get_slice(name).get_shape())
    header_reads = [r for r in server.log if r.method == "GET" and r.file and r.file.endswith(".safetensors")]
    assert len(header_reads) == 3
    assert all(r.range == "bytes=0-100000" and r.status == 206 for r in header_reads)
    assert (tmp_path / "models--org--tiny").is_dir()  # the index went to the patched cache


def test_transformers_from_pretrained_through_hf_hub_endpoint(
    server: HubServer, tiny_llama: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    with hf_hub_endpoint(server.url, cache_dir=tmp_path):
        remote = AutoModelForCausalLM.from_pretrained(REPO)
    local = AutoModelForCausalLM.from_pretrained(tiny_llama)

    weights = sum(p.stat().st_size for p in tiny_llama.glob("*.safetensors"))
    assert server.bytes_sent(".safetensors") == weights
    for (name, a), (_, b) in zip(remote.state_dict().items(), local.state_dict().items(), strict=True):
        assert a.equal(b), name


# -- ranges ----------------------------------------------------------------------------------------


def test_range_requests(blob_folder: Path) -> None:
    data = (blob_folder / "blob.bin").read_bytes()
    size = len(data)
    with hub_server({"org/blobs": blob_folder}) as srv, httpx2.Client() as client:
        url = _resolve_url(srv, "blob.bin", "org/blobs")

        def get(range_header: str) -> httpx2.Response:
            return client.get(url, headers={"Range": range_header})

        first = get("bytes=0-9")
        open_ended = get(f"bytes={size - 100}-")
        suffix = get("bytes=-5")
        clamped = get(f"bytes=10-{size * 2}")
        past_end = get(f"bytes={size}-")
        ignored = get("bytes=5-2")  # malformed (last < first): ignored, whole file
        head = client.head(url)

    assert (first.status_code, first.headers["Content-Range"], first.content) == (
        206,
        f"bytes 0-9/{size}",
        data[:10],
    )
    assert open_ended.headers["Content-Range"] == f"bytes {size - 100}-{size - 1}/{size}"
    assert open_ended.content == data[-100:]
    assert (suffix.status_code, suffix.content) == (206, data[-5:])
    assert suffix.headers["Content-Range"] == f"bytes {size - 5}-{size - 1}/{size}"
    assert clamped.content == data[10:] and clamped.headers["Content-Length"] == str(size - 10)
    assert (past_end.status_code, past_end.headers["Content-Range"]) == (416, f"bytes */{size}")
    assert (ignored.status_code, len(ignored.content)) == (200, size)
    assert head.headers["Accept-Ranges"] == "bytes" and head.headers["Content-Length"] == str(size)
    assert head.headers["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert head.headers["X-Linked-Size"] == str(size) and "X-Repo-Commit" in head.headers


def test_a_file_that_shrank_since_it_was_added_is_cut_short_and_logged_as_sent(blob_folder: Path) -> None:
    """The body goes out by ``sendfile`` over plain HTTP, by reads over TLS: both stop where the file now ends, and
    the log counts what was sent, not what the headers promised."""
    with hub_server({"org/blobs": blob_folder}, bandwidth=50_000_000) as srv:
        url = _resolve_url(srv, "blob.bin", "org/blobs")
        whole = httpx2.get(url)
        with (blob_folder / "blob.bin").open("r+b") as fh:
            fh.truncate(600_000)
        with pytest.raises(httpx2.RemoteProtocolError):
            httpx2.get(url)
        srv.wait_idle()
        sent = srv.bytes_sent("blob.bin")
    assert len(whole.content) == 1_000_000 and sent == 1_600_000


# -- errors ----------------------------------------------------------------------------------------


def test_not_found_errors_map_to_hub_exceptions(server: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=server.url)
    download = {"cache_dir": tmp_path, "endpoint": server.url}

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", **download)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="nope", **download)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json", **download)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(REPO, revision="nope")

    # EntryNotFound carries X-Repo-Commit, so the client caches the absence.
    sha = api.model_info(REPO).sha
    assert (tmp_path / "models--org--tiny" / ".no_exist" / str(sha) / "missing.json").exists()


def test_gated_repo_needs_a_token(tiny_llama: Path, tmp_path: Path) -> None:
    with HubServer() as srv:
        srv.add_repo(REPO, tiny_llama, gated=True)
        assert HfApi(endpoint=srv.url).model_info(REPO).gated == "auto"  # metadata stays public
        with pytest.raises(GatedRepoError):
            hf_hub_download(REPO, "config.json", cache_dir=tmp_path, endpoint=srv.url, token=False)
        path = hf_hub_download(REPO, "config.json", cache_dir=tmp_path, endpoint=srv.url, token="hf_test")
        resolves = [(r.method, r.status, r.authorization) for r in srv.log if r.path.startswith(f"/{REPO}/")]

    assert Path(path).read_bytes() == (tiny_llama / "config.json").read_bytes()
    assert resolves == [("HEAD", 401, False), ("HEAD", 200, True), ("GET", 200, True)]


# -- faults ----------------------------------------------------------------------------------------


def test_503_once_is_retried_by_http_backoff(server: HubServer, tiny_llama: Path) -> None:
    fault = server.add_fault(Fault(path="/api/models/*/tree/*", status=503))

    files = HfApi(endpoint=server.url).list_repo_files(REPO)  # _paginate_pages -> http_backoff

    assert sorted(files) == sorted(p.name for p in tiny_llama.iterdir())
    assert fault.fired == 1 and fault.spent
    assert [(r.status, r.fault) for r in server.log] == [(503, "status=503"), (200, None)]


def test_503_on_head_falls_back_to_a_retrying_head(server: HubServer, tmp_path: Path) -> None:
    server.add_fault(Fault(path="*/config.json", method="HEAD", status=503))

    hf_hub_download(REPO, "config.json", cache_dir=tmp_path, endpoint=server.url)

    assert [(r.method, r.status) for r in server.log] == [("HEAD", 503), ("HEAD", 200), ("GET", 200)]


def test_status_fault_with_retry_after_and_ranged_only(server: HubServer) -> None:
    server.add_fault(Fault(status=429, retry_after=7, method="GET", ranged_only=True, times=None))
    url = _resolve_url(server, "config.json")

    plain = httpx2.get(url)
    ranged = [httpx2.get(url, headers={"Range": "bytes=0-1"}) for _ in range(2)]

    assert plain.status_code == 200
    assert [(r.status_code, r.headers["Retry-After"]) for r in ranged] == [(429, "7"), (429, "7")]


def test_truncate_and_reset_are_visible_to_a_plain_client(server: HubServer, tiny_llama: Path) -> None:
    url = _resolve_url(server, SHARD)
    truncate = server.add_fault(Fault(path="*.safetensors", truncate_after=100))
    server.add_fault(Fault(path="/api/*", reset=True))

    head = httpx2.head(url)  # a HEAD has no body: it does not take the truncate fault
    with pytest.raises(httpx2.RemoteProtocolError):
        httpx2.get(url)
    with pytest.raises(httpx2.TransportError):
        httpx2.get(f"{server.url}/api/models/{REPO}")
    again = httpx2.get(url)  # both faults are spent now

    assert head.status_code == 200 and truncate.fired == 1
    assert again.content == (tiny_llama / SHARD).read_bytes()
    log = server.log
    assert [(r.method, r.status, r.bytes_sent, r.fault) for r in log[1:3]] == [
        ("GET", 200, 100, "truncate_after=100"),
        ("GET", None, 0, "reset"),
    ]


def test_hf_hub_download_resumes_after_truncation(tmp_path: Path) -> None:
    # http_get only counts bytes that iter_bytes yielded, in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces: a cut
    # inside the first 10 MiB restarts from 0, a later cut resumes with a Range from the last full chunk.
    folder = tmp_path / "repo"
    folder.mkdir()
    size, chunk = 11 * 2**20, 10 * 2**20
    data = (bytes(range(256)) * (size // 256))[:size]
    (folder / "big.dat").write_bytes(data)  # LFS because > 10 MB, whatever the name
    with hub_server({"org/big": folder}) as srv:
        srv.add_fault(Fault(path="*/big.dat", truncate_after=chunk + 2**19))
        path = hf_hub_download("org/big", "big.dat", cache_dir=tmp_path / "cache", endpoint=srv.url)
        gets = [(r.range, r.status, r.bytes_sent) for r in srv.log if r.method == "GET"]

    assert Path(path).read_bytes() == data
    assert Path(path).resolve().name == hashlib.sha256(data).hexdigest()
    assert gets == [(None, 200, chunk + 2**19), (f"bytes={chunk}-", 206, size - chunk)]


def test_delay_fault(server: HubServer) -> None:
    server.add_fault(Fault(path="*/config.json", delay=0.3))
    start = time.monotonic()
    response = httpx2.get(_resolve_url(server, "config.json"))
    assert response.status_code == 200 and time.monotonic() - start >= 0.3


def test_fault_needs_exactly_one_action() -> None:
    with pytest.raises(ValueError):
        Fault(status=500, reset=True)
    with pytest.raises(ValueError):
        Fault()


# -- redirects, bandwidth, log, lifecycle -----------------------------------------------------------


def test_bandwidth_cap_is_shared_by_all_connections(blob_folder: Path) -> None:
    with hub_server({"org/blobs": blob_folder}, bandwidth=2_000_000) as srv:
        url = _resolve_url(srv, "blob.bin", "org/blobs")
        start = time.monotonic()
        assert len(httpx2.get(url).content) == 1_000_000
        single = time.monotonic() - start

        threads = [
            threading.Thread(target=httpx2.get, args=(url,), kwargs={"headers": {"Range": r}})
            for r in ("bytes=0-499999", "bytes=500000-")
        ]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent = time.monotonic() - start
        sent = srv.bytes_sent("blob.bin")

    assert 0.4 <= single < 3 and 0.4 <= concurrent < 3
    assert sent == 2_000_000


def test_request_log_records(server: HubServer, tmp_path: Path) -> None:
    hf_hub_download(REPO, "config.json", cache_dir=tmp_path, endpoint=server.url, token="hf_test")
    httpx2.get(_resolve_url(server, SHARD), headers={"Range": "bytes=-8"})
    assert server.wait_idle()

    head, get, ranged = server.log
    assert (head.method, head.path, head.origin, head.status, head.bytes_sent) == (
        "HEAD",
        f"/{REPO}/resolve/main/config.json",
        "hub",
        200,
        0,
    )
    assert head.authorization and get.authorization and not ranged.authorization
    assert get.file == "config.json" and get.bytes_sent == (server.bytes_sent("config.json"))
    assert (ranged.range, ranged.status, ranged.bytes_sent, ranged.fault) == ("bytes=-8", 206, 8, None)
    assert head.time <= get.time <= ranged.time and all(r.end is not None for r in server.log)
    server.clear_log()
    assert server.log == [] and server.bytes_sent() == 0


def test_stop_is_quick_even_with_open_and_throttled_connections(blob_folder: Path) -> None:
    srv = HubServer(bandwidth=100_000).start()
    srv.add_repo("org/blobs", blob_folder)
    url = _resolve_url(srv, "blob.bin", "org/blobs")
    errors: list[BaseException] = []

    def slow_download() -> None:
        try:
            httpx2.get(url, timeout=10)
        except httpx2.TransportError as error:
            errors.append(error)

    with httpx2.Client() as idle_client:
        idle_client.get(f"{srv.url}/api/models/org/blobs")  # leaves a keep-alive connection open
        thread = threading.Thread(target=slow_download)
        thread.start()
        deadline = time.monotonic() + 10  # until the download is being answered (a busy machine takes a while)
        while not any(r.end is None and r.bytes_sent for r in srv.log) and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        srv.stop()
        stopped_in = time.monotonic() - start
        thread.join(5)

    assert stopped_in < 1.0
    assert errors and isinstance(errors[0], httpx2.RemoteProtocolError)
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(url)


def test_only_loopback() -> None:
    with pytest.raises(ValueError):
        HubServer(host="0.0.0.0")


# -- the link model and today's faults ----------------------------------------------------------------


def test_latency_is_paid_by_every_answer(server: HubServer) -> None:
    server.latency = 0.2
    url = _resolve_url(server, "config.json")
    with httpx2.Client() as client:
        client.get(url)  # the connection is open: what follows is time to first byte, not connecting
        start = time.monotonic()
        client.head(url)
        client.get(url, headers={"Range": "bytes=0-1"})
        elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 1.5


def test_connection_bandwidth_caps_each_connection_apart_from_the_total(blob_folder: Path) -> None:
    with hub_server({"org/blobs": blob_folder}, connection_bandwidth=1_000_000, bandwidth=100_000_000) as srv:
        url = _resolve_url(srv, "blob.bin", "org/blobs")
        start = time.monotonic()
        assert len(httpx2.get(url, headers={"Range": "bytes=0-499999"}).content) == 500_000
        single = time.monotonic() - start

        halves = ("bytes=0-499999", "bytes=500000-999999")
        threads = [threading.Thread(target=httpx2.get, args=(url,), kwargs={"headers": {"Range": r}}) for r in halves]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        parallel = time.monotonic() - start
    # One connection moves ~1 MB/s; two move twice as much in the same time (the total cap is far).
    assert 0.4 <= single < 1.5 and 0.4 <= parallel < 1.5


def test_a_stall_fault_goes_silent_mid_body_then_sends_the_rest(blob_folder: Path) -> None:
    data = (blob_folder / "blob.bin").read_bytes()
    with hub_server({"org/blobs": blob_folder}) as srv:
        url = _resolve_url(srv, "blob.bin", "org/blobs")
        stall = srv.add_fault(Fault(file="blob.bin", stall=0.6, stall_after=1000, times=2))
        with pytest.raises(httpx2.ReadTimeout):
            httpx2.get(url, timeout=httpx2.Timeout(5.0, read=0.3))
        start = time.monotonic()
        patient = httpx2.get(url, headers={"Range": "bytes=10-"})
        waited = time.monotonic() - start
        log = srv.log

    assert patient.content == data[10:] and waited >= 0.6 and stall.fired == 2
    assert [r.fault for r in log] == ["stall=0.6@1000"] * 2


def test_every_nth_request_fault_is_occasional_and_can_hit_valid_ranges_on_the_bridge(tiny_llama: Path) -> None:
    with hub_server({REPO: tiny_llama}, mode="xet") as srv:
        location = get_hf_file_metadata(_resolve_url(srv, SHARD)).location
        forbidden = srv.add_fault(Fault(origin="bridge", ranged_only=True, status=403, every=3, times=None))
        answers = [httpx2.get(location, headers={"Range": f"bytes={i}-{i}"}) for i in range(7)]
    assert [a.status_code for a in answers] == [206, 206, 403, 206, 206, 403, 206]
    assert (forbidden.seen, forbidden.fired) == (7, 2)
    refused = answers[2]  # as the storage answers, not the Hub
    assert refused.headers["Transfer-Encoding"] == "chunked" and b"<Code>InjectedFault</Code>" in refused.content


def test_mirror_mode_serves_ranges_itself_each_a_resolve_call_optionally_without_content_range(
    blob_folder: Path,
) -> None:
    data = (blob_folder / "blob.bin").read_bytes()
    with hub_server({"org/blobs": blob_folder}, content_range=False) as srv:
        url = _resolve_url(srv, "blob.bin", "org/blobs")
        answers = [httpx2.get(url, headers={"Range": f"bytes={s}-{s + 9}"}) for s in (0, 100, 200)]
        calls = srv.resolve_calls("blob.bin")
    assert [(a.status_code, a.content) for a in answers] == [(206, data[s : s + 10]) for s in (0, 100, 200)]
    assert all("Content-Range" not in a.headers and a.headers["Content-Length"] == "10" for a in answers)
    assert calls == 3


def test_fault_and_server_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        Fault(stall=1.0, delay=1.0)
    with pytest.raises(ValueError):
        Fault(status=403, every=0)
    with pytest.raises(ValueError):
        Fault(status=403, origin="cdn")
    with pytest.raises(ValueError):
        HubServer(mode="lfs")
    with pytest.raises(ValueError):
        HubServer(connection_bandwidth=0)
