"""The fuzzers' parts: the mutators of packs and of stage outputs, the bases they damage, the per-case guards.

Run by ``benchmarks/fuzz_packs.py`` and ``benchmarks/fuzz_outputs.py``; nothing runs on import.
"""
