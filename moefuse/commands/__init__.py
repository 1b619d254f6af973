"""The `moefuse` commands: one module per command, each with a `main(argv) -> int` that the console script
(`moefuse.cli`) runs, and nothing else. No module imports them; the library code they run lives in the other
packages: `build_shards`, `demo_data`, `train`, `evaluate`, `predict`, `serve`, `export`, `demo`."""
