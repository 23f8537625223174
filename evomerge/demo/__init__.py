"""The embedded demo: a tiny base model and two specialists trained locally on synthetic tasks (kit.py,
data.py; tasks in fitness/demo/), and, until the demo search lands, a tour of the merge engine (merge_tour.py)."""
