"""Data layer: TFRecord shards and image folders -> one table -> training/validation images.

- `errors`: `DataError` and `DataWarning`, shared by every data module and the command line.
- `tfrecord`: record framing, CRC-32C, hand-written tf.train.Example codec, shard indexes.
- `sources`: DataSource -> DataFrame, label filtering, held-out validation split.
- `guarded_decode`: the one guarded PIL decode (bomb guard, pixel cap) every image reader uses.
- `dataset`: decoding and a torch Dataset that skips damaged images.
- `sample`: a small multi-domain instance-level data set built from packaged photos.
- `preprocess`: the one resize + normalise shared by validation and the export.
- `fetch`: downloads a config's datasets through a `remote.DatasetHost` (the Kaggle client).
"""
