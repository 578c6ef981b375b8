"""The local (no-cluster) backends of midfill: the same TrainingRun/ModelRelease YAML on one machine.

`midfill apply -f` stores the resource in a state dir (`state.py`), trains through torchx's local
scheduler (`training.py`), and serves on a local Ray (`serving.py`); `cli.py` adds the commands.
"""
