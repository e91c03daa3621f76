"""mergekit 0.1.5's merge_state_dicts on the cases of tests/test_in_memory.py, run with mergekit's Python:
    python mergekit_api_runner.py INPUTS.safetensors CASES.json OUTPUTS.safetensors ERRORS.json
INPUTS holds MODEL/TENSOR entries; CASES is {order: the tensors' order in each state dict, cases: [...]}, each case
{name, method, models, base, parameters, dtype, out_dtype, strict}, a parameter {"per_group": [...]} standing for
PerGroupValues (one value per tensor, in that order). OUTPUTS gets CASE/TENSOR entries; ERRORS each failed
case's error text."""
import json
import os
import sys

# Python put this script's folder, tests/, first on the path, where tests/kernels would shadow the PyPI package
# `kernels` that transformers imports
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]

import torch  # noqa: E402
from mergekit.merge_methods.api import merge_state_dicts  # noqa: E402
from mergekit.merge_methods.base import PerGroupValues  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def main(inputs_path: str, cases_path: str, outputs_path: str, errors_path: str) -> None:
    stored, spec = load_file(inputs_path), json.load(open(cases_path))
    models: dict = {}
    for key in sorted(stored, key=lambda k: spec["order"].index(k.split("/", 1)[1])):  # (the file sorts them)
        model, name = key.split("/", 1)
        models.setdefault(model, {})[name] = stored[key]
    outputs, errors = {}, {}
    for case in spec["cases"]:
        parameters = {k: PerGroupValues(v["per_group"]) if isinstance(v, dict) and "per_group" in v else v
                      for k, v in case["parameters"].items()}
        try:
            merged = merge_state_dicts({m: models[m] for m in case["models"]}, case["method"], parameters=parameters,
                                       base=case["base"], strict=case["strict"],
                                       dtype=case["dtype"] and getattr(torch, case["dtype"]),
                                       out_dtype=case["out_dtype"] and getattr(torch, case["out_dtype"]))
            outputs.update({f"{case['name']}/{n}": t.contiguous() for n, t in merged.items()})
        except Exception as e:  # noqa: BLE001 (the test compares which cases fail)
            errors[case["name"]] = f"{type(e).__name__}: {e}"
    save_file(outputs, outputs_path)
    json.dump(errors, open(errors_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
