"""RLDS data: reading, writing, transforms, statistics and deterministic sharded loading (docs/DATASETS.md).

Entry points: `rlds_dataset.RLDSFrameDataset`, `loader.make_train_loader` / `make_eval_loader`,
`statistics.save_dataset_statistics` / `load_dataset_statistics`, `rlds_writer.write_rlds_dataset`,
`synthetic_libero.make_synthetic_libero_dataset`. Kept import-free so `normalization` / `image_ops` stay light.
"""
