"""The model folder: the format that `save_pretrained` writes and `from_pretrained`, `evaluate`, `predict` and
`serve` read (`folder`: weights, config.json and config.yaml, architecture files, export.json, each checked when
loaded; `export_info`: export.json's schema; `model_card`: its README.md with the Hub's metadata; `hub`: the
`ModelHubMixin` that gives a model class `save_pretrained`, `from_pretrained` of a folder or a Hub id, and
`push_to_hub`). The format knows no model class: the class is passed in and builds itself from the folder's
config."""
