"""prefalign's benchmarks: ``python benchmarks/run.py`` times each figure's variants side by side (README.md)."""
