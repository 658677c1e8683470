"""``hf-weightstream serve-hub``: serve a model folder as a Hub repo on 127.0.0.1 until Ctrl-C.

For trying lazy Hub streaming offline or over a slow link (``--bandwidth``): it prints the ``HF_ENDPOINT`` to
export in the shell that runs the client.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
from pathlib import Path

from ._common import PROG, UsageError, format_bytes, port_arg, size_arg

NAME = "serve-hub"
ORDER = 40
HELP = "serve a model folder as a Hub repo on 127.0.0.1 until Ctrl-C"
DESCRIPTION = """\
Serve FOLDER over HTTP as a Hugging Face Hub model repo on 127.0.0.1, e.g. to try streaming
from the Hub offline or over a slow link (--bandwidth). Prints the HF_ENDPOINT to export."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="a folder written by save_pretrained")
    parser.add_argument("--repo-id", help="repo id to serve it as (default: local/<folder name>)")
    parser.add_argument("--port", type=port_arg, metavar="PORT", default=0, help="TCP port (default: 0, any free port)")
    parser.add_argument(
        "--bandwidth",
        type=size_arg("bandwidth"),
        metavar="SIZE",
        help="cap in bytes/s, e.g. 100MB (default: unlimited)",
    )


def run(args: argparse.Namespace) -> int:
    from ..testing.hub_server import HubServer

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{args.folder}: no such folder.")
    repo_id = args.repo_id or f"local/{folder.resolve().name}"
    hub = HubServer(port=args.port, bandwidth=args.bandwidth)
    try:
        hub.add_repo(repo_id, folder)
    except ValueError as err:
        raise UsageError(f"--repo-id: {err}") from None
    with hub:
        limit = f"{format_bytes(args.bandwidth)}/s" if args.bandwidth else "unlimited"
        print(f"Serving {folder} as model repo {repo_id} at {hub.url} (bandwidth {limit}).")
        print("Point clients at it (huggingface_hub reads this when it is imported):\n")
        print(f"export HF_ENDPOINT={hub.url}")
        print(f"\nthen e.g.: {PROG} generate {repo_id} 'Hello'\nPress Ctrl-C to stop.", flush=True)
        # A shell without job control starts background commands with SIGINT ignored, and Python keeps it
        # ignored: the Ctrl-C (or `kill -INT`) this command is stopped with would never arrive.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    print("Stopped.")
    return 0
