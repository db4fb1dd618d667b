"""The Kaggle side of the kit: client wrapper, packaging, notebooks, submission history.

Submodules are imported explicitly (`from guie.kaggle.packaging import ...`): the kernels import
`guie.kaggle.packaging` on Kaggle, where nothing here may pull in the `kaggle` client at import.
"""
