"""The model folder: the format that `save_pretrained` writes and `from_pretrained`, `evaluate`, `predict` and
`serve` read (`folder`: weights, config, architecture files, export.json; `model_card`: its README.md). The format
knows no model class: the class is passed in and builds itself from the folder's config."""
