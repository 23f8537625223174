"""The embedded demo: a tiny base model and two specialists trained locally on synthetic tasks (kit.py,
data.py; tasks in fitness/demo/), a grid of hand recipes (hand.py), the demo search's stages
(search_demo.py) and their sequence (pipeline.py, which `evomerge demo` runs)."""
