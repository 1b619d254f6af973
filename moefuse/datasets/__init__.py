"""Data: manifests -> webdataset shards (`moefuse build-shards`), streaming loaders, the synthetic demo data and
the collator that turns decoded samples into model batches.

Names are imported from their modules on first use (`moefuse.lazy`)."""

from moefuse.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "moefuse.datasets.collate": ["IGNORE_INDEX", "Collator"],
    "moefuse.datasets.config": ["DataConfig", "build_eval_loader", "build_train_loader"],
    "moefuse.datasets.demo": ["make_demo_data"],
    "moefuse.datasets.loader": ["COUNT_KEYS", "DataError", "ShardLoader", "ShardStream", "SkipCounter", "collect_tasks",
                                "decode_sample", "load_dataset_info", "make_loader", "resolve_source", "shard_urls",
                                "validate_dataset_info"],
    "moefuse.datasets.manifest": ["FIELDS", "ManifestError", "ManifestRow", "read_manifest"],
    "moefuse.datasets.media": ["MediaError"],
    "moefuse.datasets.shards": ["BuildError", "BuildOptions", "build_shards"],
})
