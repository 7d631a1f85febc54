"""What the ``numbabn`` commands share: settings, the error type, the lazy group.

Only click is imported here: loading the CLI and rendering ``--help`` must not
import Numba, PyTorch or matplotlib (that would cost seconds per invocation).
"""
from dataclasses import dataclass
from importlib import import_module

import click


@dataclass
class Settings:
    """Global options, stored as ``ctx.obj`` by the ``numbabn`` group."""

    verbose: int = 0
    quiet: bool = False


class CLIError(click.ClickException):
    """A one-line error with exit code 2, for a request this machine cannot serve
    (CUDA without a GPU, torch not installed): no usage hint, since the command
    line itself is well-formed, but the same exit code as a usage error."""

    exit_code = 2


def check_threads(ctx, threads):
    """``--threads`` may not exceed the CPUs this process may use (affinity, cgroup quota)."""
    from numbabn._threads import available_cpus

    cpus = available_cpus()
    if threads > cpus:
        raise click.BadParameter(f"{threads} is more than the {cpus} CPUs this process may use",
                                 ctx=ctx, param_hint="'--threads'")


class LazyGroup(click.Group):
    """A group whose subcommands live in other modules and are imported on first use.

    ``lazy_subcommands`` maps a command name to ``"module:attribute"``. Adding a
    command is one dict entry, and listing commands in ``--help`` imports only the
    command modules (which import nothing heavy at module level).
    """

    def __init__(self, *args, lazy_subcommands=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands if lazy_subcommands is not None else {}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx, cmd_name):
        target = self.lazy_subcommands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attribute = target.split(":")
        return getattr(import_module(module), attribute)
