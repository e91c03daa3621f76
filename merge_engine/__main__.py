from merge_engine.cli import entry

entry()
