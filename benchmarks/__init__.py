"""The benchmark (`scripts/bench`, BENCHMARKS.md): not part of the installed daemon."""
