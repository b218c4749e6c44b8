import pytest
import torch

from saelab.errors import ConfigError
from saelab.interp.contexts import feature_contexts, feature_text
from saelab.interp.examples import ExampleSampler, TokenText

C, T = 10, 12


@pytest.fixture
def found(make_record, word_tokenizer):
    """Latent 0 fires once per context c, at position 3 + c % 5 with value c + 1; latent 1 never fires."""
    latents = torch.zeros(C, T, 2)
    for c in range(C):
        latents[c, 3 + c % 5, 0] = c + 1
    contexts = torch.arange(C * T).reshape(C, T) % 96 + 4  # token ids 4.. = words w0..
    synthetic = make_record(latents, contexts=contexts)
    sampler = ExampleSampler(synthetic.record, synthetic.store, window_before=2, window_after=1)
    return feature_contexts(synthetic.record, sampler, [0, 1], n_top=3, n_random=4, seed=0), contexts


def test_top_and_random_contexts(found) -> None:
    (first, silent), contexts = found
    assert (first.count, first.n_tokens, first.max_activation) == (C, C * T, 10.0)
    assert [e.context for e in first.top] == [9, 8, 7]
    assert [e.max_activation for e in first.top] == [10.0, 9.0, 8.0]
    for example in first.top + first.random:
        assert example.max_activation == example.context + 1  # each window holds its context's activation
        assert list(example.token_ids) == contexts[example.context, example.start : example.start + 4].tolist()
    assert len(first.random) == 4 and {e.context for e in first.random}.isdisjoint({9, 8, 7})
    assert (silent.count, silent.top, silent.random) == (0, [], [])


def test_text_marks_the_activating_tokens_with_their_values(found, word_tokenizer) -> None:
    (first, silent), contexts = found
    text = feature_text(first, TokenText(word_tokenizer))
    active = contexts[9, 3 + 9 % 5].item() - 4
    assert text.startswith("latent 0: fires on 10 of 120 recorded tokens (8.333%), max activation 10")
    assert f"<<w{active}>>" in text and f"'w{active}' 10" in text
    assert text.index("top-activating contexts") < text.index("random activating contexts")
    assert text.count("<<") == 3 + 4
    assert "never fires" in feature_text(silent, TokenText(word_tokenizer))


def test_a_latent_out_of_range_is_named(make_record) -> None:
    synthetic = make_record(torch.rand(2, 4, 3))
    sampler = ExampleSampler(synthetic.record, synthetic.store, 1, 1)
    with pytest.raises(ConfigError, match="latent 3 is out of range: the SAE has 3 latents"):
        feature_contexts(synthetic.record, sampler, [3], 1, 1)
