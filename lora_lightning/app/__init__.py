"""The Hydra app beside the library: ``lora-train`` fine-tunes the embedded model on the embedded data
(or yours) with :class:`~lora_lightning.LoRACallback`. It imports the library; the library never
imports it. Its configs (``conf/``) ship inside the package, so an installed wheel runs it."""
