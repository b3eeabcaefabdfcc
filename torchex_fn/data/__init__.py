"""Synthetic data the package generates (no downloads): shapes with masks, their decoy variant, the demo model,
and a name task for activation patching.

``tx.datasets`` is this package: ``tx.datasets.shapes(...)``, ``tx.datasets.decoy_shapes(...)``,
``tx.datasets.name_task(...)``.
"""
from .decoy import PALETTE, DecoyShapes, decoy_shapes
from .names import NameTask, name_task, train_name_model
from .synthetic import CLASSES, Shapes, shapes

__all__ = ["Shapes", "shapes", "CLASSES", "DecoyShapes", "decoy_shapes", "PALETTE", "NameTask", "name_task",
           "train_name_model"]
