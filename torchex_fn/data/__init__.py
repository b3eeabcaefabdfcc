"""Synthetic data the package generates (no downloads): shapes with masks, their decoy variant, the demo model.

``tx.datasets`` is this package: ``tx.datasets.shapes(...)``, ``tx.datasets.decoy_shapes(...)``.
"""
from .decoy import PALETTE, DecoyShapes, decoy_shapes
from .synthetic import CLASSES, Shapes, shapes

__all__ = ["Shapes", "shapes", "CLASSES", "DecoyShapes", "decoy_shapes", "PALETTE"]
