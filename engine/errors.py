"""The errors a user can fix: each becomes one line on stderr and exit code 2 (cli.run_cli).
Torch-free, so that every layer can raise them."""


class UserError(ValueError):
    """Bad input: the message names the file (and line), the option, or the checkpoint."""


class ConfigError(UserError):
    """A config.json or a command-line option that cannot be used."""


class DataError(UserError):
    """A data file that cannot be read."""


class OutputError(UserError):
    """An output file that cannot be written where the user asked (a folder, say)."""


class CheckpointError(UserError):
    """A checkpoint folder, weight file or saved run that does not fit."""


class ReportedElsewhere(UserError):
    """Rank 0's error, raised on the other ranks too so that every process stops at once;
    rank 0 prints it, the others exit quietly (cli.run_cli)."""


class Interrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after saving its state; exits 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
