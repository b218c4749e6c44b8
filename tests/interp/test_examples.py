import pytest
import torch

from saelab.errors import ConfigError
from saelab.interp.examples import Example, ExampleConfig, ExampleSampler, TokenText, marked_text

C, T = 10, 12


def _position(c: int) -> int:
    return (3 * c + 2) % T


@pytest.fixture
def sampler(make_record) -> tuple[ExampleSampler, torch.Tensor]:
    """Latent 0 fires once per context c (value c + 1); latent 1 everywhere in contexts 0-4 (value 1 + position);
    latent 2 once, at context 0 position 1. Position 0 (a BOS) is not stored."""
    latents = torch.zeros(C, T, 3)
    for c in range(C):
        latents[c, _position(c), 0] = c + 1
    latents[:5, :, 1] = torch.arange(1, T + 1).float()
    latents[0, 1, 2] = 5.0
    keep = torch.ones(C, T, dtype=torch.bool)
    keep[:, 0] = False
    contexts = torch.randint(4, 100, (C, T))
    synthetic = make_record(latents, contexts=contexts, keep=keep)
    return ExampleSampler(synthetic.record, synthetic.store, window_before=3, window_after=2), contexts


def _overlap(a: Example, b: Example) -> bool:
    return a.context == b.context and abs(a.start - b.start) < len(a.token_ids)


def test_top_windows_hold_the_context_tokens_and_activations(sampler) -> None:
    examples, contexts = sampler
    top = examples.top(0, 3)
    assert [e.context for e in top] == [9, 8, 7]
    for example in top:
        position = _position(example.context)
        assert example.start == min(max(position - 3, 0), T - 6)
        assert example.token_ids == tuple(contexts[example.context, example.start : example.start + 6].tolist())
        expected = [0.0] * 6
        expected[position - example.start] = example.context + 1.0
        assert list(example.activations) == expected
    assert top[0].scaled(10.0) == [10 if a else 0 for a in top[0].activations]
    assert Example(0, "top", 0, 0, (1, 2, 3), (0.0, 0.04, 5.0)).scaled(10.0) == [0, 1, 5]  # nonzero stays >= 1


def test_windows_are_clamped_inside_the_context_and_unstored_positions_are_silent(sampler) -> None:
    examples, contexts = sampler
    (only,) = examples.top(2, 5)
    assert (only.start, only.activations) == (0, (0.0, 5.0, 0.0, 0.0, 0.0, 0.0))
    (first,) = examples.top(1, 1)  # strongest is the last position: the window ends with the context
    assert first.start == T - 6 and first.activations[-1] == T


def test_windows_of_a_latent_never_overlap(sampler) -> None:
    examples, _ = sampler
    top = examples.top(1, 50)
    assert len(top) == 5 * 2  # two disjoint windows of 6 fit in a context of 12
    assert not any(_overlap(a, b) for i, a in enumerate(top) for b in top[i + 1 :])
    assert not any(_overlap(a, b) for a in examples.top(1, 3, exclude=top) for b in top)


def test_training_and_test_examples_are_disjoint_and_by_quantile(sampler) -> None:
    examples, _ = sampler
    cfg = ExampleConfig(window_before=3, window_after=2, train_sampling="top", n_train=3, test_quantiles=2,
                        test_per_quantile=2, test_non_activating=3)
    chosen = examples.examples(0, cfg)
    assert chosen.max_activation == 10.0
    assert [e.context for e in chosen.train] == [9, 8, 7]
    by_quantile = {q: sorted(e.max_activation for e in chosen.test_activating if e.quantile == q) for q in (0, 1)}
    assert len(by_quantile[0]) == 2 and max(by_quantile[0]) <= 5  # lower half: values 1-5
    assert by_quantile[1] == [6.0, 7.0]  # upper half: values 6-10, of which 8-10 went to training
    assert len(chosen.test_non_activating) == 3
    assert all(e.max_activation == 0 and e.kind == "non_activating" for e in chosen.test_non_activating)
    everything = chosen.train + chosen.test_activating + chosen.test_non_activating
    assert not any(_overlap(a, b) for i, a in enumerate(everything) for b in everything[i + 1 :])
    assert examples.examples(0, cfg) == chosen  # reproducible
    spread = examples.examples(0, ExampleConfig(window_before=3, window_after=2, n_train=4, train_quantiles=2))
    assert sorted(e.quantile for e in spread.train) == [0, 0, 1, 1]


def test_random_activating_windows_and_activating_token_ids(sampler) -> None:
    examples, contexts = sampler
    drawn = examples.random_activating(0, 4, seed=1)
    assert len(drawn) == 4 and all(e.max_activation == e.context + 1 for e in drawn)
    assert drawn == examples.random_activating(0, 4, seed=1)
    assert examples.activating_token_ids(0).tolist() == [int(contexts[c, _position(c)]) for c in range(C)]


def test_example_config_rejects_impossible_settings() -> None:
    with pytest.raises(ConfigError):
        ExampleConfig(n_train=0).validate()
    assert ExampleConfig(test_quantiles=4, test_per_quantile=2).min_activations == 9


def test_token_pieces_and_marks(word_tokenizer) -> None:
    text = TokenText(word_tokenizer)
    ids = word_tokenizer("w1 w2 w3 w4")["input_ids"]
    pieces = text.pieces(ids)
    assert pieces == ["w1", " w2", " w3", " w4"]
    assert "".join(pieces) == word_tokenizer.decode(ids)
    assert marked_text(pieces, [False, True, True, False]) == "w1 <<w2 w3>> w4"
    assert marked_text(pieces, [True, False, False, True]) == "<<w1>> w2 w3 <<w4>>"
    assert marked_text(["a", "\n b"], [False, True]) == "a\n <<b>>"
