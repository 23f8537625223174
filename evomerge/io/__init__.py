"""Checkpoint input and output. Import the module you need: `headers`, `paths` and `documents` are torch-free
(the driver side reads them); `checkpoint`, `compat` and `save` hold torch tensors (the worker side)."""
