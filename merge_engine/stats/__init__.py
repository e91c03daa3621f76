"""Statistics of a model over a data set, for merges that weigh parameters by them (Fisher merging).

    from merge_engine.stats import collect_fisher, FisherOptions
    collect_fisher("model/", "data.jsonl", "model-fisher/", FisherOptions(variant="sampled"))
"""
from merge_engine.stats.data import DataError, TokenizedData, load_data, load_tokenizer, make_batch, read_texts
from merge_engine.stats.fisher import (
    FisherOptions,
    FisherResult,
    collect_fisher,
    compute_fisher,
    load_manifest,
    save_fisher,
)

__all__ = ["DataError", "FisherOptions", "FisherResult", "TokenizedData", "collect_fisher", "compute_fisher",
           "load_data", "load_manifest", "load_tokenizer", "make_batch", "read_texts", "save_fisher"]
