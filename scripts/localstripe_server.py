"""Serve localstripe (a test-only Stripe API fake) on 127.0.0.1 alone, its state in memory only."""

from __future__ import annotations

import argparse

from aiohttp import web
from localstripe import resources, server


def main() -> None:
    """Parse --port and serve until terminated."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # localstripe's own start() listens on every interface and pickles its store to one fixed /tmp file that any
    # other run on the machine shares; the tests want loopback only and a store private to this process.
    resources.store.dump_to_disk = lambda: None  # type: ignore[method-assign]
    web.run_app(server.app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
