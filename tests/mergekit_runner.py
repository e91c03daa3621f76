"""mergekit-yaml command lines run in one long-lived process, for the parity tests (tests/conftest.py's
`mergekit` fixture). Importing mergekit's command takes about 9 s here, longer than a test's merge: paying it
once per test worker rather than once per test saves minutes. Each request runs exactly the command line's
entry point (mergekit.scripts.run_yaml.main, a click command) with the given arguments, in this process.

Run with mergekit's Python. Protocol: one JSON list of arguments per line on stdin; one JSON line back,
{"ok": bool, "error": text}, on the file descriptor given as argv[1] (stdout and stderr are mergekit's own)."""
import json
import os
import sys
import traceback

# Python put this script's folder, tests/, first on the path, where tests/kernels would shadow the PyPI
# package `kernels` that transformers imports when it is installed (transformers 5.25 with kernels 0.19).
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
replies = os.fdopen(int(sys.argv[1]), "w")
from mergekit.scripts.run_yaml import main  # noqa: E402 (after the reply channel is taken)

for line in sys.stdin:
    try:
        main.main(args=json.loads(line), standalone_mode=False)
        reply = {"ok": True, "error": ""}
    except SystemExit as e:  # click's exit: 0 or None is success
        reply = {"ok": e.code in (0, None), "error": f"exit status {e.code}"}
    except BaseException:  # noqa: BLE001 (any failure is the test's to report)
        reply = {"ok": False, "error": traceback.format_exc()}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()
