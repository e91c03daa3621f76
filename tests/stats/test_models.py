"""Loading a model folder for statistics: what it leaves in the caller's process."""
import subprocess
import sys
import textwrap


def test_loading_a_model_shows_no_bar_and_leaves_no_thread(tiny_lm):
    """transformers' "Loading weights" bar is not shown, so its tqdm monitor thread is not started (in a fresh
    process: tqdm starts that thread once per process), and the caller's progress-bar setting is kept."""
    script = textwrap.dedent(f"""
        import threading, torch, transformers
        from merge_engine.stats.models import load_model
        before = {{t.name for t in threading.enumerate()}}
        load_model({tiny_lm("llama")!r}, None, torch.device("cpu"))
        # (transformers' weight-loading pool may still be winding down its workers: not ours, and not tqdm's)
        print(sorted(n for n in {{t.name for t in threading.enumerate()}} - before
                     if not n.startswith("ThreadPoolExecutor-")),
              transformers.utils.logging.is_progress_bar_enabled())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[] True", run.stdout
    assert "Loading weights" not in run.stderr
