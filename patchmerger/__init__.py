"""patchmerger: Vision Transformers with learned token merging (Renggli et al., 2022)."""
