"""Data: read, check and normalize training data once, in the core, for every backend.

    readers.py    streaming readers for every kind of source (jsonl/json/gz, csv/tsv, parquet, text, saved
                  datasets, hub datasets), each error naming the record's file:line or row
    formats.py    record formats (alpaca, messages, ShareGPT, preference, text) and their normalized form
    prepare.py    the normalized-source cache and a run's selection (mix, max_samples, eval split, subset)
    inspect.py    `llfarm data inspect`;  tools.py: `llfarm data split` / `convert`

``prepare(strategy)`` checks everything and writes nothing; ``prepare(strategy, write=True)`` also fills the cache
(a run, a plan), and ``.materialize()`` gives the files the backends read.
"""

from __future__ import annotations

from .formats import FORMATS, KIND_OF, STAGE_KIND, detect_format, normalize
from .prepare import PreparedData, cache_root, open_sources, select, token_cache_dir
from .readers import open_source, sha256_file

__all__ = ["FORMATS", "KIND_OF", "STAGE_KIND", "PreparedData", "cache_root", "detect_format", "normalize",
           "open_source", "prepare", "sha256_file", "token_cache_dir"]


def prepare(strategy, *, write: bool = False) -> PreparedData:
    """Every source of the strategy checked (and, with ``write``, cached), and the run's selection over them."""
    from ..training import examples_needed

    train = open_sources(strategy, "train", strategy.stage, write=write)
    evals = open_sources(strategy, "eval", strategy.stage, write=write)
    return select(train, evals, seed=strategy.training.seed, max_samples=strategy.data.max_samples,
                  eval_split=strategy.data.eval_split, needed=examples_needed(strategy))
