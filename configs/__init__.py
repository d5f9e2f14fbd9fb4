"""Run configurations: `default.py` and one file per dataset, each a `get_config()`.

Pass a file to the trainer (`python -m semimeta_jax.main --config=configs/digits.py`);
a dataset's file imports `configs.default` and overrides a few fields, which is why
this folder is a package, installed with the project.
"""
