"""Training, conversion, cost model and demo for ADSC-LLaVA.

Nothing here is shipped inside checkpoints: the two top-level modeling files are self-contained.
"""
