"""Scorers of a live transformers causal LM, for a search over merges: each is an Evaluator (a name, a
direction, a call returning the score, and the tokens one call feeds the model).

    from merge_engine.evaluation import MultipleChoice, evaluator_from_spec
    accuracy = MultipleChoice("val.jsonl", tokenizer, normalize="chars")
    accuracy(model)  # fraction of questions whose most likely choice is the answer
"""
from merge_engine.evaluation.lm_eval_tasks import LmEvalTasks
from merge_engine.evaluation.multiple_choice import NORMALIZE, MultipleChoice
from merge_engine.evaluation.perplexity import Perplexity
from merge_engine.evaluation.spec import Evaluator, evaluator_from_spec

__all__ = ["NORMALIZE", "Evaluator", "LmEvalTasks", "MultipleChoice", "Perplexity", "evaluator_from_spec"]
