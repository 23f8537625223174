"""The torch side: what holds tensors. Sources on a device, the in-place materializer, routed (data-flow)
models, checkpoint writers, and the Evaluator a worker runs. The driver side (evomerge.search) never imports it."""
