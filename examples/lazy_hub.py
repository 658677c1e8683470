"""Stream a model by its Hub repo id, served by a local Hub server (no internet, no account needed).

    python examples/lazy_hub.py [FOLDER]

``hf_weightstream.testing.HubServer`` serves a folder written by ``save_pretrained`` as a Hub model repo on
127.0.0.1, speaking the protocol of today's Hub (``mode="xet"``: each weight file redirects to a signed URL on a
second host, with its sha256 and Xet hash), so ``from_pretrained("local/tiny", device_map="stream")`` goes
through huggingface_hub exactly as with huggingface.co. The catch: huggingface_hub reads ``HF_ENDPOINT`` (and
``HF_HUB_CACHE``) once, when it is imported, and importing transformers or hf_weightstream imports it. So this
script picks the server's port and sets both variables first, and imports everything else afterwards. The Hub
cache is a fresh temporary folder, so the model starts cold. Without FOLDER a tiny random Llama is used.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

REPO_ID = "local/streamed-model"


def free_port() -> int:
    """A port nothing listens on now (another process could take it before the server binds; rare)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    port = free_port()
    cache = tempfile.mkdtemp(prefix="hf_weightstream-hub-cache-")
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    os.environ["HF_HUB_CACHE"] = cache
    os.environ.pop("HF_HUB_OFFLINE", None)

    # Only now may huggingface_hub be imported (hf_weightstream and transformers import it).
    from _tiny import model_from_argv
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_weightstream
    from hf_weightstream.testing.hub_server import HubServer

    folder = Path(model_from_argv())
    try:
        with HubServer(port=port, mode="xet", latency=0.02) as hub:
            hub.add_repo(REPO_ID, folder)
            print(f"serving {folder} as {REPO_ID} at {hub.url}")
            model = AutoModelForCausalLM.from_pretrained(
                REPO_ID, device_map="stream", stream_config=hf_weightstream.StreamConfig(budget="150MB")
            )
            tokenizer = AutoTokenizer.from_pretrained(REPO_ID)
            inputs = tokenizer("the capital of france is", return_tensors="pt")
            output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            print("text:", tokenizer.decode(output[0], skip_special_tokens=True))

            shard_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            stats = hf_weightstream.stats(model)
            print(
                f"HTTP requests: {len(hub.log)} ({hub.resolve_calls()} to /resolve/); shard bytes sent "
                f"{hub.bytes_sent('.safetensors'):,} of {shard_bytes:,} on disk"
            )
            print(
                f"weights read by the engine: {stats['bytes_read']:,} bytes; hits {stats['hits']}, "
                f"misses {stats['misses']}"
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
