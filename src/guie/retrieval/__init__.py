"""Retrieval rig: embed a folder with any contract-following TorchScript model and show its k-NN.

- images: robust loading of real-world files (formats, modes, EXIF, huge and tiny images).
- index: the saved, incrementally updated embeddings index (`Embedder`, `update_index`).
- labels: sub-folder or CSV labels and leave-one-out mP@5.
- report: the self-contained HTML page and the PNG contact sheet.
The command line is `submit.py search` (guie_cli/search.py).
"""
