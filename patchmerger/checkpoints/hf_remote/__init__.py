"""Self-contained transformers remote code for our ViTs with PatchMergers, TokenLearners or
pooling between blocks, ToMe inside them, GAP or MAP heads and pre-logits: `hf_export` copies
these files into a `--to=transformers` export, which then opens with
`AutoModelForImageClassification.from_pretrained(DIR, trust_remote_code=True)`.
They import only torch, transformers and each other (never patchmerger or jax)."""
