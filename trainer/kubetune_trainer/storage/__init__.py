"""Where the trainer's bytes come from and go to, on plain string URIs.

- `interface`: the `ObjectStore` protocol every backend keeps, its records (`ObjectInfo`,
  `Fetched`), its errors and the URI and small-text helpers; it imports no backend.
- `local`, `s3` (with `s3_http`, `s3_ranges`, `transfer_checks`): the backends.
- `staging` (and `hub` for hf://): a model or dataset URI brought onto local disk.
- `schemes`: the one table from URI scheme to backend and way of staging, behind
  `open_store()` and `stage()`; the only module here that imports the backends.

This package imports nothing itself, so importing one of its modules loads only what that
module needs.
"""
