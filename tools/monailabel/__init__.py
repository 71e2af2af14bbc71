"""The MONAI Label app (``main.py``), its tasks (``tasks.py``), the server launcher (``serve.py``, ``make label``)
and the synthetic studies it serves by default (``studies.py``). Runs in ``.venv-label`` (tools/setup_label_env.sh)."""

__all__: list[str] = []
