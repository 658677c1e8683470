"""Lazy Hub streaming: a model's weight bytes arrive by HTTP range requests, in the order its forward pass reads them.

Why: ``from_pretrained`` downloads every shard before it builds the model, so the first token of a cold start waits
for ``download + load + compute``. Here ``from_pretrained`` fetches only configs, the index and each shard's
safetensors header; the bytes of each block are fetched when the engine reads them (and, on idle connections, the
bytes it will read next), so downloading overlaps computing and the first token waits for about
``max(download, compute)``. Bytes fetched are never thrown away: they go into a partial file in the repo's Hub
cache folder, and each complete shard is verified and committed where ``hf_hub_download`` would have put it.

One job per module, data flowing down the list:

- ``remote``: what we fetch (a repo pinned at one commit, its shards' metadata in one call) and byte ranges over
  HTTP (signed bridge URLs, refreshes, retries, every answer checked).
- ``partial``: partial files, the record of the ranges they hold, and the ranges other processes are fetching.
- ``stream``: one shard being streamed: present and claimed ranges, fetching, following other processes.
- ``schedule``: who gets the connections: demand reads, then readahead, then fill.
- ``recorder`` and ``cache``: making fetched bytes durable, verifying complete shards and committing them into
  the Hub cache (and huggingface_hub's shared blob store).
- ``source``: `HubSource`, the `ByteSource` the engine reads from, and `wait_until_cached`.
- ``_hf_compat``: the private huggingface_hub helpers the above use, in one place.
"""

from .cache import CachedShard
from .partial import PARTIAL_FOLDER, recorded_bytes
from .remote import HubRepo, RangeFetchError, RemoteFile, RetryPolicy, ShardNotInRepoError, describe_remote_files
from .source import HubSource, wait_until_cached

__all__ = [
    "PARTIAL_FOLDER",
    "CachedShard",
    "HubRepo",
    "HubSource",
    "RangeFetchError",
    "RemoteFile",
    "RetryPolicy",
    "ShardNotInRepoError",
    "describe_remote_files",
    "recorded_bytes",
    "wait_until_cached",
]
