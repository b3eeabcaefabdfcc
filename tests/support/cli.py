"""The command line's mistakes, shared by tests/cli/test_explain.py and tests/cli/test_cli_first_day.py."""
from typing import List, Sequence

import pytest

from torchex_fn.__main__ import main


def with_flags(argv: Sequence[str], extra: Sequence[str]) -> List[str]:
    """``argv`` with the ``--flag value`` pairs of ``extra``: a flag already there gets the new value, any other
    is added at the end."""
    argv = list(argv)
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def usage_error(argv: Sequence[str]) -> None:
    """Run the command line on ``argv`` and assert it exits with code 2 (argparse's usage error)."""
    with pytest.raises(SystemExit) as err:
        main(list(argv))
    assert err.value.code == 2
