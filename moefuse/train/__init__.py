"""Entry points and the training, evaluation and inference code they run.

Entry points, each with `main(argv)`, run by the `moefuse` console script (`moefuse.cli.COMMANDS`) and never
imported as a library: `build_shards` (`moefuse build-shards`), `demo_data` (`moefuse demo-data`), `run`
(`moefuse train`), `evaluate`, `predict`, `export`, `demo`. Library modules they share: `recipe` (the training
recipe in named steps), `state`, `optim`, `metrics_log`, `preflight`, `evaluation` (a model over a loader),
`report` (the evaluation report of an export), `inference` (predictions on raw inputs), `metrics`, `plots`,
`checkpoint`, `config` (the `train:` section)."""
