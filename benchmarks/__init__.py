"""Side-by-side benchmarks, a regular package so that no installed top-level ``benchmarks`` package shadows it."""
