from collections.abc import Sequence

import numpy as np

from saelab.interp.examples import Example, LatentExamples, TokenText
from saelab.interp.explainers import baseline_explanation, explain_latents
from saelab.interp.llm import ChatClient, ChatReply, ChatRequest


class ScriptedClient(ChatClient):
    """Answers with the given texts in order and keeps the requests."""

    model_id = "scripted"

    def __init__(self, texts: Sequence[str]) -> None:
        self.texts = list(texts)
        self.requests: list[ChatRequest] = []

    def complete(self, request: ChatRequest) -> ChatReply:
        self.requests.append(request)
        return ChatReply(self.texts[len(self.requests) - 1], 5, 2)


def test_explanations_from_marked_training_examples(word_tokenizer) -> None:
    ids = tuple(word_tokenizer("w1 w7 w2 w7")["input_ids"])
    train = [Example(0, "top", 0, 0, ids, (0.0, 8.0, 0.0, 2.0))]
    latents = [LatentExamples(0, 8.0, train, [], []), LatentExamples(1, 8.0, train, [], [])]
    client = ScriptedClient(["Explanation: the word w7", "   "])
    explanations = explain_latents(client, latents, TokenText(word_tokenizer), max_tokens=30)
    assert [(e.latent, e.text) for e in explanations] == [(0, "the word w7"), (1, None)]
    assert {e.source for e in explanations} == {"scripted"}
    user = client.requests[0].messages[-1][1]
    assert "Excerpt 1: w1 <<w7>> w2 <<w7>>\nActivating tokens: 'w7' (10), 'w7' (3)" in user
    assert client.requests[0].max_tokens == 30


def test_baseline_explanation_names_the_most_frequent_activating_tokens(word_tokenizer) -> None:
    text = TokenText(word_tokenizer)
    w = {f"w{i}": word_tokenizer.convert_tokens_to_ids(f"w{i}") for i in range(10)}
    ids = np.array([w["w7"]] * 5 + [w["w3"]] * 3 + [w["w1"]])
    explanation = baseline_explanation(4, ids, text, n_tokens=2)
    assert (explanation.latent, explanation.text, explanation.source) == (4, 'the tokens "w7", "w3"', "baseline")
    assert baseline_explanation(4, np.zeros(0, np.int64), text).text is None
