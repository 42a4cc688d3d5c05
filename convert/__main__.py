"""`python -m convert import|export|merge-lora` (see convert/cli.py)."""
import os

# Conversions are host work: keep JAX off accelerators (no GPU memory preallocation).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from convert.cli import main  # noqa: E402

main()
