"""tools/fuzz.py, a bounded run: mutated PNGs get a slice or a 4xx, never a crash or a 5xx."""

from collections import Counter

import numpy as np

from tools import fuzz


def test_2000_mutated_pngs_decode_or_get_a_4xx():
    rng = np.random.default_rng(9)
    pool = fuzz.seeds(rng)
    outcomes, broken = Counter(), []
    for index in range(2000):
        outcome, ok = fuzz.decode(fuzz.mutate(pool[index % len(pool)], rng))
        outcomes[outcome.split(":")[0]] += 1
        if not ok:
            broken.append(outcome)
    assert broken == []
    assert outcomes["decoded"] > 100 and outcomes["400 ImageError"] > 1000, outcomes


def test_mutated_pngs_over_http_get_a_mask_or_a_json_4xx(server_url):
    rng = np.random.default_rng(10)
    pool = fuzz.seeds(rng)
    outcomes, broken = Counter(), []
    for index in range(200):
        outcome, ok = fuzz.post(server_url + "/", fuzz.mutate(pool[index % len(pool)], rng))
        outcomes[outcome] += 1
        if not ok:
            broken.append(outcome)
    assert broken == [], outcomes
    assert outcomes["200"] > 10 and outcomes["400"] > 100, outcomes
