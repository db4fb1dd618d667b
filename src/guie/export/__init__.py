"""The export: a trained run's model as the competition's `submission.zip`.

- `build`: load a training output folder's weights (souped with `export.soup`), fit the
  reduction to 64, put `export.concat` towers side by side, and pick the export below.
- `script`: the TorchScript module in the host's contract, scripted, contract-checked, zipped.
- `compat`: the same network rebuilt from operations PyTorch 1.11 (the host's stated version)
  can load.
"""
