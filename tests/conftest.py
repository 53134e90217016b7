import os
import sys
from pathlib import Path

# Tests import `tests.factories`; make the repo root importable however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
