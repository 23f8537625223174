"""Models scored side by side in threads (evomerge.fitness.parallel): the same scores as one at a time, in job
order, with stdout and lm-eval's loggers left as they were, and a failing job's error raised to the caller."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

from evomerge.fitness.lmeval import Scorer
from evomerge.fitness.parallel import score_side_by_side, scoring_threads
from evomerge.fitness.tasks import muted
from evomerge.testing.tasks import write_choice_tasks
from evomerge.testing.tiny import TinySpec, make_family


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("side_by_side")
    family = make_family(root / "models", TinySpec(arch="llama"), n_sources=3, seed=4, task_scale=0.2)
    write_choice_tasks(root / "tasks", {"t_one": 24, "t_two": 16}, n_choices=4)
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in (family.base, *family.sources)]

    def make_scorer() -> Scorer:
        from transformers import AutoTokenizer

        return Scorer(["t_one", "t_two"], [root / "tasks"], tokenizer=AutoTokenizer.from_pretrained(family.base),
                      batch_size=4)
    return models, make_scorer


def _raw(scores) -> dict[str, np.ndarray]:
    return {t: s.raw for t, s in scores.items()}


def test_side_by_side_scores_equal_one_at_a_time_in_job_order(setup):
    models, make_scorer = setup
    alone = make_scorer()
    with torch.no_grad():
        expected = [_raw(alone.score(m)) for m in models]
    assert len({tuple(e["t_one"].round(4)) for e in expected}) > 1  # the models differ: order is checked

    def job(i: int):
        def run(scorer: Scorer):
            with torch.no_grad():
                return _raw(scorer.score(models[i]))
        return f"model {i}", run

    built, seen = [], []
    stdout, threads = sys.stdout, torch.get_num_threads()
    results = score_side_by_side([job(i) for i in range(len(models))],
                                 lambda: built.append(make_scorer()) or built[-1],
                                 progress=lambda done, total, name: seen.append((done, total)))
    assert len(built) == scoring_threads(len(models))  # one scorer per thread (they keep per-call state)
    for got, want in zip(results, expected, strict=True):
        for t in want:
            np.testing.assert_allclose(got[t], want[t], rtol=1e-5, atol=1e-6)
    assert seen[0] == (0, 4) and seen[-1] == (4, 4) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert sys.stdout is stdout and torch.get_num_threads() == threads
    assert not any(lg.disabled for lg in alone._loggers)  # lm-eval's logs are back on


def test_a_failing_job_raises_to_the_caller(setup):
    _, make_scorer = setup

    def fail(scorer):
        raise ValueError("model 1 could not be loaded")

    with pytest.raises(ValueError, match="model 1"):
        score_side_by_side([("ok", lambda s: 1), ("bad", fail), ("later", lambda s: 3)], lambda: object())


def test_overlapping_muted_blocks_unmute_when_the_last_ends():
    logger = logging.getLogger("lm_eval.side_by_side_probe")
    first, second = muted([logger]), muted([logger])
    first.__enter__()
    second.__enter__()  # a second thread's block, started while the first holds the logger disabled
    first.__exit__(None, None, None)  # the first ends before the second: the logger must stay off
    assert logger.disabled
    second.__exit__(None, None, None)
    assert not logger.disabled
