"""Seeds reach the on-policy draws (issue 27, item 5).

The coin of each batch and the student's samples are keyed by `on_policy.seed`; left unset it
is the training loader's seed — in a recipe the student's seed (seed, seed + 1, …) — so runs
with different seeds draw different on-policy batches and a run repeats with its seed. (The
coins were keyed by `on_policy.seed` alone, 0 unless set: every seed of a recipe sampled the
same batches, and the ± of its on-policy rows understated the spread.)
"""

from __future__ import annotations

import pytest
import torch
from test_onpolicy import TinyLM, random_completions

import kdistill as kd
from kdistill.data import BatchLoader
from kdistill.distill.onpolicy import OnPolicy
from kdistill.distill.transforms import OnPolicyConfig, on_policy_transform
from kdistill.engine import TrainConfig, fit
from kdistill.losses.token import ForwardKL


def run(loader_seed: int, on_policy_seed: int | None = None):
    """A λ = 0.5 run over unshuffled data (the same batches in the same order whatever the
    seed): only the on-policy draws can depend on the seed. Returns (the coin of each batch,
    the student's final weights)."""
    student, teacher = TinyLM(seed=1), TinyLM(seed=2)
    coins = []
    original = OnPolicy.apply

    def spy(self, student_, batch, key, rank=0):
        new, sampled = original(self, student_, batch, key, rank)
        coins.append(sampled)
        return new, sampled

    seed = {} if on_policy_seed is None else {"seed": on_policy_seed}  # unset: the default
    config = TrainConfig(
        epochs=2,
        batch_size=2,
        lr=0.05,
        schedule="constant",
        progress=False,
    )
    loader = BatchLoader(
        random_completions(32, seed=0), batch_size=2, shuffle=False, seed=loader_seed
    )
    OnPolicy.apply = spy
    try:
        on_policy = on_policy_transform(OnPolicyConfig(lmbda=0.5, max_new_tokens=4, **seed), loader)
        distiller = kd.Distiller(teacher, student, [kd.Term(ForwardKL())])
        fit(distiller, loader, config, batch_transforms=[on_policy])
    finally:
        OnPolicy.apply = original
    return coins, student.state_dict()


def same_weights(a, b) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


def test_two_seeds_draw_different_on_policy_batches_and_a_seed_repeats():
    coins_0, weights_0 = run(0)
    coins_0_again, weights_0_again = run(0)
    coins_1, weights_1 = run(1)
    assert len(coins_0) == 32 and 0 < sum(coins_0) < 32  # λ = 0.5 over 32 batches
    assert coins_0 == coins_0_again and same_weights(weights_0, weights_0_again)
    # two seeds agree on a batch's coin with probability 1/2: all 32 alike by chance 2^-32
    assert coins_0 != coins_1, f"seeds 0 and 1 drew the same {sum(coins_0)} of 32 batches"
    assert not same_weights(weights_0, weights_1)


def test_an_explicit_on_policy_seed_fixes_the_draws_whatever_the_loaders_seed():
    coins_a, weights_a = run(0, on_policy_seed=5)
    coins_b, weights_b = run(1, on_policy_seed=5)
    assert coins_a == coins_b and same_weights(weights_a, weights_b)


RECIPE = """\
name: seeds-test
task: completion
data:
  dataset: kjv_completions
  text: {{vocab_size: 300, max_length: 24, text_file: {text_file}}}
  train_limit: 32
  test_limit: 16
teacher: {{model: lm_teacher, kwargs: {{width: 16, n_layer: 1, n_head: 2}}}}
students: [{{name: s, model: lm_student, kwargs: {{width: 16}}}}]
cost: {{enabled: false}}
seeds: 2
distill:
  teacher_cache: off
  methods: {{gkd: [{{loss: forward_kl}}]}}
  on_policy: {{gkd: {on_policy}}}
train: {{epochs: 1, max_steps: 2, batch_size: 8, progress: false}}
"""


@pytest.mark.parametrize("on_policy", ["{lmbda: 0.5}", "{lmbda: 0.5, seed: 7}"])
def test_a_recipes_seeds_reach_its_on_policy_draws(on_policy, tmp_path, monkeypatch):
    """Through the runner: the on-policy draws (coin, sampling seed) of the batches a student
    of seed 0, 1 and 0 again would train on; seed 1 differs from seed 0, which repeats —
    whether `on_policy.seed` is left unset or fixed."""
    from test_text_data import fake_kjv_lines

    from kdistill.recipes import load_recipe, runner, student_stage

    text_file = tmp_path / "kjv.txt"
    text_file.write_text("\n".join(fake_kjv_lines()) + "\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(text_file=text_file, on_policy=on_policy))
    experiment = runner.Experiment(load_recipe(path), tmp_path / "run", progress=False)

    class Stop(Exception):
        pass

    policies = []

    def fit(distiller, loader, config, **kwargs):  # what the engine would draw, then stop
        (transform,) = [t for t in kwargs["batch_transforms"] if t.name == "on_policy"]
        policies.append(transform.sampler)
        raise Stop

    monkeypatch.setattr(student_stage, "fit", fit)  # the students' steps train through it
    spec = experiment.recipe.students[0]
    for seed in (0, 1, 0):
        with pytest.raises(Stop):
            experiment.train_student(
                f"s/gkd/seed{seed}", spec, seed, experiment.objective(None), "gkd",
                experiment.splits.test, keep_checkpoint=False,
            )  # fmt: skip
    draws = [[policy.draw(key) for key in range(32)] for policy in policies]
    assert draws[0] == draws[2]
    assert [coin for coin, _ in draws[0]] != [coin for coin, _ in draws[1]]
    assert {s for _, s in draws[0]}.isdisjoint({s for _, s in draws[1]})
