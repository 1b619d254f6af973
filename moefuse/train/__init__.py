"""Entry points: training (`run`), evaluation, prediction and the end-to-end demo. Each has `main(argv)`."""
