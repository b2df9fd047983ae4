"""Fine-tuning of ADSC-LLaVA (installed as `adsc_llava.train`): options, data, curriculum and trainer.

Nothing here is shipped inside checkpoints: the two top-level modeling files are self-contained.
"""
