"""Evaluation: `metrics` (accuracy, macro-F1, calibration, selective prediction, voter diversity), `loop` (a model
over a loader, with routing statistics), `report` (the evaluation report of a model folder, `moefuse evaluate`),
`plots` and `confidence_plots` (the routing heatmap, reliability diagrams and risk-coverage curves)."""
