"""Helpers shared by the test files (tests/README.md): models, oracles, the method tables, state snapshots.

A test file imports from here (``from support.models import TinyCNN``), never from another test file.
``support`` is importable from every test folder through pytest's ``pythonpath = ["tests"]`` (pyproject.toml).

* ``models``: tiny hand-weighted models (``TinyCNN``, ``LinearHead``, ``TinyAttention``, ...).
* ``reference``: plain autograd + hook implementations, used as oracles.
* ``state``: ``Snapshot``, everything a call could leave behind, compared before and after.
* ``contracts``: the contract suite's table of cases (``METHODS``) and its model, from the registry.
* ``ranks``: a tiny model per input rank and the table of calls per method (``CALLS``), from the registry.
* ``dtypes``: the low-precision tolerances shared by the CPU and CUDA dtype tests.
* ``parity``: the seeded torchvision models and the tolerance rule of the peer-parity tests.
* ``zoo``: today's architectures, small, with random weights (also read by docs/architectures.py).
* ``perturbations``: ``Feed``, a ``perturb_func`` of fixed draws for the metrics that perturb.
* ``store_runs``: the tiny runs of the store's fault tests, and their forkserver (children start in ms).
* ``cli``: a command line with flags changed (``with_flags``), and its usage error (``usage_error``, exit code 2).
"""
