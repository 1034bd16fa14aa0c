"""collabvit's benchmark suite: ``python -m benchmarks`` runs it and rewrites RESULTS.md."""
