"""Operations on finished datasets: subsets, dedup and stats, lazily, at 100M+ rows.

How it fits together (a newcomer's minute):

- `source.open_dataset(path)` reads the per-shard Parquet files of a `fastlaion run` folder (or
  the `metadata.parquet` of a subset or dedup folder) as one Polars LazyFrame. Unreadable files
  are skipped, counted and named in a warning; everything after is lazy and streaming
  (`scan_parquet` ... `sink_parquet`), so memory follows the columns a job touches, not the rows.
- Every row keeps pointing at its images: the `shard` column names the tar, the Parquet row and
  the embeddings of the *original run* (`Dataset.root`, recorded in dataset.json relative to the
  subset and absolute), so a subset of a dedup of a run still finds its pixels without copying
  them. A subset written with `--shards` holds its own tars and embeddings and is its own root.
- `subset.py`: LAION's derived subsets as recipes (Polars expressions), `--where` SQL, output
  Parquet, optional resharded webdataset tars and a URL list for re-downloading.
- `dedup.py`: exact (url, url+caption, sha256, LAION's hash), perceptual (64-bit DCT hash, `phash.py`) and
  semantic (CLIP image embeddings) dedup. Nothing is deleted: duplicates become
  status=dropped, stage=dedup, reason=duplicate_<by>, with `duplicate_of` = the key they repeat.
- `stats.py`: the funnel, drops per reason, histograms, languages and image sizes;
  `fastlaion.report` turns them into one self-contained HTML page.
"""

from .source import COLUMN_SOURCES, Dataset, DatasetError, RunState, open_dataset, run_state

__all__ = ["COLUMN_SOURCES", "Dataset", "DatasetError", "RunState", "open_dataset", "run_state"]
