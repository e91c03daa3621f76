"""Statistics of a model over a data set, for merges that weigh parameters by them: diagonal Fishers
(Fisher merging) and linear layers' input Grams (RegMean, BMM).

    from merge_engine.stats import collect_fisher, collect_grams, FisherOptions, GramOptions
    collect_fisher("model/", "data.jsonl", "model-fisher/", FisherOptions(variant="sampled"))
    collect_grams("model/", "data.jsonl", "model-grams/", GramOptions(packed=True))
"""
from merge_engine.stats.data import DataError, TokenizedData, load_data, load_tokenizer, make_batch, read_texts
from merge_engine.stats.fisher import FisherOptions, FisherResult, collect_fisher, compute_fisher, save_fisher
from merge_engine.stats.gram import GramOptions, collect_grams

__all__ = ["DataError", "FisherOptions", "FisherResult", "GramOptions", "TokenizedData", "collect_fisher",
           "collect_grams", "compute_fisher", "load_data", "load_tokenizer",
           "make_batch", "read_texts", "save_fisher"]
