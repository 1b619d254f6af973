"""Training, evaluation and inference. Entry points, each with `main(argv)` and never imported as a library:
`run` (`moefuse train`), `evaluate`, `predict`, `export`, `demo`. Library modules they share: `recipe` (the
training recipe in named steps), `state`, `optim`, `metrics_log`, `preflight`, `evaluation`, `metrics`, `plots`,
`checkpoint`."""
