import os
import sys
from pathlib import Path

# Tests import `tests.factories`; make the repo root importable however pytest is invoked.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when it is first imported, and torch (dynamo, ONNX export) may import it before the Triton
# tests run: switch the interpreter on for the whole session. CPU tensors never take the Triton path otherwise.
os.environ.setdefault("TRITON_INTERPRET", "1")
