# Run from tests/ with PYTHONPATH=<a checkout of 3c1a28f>: python data/legacy_3c1a28f/make_legacy.py data/legacy_3c1a28f
"""Made with lora_lightning at 3c1a28f (before the state handle and the base identity): an adapter file, an
adapter-only Lightning checkpoint and the outputs they give, so today's code can be checked to load them."""
import sys, torch, warnings
warnings.simplefilter("ignore")
from pathlib import Path
from conftest import LitTiny, tiny_loader, tiny_batch, trainer, adapted
from lora_lightning import LoRACallback, save_adapter
out = Path(sys.argv[1])
torch.manual_seed(0)
m = adapted(seed=0)  # tiny transformer, r=4 on q,v, random B
save_adapter(m, out / "adapter.safetensors")
ids = tiny_batch()[0]
with torch.no_grad():
    torch.save({"adapter": m(ids)}, out / "expected_adapter.pt")
lit = LitTiny(seed=0)
t = trainer(out / "run", [LoRACallback(r=2, targets=["q", "v"], modules_to_save=["net.classifier"], verbose=False)], max_steps=3)
t.fit(lit, tiny_loader())
t.save_checkpoint(out / "adapter_only.ckpt")
lit.eval()
with torch.no_grad():
    torch.save({"ckpt": lit(ids)}, out / "expected_ckpt.pt")
print("ok")
