"""What we fetch and how: a repo pinned at one commit, its shards' metadata, and byte ranges over HTTP.

Round trips are what a cold start pays for, so they are counted:

- The revision is resolved to a commit once (transformers' ``resolve_revision`` usually did it already: a
  ``ResolvedRevision``); everything after is fetched by commit hash, so the index and the shards cannot come from
  different commits if the branch moves meanwhile.
- Each shard is described by its own resolve answer when the files' names are known as the commit is pinned
  (`locate_remote_files`: a HEAD of ``/resolve/<commit>/<file>``, which today's Hub answers 302 to a signed URL on
  a bridge host, with the file's sha256, size and Xet hash), sent together with the index download. Otherwise one
  call describes every shard: on a cold cache, a listing of the weights' folder (``list_repo_tree``) sent together
  with the index download; else ``get_paths_info`` for the shards the index names.
- The first range of a shard is the header probe (``HEADER_PROBE_BYTES`` from byte 0, like huggingface_hub's own
  ``parse_safetensors_file_metadata``: one request covers nearly every safetensors header). Unless the HEAD above
  told where the bytes are, it goes to ``/resolve/<commit>/<file>``, whose 302 carries the file's ``X-Linked-Etag``
  (checked against the sha256 we expect). Every later range of the file goes straight to the redirect's URL, so a
  shard costs one call to the Hub's rate-limited ``/resolve/`` route. A mirror that does not redirect answers the
  range itself; then every request is a resolve call.
- Signed URLs expire (about an hour on the Hub). A 403 on an URL that has expired (its ``Expires`` or
  ``X-Amz-Date``/``X-Amz-Expires``), or whose expiry cannot be read, re-resolves it, once for all the threads
  fetching that file (`Location`). A 403 on an URL that has not expired (seen in the wild on Xet bridges) is
  retried after a backoff wait, then reported with what was tried.

`RangeFetcher` uses an HTTP client of its own (made by the factory of huggingface_hub's, so proxies and
certificates configured there apply), with its own retries: huggingface_hub's backoff closes its shared client on
a connect error, which would cut the other connections' bodies. The ranges sent to a file's known location, the
bulk of the bytes, have their bodies read straight into our buffer (`direct_http`), where that is equivalent.
Every answer is checked before a byte is used.
"""

from __future__ import annotations

import calendar
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urljoin, urlsplit

import httpx2
from huggingface_hub import HfApi, RepoFile, ResolvedRevision, constants, hf_hub_url
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

from ..errors import CheckpointError
from . import _hf_compat as compat
from .direct_http import DirectBody, DirectConnections, usable

logger = logging.getLogger(__name__)

HEADER_PROBE_BYTES = 100_001  # what parse_safetensors_file_metadata reads at once (bytes=0-100000)
BODY_CHUNK_BYTES = 256 << 10  # response bytes handed on at a time (small: each thread allocates it)
# ... or what arrived in this long: at 100 KB/s a connection took 2.6 s to gather a chunk, which a kill -9 lost (the
# recorder records only what was handed on), and 12 of them lost 3 MiB.
HAND_ON_EVERY_SECONDS = 0.25
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_EXPIRY_SLACK_S = 1.0  # a 403 this close to an URL's expiry is taken for its expiry
_SHA256 = re.compile(r"[0-9a-f]{64}")  # also the form of a Xet hash


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one range is tried before the error reaches the user.

    ``http_retries``: answers 408/429/5xx and connections that fail before an answer (waiting ``Retry-After`` when
    the server says). ``attempts``: resumes after a body cut short or stalled past ``HF_HUB_DOWNLOAD_TIMEOUT`` (a
    try that made progress does not count). ``forbidden_retries``: 403s on an URL that has not expired, and
    refreshes that did not help. Waits double from ``base_wait`` up to ``max_wait`` seconds.
    """

    attempts: int = 5
    http_retries: int = 5
    forbidden_retries: int = 3
    base_wait: float = 1.0
    max_wait: float = 8.0


RETRY = RetryPolicy()


class RangeFetchError(CheckpointError):
    """A byte range of a Hub file could not be fetched; what was fetched before is kept for the next run."""


class ShardNotInRepoError(CheckpointError):
    """A weight file the checkpoint names is not in the repo at the pinned commit."""

    def __init__(self, shard: str, message: str) -> None:
        super().__init__(message)
        self.shard = shard


class Cancelled(Exception):
    """The source was closed while a fetch was running."""


class Yielded(Exception):
    """A background fetch stopped early to leave its connection to a read the forward pass waits for."""


class _Interrupted(Exception):
    """A response body stopped early (cut, reset, stall); the bytes before are good."""


# ------------------------------------------------------------------------------------------------ what we fetch
@dataclass(frozen=True)
class HubRepo:
    """A model repo pinned at one commit, and the Hub cache its files go to."""

    repo_id: str
    revision: str  # what the user asked for, e.g. "main": written to refs/ like hf_hub_download does
    commit: str
    cache_dir: Path
    token: str | bool | None
    subfolder: str
    offline: bool
    force_download: bool

    @classmethod
    def pin(cls, repo_id: str, download_kwargs: dict[str, Any]) -> HubRepo:
        """Resolve the revision to a commit, unless it already is one (a ``ResolvedRevision`` or a hash)."""
        revision = download_kwargs.get("revision") or constants.DEFAULT_REVISION
        token = download_kwargs.get("token")
        cache_dir = Path(download_kwargs.get("cache_dir") or constants.HF_HUB_CACHE).expanduser().resolve()
        offline = bool(download_kwargs.get("local_files_only")) or constants.is_offline_mode()
        if isinstance(revision, ResolvedRevision):
            commit = revision.resolved
        elif compat.is_commit_hash(revision):
            commit = revision
        else:
            commit = (
                HfApi(token=token)
                .resolve_revision(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline)
                .resolved
            )
        return cls(
            repo_id=repo_id,
            revision=str(revision),
            commit=commit,
            cache_dir=cache_dir,
            token=token,
            subfolder=download_kwargs.get("subfolder") or "",
            offline=offline,
            force_download=bool(download_kwargs.get("force_download")),
        )

    @property
    def resolved_revision(self) -> ResolvedRevision:
        """The pinned revision, for huggingface_hub calls (fetch by commit, record ``refs/<revision>``)."""
        return ResolvedRevision(self.commit, initial=self.revision, repo_id=self.repo_id)

    @property
    def storage_folder(self) -> Path:
        return self.cache_dir / compat.repo_folder(self.repo_id)

    def path_in_repo(self, shard: str) -> str:
        return f"{self.subfolder}/{shard}" if self.subfolder else shard

    def pointer_path(self, shard: str) -> Path:
        return self.storage_folder / "snapshots" / self.commit / self.path_in_repo(shard)

    def blob_path(self, etag: str) -> Path:
        return self.storage_folder / "blobs" / etag

    def hf_lock_path(self, etag: str) -> Path:
        """The lock huggingface_hub takes around writing ``blobs/<etag>`` (``<cache>/.locks/<repo_folder>/``)."""
        return self.cache_dir / ".locks" / self.storage_folder.name / f"{etag}.lock"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def expires_at(url: str) -> float | None:
    """When a signed URL stops working (Unix time), if it says: CloudFront ``Expires`` or S3 ``X-Amz-Date`` plus
    ``X-Amz-Expires``."""
    params = {k.lower(): v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    try:
        if "expires" in params:
            return float(params["expires"])
        if "x-amz-date" in params and "x-amz-expires" in params:
            signed = calendar.timegm(time.strptime(params["x-amz-date"], "%Y%m%dT%H%M%SZ"))
            return signed + float(params["x-amz-expires"])
    except ValueError:
        pass
    return None


class Location:
    """Where the bytes of one file are fetched from, shared by every thread fetching it.

    None until the first request resolves it; `invalidate` (after a 403 on an expired URL) makes the next request
    resolve it again. Resolving happens under ``lock``, so threads that find the URL expired at the same time cost
    one resolve call, not one each: the first resolves, the others wait for it and use its answer.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.url: str | None = None
        self.generation = 0
        self.mirror = False  # /resolve/ itself serves the bytes: every request is a resolve call
        self.resolves = 0
        self._when_known: list[Callable[[], None]] = []

    def current(self) -> tuple[str | None, int]:
        return self.url, self.generation

    def when_known(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the first resolve has answered where the bytes are (now, if it has): requests that
        need the location and nothing from the first answer's body can go out while that body is on its way."""
        with self.lock:
            if not self.resolves:
                self._when_known.append(callback)
                return
        callback()

    def notify_known(self) -> None:
        """Run the `when_known` callbacks once a resolve has answered; on the resolving thread, outside ``lock``."""
        with self.lock:
            if not self.resolves:
                return
            callbacks, self._when_known = self._when_known, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # noqa: BLE001 - the request that resolved goes on; say what went wrong
                logger.exception("hf_weightstream: a callback waiting for a file's location failed")

    def set(self, url: str, mirror: bool) -> None:
        self.url, self.mirror = url, mirror
        self.generation += 1
        self.resolves += 1

    def invalidate(self, generation: int) -> None:
        """Forget the URL of ``generation`` (a newer one stays: another thread refreshed it already)."""
        with self.lock:
            if self.generation == generation:
                self.url = None


@dataclass(eq=False)
class RemoteFile:
    """One shard of a pinned repo: its sha256 (the LFS etag), size and Xet hash, and where its bytes are."""

    repo: HubRepo
    shard: str  # name in the checkpoint index
    sha256: str
    size: int
    xet_hash: str | None
    location: Location = field(default_factory=Location)

    @property
    def url(self) -> str:
        """``/resolve/<commit>/<file>``: what the first request (and a refresh) goes to."""
        return hf_hub_url(self.repo.repo_id, self.repo.path_in_repo(self.shard), revision=self.repo.commit)

    def describe(self, start: int | None = None, end: int | None = None) -> str:
        where = f"{self.repo.path_in_repo(self.shard)} of {self.repo.repo_id}@{self.repo.commit[:8]}"
        return where if start is None or end is None else f"bytes {start}-{end - 1} of {where}"


# Clients of our own made ahead of the requests that need them (`prepare_clients`), with the factory that made each.
_spare_clients: list[tuple[Callable[[], httpx2.Client], httpx2.Client]] = []
_spare_lock = threading.Lock()
SPARE_CLIENTS = 2  # a cold load's first two: its shards' HEADs (or the folder listing), the range fetcher's


def prepare_clients() -> None:
    """Make the clients a cold load is about to need, in the background, while its revision resolves.

    Making one costs about 30 ms of CPU (httpx2 loads the CA bundle into a new SSL context), and a cold load makes
    two on the path to its first weight byte, one after the other: the one its shards' HEADs (or the folder
    listing) go through, then the one its range requests do. Made ahead, they cost that path nothing.
    """

    def make() -> None:
        factory = compat.http_client_factory()
        with _spare_lock:
            stale = [client for made_by, client in _spare_clients if made_by is not factory]
            _spare_clients[:] = [(made_by, client) for made_by, client in _spare_clients if made_by is factory]
            wanted = SPARE_CLIENTS - len(_spare_clients)
        for client in stale:  # the user set another factory since (proxies, certificates): not ours to use
            client.close()
        for _ in range(wanted):
            client = factory()
            with _spare_lock:
                _spare_clients.append((factory, client))

    threading.Thread(target=make, name="hf_ws-clients", daemon=True).start()


def take_client() -> httpx2.Client:
    """A client of our own, made by huggingface_hub's current factory: a spare one if `prepare_clients` made it
    (the caller owns it either way, and closes it)."""
    factory = compat.http_client_factory()
    with _spare_lock:
        for i, (made_by, client) in enumerate(_spare_clients):
            if made_by is factory:
                del _spare_clients[i]
                return client
    return factory()


def list_remote_files(repo: HubRepo) -> dict[str, Any]:
    """Every file of the weights' folder (the subfolder, or the repo root) at the pinned commit, path -> info: the
    same size, sha256 and Xet hash ``get_paths_info`` gives, asked for before the index names the shards, so that
    it can run while the index downloads.

    Only a shortcut (the caller asks paths-info when this fails or is late), so it is one request of the tree API
    on a client of our own, with no retry: huggingface_hub's backoff would keep it going after the load moved on,
    and closes huggingface_hub's shared client on a connect error, under the feet of the user's other downloads.
    A listing longer than one page gives its first page.
    """
    folder = "/" + quote(repo.subfolder, safe="") if repo.subfolder else ""
    url = f"{constants.ENDPOINT}/api/models/{repo.repo_id}/tree/{repo.commit}{folder}"
    with take_client() as client:
        response = client.get(url, headers=build_hf_headers(token=repo.token), timeout=constants.HF_HUB_ETAG_TIMEOUT)
        hf_raise_for_status(response)
        return {item["path"]: RepoFile(**item) for item in response.json() if item.get("type") == "file"}


def locate_remote_files(repo: HubRepo, shards: list[str]) -> dict[str, RemoteFile]:
    """The shards that their own resolve answer describes, each with where its bytes are.

    One ``HEAD /resolve/<commit>/<file>`` each, all at once, not followed: today's Hub answers 302 with the file's
    sha256 (``X-Linked-Etag``), size (``X-Linked-Size``), Xet hash and signed URL (``Location``), which is what
    the folder listing and the first range request would tell, in one round trip instead of two. It is the resolve
    call the shard's first range request would have made: the requests after it go to ``Location``. A shard whose
    answer does not describe it that way (an error, a renamed repo's redirect, a mirror without the headers, a
    file outside LFS) is left out, for the listing to describe; like the listing, this is only a shortcut, with no
    retry.
    """
    headers = build_hf_headers(token=repo.token)
    headers["Accept-Encoding"] = "identity"

    def locate(client: httpx2.Client, shard: str) -> RemoteFile | None:
        url = hf_hub_url(repo.repo_id, repo.path_in_repo(shard), revision=repo.commit)
        try:
            response = client.head(url, headers=headers, timeout=constants.HF_HUB_ETAG_TIMEOUT, follow_redirects=False)
        except httpx2.HTTPError as err:
            logger.debug("Locating %s failed (%r)", shard, err)
            return None
        sha256 = _normalize_etag(response.headers.get(constants.HUGGINGFACE_HEADER_X_LINKED_ETAG))
        size = response.headers.get(constants.HUGGINGFACE_HEADER_X_LINKED_SIZE, "")
        commit = response.headers.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT, repo.commit)
        if not (response.has_redirect_location or response.status_code == 200) or commit != repo.commit:
            return None
        if sha256 is None or not _SHA256.fullmatch(sha256) or not size.isdigit():
            return None  # not a file in LFS (no sha256 to verify a stream against), or a server that does not say
        xet_hash = response.headers.get(constants.HUGGINGFACE_HEADER_X_XET_HASH)
        remote = RemoteFile(
            repo, shard, sha256, int(size), xet_hash if xet_hash and _SHA256.fullmatch(xet_hash) else None
        )
        with remote.location.lock:
            if response.has_redirect_location:
                remote.location.set(urljoin(url, response.headers["Location"]), mirror=False)
            else:  # a mirror: /resolve/ serves the bytes itself
                remote.location.set(url, mirror=True)
        return remote

    with take_client() as client, ThreadPoolExecutor(max(1, len(shards)), "hf_ws-locate") as pool:
        located = dict(zip(shards, pool.map(lambda shard: locate(client, shard), shards), strict=True))
    return {shard: remote for shard, remote in located.items() if remote is not None}


def describe_remote_files(
    repo: HubRepo, shards: list[str], listed: dict[str, Any] | None = None
) -> dict[str, RemoteFile | None]:
    """Size, sha256 and Xet hash of every shard, from ``listed`` (`list_remote_files`) or else one
    ``get_paths_info`` call; None for a file that is not in LFS (no sha256 to verify a stream against: it is
    downloaded the normal way)."""
    paths = {repo.path_in_repo(shard): shard for shard in shards}
    found = dict(listed or {})
    unlisted = [path for path in paths if path not in found]
    if unlisted:
        infos = HfApi(token=repo.token).get_paths_info(repo.repo_id, unlisted, revision=repo.commit)
        found.update((info.path, info) for info in infos)
    out: dict[str, RemoteFile | None] = {}
    for path, shard in paths.items():
        info = found.get(path)
        if info is None or not hasattr(info, "size"):
            raise ShardNotInRepoError(shard, f"{path} is not in {repo.repo_id} at commit {repo.commit}.")
        lfs = getattr(info, "lfs", None)
        out[shard] = None if lfs is None else RemoteFile(repo, shard, lfs.sha256, info.size, info.xet_hash)
    return out


# ------------------------------------------------------------------------------------------------ HTTP
def _normalize_etag(value: str | None) -> str | None:
    return None if value is None else value.strip().removeprefix("W/").strip('"')


class RangeFetcher:
    """Fetches byte ranges of Hub files over HTTP; see the module docstring for the protocol.

    Every answer is checked before a byte is used: 206 with a Content-Range equal to the range asked for (a server
    that sends no Content-Range must announce exactly the length asked for; the sha256 checks the whole file before
    it is committed), no content encoding, and a body of exactly that length. A body cut short, reset or stalled
    past ``HF_HUB_DOWNLOAD_TIMEOUT`` is resumed from the last byte received.
    """

    def __init__(self, on_bytes: Callable[[int], None], cancelled: threading.Event) -> None:
        self._on_bytes = on_bytes
        self._cancelled = cancelled
        self._client: httpx2.Client | None = None
        self._client_lock = threading.Lock()
        self._direct = DirectConnections()
        self._warned_no_content_range = False
        self._local = threading.local()

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()
                self._client = None
        self._direct.close()

    def _buffer(self, at_least: int = 0) -> bytearray:
        """This thread's receive buffer (``BODY_CHUNK_BYTES``, or more if a transport read was larger)."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or len(buffer) < max(at_least, BODY_CHUNK_BYTES):
            buffer = self._local.buffer = bytearray(max(at_least, BODY_CHUNK_BYTES))
        return buffer

    def _http(self) -> httpx2.Client:
        with self._client_lock:
            if self._client is None:
                self._client = take_client()
            return self._client

    def fetch(
        self,
        remote: RemoteFile,
        start: int,
        end: int,
        sink: Callable[[int, memoryview], None],
        should_yield: Callable[[], bool] = lambda: False,
    ) -> None:
        """Call ``sink(offset, chunk)`` for consecutive chunks covering ``[start, end)`` (``chunk`` is only valid
        during the call).

        ``should_yield`` is asked between chunks; when it says so, `Yielded` is raised (the bytes before were
        handed on).
        """
        policy = RETRY
        position = start
        resumes = http_failures = forbidden = refreshes = 0
        wait = policy.base_wait

        while position < end:
            if self._cancelled.is_set():
                raise Cancelled
            before = position
            delay: float | None = None
            try:
                position = self._attempt(remote, position, end, sink, should_yield)
                continue
            except _Interrupted as cut:
                position = cut.args[0]
                error: BaseException = cut.__cause__ or cut
                resumes = 0 if position > before else resumes + 1
                if resumes >= policy.attempts:
                    raise self._gave_up(remote, position, end, error) from error
                logger.info("Resuming %s after %r", remote.describe(position, end), error)
            except _Forbidden as denied:
                position = denied.position
                if denied.expired:
                    refreshes += 1
                    if refreshes > policy.forbidden_retries:
                        raise self._forbidden(remote, position, end, denied, forbidden, refreshes) from None
                    continue  # at once: the next attempt resolves a fresh URL
                forbidden += 1
                if forbidden > policy.forbidden_retries:
                    raise self._forbidden(remote, position, end, denied, forbidden, refreshes) from None
                logger.info("%s: 403 on an URL that has not expired, retrying", remote.describe(position, end))
            except _RetryLater as busy:
                position = busy.position
                http_failures += 1
                if http_failures > policy.http_retries:
                    raise self._gave_up(remote, position, end, busy.error) from busy.error
                delay = busy.retry_after
            except httpx2.TransportError as err:  # no answer at all (connection refused, DNS, timeout)
                if (untrusted := _untrusted_certificate(err)) is not None:  # no retry passes it
                    raise self._untrusted(remote, position, end, err, untrusted) from err
                http_failures += 1
                if http_failures > policy.http_retries:
                    raise self._gave_up(remote, position, end, err) from err
            if position > before:  # progress: the failures so far were passing trouble
                wait, http_failures, forbidden, refreshes = policy.base_wait, 0, 0, 0
            if self._cancelled.wait(wait if delay is None else delay):
                raise Cancelled
            wait = min(policy.max_wait, wait * 2)

    # -- one request ------------------------------------------------------------------------------------------
    def _attempt(
        self,
        remote: RemoteFile,
        start: int,
        end: int,
        sink: Callable[[int, memoryview], None],
        should_yield: Callable[[], bool],
    ) -> int:
        """One request for ``[start, end)``; returns the position reached (``end``) or raises."""
        response, generation = self._open(remote, start, end)
        position = start
        try:
            try:
                self._check_status(response, remote, start, generation)
                self._check_range_answer(response, remote, start, end)
                # Bytes received are gathered in this thread's buffer (reused: no large allocation per chunk, which
                # glibc would keep in a per-thread arena) and handed on BODY_CHUNK_BYTES at a time, or after
                # HAND_ON_EVERY_SECONDS, and before a cut.
                buffer = self._buffer()
                filled = 0
                handed_at = time.monotonic()

                def hand_on() -> None:
                    nonlocal position, filled, handed_at
                    if filled:
                        with memoryview(buffer) as view:
                            sink(position, view[:filled])
                        position += filled
                        self._on_bytes(filled)
                        filled = 0
                        handed_at = time.monotonic()

                def received(n: int) -> None:
                    nonlocal filled
                    filled += n
                    if filled >= BODY_CHUNK_BYTES or time.monotonic() - handed_at >= HAND_ON_EVERY_SECONDS:
                        hand_on()
                        if position < end and should_yield():
                            raise Yielded(position)

                try:
                    if isinstance(response.stream, DirectBody):  # read into the buffer, never past the range
                        with memoryview(buffer) as view:
                            while position + filled < end:
                                if self._cancelled.is_set():
                                    raise Cancelled
                                n = response.stream.readinto(view[filled : min(len(view), end - position)])
                                if not n:
                                    break  # the body ended early: resumed by the caller
                                received(n)
                        if position + filled == end and response.stream.readinto(memoryview(bytearray(1))):
                            raise self._too_long(remote, start, end)
                    else:
                        for piece in response.iter_raw():  # as the transport delivers; no decoding: checked identity
                            if self._cancelled.is_set():
                                raise Cancelled
                            if position + filled + len(piece) > end:
                                raise self._too_long(remote, start, end)
                            if filled + len(piece) > len(buffer):
                                hand_on()
                            if len(piece) > len(buffer):
                                buffer = self._buffer(len(piece))
                            buffer[filled : filled + len(piece)] = piece
                            received(len(piece))
                finally:
                    # What arrived before a cut, a stall or the source's close is good: kept, and recorded by the
                    # recorder's last flush (a close joins these threads before it).
                    hand_on()
            except httpx2.TransportError as err:
                raise _Interrupted(position) from err
            except (_Forbidden, _RetryLater) as retry:
                retry.position = position
                raise
        finally:
            response.close()
        if position < end:
            raise _Interrupted(position) from ConnectionError(f"body ended at byte {position}, expected {end}")
        return position

    def _open(self, remote: RemoteFile, start: int, end: int) -> tuple[httpx2.Response, int]:
        """Send the GET for ``[start, end)``: to the file's known location, or to ``/resolve/`` to learn it."""
        location = remote.location

        def stale(url: str | None) -> bool:
            expiry = None if url is None else expires_at(url)
            return url is None or (expiry is not None and time.time() >= expiry)

        url, generation = location.current()
        if stale(url):
            try:
                with location.lock:  # one resolve for all threads; the others wait here and use its answer
                    url, generation = location.current()
                    if stale(url):
                        response = self._send(remote, remote.url, start, end, resolve=True)
                        try:
                            if response.status_code >= 400:  # the Hub's own error: _check_status raises it
                                return response, generation
                            self._check_linked_headers(response, remote)
                            if not response.has_redirect_location:  # a mirror: /resolve/ serves the bytes itself
                                location.set(remote.url, mirror=True)
                                return response, location.generation
                        except BaseException:
                            response.close()
                            raise
                        response.close()
                        location.set(urljoin(remote.url, response.headers["Location"]), mirror=False)
                        url, generation = location.current()
            finally:
                location.notify_known()
        assert url is not None
        return self._send(remote, url, start, end, resolve=False), generation

    def _send(self, remote: RemoteFile, url: str, start: int, end: int, resolve: bool) -> httpx2.Response:
        """GET a range of ``url``: through httpx2 for a resolve (it may redirect), straight into our buffer for a
        known location where that is equivalent (`direct_http.usable`)."""
        headers = build_hf_headers(token=remote.repo.token)
        if _origin(url) != _origin(remote.url):
            headers.pop("authorization", None)  # a token never leaves the Hub for a bridge or CDN
        headers["Accept-Encoding"] = "identity"  # byte offsets are offsets of the file, not of a gzip stream
        headers["Range"] = f"bytes={start}-{end - 1}"
        if not resolve and usable(url):
            return self._direct.get(url, headers, constants.HF_HUB_DOWNLOAD_TIMEOUT)
        client = self._http()
        timeout = httpx2.Timeout(constants.HF_HUB_DOWNLOAD_TIMEOUT)  # read at call time: tests and users lower it
        request = client.build_request("GET", url, headers=headers, timeout=timeout)
        return client.send(request, stream=True, follow_redirects=False)

    def _check_linked_headers(self, response: httpx2.Response, remote: RemoteFile) -> None:
        """The resolve answer must describe the file paths-info described (same sha256 and size)."""
        etag = _normalize_etag(response.headers.get(constants.HUGGINGFACE_HEADER_X_LINKED_ETAG))
        size = response.headers.get(constants.HUGGINGFACE_HEADER_X_LINKED_SIZE)
        if (etag is not None and etag != remote.sha256) or (size is not None and size != str(remote.size)):
            raise RangeFetchError(
                f"The Hub describes {remote.describe()} as sha256 {etag}, {size} bytes, but its paths-info said "
                f"{remote.sha256}, {remote.size} bytes: refusing to mix bytes of two files. Check HF_ENDPOINT."
            )

    def _check_status(self, response: httpx2.Response, remote: RemoteFile, start: int, generation: int) -> None:
        status = response.status_code
        if status < 400:
            return
        from_storage = _origin(str(response.url)) != _origin(remote.url)
        if status == 403 and from_storage:
            expiry = expires_at(str(response.url))
            expired = expiry is None or time.time() >= expiry - _EXPIRY_SLACK_S
            if expired:
                remote.location.invalidate(generation)
            response.read()
            raise _Forbidden(start, expired, _body_text(response), str(response.url))
        if status in _RETRY_STATUS:
            raise _RetryLater(start, _retry_after(response), _status_error(response))
        response.read()
        hf_raise_for_status(response)  # 401/403/404...: huggingface_hub's own errors (GatedRepoError...)
        raise _status_error(response)

    def _check_range_answer(self, response: httpx2.Response, remote: RemoteFile, start: int, end: int) -> None:
        got = response.headers.get("Content-Range")
        length = response.headers.get("Content-Length")
        whole = start == 0 and end == remote.size
        if response.status_code == 206 and got is None and length == str(end - start):
            if not self._warned_no_content_range:
                self._warned_no_content_range = True
                logger.info(
                    "%s answers ranges without Content-Range; trusting its Content-Length (the sha256 checks each "
                    "file before it goes into the cache).",
                    urlsplit(str(response.url)).netloc,
                )
        elif not (
            (response.status_code == 206 and got == f"bytes {start}-{end - 1}/{remote.size}")
            or (response.status_code == 200 and whole and length in (None, str(remote.size)))
        ):
            hint = " (the server ignores Range requests, so nothing can be streamed from it)" * (
                response.status_code == 200
            )
            raise RangeFetchError(
                f"Asked the server for {remote.describe(start, end)} (file size {remote.size}) and got HTTP "
                f"{response.status_code} with Content-Range {got!r}: refusing bytes that may not be the ones asked "
                f"for{hint}."
            )
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RangeFetchError(
                f"The server compressed {remote.describe(start, end)} (Content-Encoding: {encoding}) although "
                "identity was asked for: byte offsets would not be file offsets."
            )
        if length is not None and length != str(end - start):
            raise RangeFetchError(
                f"Asked for {end - start} bytes ({remote.describe(start, end)}) and the server announced {length}."
            )

    # -- errors -----------------------------------------------------------------------------------------------
    @staticmethod
    def _too_long(remote: RemoteFile, start: int, end: int) -> RangeFetchError:
        return RangeFetchError(
            f"The server sent more than the {end - start} bytes asked for ({remote.describe(start, end)})."
        )

    @staticmethod
    def _gave_up(remote: RemoteFile, start: int, end: int, error: BaseException) -> RangeFetchError:
        return RangeFetchError(
            f"Could not fetch {remote.describe(start, end)} from the Hub ({type(error).__name__}: {error}). The "
            "bytes fetched so far are kept in the Hub cache: run again to resume from there."
        )

    @staticmethod
    def _untrusted(
        remote: RemoteFile, start: int, end: int, error: httpx2.TransportError, cause: ssl.SSLCertVerificationError
    ) -> RangeFetchError:
        try:
            host = error.request.url.host
        except RuntimeError:  # an error raised without its request
            host = "the server"
        return RangeFetchError(
            f"Could not fetch {remote.describe(start, end)}: the TLS certificate of {host} is not trusted "
            f"({cause.verify_message}). If a proxy or a private mirror sits between you and the Hub, point "
            "SSL_CERT_FILE at a CA bundle that includes its certificate (huggingface_hub's client reads it too). The "
            "bytes fetched so far are kept in the Hub cache."
        )

    @staticmethod
    def _forbidden(
        remote: RemoteFile, start: int, end: int, denied: _Forbidden, forbidden: int, refreshes: int
    ) -> RangeFetchError:
        host = urlsplit(denied.url).netloc
        return RangeFetchError(
            f"{host} refused {remote.describe(start, end)} with 403 Forbidden ({denied.body!r}): {forbidden} time(s) "
            f"with an URL that had not expired, after {refreshes} fresh URL(s) from the Hub. The file's storage "
            "refuses a valid request (seen on some Xet bridge regions): try again later, or point HF_ENDPOINT at a "
            "mirror. The bytes fetched so far are kept in the Hub cache: the next run resumes from there."
        )


def _untrusted_certificate(error: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The failed certificate check under ``error`` (httpx2 wraps it in its own errors), if there is one."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ssl.SSLCertVerificationError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class _Forbidden(Exception):
    def __init__(self, position: int, expired: bool, body: str, url: str) -> None:
        super().__init__(body)
        self.position, self.expired, self.body, self.url = position, expired, body, url


class _RetryLater(Exception):
    def __init__(self, position: int, retry_after: float | None, error: BaseException) -> None:
        super().__init__(str(error))
        self.position, self.retry_after, self.error = position, retry_after, error


def _body_text(response: httpx2.Response) -> str:
    try:
        return response.text[:200]
    except (httpx2.HTTPError, UnicodeDecodeError):
        return ""


def _status_error(response: httpx2.Response) -> httpx2.HTTPStatusError:
    return httpx2.HTTPStatusError(
        f"HTTP {response.status_code} from {urlsplit(str(response.url)).netloc}",
        request=response.request,
        response=response,
    )


def _retry_after(response: httpx2.Response) -> float | None:
    """Seconds the server asks us to wait (``Retry-After``), capped at five minutes."""
    value = response.headers.get("Retry-After", "")
    return min(300.0, float(value)) if value.isdigit() else None
