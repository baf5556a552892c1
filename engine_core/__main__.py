"""`python -m engine_core --handshake ADDR`: the EngineCore process, started by the frontend."""

import argparse
import sys

from engine_core.core import run_engine_core


def main() -> int:
    parser = argparse.ArgumentParser(
        description="ringserve EngineCore process (started by the frontend)"
    )
    parser.add_argument(
        "--handshake", required=True, help="ZMQ address to fetch the configuration from"
    )
    args = parser.parse_args()
    return run_engine_core(args.handshake)


if __name__ == "__main__":
    sys.exit(main())
