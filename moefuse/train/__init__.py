"""Entry points: training (`run`; the recipe itself is `recipe`), evaluation, prediction and the end-to-end demo.
Each has `main(argv)`."""
