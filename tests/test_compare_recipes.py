"""bench/compare_recipes.py --seeds: a recipe's figures over seeds, against a brute-force mean/sd."""

from __future__ import annotations

import statistics

from bench.compare_recipes import seed_figures, seed_markdown, seed_spread


def run(seed: int, paraphrase: float, panel: float, **extra) -> dict:
    return {"recipe": f"facts/opsd[lora][seed={seed}]", "seed": seed, "after": paraphrase / 2,
            "after_by_task": {"paraphrase": paraphrase, "compose": 0.125},
            "benchmarks": {"facts-ood": {"before": 0.0, "after": 0.5, "teacher": 0.6}},
            "retention_panel_delta": panel, "retention_panel_task_delta": {"general": 3 * panel},
            "retention_logprob_delta": -0.02, "retention_text_delta": -0.003, **extra}


def test_seed_figures_names_every_figure_a_seed_moves():
    figures = seed_figures(run(0, 0.625, -0.01))
    assert figures == {"after": 0.3125, "after:paraphrase": 0.625, "after:compose": 0.125,
                       "facts-ood:after": 0.5, "panel Δ": -0.01, "panel Δ:general": -0.03,
                       "replies Δ": -0.02, "text Δ": -0.003}


def test_seed_spread_matches_the_sample_statistics_and_leaves_failed_runs_out():
    paraphrase, panel = [0.771, 0.625, 0.667], [-0.09, -0.08, -0.10]
    results = [run(s, p, d) for s, (p, d) in enumerate(zip(paraphrase, panel))]
    results.append({"recipe": "facts/opsd[lora][seed=3]", "seed": 3, "error": "boom"})
    results.append({"recipe": "quickstart", "after": 1.0})  # no seed: not a group
    (group,) = seed_spread(results)
    assert group["recipe"] == "facts/opsd[lora]" and group["seeds"] == [0, 1, 2, 3]
    assert group["failed"] == 1
    st = group["figures"]["after:paraphrase"]
    assert abs(st["mean"] - statistics.mean(paraphrase)) < 1e-12
    assert abs(st["sd"] - statistics.stdev(paraphrase)) < 1e-12
    assert (st["min"], st["max"], st["n"]) == (0.625, 0.771, 3)
    assert abs(group["figures"]["panel Δ"]["mean"] - statistics.mean(panel)) < 1e-12
    # one seed: sd 0, not a division by zero
    (single,) = seed_spread([run(5, 0.5, 0.0)])
    assert single["figures"]["after:paraphrase"]["sd"] == 0.0


def test_seed_markdown_prints_percent_points_and_nats():
    text = seed_markdown(seed_spread([run(0, 0.75, -0.02), run(1, 0.625, 0.0)]))
    assert "| facts/opsd[lora] | 0,1 | after:paraphrase | 68.8 ± 8.8 | 62.5 | 75.0 |" in text, text
    assert "| facts/opsd[lora] | 0,1 | panel Δ | -1.0 ± 1.4 | -2.0 | +0.0 |" in text, text
    assert "| facts/opsd[lora] | 0,1 | panel Δ:general | -3.0 ± 4.2 | -6.0 | +0.0 |" in text, text
    assert "| facts/opsd[lora] | 0,1 | text Δ | -0.003 ± 0.000 | -0.003 | -0.003 |" in text, text
    assert "| facts/opsd[lora] | 0,1 | replies Δ | -0.020 ± 0.000 | -0.020 | -0.020 |" in text, text
