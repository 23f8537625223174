"""Fit py-irt on a responses matrix; run inside bench/out/pyirt-venv (py-irt is not an evomerge dependency).

    bench/out/pyirt-venv/bin/python bench/pyirt_runner.py IN.npz OUT.json --model 2pl|multidim_2pl --dims D

IN.npz holds `y` (M, N) with NaN where not observed. OUT.json gets a (N, D), b (N,), theta (M, D) in evomerge's
parametrisation P = sigmoid(a . theta - b), and the training wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
from py_irt.config import IrtConfig
from py_irt.dataset import Dataset
from py_irt.training import IrtModelTrainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("inp")
    p.add_argument("out")
    p.add_argument("--model", default="2pl")
    p.add_argument("--dims", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.1)
    args = p.parse_args()
    y = np.load(args.inp)["y"]
    m, n = y.shape
    items = [f"i{j}" for j in range(n)]
    df = pd.DataFrame(y, columns=items)
    df.insert(0, "model", [f"m{i}" for i in range(m)])
    start = time.perf_counter()
    dataset = Dataset.from_pandas(df, subject_column="model", item_columns=items)
    config = IrtConfig(model_type=args.model, epochs=args.epochs, priors="hierarchical", lr=args.lr, seed=0,
                       dims=args.dims if args.model == "multidim_2pl" else None, log_every=10**9)
    trainer = IrtModelTrainer(data_path=None, config=config, dataset=dataset, verbose=False)
    trainer.train(device="cpu")
    seconds = time.perf_counter() - start
    params = trainer.irt_model.export()
    # py-irt indexes items and subjects by its own id maps: put them back in column / row order
    item_pos = [dataset.item_id_to_ix[i] for i in items]
    subj_pos = [dataset.subject_id_to_ix[f"m{i}"] for i in range(m)]
    ability = np.array(params["ability"]).reshape(len(params["ability"]), -1)[subj_pos]
    disc = np.array(params["disc"]).reshape(len(params["disc"]), -1)[item_pos]
    diff = np.array(params["diff"]).reshape(len(params["diff"]), -1)[item_pos]
    # 2pl: logit = disc (theta - diff); multidim_2pl: logit = sum_k disc_k (theta_k - diff_k)
    a, b = disc, np.sum(disc * diff, axis=1)
    with open(args.out, "w") as f:
        json.dump({"a": a.tolist(), "b": b.tolist(), "theta": ability.tolist(), "seconds": seconds}, f)


if __name__ == "__main__":
    main()
