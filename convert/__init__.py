"""Other code bases' checkpoints in and out of this project: `python -m convert` (convert/cli.py).

Reading a HF dir is the model package's own (vlm/hf.py, vlm.from_pretrained); convert/ writes HF
dirs and reads and writes the other formats (LLaVA repo, open_clip, PEFT adapters, compositions)."""
