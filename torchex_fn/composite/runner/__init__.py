"""The data-set runner: :func:`attribute_dataset` explains a whole data set into a resumable store, and
:func:`open_attributions` reads it back. ``codec`` is the file format, ``store`` the store and its reader,
``run`` the loop over batches (one process or ``torchrun``)."""
from .run import attribute_dataset
from .store import Attributions, open_attributions

__all__ = ["attribute_dataset", "open_attributions", "Attributions"]
