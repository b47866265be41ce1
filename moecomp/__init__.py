"""moecomp: multi-objective evolutionary compression of PyTorch models.

The stages of the pipeline (see shared/DESIGN.md) live one per module:
``data``/``zoo``/``target`` (what is compressed), ``relevance`` (which weights go first),
``plan`` (the configuration), ``quantize``/``apply`` (turning a plan into weights),
``evaluate``/``search`` (the pymoo problem), ``tune`` (Optuna), ``pick``, ``refine``,
``codec``/``export`` (the .mcz file) and ``compare`` (the single-objective DE baseline).
"""

__version__ = "0.1.0"
