"""Efficiency benchmarks of lora-lightning against full fine-tuning, a frozen base and HF PEFT.

Run ``python -m benchmarks.run`` (``--quick`` for a smoke run); see ``benchmarks/README.md``.
"""
