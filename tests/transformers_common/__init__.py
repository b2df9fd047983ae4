"""Runs transformers' own `ModelTesterMixin` against stock LLaVA and the ADSC classes.

transformers' test suite is not part of its wheel, and its source release on PyPI ships only the top-level
`tests/test_*.py` files. `load_model_tester_mixin` downloads that source release (pip, PyPI, cached under
`.cache/transformers-tests/`; nothing of it is committed here) and imports `tests/test_modeling_common.py` from it.
That module imports two mixins from folders the release leaves out (`tests/generation/test_utils.py`,
`tests/exporters/test_export.py`); they are replaced by empty classes, so the generation and torch.export tests of
transformers do not run here (the project's own tests cover cached generation, beam search and their equality).
"""
