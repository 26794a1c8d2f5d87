"""Performance benchmarks (not part of the test suite). Run from the repository root, e.g.
`python -m benchmarks.step_vs_hf`; each prints a table and writes JSON under benchmarks/results/."""
