"""Data: manifests -> webdataset shards (`moefuse build-shards`), streaming loaders, the synthetic demo data and
the collator that turns decoded samples into model batches."""

from moefuse.datasets.collate import IGNORE_INDEX, Collator
from moefuse.datasets.config import DataConfig, build_eval_loader, build_train_loader
from moefuse.datasets.demo import make_demo_data
from moefuse.datasets.loader import (
    COUNT_KEYS,
    DataError,
    ShardLoader,
    ShardStream,
    SkipCounter,
    collect_tasks,
    decode_sample,
    load_dataset_info,
    make_loader,
    resolve_source,
    shard_urls,
    validate_dataset_info,
)
from moefuse.datasets.manifest import FIELDS, ManifestError, ManifestRow, read_manifest
from moefuse.datasets.media import MediaError
from moefuse.datasets.shards import BuildError, BuildOptions, build_shards

__all__ = [
    "COUNT_KEYS",
    "FIELDS",
    "IGNORE_INDEX",
    "BuildError",
    "BuildOptions",
    "Collator",
    "DataConfig",
    "DataError",
    "ManifestError",
    "ManifestRow",
    "MediaError",
    "ShardLoader",
    "ShardStream",
    "SkipCounter",
    "build_eval_loader",
    "build_shards",
    "build_train_loader",
    "collect_tasks",
    "decode_sample",
    "load_dataset_info",
    "make_demo_data",
    "make_loader",
    "read_manifest",
    "resolve_source",
    "shard_urls",
    "validate_dataset_info",
]
