"""The embedded demo kit. For now: a tour of the merge engine on a tiny model family built locally.
(The demo search, with specialists trained on synthetic tasks, replaces it once the search lands.)"""
